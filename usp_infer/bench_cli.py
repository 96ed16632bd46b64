"""`usp-infer bench`'s flags, without torch: `bench --help` and a bad flag answer at once; the run imports bench."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

# bench.SHAPES' names (a test holds them equal): listing them here keeps torch out of --help.
SHAPES = ("ltx-video-2b", "ltx-video-13b", "ltx-tiny", "ltx-2-19b", "ltx-2.3-22b", "ltx2-tiny")


def bench_command(
    shape: str = typer.Option("ltx-video-13b", help=f"Model shape, random weights: {', '.join(SHAPES)}."),
    height: int = typer.Option(512, help="Pixels, a multiple of 32."),
    width: int = typer.Option(768, help="Pixels, a multiple of 32."),
    num_frames: int = typer.Option(121, help="Frames, 8k+1; tokens = ((F-1)/8+1) x H/32 x W/32."),
    branches: Optional[int] = typer.Option(None, help="Guidance branches per step: 1 cond, 2 + uncond (CFG), 3 + STG, "
                                           "4 + modality-isolated (LTX-2) [default: all of the shape's family]."),
    branch_mode: str = typer.Option("batched", help="batched (one forward) | sequential (one per branch)."),
    ulysses_degree: Optional[int] = typer.Option(None, help="Ulysses degree [default: world / (cfg x ring)]."),
    ring_degree: int = typer.Option(1, help="Ring-attention degree."),
    cfg_parallel: int = typer.Option(1, "--cfg-parallel", "--cfg-degree",
                                     help="Spread the branches over this many rank groups."),
    layouts: Optional[str] = typer.Option(None, "--layouts", help="Several layouts in one launch: 'all' (every "
                                          "one that fits the world) or 'CxRxU,...', e.g. 1x1x4,1x2x2."),
    a2a_mode: str = typer.Option("direct", help="direct | functional | both (ratios from the same launch)."),
    comm_share: bool = typer.Option(False, help="Also time each Ulysses configuration with its exchanges "
                                                "replaced by local copies: the difference is their share."),
    compile: bool = typer.Option(False, "--compile", help="Also time each configuration with torch.compile'd "
                                                          "blocks (the exchanges stay eager)."),
    warmup: int = typer.Option(2, help="Untimed steps first (compilation happens here)."),
    steps: int = typer.Option(5, help="Timed steps; the median is reported."),
    baseline: str = typer.Option("none", help="none | diffusers: also time diffusers' transformer "
                                              "(LTX-Video: with enable_parallelism(ContextParallelConfig(ulysses_degree=N)); "
                                              "LTX-2: one GPU, called as LTX2Pipeline calls it, and all branches batched)."),
    image: bool = typer.Option(False, "--image", help="Time image-to-video steps (per-token timesteps) instead."),
    json_out: Optional[Path] = typer.Option(None, help="Write the records (a JSON list) here (rank 0)."),
    profile: Optional[Path] = typer.Option(None, help="Profile one extra step of each configuration; "
                                                      "each rank writes its kernel tables into this folder."),
    device: str = typer.Option("auto", help="auto | cuda | cpu."),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float16 | float32."),
    dist_timeout: float = typer.Option(600.0, help="Seconds a collective may wait before the run fails."),
    seed: int = typer.Option(0, help="Weight seed (the same on every rank)."),
    recipe: Optional[str] = typer.Option(None, help="LTX-2: time whole generations instead, by phase (stage 1, "
                                         "upsample, stage 2, decodes, mp4): one-stage, distilled, two-stage, "
                                         "two-stage-distilled, a comma list or 'all'; --height/--width are the "
                                         "output's; the dev recipe takes the weights' steps (one process)."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Time each one-GPU or cfg-parallel "
                                     "configuration (with --recipe: each recipe) again with the block loop replayed "
                                     "as a CUDA graph (generate --cuda-graphs), in the same launch; CUDA only."),
    quantize: str = typer.Option("none", help="fp8 | fp8,fp8-static | fp8,fp8-kernel,fp8-static: after the "
                                 "model-dtype rows, swap the blocks' linears for float8 ones (quant.py) and time "
                                 "every configuration again, in the same launch; fp8-kernel: per-row scales from the "
                                 "Triton kernel inside compiled blocks too (not Inductor's fused ops); fp8-static "
                                 "first calibrates static input scales on one step (with --recipe: on one eager run "
                                 "of each recipe), as `quantize --calibrate` does."),
) -> None:
    """Time denoising steps of a full-size LTX transformer (random weights) on this world's GPUs.

    Examples:

      usp-infer bench --shape ltx-video-13b --warmup 2 --steps 5

      torchrun --nproc_per_node 4 -m usp_infer bench --layouts all --a2a-mode both --json-out r.json
    """
    options = dict(locals())  # the flags, before the import below adds a name
    from .bench import run

    run(**options)
