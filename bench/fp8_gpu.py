"""FP8 on one GPU (issue 25): the parts `usp-infer bench` does not time, as JSON. torch alone (no diffusers).

  python bench/fp8_gpu.py micro  OUT.json   # the activation-quantization kernel vs torch ops; FP8Linear vs bf16
                                            # linear at LTX-2.3's shapes (24,576 rows); the kernel's bits vs torch's
  python bench/fp8_gpu.py errors OUT.json   # relative L2 error vs bf16 of one forward and of a 30-step trajectory's
                                            # final latents, per shape, real-shaped random weights; weight memory

Each result is written as soon as it exists, so a run cut short keeps what it measured. Without CUDA it runs
the same code on tiny shapes on the CPU (a smoke test of this script; its numbers mean nothing).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from usp_infer import kernels, quant
from usp_infer.bench import latent_grid, randomize
from usp_infer.ltx2 import bench as ltx2_bench
from usp_infer.ltx2.model import SHAPES as LTX2_SHAPES
from usp_infer.ltx2.model import rope_tables as ltx2_rope
from usp_infer.ltx_video import bench as ltx_video_bench
from usp_infer.ltx_video.model import SHAPES as LTX_SHAPES
from usp_infer.ltx_video.model import rope_tables as ltx_rope

SMOKE = not torch.cuda.is_available()
DEVICE = torch.device("cpu" if SMOKE else "cuda")
ROWS = 64 if SMOKE else 24_576  # 4 branches x 6,144 video tokens
# LTX-2.3 22B's block linears (in, out): video q/k/v/out, FFN up, FFN down, audio<->video q/out and k/v
LINEARS = [(64, 64), (64, 256)] if SMOKE else [(4096, 4096), (4096, 16384), (16384, 4096), (4096, 2048), (2048, 4096)]
SHAPES = (("ltx2-tiny", "ltx-tiny") if SMOKE else ("ltx-2.3-22b", "ltx-video-13b"))
SIZE = (64, 64, 9) if SMOKE else (512, 768, 121)  # height, width, frames: 6,144 video tokens
STEPS = 3 if SMOKE else 30


def timed(fn, n: int = 10) -> float:
    """Median ms of fn() by CUDA events, after 3 untimed calls."""
    for _ in range(3):
        fn()
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    marks[0].record()
    for m in marks[1:]:
        fn()
        m.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(marks, marks[1:]))


def save(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


def micro(out: Path) -> None:
    results = {"torch": torch.__version__, "gpu": None if SMOKE else torch.cuda.get_device_name(), "rows": ROWS,
               "quantize": [], "linear": []}
    quantize_rows = kernels.quantize_rows_fp8 if kernels.available(torch.empty(0, device=DEVICE)) else \
        quant.quantize_rows_torch  # the smoke run has no Triton kernel
    torch.manual_seed(0)
    compiled_quant = torch.compile(quant.quantize_rows_torch)
    for k in sorted({k for k, _ in LINEARS}):
        x = torch.randn(ROWS, k, device=DEVICE, dtype=torch.bfloat16)
        x[7] = 0  # an all-zero row
        x[9, 3] = float("nan")  # must stay NaN (the interpreter cannot show it: this is its check)
        static = torch.tensor(2.0**-6, device=DEVICE)
        got, ref = quantize_rows(x, None), quant.quantize_rows_torch(x, None)
        row = {"k": k, "bytes": ROWS * k * 3,
               "bits_differ": int((got[0].view(torch.uint8) != ref[0].view(torch.uint8)).sum()),
               "scales_differ": int((got[1] != ref[1]).sum()), "nan_count": int(got[0].float().isnan().sum()),
               "static_bits_differ": int((quantize_rows(x, static)[0].view(torch.uint8)
                                          != quant.quantize_rows_torch(x, static)[0].view(torch.uint8)).sum())}
        x[9, 3] = 0.0
        for name, fn in (("triton_rowwise", lambda: quantize_rows(x, None)),
                         ("triton_static", lambda: quantize_rows(x, static)),
                         ("torch_rowwise", lambda: quant.quantize_rows_torch(x, None)),
                         ("torch_static", lambda: quant.quantize_rows_torch(x, static)),
                         ("compiled_rowwise", lambda: compiled_quant(x, None))):
            ms = timed(fn)
            row[f"{name}_ms"], row[f"{name}_tb_s"] = ms, row["bytes"] / ms / 1e9
        results["quantize"].append(row)
        print(json.dumps(row), flush=True)
        save(out, results)
    for k, n in LINEARS:
        lin = torch.nn.Linear(k, n, device=DEVICE, dtype=torch.bfloat16).requires_grad_(False)
        with torch.no_grad():
            lin.weight.normal_(0, k**-0.5)
        x = torch.randn(ROWS, k, device=DEVICE, dtype=torch.bfloat16)
        fp8 = quant.FP8Linear.from_linear(lin)
        static = quant.FP8Linear.from_linear(lin)
        with quant.calibrate(static):
            static(x)
        qx, sx = quant.quantize_rows_torch(x, None)
        flop = 2 * ROWS * k * n
        row = {"in": k, "out": n}
        with torch.no_grad():
            ref = lin(x).float()
            row["rel_err_rowwise"] = ((fp8(x).float() - ref).norm() / ref.norm()).item()
            row["rel_err_static"] = ((static(x).float() - ref).norm() / ref.norm()).item()
            cases = [("bf16", lambda: lin(x)), ("fp8_rowwise", lambda: fp8(x)), ("fp8_static", lambda: static(x))]
            for fast in (False, True):
                cases.append((f"scaled_mm_only_fast_accum_{fast}", lambda fast=fast: torch._scaled_mm(
                    qx, fp8.weight.t(), scale_a=sx, scale_b=fp8.weight_scale[None], bias=fp8.bias,
                    out_dtype=torch.bfloat16, use_fast_accum=fast)))
            for name, fn in cases:
                ms = timed(fn)
                row[f"{name}_ms"], row[f"{name}_tflops"] = ms, flop / ms / 1e9
        results["linear"].append(row)
        print(json.dumps(row), flush=True)
        save(out, results)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _ltx2_case(shape: str):
    cfg = LTX2_SHAPES[shape]
    model = ltx2_bench.random_model(cfg, DEVICE, torch.bfloat16, 0, randomize)
    grid = latent_grid(*SIZE)
    gen = torch.Generator(DEVICE).manual_seed(1)
    video, audio, text = ltx2_bench._inputs(cfg, grid, SIZE[2], DEVICE, torch.bfloat16, gen)
    rope = ltx2_rope(cfg, *grid, ltx2_bench.FPS, audio.shape[1], DEVICE)
    t_text, a_text, _ = text["cond"]

    def velocity(state: tuple[torch.Tensor, ...], sigma: float) -> tuple[torch.Tensor, ...]:
        s = torch.full((1,), sigma, device=DEVICE)
        return model(state[0].to(torch.bfloat16), state[1].to(torch.bfloat16), t_text, a_text, None, None,
                     s * 1000, s * 1000, s, s, rope)

    return model, (video, audio), velocity


def _ltx_video_case(shape: str):
    cfg = LTX_SHAPES[shape]
    model = ltx_video_bench.random_model(cfg, DEVICE, torch.bfloat16, 0, randomize)
    grid = latent_grid(*SIZE)
    gen = torch.Generator(DEVICE).manual_seed(1)
    tokens = grid[0] * grid[1] * grid[2]
    latents = torch.randn(1, tokens, cfg.in_channels, generator=gen, device=DEVICE)
    text = torch.randn(1, 128, cfg.caption_channels, generator=gen, device=DEVICE).to(torch.bfloat16)
    mask = (torch.arange(128, device=DEVICE) < 24)[None]
    rope = ltx_rope(cfg, *grid, (8 / 25, 32.0, 32.0), DEVICE)

    def velocity(state: tuple[torch.Tensor, ...], sigma: float) -> tuple[torch.Tensor, ...]:
        return (model(state[0].to(torch.bfloat16), text, torch.full((1,), sigma * 1000, device=DEVICE), mask, rope),)

    return model, (latents,), velocity


def trajectory(velocity, start: tuple[torch.Tensor, ...], steps: int = STEPS) -> tuple[torch.Tensor, ...]:
    """Euler steps of the flow from sigma 1 to 0 (fp32 state, as the pipelines keep it)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    state = start
    for s, s_next in zip(sigmas, sigmas[1:]):
        state = tuple(x + (s_next - s) * v.float() for x, v in zip(state, velocity(state, s)))
    return state


