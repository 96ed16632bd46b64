"""Peak memory per rank on CPU (gloo): what each rank of a torchrun job holds, measured as max RSS.

    python bench/memory_cpu.py make MODEL_DIR       # a small model with the 13B's component proportions
    torchrun --nproc_per_node N bench/memory_cpu.py run -- generate --model MODEL_DIR --prompt x ... -o x.npz

`make` writes the tiny pipeline with wider parts: transformer 8 x 128 heads, 8 layers (~0.5 GiB fp32);
T5 width 1024, 4 layers (~0.2 GiB); the tiny VAE. `run` runs the CLI and prints `rank R peak_rss_gib X`
for every rank on exit (the sidecar has the same figures per rank; this works with older code too).
"""

import resource
import sys

if sys.argv[1] == "make":
    import usp_infer.ltx_video.tiny as tiny

    tiny.TEXT_DIM = 1024
    tiny.TRANSFORMER_CONFIG.update(num_attention_heads=8, attention_head_dim=128, cross_attention_dim=1024,
                                   num_layers=8, caption_channels=1024)
    tiny.T5_CONFIG.update(d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=4)
    tiny.make_tiny(sys.argv[2])
else:
    import os

    from usp_infer.cli import main

    sys.argv = [sys.argv[0], *sys.argv[3:]]
    try:
        main()
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"rank {os.environ.get('RANK', '0')} peak_rss_gib {peak:.3f}", file=sys.stderr)
