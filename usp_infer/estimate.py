"""A rough figure for a run on the CPU, said before it starts: the defaults are GPU-sized (704x480x121 at
40 steps is half a minute even on the tiny model, about a day on LTX-Video 2B), and nothing else warns. No torch:
safetensors headers and JSON.

Denoising cost per step and branch ~ 2 x parameters x tokens (the linear layers) + 4 x layers x tokens^2 x
width (attention scores and values); by that count a 2-core box did 18-32 GFLOP/s in fp32 (the tiny models at
their default sizes: ltx-tiny 19.2 s for 40 steps of 2 branches, ltx2-tiny 1.2 s a step of 4), so the figure
takes 20 and says it is rough.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

CPU_FLOPS = 20e9  # fp32 FLOP/s a small CPU sustains on these shapes (rough)
WORTH_SAYING_S = 20.0  # below this a run is short enough to need no warning


def parameters(folder: Path) -> int:
    """Parameters of a component from its safetensors headers alone (nothing is read past them)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def branch_count(guidance, most: int) -> int:
    """Branches the first step runs: LTX-2's guidance lists them, LTX-Video's per step (at sigma 1)."""
    listed = getattr(guidance, "branches", None)
    if callable(listed):
        return len(listed())
    at = getattr(guidance, "at", None)
    return len(at(1.0).branches) if callable(at) else most


def cpu_note(model: Path, configs: dict, requests: list, most_branches: int) -> str | None:
    """One line (tokens, steps, branches, a rough time) when the run's denoising looks longer than 20 s on the
    CPU; None otherwise. No memory figure: the CPU's attention works in blocks, and the decode's need
    depends on the VAE (LTX-Video's path estimates it and tiles when it would not fit)."""
    t = configs["transformer"]
    params = parameters(model / "transformer")
    width = t.get("num_attention_heads", 32) * t.get("attention_head_dim", 64)
    layers = t.get("num_layers", 28)
    seconds, shown = 0.0, None
    for req in requests:
        tokens = ((req.num_frames - 1) // 8 + 1) * (req.height // 32) * (req.width // 32)
        branches = branch_count(req.guidance, most_branches)
        per_step = branches * (2 * params * tokens + 4 * layers * tokens**2 * width)
        seconds += req.steps * per_step / CPU_FLOPS
        shown = shown or (req, tokens, branches)
    if seconds < WORTH_SAYING_S or shown is None:
        return None
    req, tokens, branches = shown
    what = (f"{req.width}x{req.height}x{req.num_frames} = {tokens:,} video tokens x {req.steps} steps x {branches} "
            f"branches" + (f" (and {len(requests) - 1} more item{'s' if len(requests) > 2 else ''})" if len(requests) > 1 else ""))
    return (f"note: on the CPU {what}: roughly {_duration(seconds)} of denoising; "
            "the defaults are GPU-sized, e.g. --height 64 --width 96 --num-frames 9 --steps 4 is seconds")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
