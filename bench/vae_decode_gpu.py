"""The LTX-2 video VAE's decode on one GPU, by memory format and cuDNN setting (random weights at the released
config, bf16): is channels_last_3d or cuDNN's autotuner worth taking into decode_video?

    python3 bench/vae_decode_gpu.py --out vae.json

Times the first call (what a one-shot `generate` pays, autotuning included) and the median of the next
`--repeat`, for the latents of a 768x512x121 and a 1536x1024x121 output, and the relative L2 difference of
each variant's frames from the default's.
"""

import argparse
import json
import statistics
import time

import torch


def _time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from diffusers import AutoencoderKLLTX2Video

    from usp_infer.ltx2.bench_e2e import RELEASED_VIDEO_VAE

    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Video(**RELEASED_VIDEO_VAE).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    records = []
    for name, (h, w) in (("768x512x121", (16, 24)), ("1536x1024x121", (32, 48))):
        latents = torch.randn(1, 128, 16, h, w, device="cuda", dtype=torch.bfloat16)
        reference = None
        for layout in ("contiguous", "channels_last_3d"):
            for benchmark in (False, True):
                torch.backends.cudnn.benchmark = benchmark
                fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
                vae.to(memory_format=fmt)
                x = latents.contiguous(memory_format=fmt)
                out = {}

                def decode():
                    out["video"] = vae.decode(x, return_dict=False)[0]

                with torch.no_grad():
                    first = _time(decode)
                    times = [_time(decode) for _ in range(args.repeat)]
                video = out["video"].float()
                if reference is None:
                    reference = video
                diff = float((video - reference).norm() / reference.norm())
                rec = {"output": name, "layout": layout, "cudnn_benchmark": benchmark, "first_s": round(first, 3),
                       "median_s": round(statistics.median(times), 3), "all_s": [round(t, 3) for t in times],
                       "rel_l2_vs_default": diff, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
                print(json.dumps(rec), flush=True)
                records.append(rec)
                del video, out
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        del reference
    meta = {"gpu": torch.cuda.get_device_name(), "gpu_count": 1, "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "command": "python3 bench/vae_decode_gpu.py --out " + args.out}
    with open(args.out, "w") as f:
        json.dump({**meta, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
