"""One rank's share of a multi-GPU step, timed on one GPU: `usp-infer bench` of any checkout in a loopback world.

    python bench/rank_share.py CODE_DIR --world 4 -- --shape ltx-video-13b --height 512 --width 768 \
        --num-frames 121 --layouts 1x1x4,1x2x2 --json-out r.json

CODE_DIR holds a `usp_infer` package (this checkout: `.`; the 2026-11-28 code: `git archive 8c0ba2b usp_infer |
tar -x -C old`). This process joins a loopback world of `--world` ranks as rank 0 (bench/loopback.py: every
collective is a copy of the same bytes on this device), then runs that code's bench command unchanged: each
record's ms_per_step is rank 0's compute plus byte-equal copies in place of the exchanges, which is what the
cost model's per-rank compute is (usp_infer/parallel/costmodel.py). Outputs are not the multi-GPU ones (each
"peer" is this rank) but finite. The code must reuse an already joined default group (8c0ba2b does).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loopback


def main() -> None:
    ap = argparse.ArgumentParser(usage=__doc__)
    ap.add_argument("code_dir", type=Path)
    ap.add_argument("--world", type=int, required=True)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, bench_args = ap.parse_args(argv[:cut]), argv[cut + 1:]
    os.environ.update(WORLD_SIZE=str(args.world), RANK="0", LOCAL_RANK="0")
    sys.path.insert(0, str(args.code_dir.resolve()))
    loopback.join(args.world)
    import typer

    from usp_infer.bench import bench_command

    app = typer.Typer(add_completion=False)
    app.command()(bench_command)
    typer.main.get_command(app).main(bench_args, prog_name="rank_share.py", standalone_mode=False)


if __name__ == "__main__":
    main()
