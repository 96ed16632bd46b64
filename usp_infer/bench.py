"""`usp-infer bench`: time denoising steps of a full-size LTX transformer on any layout; write JSON records.

The transformer is built from a named shape with random weights made on the device (no checkpoint).
A step is `pipeline.Denoiser.step`, the very function `generate` runs per denoising step: the
guidance branches' forward(s) (batched, sequential, or spread over the cfg mesh dimension by the
plan), the guidance combine, the Euler update; then the plan's non-finite check. One launch (torchrun
for N processes) builds the model once and times every configuration asked for (layouts x a2a modes x
eager / compiled), so the ratios between them come from the same run. Rank 0 prints a table and writes JSON.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.distributed as dist
import typer
from torch import Tensor, nn

from .config import A2A_MODES, BRANCH_MODES, GenerateRequest, ParallelConfig, pick_device
from .guidance import GuidanceConfig
from . import quant
from .layers import sdpa_attention
from .ltx2.model import SHAPES as LTX2_SHAPES
from .ltx_video import bench as ltx_video_bench
from .ltx_video.model import SHAPES as LTX_SHAPES
from .ltx_video.model import LTXTransformer
from .parallel.dist import (
    Mesh,
    check_device,
    env_rank,
    env_world_size,
    init_mesh,
    teardown,
    validate_layout,
)
from .parallel.dist import layouts as fitting_layouts
from .parallel.plan import Plan
from .parallel.sharding import SeqShard
from .parallel.usp import Pending, USPAttention

SHAPES = {**LTX_SHAPES, **LTX2_SHAPES}  # LTX-Video shapes (ltx_video/bench.py runs those) and LTX-2's (ltx2/bench.py)


def latent_grid(height: int, width: int, num_frames: int) -> tuple[int, int, int]:
    """(frames, height, width) in latent tokens, as the pipeline computes them (VAE: 8x in time, 32x in space)."""
    return (num_frames - 1) // 8 + 1, height // 32, width // 32




def randomize(model: nn.Module, seed: int) -> None:
    """Fill every parameter in place with draws that keep activations O(1) through the blocks.

    Never zeros: a matmul on zeros runs faster than on real data. The same seed gives every rank the
    same weights, as a loaded checkpoint would.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # RMS-norm gains
                p.fill_(1.0)
            elif "scale_shift_table" in name:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
            elif p.ndim == 2:  # weights: unit-variance outputs for unit-variance inputs
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
            else:  # biases
                p.normal_(0.0, 0.02, generator=gen)




def _workload(s: Setup) -> ModuleType:
    """The family's bench module: its random model, its step, its FLOPs."""
    if s.ltx2:
        from .ltx2 import bench as ltx2_bench

        return ltx2_bench
    return ltx_video_bench


class LocalExchangeAttention(USPAttention):
    """USPAttention whose Ulysses exchanges are local copies of the same bytes: its outputs are wrong, but
    its step time, subtracted from the real one, is the time the exchanges add to a step."""

    def _start(self, x: Tensor, group: dist.ProcessGroup) -> Pending:
        out = x.clone(memory_format=torch.contiguous_format)
        return lambda: out


@dataclass(frozen=True)
class Setup:
    """What stays fixed in one launch."""

    shape: str
    height: int
    width: int
    num_frames: int
    branches: int
    branch_mode: str
    warmup: int
    steps: int
    device: torch.device
    dtype: torch.dtype
    image: bool = False  # image-to-video steps: the first latent frame held at timestep 0 (per-token timesteps)

    @property
    def cfg(self):
        return SHAPES[self.shape]

    @property
    def ltx2(self) -> bool:
        return self.shape in LTX2_SHAPES

    @property
    def grid(self) -> tuple[int, int, int]:
        return latent_grid(self.height, self.width, self.num_frames)

    @property
    def tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w

    def guidance(self) -> GuidanceConfig:
        """1 branch: cond; 2: + uncond (CFG 3); 3: + STG-perturbed (LTX-2B's defaults, its block 19 or the last)."""
        block = min(19, self.cfg.num_layers - 1)
        return GuidanceConfig(cfg=(3.0 if self.branches > 1 else 1.0,), stg=(1.0 if self.branches > 2 else 0.0,),
                              rescale=(0.7,), stg_blocks=((block,),))