def errors(out: Path) -> None:
    results = {"torch": torch.__version__, "gpu": None if SMOKE else torch.cuda.get_device_name(), "shapes": []}
    cases = zip(SHAPES, (_ltx2_case, _ltx_video_case))
    for shape, build in cases:
        started = time.perf_counter()
        model, start, velocity = build(shape)
        row = {"shape": shape, "tokens": start[0].shape[1], "branches": 1, "trajectory_steps": STEPS,
               "weight_gib_bf16": quant.weight_bytes(model) / 2**30}
        with torch.no_grad():
            ref_forward = velocity(start, 0.9)
            ref_final = trajectory(velocity, start)
            quant.quantize_(model)
            if not SMOKE:
                torch.cuda.empty_cache()
            row["weight_gib_fp8"] = quant.weight_bytes(model) / 2**30
            row["weight_fraction"] = row["weight_gib_fp8"] / row["weight_gib_bf16"]
            row["forward_rel_err_rowwise"] = [rel(a, b) for a, b in zip(velocity(start, 0.9), ref_forward)]
            row["trajectory_rel_err_rowwise"] = [rel(a, b) for a, b in zip(trajectory(velocity, start), ref_final)]
            save(out, results | {"shapes": results["shapes"] + [row]})
            with quant.calibrate(model):  # static scales from the inputs of three steps across the schedule
                for sigma in (1.0, 0.5, 0.05):
                    velocity(start, sigma)
            row["forward_rel_err_static"] = [rel(a, b) for a, b in zip(velocity(start, 0.9), ref_forward)]
            row["trajectory_rel_err_static"] = [rel(a, b) for a, b in zip(trajectory(velocity, start), ref_final)]
        row["seconds"] = time.perf_counter() - started
        results["shapes"].append(row)
        print(json.dumps(row), flush=True)
        save(out, results)
        del model, velocity
        if not SMOKE:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    {"micro": micro, "errors": errors}[sys.argv[1]](Path(sys.argv[2]))
