"""Static fp8 input scales from real generations: `usp-infer quantize MODEL OUT --calibrate FILE`.

A static scale spares each float8 linear the reduction over its input's rows (bench/NOTES.md: a four-branch
LTX-2.3 step, compiled, 945.7 -> 883.8 ms on an H100), but it has to cover whatever the layer will see. So the
scales are measured on generations the user names (a batch file: their recipe, sizes, prompts, images, audio),
run as `generate` runs them, in one process, with the transformer already in float8 (each layer sees what the
float8 layers before it hand on), every step and guidance branch, and taken with quant.HEADROOM to spare.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from . import quant
from .config import ParallelConfig
from .families import Family
from .parallel.plan import Plan


def input_scales(model: Path, requests: list, family: Family, device: torch.device, dtype: torch.dtype,
                 say: Callable[[str], None], progress: bool = True) -> dict[str, torch.Tensor]:
    """Layer name -> static input scale, for every float8 linear that the requests' generations reached."""
    pipe = family.pipeline()
    plan = Plan.build(ParallelConfig(), str(device))
    with torch.no_grad():
        texts = pipe.encode_prompts(model, device, dtype, requests)  # the text encoder is freed before the rest loads
        components = pipe.load_components(model, device, dtype, main=True, text_encoder=False)
        components.text_cache = texts
        quant.quantize_(components.transformer)
        with quant.calibrate(components.transformer) as scales:
            for number, request in enumerate(requests, 1):
                say(f"calibrating on generation {number}/{len(requests)}")
                pipe.generate(components, request, plan, progress=progress, say=say)
    return scales