@dataclass(frozen=True)
class Case:
    """One timed configuration."""

    layout: tuple[int, int, int]  # cfg, ring, ulysses
    a2a_mode: str
    compiled: bool
    exchange: bool = True  # False: Ulysses exchanges replaced by local copies (the share estimate)
    graphs: bool = False  # the block loop replayed as a CUDA graph (--cuda-graphs; captured in the warm-up)


def _timed(step: Callable[[], None], n: int, device: torch.device) -> list[float]:
    """ms per call of `step`: CUDA events on a GPU (no host sync inside the loop), the host clock on CPU."""
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        marks[0].record()
        for mark in marks[1:]:
            step()
            mark.record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    stamps = [time.perf_counter()]
    for _ in range(n):
        step()
        stamps.append(time.perf_counter())
    return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def _gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's list (all the same length), in rank order."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return [values]
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


def _sync(device: torch.device) -> None:
    """Start a timed region together: every rank's queued work done, then a barrier."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def _peak_and_reset(device: torch.device, reset: bool) -> float:
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def matmul_tflops(device: torch.device) -> tuple[float, float]:
    """(burst, sustained) bf16 matmul rate of this device; model FLOP/s is compared with the burst rate.

    8192^3 on random data, median of 10. Burst: after 3 warm-ups, the usual ceiling. Sustained: after a
    second of back-to-back products, for the record: that load throttles the clock more than a mixed
    denoising step does (on an H200 the step's own GEMMs ran faster than it; bench/NOTES.md).
    """
    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    burst = statistics.median(_timed(lambda: a @ b, 10, device))
    loaded = time.perf_counter() + 1.0
    while time.perf_counter() < loaded:
        _timed(lambda: a @ b, 10, device)  # each call ends in a sync, so this is a second of GPU work
    sustained = statistics.median(_timed(lambda: a @ b, 10, device))
    return tuple(2 * n**3 / (ms / 1e3) / 1e12 for ms in (burst, sustained))


def _measure(step: Callable[[], None], s: Setup) -> tuple[list[float], list[float]]:
    """(per-step ms, the slowest rank's, for each timed step; peak GiB of each rank)."""
    _peak_and_reset(s.device, reset=True)
    for _ in range(s.warmup):
        step()
    _sync(s.device)
    per_rank = _gather_floats(_timed(step, s.steps, s.device), s.device)
    peaks = [row[0] for row in _gather_floats([_peak_and_reset(s.device, reset=False)], s.device)]
    return [max(column) for column in zip(*per_rank)], peaks


def attention_check(mesh: Mesh, shard: SeqShard, case: Case, s: Setup) -> float:
    """Relative error of this layout's USP attention against one-device SDPA over the whole sequence.

    Every rank draws the same q, k, v (B=1, all heads), so each timing comes with evidence that its
    exchanges put every token and head where it belongs (a misplaced chunk gives errors of order 1).
    """
    cfg, device = s.cfg, s.device
    gen = torch.Generator(device).manual_seed(2)
    q, k, v = (torch.randn(1, s.tokens, cfg.num_attention_heads, cfg.attention_head_dim, generator=gen,
                           device=device).to(s.dtype) for _ in range(3))
    out = shard.gather(USPAttention(mesh, shard, case.a2a_mode)(*map(shard.split, (q, k, v))))
    ref = sdpa_attention(q, k, v).float()
    return ((out.float() - ref).norm() / ref.norm()).item()


def _profile(step: Callable[[], None], path: Path) -> None:
    """One more step under torch.profiler; this rank's kernels by device time, as a text table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))


def _run_case(model: nn.Module, s: Setup, case: Case, mesh: Mesh,
              profile_to: Path | None = None) -> tuple[list[float], list[float], bool]:
    plan = Plan(mesh)
    local = None  # the exchange-free variant: Ulysses exchanges replaced by local copies of the same bytes
    if mesh.seq_degree > 1 and not case.exchange:
        local = LocalExchangeAttention(mesh, plan.shard(s.tokens), case.a2a_mode)
    step, state = _workload(s).make_step(model, s, plan, local, case.graphs)
    times, peaks = _measure(step, s)
    if profile_to is not None:
        _profile(step, profile_to)
    return times, peaks, state["finite"]






def _command_line() -> str:
    """How this process was started, as a user would type it (torchrun's own flags are not visible here)."""
    args = shlex.join(sys.argv[1:])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    prefix = f"CUDA_VISIBLE_DEVICES={visible} " if visible is not None else ""
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun sets it
        return f"{prefix}torchrun --nproc_per_node {os.environ['LOCAL_WORLD_SIZE']} -m usp_infer {args}"
    return f"{prefix}usp-infer {args}"


def _environment(device: torch.device, world: int, matmul: list[list[float]]) -> dict:
    """Versions, the GPU, the command and the matmul ceilings (`matmul`: each rank's (burst, sustained))."""
    on_gpu = device.type == "cuda"
    burst, sustained = zip(*matmul)
    return {
        "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
        "gpu_count": world if on_gpu else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if on_gpu else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if on_gpu else None,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "matmul_tflops": statistics.median(burst),
        "matmul_tflops_per_rank": list(burst),
        "matmul_tflops_sustained": statistics.median(sustained),
        "matmul_tflops_sustained_per_rank": list(sustained),
        "command": _command_line(),
    }


def _record(s: Setup, case: Case | None, world: int, times: list[float], peaks: list[float], finite: bool,
            env: dict, implementation: str, text_tokens: int) -> dict:
    ms = statistics.median(times)
    exchange = None
    # the work done: ours skips the perturbed row's blocks before the first STG block where cond shares its
    # batch; diffusers runs every branch's every block
    shares = implementation.startswith("usp-infer")
    cfg_degree = (case.layout[0] if case else 1) if shares else None
    if s.ltx2:
        from .ltx2 import bench as bench_ltx2

        parts = bench_ltx2.step_flops(s.cfg, s, cfg_degree)
        text_tokens = bench_ltx2.TEXT_TOKENS
        exchange = bench_ltx2.v2a_exchange_bytes(s.cfg, s.tokens, bench_ltx2.audio_tokens(s.num_frames), s.branches,
                                                 case.layout[1] * case.layout[2] if case else 1)
    else:
        parts = ltx_video_bench.step_flops(s.cfg, s.tokens, s.branches, text_tokens,
                                           ltx_video_bench.shared_blocks(s, cfg_degree))
    tflops = sum(parts.values()) / (ms / 1e3) / world / 1e12
    cfg_d, ring, uly = case.layout if case else (1, 1, world)
    return {
        "implementation": implementation, "world_size": world, "cfg": cfg_d, "ring": ring, "ulysses": uly,
        "a2a_mode": case.a2a_mode if case else None,
        "compiled": case.compiled if case else False, "cuda_graphs": case.graphs if case else False,
        "shape": s.shape, "height": s.height, "width": s.width,
        "num_frames": s.num_frames, "tokens": s.tokens, "branches": s.branches, "branch_mode": s.branch_mode,
        "image_to_video": s.image, "v2a_exchange_bytes_per_step_per_rank": exchange,
        "dtype": str(s.dtype).removeprefix("torch."), "warmup": s.warmup, "steps": s.steps,
        "ms_per_step": ms, "ms_per_step_all": times, "flops_per_step": sum(parts.values()), "flops_parts": parts,
        "text_tokens": text_tokens, "tflops_per_gpu": tflops, "fraction_of_matmul_rate": tflops / env["matmul_tflops"],
        "fraction_of_sustained_matmul_rate": tflops / env["matmul_tflops_sustained"],
        "peak_mem_gb": max(peaks), "peak_mem_gb_per_rank": peaks, "finite": finite, **env,
    }


def _cases(world: int, s: Setup, chosen: list[tuple[int, int, int]], modes: list[str], compile_too: bool,
           comm_share: bool, graphs_too: bool = False) -> list[Case]:
    """Eager cases first, then compiled ones; a2a modes only where a layout exchanges; the exchange-share
    estimate (exchange=False) once per Ulysses layout, in the first mode; each case again with CUDA graphs
    (graphs_too) where the sequence is whole on every rank."""
    cases = []
    for compiled in (False, True) if compile_too else (False,):
        for lay in chosen:
            for mode in modes if lay[1] * lay[2] > 1 else modes[:1]:
                cases.append(Case(lay, mode, compiled))
                if comm_share and lay[2] > 1 and not compiled and mode == modes[0]:
                    cases.append(Case(lay, mode, compiled, exchange=False))
                if graphs_too and lay[1] * lay[2] == 1:
                    cases.append(Case(lay, mode, compiled, graphs=True))
    return cases


def _parse_layouts(text: str, world: int, s: Setup) -> list[tuple[int, int, int]]:
    """'all' (every layout that fits, cfg at most the branch count) or 'CxRxU,...' (cfg x ring x ulysses)."""
    heads = math.gcd(s.cfg.num_attention_heads, getattr(s.cfg, "audio_num_attention_heads", 0))
    if text == "all":
        return [lay for lay in fitting_layouts(world, heads, None) if lay[0] <= s.branches]
    chosen = []
    for part in text.split(","):
        try:
            cfg_d, ring, uly = (int(n) for n in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--layouts {text!r}: {part!r} is not CxRxU (cfg x ring x ulysses), e.g. 1x2x2") from None
        validate_layout(ParallelConfig(cfg_d, ring, uly), world, heads)
        if cfg_d > s.branches:
            raise ValueError(f"--layouts {part}: cfg {cfg_d} is more than the {s.branches} branches; ranks would idle")
        chosen.append((cfg_d, ring, uly))
    return chosen


def _print_table(records: list[dict]) -> None:
    typer.echo(f"{'impl':<20} {'tokens':>6} {'cfg/ring/uly':>12} {'mode':>10} {'comp':>4} "
               f"{'ms/step':>9} {'TFLOP/s/GPU':>11} {'%matmul':>7} {'peak GB':>7} {'a2a share':>9} {'attn err':>8}")
    for r in records:
        share, err = r.get("a2a_share"), r.get("attention_check_rel_err")
        typer.echo(
            f"{r['implementation'][:20]:<20} {r['tokens']:>6} {r['cfg']}/{r['ring']}/{r['ulysses']:<8} "
            f"{str(r['a2a_mode']):>10} {('yes' if r['compiled'] else 'no') + ('+g' if r.get('cuda_graphs') else ''):>4} "
            f"{r['ms_per_step']:>9.1f} {r['tflops_per_gpu']:>11.1f} {100 * r['fraction_of_matmul_rate']:>6.1f}% "
            f"{r['peak_mem_gb']:>7.1f} {'' if share is None else f'{100 * share:.1f}%':>9} "
            f"{'' if err is None else f'{err:.1e}':>8}"
        )


def _validated(shape: str, height: int, width: int, num_frames: int, branches: int, branch_mode: str,
               a2a_mode: str, baseline: str, warmup: int, steps: int, dtype: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r} is unknown; use one of {', '.join(SHAPES)}")
    GenerateRequest(prompt="bench", height=height, width=width, num_frames=num_frames)  # its size checks
    most = 4 if shape in LTX2_SHAPES else 3
    if not 1 <= branches <= most:
        raise ValueError(f"--branches {branches}: use 1 (cond), 2 (+ uncond), 3 (+ STG perturbed)"
                         + (" or 4 (+ modality-isolated)" if most == 4 else ""))
    if branch_mode not in BRANCH_MODES:
        raise ValueError(f"--branch-mode {branch_mode!r} is unknown; use one of {', '.join(BRANCH_MODES)}")
    if a2a_mode not in (*A2A_MODES, "both"):
        raise ValueError(f"--a2a-mode {a2a_mode!r} is unknown; use {', '.join(A2A_MODES)} or both")
    if baseline not in ("none", "diffusers"):
        raise ValueError(f"--baseline {baseline!r} is unknown; use none or diffusers")
    if warmup < 1 or steps < 1:
        raise ValueError(f"--warmup {warmup} and --steps {steps} must both be at least 1")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"--dtype {dtype!r} is unknown; use bfloat16, float16 or float32")


def _available_memory() -> int:
    """Bytes the kernel could give us now (MemAvailable counts reclaimable cache); free pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_fits_host(s: Setup) -> None:
    """On the CPU the weights live in host memory: refuse a shape that would not fit, before building it."""
    if s.device.type != "cpu":
        return
    from .ltx2.model import LTX2Transformer

    with torch.device("meta"):  # shapes only: nothing is allocated
        params = sum(p.numel() for p in (LTX2Transformer if s.ltx2 else LTXTransformer)(s.cfg).parameters())
    need = params * s.dtype.itemsize
    free = _available_memory()
    if need > free / 2:  # weights, activations and the branches' batch need the other half and more
        raise ValueError(
            f"--shape {s.shape} on the CPU needs {need / 2**30:.1f} GiB of {str(s.dtype).removeprefix('torch.')} weights "
            f"and {free / 2**30:.1f} GiB of memory is free; use --shape ltx-tiny or ltx2-tiny on the CPU, or run on a GPU"
        )


def run(
    shape, height, width, num_frames, branches, branch_mode,
    ulysses_degree, ring_degree, cfg_parallel, layouts, a2a_mode, comm_share,
    compile, warmup, steps, baseline, image, json_out,
    profile, device, dtype, dist_timeout, seed, recipe=None, quantize="none", cuda_graphs=False,
) -> None:
    """Time denoising steps of a full-size LTX transformer (random weights) on this world's GPUs; the flags are
    bench_cli's (a torch-free module, so `usp-infer bench --help` starts fast)."""
    world = env_world_size()
    if cuda_graphs and (device == "cpu" or not torch.cuda.is_available()) and env_rank() == 0:
        typer.echo("note: --cuda-graphs does nothing without CUDA; nothing is timed with graphs", err=True)
    if recipe is not None:
        return _bench_recipes(recipe, shape, height, width, num_frames, device, dtype, seed, json_out, world,
                              compile, quantize, cuda_graphs)
    if cuda_graphs and warmup < 2:
        typer.echo(f"error: --cuda-graphs captures in the second step: use --warmup 2 or more, not {warmup}", err=True)
        raise typer.Exit(2)
    if branches is None:
        branches = 4 if shape in LTX2_SHAPES else 3
    try:
        _validated(shape, height, width, num_frames, branches, branch_mode, a2a_mode, baseline, warmup, steps, dtype)
        check_device(device)  # --device cuda on a CPU-only machine: one line, not torch's traceback
        where = torch.device(pick_device(device))
        s = Setup(shape, height, width, num_frames, branches, branch_mode, warmup, steps, where,
                  getattr(torch, dtype), image)
        _check_fits_host(s)
        if layouts is None:
            layouts = f"{cfg_parallel}x{ring_degree}x{ulysses_degree or world // (cfg_parallel * ring_degree) or 1}"
        chosen = _parse_layouts(layouts, world, s)
        methods = _parse_quantize(quantize, s)
    except (ValueError, RuntimeError) as e:  # RuntimeError: torch.device("bogus")
        if env_rank() == 0:
            typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    modes = list(A2A_MODES) if a2a_mode == "both" else [a2a_mode]
    cases = _cases(world, s, chosen, modes, compile, comm_share, cuda_graphs and where.type == "cuda")
    if compile:  # layouts and modes each compile their own variants; keep them all cached
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(cases) + 8)

    def save(records: list[dict]) -> None:
        # After every configuration: a launch that dies later (a timeout, the baseline) keeps what it measured.
        if env_rank() == 0 and json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            tmp = json_out.with_name(json_out.name + ".tmp")
            tmp.write_text(json.dumps(records, indent=1))
            tmp.replace(json_out)

    try:
        records = _run_all(s, cases, world, baseline, seed, dist_timeout, save, profile, methods)
    finally:
        teardown()
    if env_rank() == 0:
        _print_table(records)


def _bench_recipes(recipe: str, shape: str, height: int, width: int, num_frames: int, device: str,
                   dtype: str, seed: int, json_out: Path | None, world: int, compile: bool = False,
                   quantize: str = "none", cuda_graphs: bool = False) -> None:
    """`--recipe`: whole LTX-2 generations on random components (ltx2/bench_e2e.py), one process; --compile
    compiles the blocks (as generate --compile); --quantize fp8[,fp8-static] adds the same runs with float8
    blocks (then with calibrated static input scales), --cuda-graphs the same runs with the block loops as CUDA
    graphs."""
    from .ltx2 import bench_e2e
    from .ltx2.recipes import check_two_stage_size

    names = list(bench_e2e.RECIPES) if recipe == "all" else recipe.split(",")
    try:
        unknown = [n for n in names if n not in bench_e2e.RECIPES]
        if unknown:
            raise ValueError(f"--recipe {unknown[0]!r} is unknown; use {', '.join(bench_e2e.RECIPES)}, a list or all")
        if shape not in LTX2_SHAPES:
            raise ValueError(f"--recipe runs LTX-2 shapes ({', '.join(LTX2_SHAPES)}), not {shape}")
        if world != 1:
            raise ValueError("--recipe times one process; run it without torchrun")
        if any(n.startswith("two-stage") for n in names):
            check_two_stage_size(height, width)
        _validated(shape, height, width, num_frames, 1, "batched", "direct", "none", 1, 1, dtype)
        where = torch.device(pick_device(device))
        setup = Setup(shape, height, width, num_frames, 1, "batched", 0, 1, where, getattr(torch, dtype))
        methods = _parse_quantize(quantize, setup)
        if "fp8-kernel" in methods:
            raise ValueError("--recipe takes --quantize fp8 and fp8-static; fp8-kernel is a step-bench comparison")
        _check_fits_host(setup)
    except (ValueError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    on_gpu = where.type == "cuda"

    def done(records: list[dict]) -> None:  # after each record: stamped, saved, and its column said
        records[-1].update(gpu=torch.cuda.get_device_name(where) if on_gpu else None, gpu_count=int(on_gpu),
                           torch=torch.__version__, command=_command_line())
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(records, indent=1))
        bench_e2e.print_table(records[-1:], typer.echo)

    records = bench_e2e.bench_recipes(shape, names, height, width, num_frames, where, getattr(torch, dtype),
                                      seed, 1, randomize, compile=compile, quantize=tuple(methods),
                                      cuda_graphs=cuda_graphs and where.type == "cuda", done=done)
    typer.echo("")
    bench_e2e.print_table(records, typer.echo)


def _parse_quantize(text: str, s: Setup) -> list[str]:
    """--quantize 'fp8,fp8-kernel,fp8-static' -> the methods timed after the model-dtype rows, in the order they
    can run (static scales are calibrated on the fp8 model)."""
    order = ("fp8", "fp8-kernel", "fp8-static")
    given = [m for m in text.split(",") if m != "none"]
    bad = [m for m in given if m not in order]
    if bad:
        raise ValueError(f"--quantize {text!r}: {bad[0]!r} is unknown; use none, {', '.join(order)} or a comma list")
    if given and (why := quant.check_device(s.device, s.dtype)):
        raise ValueError(why)
    return [m for m in order if m in given]


def _calibrate(model: nn.Module, s: Setup, case: Case, mesh: Mesh) -> None:
    """Static input scales from one step of this configuration's inputs (each rank from its own tokens)."""
    step, _ = _workload(s).make_step(model, s, Plan(mesh), None)
    with quant.calibrate(model):
        step()


def _run_all(s: Setup, cases: list[Case], world: int, baseline: str, seed: int, timeout_s: float,
             save: Callable[[list[dict]], None], profile_dir: Path | None, methods: list[str] = ()) -> list[dict]:
    meshes: dict[tuple[int, int, int], Mesh] = {}
    # One mesh per layout: the default group is joined once and reused; a2a mode is a per-case choice.
    first = cases[0].layout
    meshes[first] = init_mesh(ParallelConfig(*first, timeout_s=timeout_s), str(s.device))
    device = meshes[first].device
    s = replace(s, device=device)
    matmul = _gather_floats(list(matmul_tflops(device)), device)
    env = _environment(device, world, matmul)
    model = _workload(s).random_model(s.cfg, device, s.dtype, seed, randomize)
    eager_blocks = compiled_blocks = model.transformer_blocks
    if any(case.compiled for case in cases):  # the same modules, each behind its own compiled frame
        compiled_blocks = nn.ModuleList(torch.compile(block) for block in eager_blocks)
    records: list[dict] = []
    with torch.no_grad():
        for method in ("none", *methods):  # the model dtype's rows first, then the same cases quantized
            if method != "none":
                model.transformer_blocks = eager_blocks
                if not quant.is_quantized(model):
                    quant.quantize_(model)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                # fp8-kernel: per-row scales from the Triton kernel inside compiled blocks too (quant.COMPILED_KERNEL)
                quant.COMPILED_KERNEL = method == "fp8-kernel"
                if method == "fp8-static":
                    _calibrate(model, s, cases[0], meshes[cases[0].layout])
                if any(case.compiled for case in cases):  # new modules inside: compile afresh
                    torch._dynamo.reset()
                    compiled_blocks = nn.ModuleList(torch.compile(block) for block in eager_blocks)
            weight_gib = quant.weight_bytes(model) / 2**30
            for case in cases:
                if case.layout not in meshes:
                    meshes[case.layout] = init_mesh(ParallelConfig(*case.layout, timeout_s=timeout_s), str(device))
                model.transformer_blocks = compiled_blocks if case.compiled else eager_blocks
                mesh = meshes[case.layout]
                label = (f"w{world}-{'x'.join(map(str, case.layout))}-{case.a2a_mode}{'' if method == 'none' else '-' + method}"
                         f"{'-compiled' if case.compiled else ''}{'' if case.exchange else '-local'}-rank{mesh.rank}.txt")
                profile_to = profile_dir / label if profile_dir else None
                times, peaks, finite = _run_case(model, s, case, mesh, profile_to)
                # The text mask keeps PROMPT_TOKENS positions; the transformer drops the trailing pads.
                implementation = "usp-infer" if method == "none" else f"usp-infer-{method}"
                record = _record(s, case, world, times, peaks, finite, env, implementation,
                                 ltx_video_bench.PROMPT_TOKENS)
                record.update(quantize=method, weight_gib_per_rank=weight_gib)
                if mesh.seq_degree > 1 and case.exchange:
                    record["attention_check_rel_err"] = attention_check(mesh, SeqShard.for_mesh(s.tokens, mesh), case, s)
                if case.exchange:
                    records.append(record)
                else:  # attach the estimate to the real configuration just timed
                    real = records[-1]
                    real["ms_per_step_local_exchange"] = record["ms_per_step"]
                    real["a2a_share"] = 1 - record["ms_per_step"] / real["ms_per_step"]
                save(records)
        model.transformer_blocks = eager_blocks
        quant.COMPILED_KERNEL = False
    if baseline == "diffusers":
        del model, eager_blocks, compiled_blocks
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if s.ltx2:
            import diffusers

            from .ltx2 import bench as bench_ltx2

            if world > 1:  # its LTX-2 context-parallel plan is LTX-Video's copy (diffusers issue #14316)
                records.append({"implementation": "diffusers", "world_size": world, "note": "not run: diffusers "
                                "0.42's LTX-2 context parallelism is broken; one-GPU baseline only"})
                save(records)
                return records
            for mode, times, peaks, finite in bench_ltx2.diffusers_cases(s, seed, randomize, lambda f: _measure(f, s)):
                record = _record(s, None, world, times, peaks, finite, env, f"diffusers-{mode}", bench_ltx2.TEXT_TOKENS)
                record["note"] = (f"diffusers {diffusers.__version__} LTX2VideoTransformer3DModel, "
                                  + ("called as LTX2Pipeline calls it: CFG pair, STG pass, modality pass"
                                     if mode == "pipeline" else "all branches as rows of one call"))
                records.append(record)
                save(records)
            return records
        times, peaks, finite, version, try_mask = ltx_video_bench.diffusers_case(s, world, seed, randomize,
                                                                                 lambda f: _measure(f, s))
        record = _record(s, None, world, times, peaks, finite, env, "diffusers", ltx_video_bench.TEXT_TOKENS)  # no mask
        record["note"] = f"{version}; timed without the text mask; with it: (not tried yet)"
        records.append(record)
        save(records)
        record["note"] = f"{version}; timed without the text mask; with it: {try_mask()}"
        save(records)
    return records
