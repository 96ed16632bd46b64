"""libx264 with PyAV's slice threads (the default) against frame threads, on this machine's cores: the mp4 write
of the smooth clip `usp-infer bench --recipe` times (with 10 s of stereo audio at 24 kHz), per size, median of
`--repeat` writes in alternation, the file size beside it. Needs PyAV.

    python bench/encode_threads.py --json-out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from usp_infer import media
from usp_infer.ltx2.bench_e2e import smooth_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="768x512x121,1536x1024x121", help="WxHxF list")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            width, height, frames = map(int, size.split("x"))
            clip = np.rint(smooth_clip((frames, height, width, 3)) * 255).astype(np.uint8)
            audio = np.random.default_rng(0).uniform(-0.1, 0.1, (2, 24000 * 10)).astype(np.float32)
            times: dict[str, list[float]] = {"SLICE": [], "FRAME": []}
            sizes = {}
            for _ in range(args.repeat):
                for mode in times:
                    media.X264_THREADS = mode
                    out = Path(tmp) / f"{mode}.mp4"
                    start = time.perf_counter()
                    media.write_video(out, clip, fps=24, overwrite=True, audio=audio,
                                      audio_sample_rate=24000)
                    times[mode].append(time.perf_counter() - start)
                    sizes[mode] = out.stat().st_size
            for mode, seconds in times.items():
                record = {"size": size, "threads": mode, "median_s": statistics.median(seconds), "runs_s": seconds,
                          "bytes": sizes[mode], "cpus": os.cpu_count()}
                records.append(record)
                print(f"{size:>14} {mode:>5}: {record['median_s']:.3f} s (runs {', '.join(f'{t:.3f}' for t in seconds)}),"
                      f" {record['bytes']:,} bytes, {record['cpus']} CPUs", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
