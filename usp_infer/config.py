"""Frozen configuration objects, validated once at the CLI edge."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .guidance import GuidanceConfig

A2AMode = Literal["direct", "functional"]
A2A_MODES: tuple[str, ...] = ("direct", "functional")
QUANTIZE_METHODS: tuple[str, ...] = ("none", "fp8")  # --quantize (quant.py)


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of the (cfg, ring, ulysses) mesh; their product is the world size."""

    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    a2a_mode: A2AMode = "direct"
    timeout_s: float = 600.0  # collective timeout: a dead rank must not hang the others forever
    auto: bool = False  # --layout auto, no degree flag: the cost model picks the degrees once the request is known
    choice: dict | None = field(default=None, compare=False)  # what the cost model predicted (for the sidecar)

    def __post_init__(self) -> None:
        for flag, degree in (("--cfg-parallel", self.cfg), ("--ring-degree", self.ring), ("--ulysses-degree", self.ulysses)):
            if degree < 1:
                raise ValueError(f"{flag} {degree} must be at least 1")
        if self.a2a_mode not in A2A_MODES:
            raise ValueError(f"--a2a-mode {self.a2a_mode!r} is unknown; use one of {', '.join(A2A_MODES)}")
        if not self.timeout_s > 0:
            raise ValueError(f"--dist-timeout {self.timeout_s} must be positive (seconds)")

    @property
    def world_size(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def seq_degree(self) -> int:
        return self.ring * self.ulysses


BRANCH_MODES: tuple[str, ...] = ("batched", "sequential")


def pick_device(name: str) -> str:
    """--device auto -> "cuda" where torch sees a GPU, else "cpu"; any other name as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_video(req) -> None:
    """What every family's request must hold: sizes the VAEs' 32x / 8x compression takes, steps, fps, branches."""
    if req.height <= 0 or req.height % 32:
        raise ValueError(f"--height {req.height} is not a positive multiple of 32; try {max(32, round(req.height / 32) * 32)}")
    if req.width <= 0 or req.width % 32:
        raise ValueError(f"--width {req.width} is not a positive multiple of 32; try {max(32, round(req.width / 32) * 32)}")
    if req.num_frames < 1 or (req.num_frames - 1) % 8:
        near = max(1, round((req.num_frames - 1) / 8) * 8 + 1)
        raise ValueError(f"--num-frames {req.num_frames} is not of the form 8k+1; try {near}")
    if req.steps <= 0:
        raise ValueError(f"--steps {req.steps} must be at least 1")
    if not math.isfinite(req.fps) or req.fps <= 0:
        raise ValueError(f"--fps {req.fps} must be a positive number")
    if req.branches not in BRANCH_MODES:
        raise ValueError(f"--branches {req.branches!r} is unknown; use one of {', '.join(BRANCH_MODES)}")


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: everything that decides the video, after presets and defaults."""

    prompt: str
    negative_prompt: str = ""
    height: int = 480
    width: int = 704
    num_frames: int = 121
    fps: float = 25.0
    steps: int = 40
    seed: int = 0
    max_sequence_length: int = 128
    decode_timestep: float = 0.05
    decode_noise_scale: float = 0.025
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    image: str | None = None
    image_strength: float = 1.0
    branches: str = "batched"

    def __post_init__(self) -> None:
        check_video(self)
        if self.max_sequence_length <= 0:
            raise ValueError(f"--max-sequence-length {self.max_sequence_length} must be at least 1")
        for flag, value in (("--decode-timestep", self.decode_timestep), ("--decode-noise-scale", self.decode_noise_scale)):
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{flag} {value} is invalid; use a value in [0, 1]")
        if not math.isfinite(self.image_strength) or not 0.0 <= self.image_strength <= 1.0:
            raise ValueError(f"--image-strength {self.image_strength} is invalid; use a value in [0, 1]")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed {self.seed} is out of range; use 0 <= seed < 2**63")


@dataclass(frozen=True)
class Session:
    """How one run (generate, or a batch) is carried out: the model, the layout, what may be replaced."""

    model: Path
    device: str
    dtype: str | None
    parallel: ParallelConfig
    overwrite: bool = False
    resume: bool = False
    keep_going: bool = False
    quiet: bool = False
    json_summary: bool = False
    debug: bool = False
    compile: bool = False
    cuda_graphs: bool = False  # replay the block loops as CUDA graphs where the layout allows (graphs.py)
    vae_tiling: bool = False  # decode in tiles even when a full decode would fit
    quantize: str = "none"  # QUANTIZE_METHODS: fp8 = the transformer blocks' linears in e4m3 (quant.py)
    batch: bool = False  # print the "done: ..." line
