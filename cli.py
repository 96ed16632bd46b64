"""Run the CLI from a checkout: `torchrun --nproc_per_node N cli.py generate ...`."""

from usp_infer.cli import main

if __name__ == "__main__":
    main()
