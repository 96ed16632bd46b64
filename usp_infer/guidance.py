"""Guidance: which branches a step needs, and how their predictions combine.

With c = cond, u = uncond, p = perturbed (STG) predictions, as the LTX-Video authors define it:

    CFG-star   u <- alpha * u,  alpha = <c, u> / ||u||^2           (per sample)
    CFG        pred = c + (cfg - 1) * (c - u)                       (= u + cfg * (c - u))
    STG        pred = pred + stg * (c - p)
    rescale    pred = pred * (r * std(c) / std(pred) + (1 - r))     (per sample)

Rescale applies whenever r != 0, on CFG-only steps too: that is diffusers' guidance_rescale in its LTX
pipelines. LTX-Video's own pipeline rescales only inside its STG branch (STG on); its presets below give
rescale with STG, so they are unaffected, but `--guidance-rescale` with `--stg-scale 0` rescales here.

Every scale may be a per-step schedule: one value per interval of `guidance_timesteps`
thresholds (sigmas in [0, 1], descending), selected exactly as the LTX-Video pipeline does.
The statistics (dot products, norms, std) span the whole sequence: they go through a
`SeqStats`, which under sequence parallelism reduces over the sequence group, pads excluded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # tensors only flow through: the CLI imports the configs here without loading torch
    import torch

STG_MODES = ("values", "skip", "residual", "block")


class SeqStats(Protocol):
    """Global sums over the token dimension (dim 1); sharding.SeqShard implements it."""

    def sum(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor: ...


class LocalStats:
    """Single-process statistics: the whole sequence is here and has no pads."""

    def sum(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x.sum(dim=dim)


def _sample_sum(x: torch.Tensor, stats: SeqStats) -> torch.Tensor:
    """Sum of a (B, S, C) tensor per sample over tokens and channels -> (B, 1, 1)."""
    return stats.sum(x.sum(dim=2, keepdim=True), dim=1).view(-1, 1, 1)


def _sample_std(x: torch.Tensor, stats: SeqStats, count: int) -> torch.Tensor:
    """Unbiased std per sample over all tokens and channels, like torch.std (two passes for accuracy)."""
    mean = _sample_sum(x, stats) / count
    return (_sample_sum((x - mean).square(), stats) / (count - 1)).sqrt()


@dataclass(frozen=True)
class StepScales:
    """The guidance values in force at one denoising step."""

    cfg: float
    stg: float
    rescale: float
    cfg_star: bool
    stg_blocks: tuple[int, ...]

    @property
    def branches(self) -> tuple[str, ...]:
        """Branches this step needs, in the order they are batched (diffusers puts uncond first)."""
        names = ("uncond",) if self.cfg != 1.0 else ()
        names += ("cond",)
        if self.stg != 0.0 and self.stg_blocks:
            names += ("perturbed",)
        return names


@dataclass(frozen=True)
class GuidanceConfig:
    """Guidance settings; each scale is one value or a schedule over `timesteps`."""

    cfg: tuple[float, ...] = (3.0,)
    stg: tuple[float, ...] = (0.0,)
    rescale: tuple[float, ...] = (0.0,)
    stg_blocks: tuple[tuple[int, ...], ...] = ((19,),)
    stg_mode: str = "values"
    cfg_star: bool = False
    timesteps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("cfg", "stg", "rescale", "stg_blocks"):
            values = getattr(self, name)
            if len(values) == 0:
                raise ValueError(f"--{name.replace('_', '-')} is empty; give at least one value")
            if len(values) > 1 and len(values) != len(self.timesteps):
                raise ValueError(
                    f"--{name.replace('_', '-')} has {len(values)} values but --guidance-timesteps has "
                    f"{len(self.timesteps)}; give one value, or one per threshold"
                )
        for name in ("cfg", "stg", "rescale"):
            for v in getattr(self, name):
                if not math.isfinite(v) or v < 0:
                    flag = "--guidance-scale" if name == "cfg" else f"--{name}-scale" if name == "stg" else "--guidance-rescale"
                    raise ValueError(f"{flag} {v} is invalid; use a finite value >= 0")
        if self.stg_mode not in STG_MODES:
            raise ValueError(f"--stg-mode {self.stg_mode!r} is unknown; use one of {', '.join(STG_MODES)}")
        if any(not 0.0 <= t <= 1.0 for t in self.timesteps) or list(self.timesteps) != sorted(self.timesteps, reverse=True):
            raise ValueError(
                f"--guidance-timesteps {list(self.timesteps)} must be sigmas in [0, 1] in descending order"
            )

    def max_block(self) -> int:
        """The highest block STG perturbs at any step (-1 if STG is never on)."""
        n = max(len(self.stg), len(self.stg_blocks))
        pairs = ((self.stg[i % len(self.stg)], self.stg_blocks[i % len(self.stg_blocks)]) for i in range(n))
        return max((b for scale, blocks in pairs if scale != 0.0 for b in blocks), default=-1)

    def at(self, sigma: float) -> StepScales:
        """The scales for a step at noise level `sigma` (LTX-Video's threshold mapping)."""
        index = 0
        if self.timesteps:
            hits = [i for i, threshold in enumerate(self.timesteps) if threshold <= sigma]
            index = hits[0] if hits else len(self.timesteps) - 1

        def pick(values):
            return values[index] if len(values) > 1 else values[0]

        return StepScales(pick(self.cfg), pick(self.stg), pick(self.rescale), self.cfg_star, pick(self.stg_blocks))


# --- the terms: each is a small object with one method ----------------------------------------


class CFGStar:
    """Scale the unconditional prediction by its projection coefficient onto the conditional one."""

    def apply(self, preds: dict[str, torch.Tensor], stats: SeqStats) -> None:
        c, u = preds["cond"], preds["uncond"]
        alpha = _sample_sum(c * u, stats) / (_sample_sum(u * u, stats) + 1e-8)
        preds["uncond"] = alpha * u


class CFG:
    def contribution(self, preds: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        return (scale - 1.0) * (preds["cond"] - preds["uncond"])


class STG:
    def contribution(self, preds: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        return scale * (preds["cond"] - preds["perturbed"])


class Rescale:
    """Pull the guided prediction's std back towards the conditional one's."""

    def apply(self, pred: torch.Tensor, cond: torch.Tensor, r: float, stats: SeqStats, count: int) -> torch.Tensor:
        factor = _sample_std(cond, stats, count) / _sample_std(pred, stats, count)
        return pred * (r * factor + (1.0 - r))


@dataclass
class Guider:
    """Combines one step's branch predictions; `count` is the global number of values per sample."""

    stats: SeqStats = field(default_factory=LocalStats)
    count: int = 0

    def combine(self, preds: dict[str, torch.Tensor], scales: StepScales) -> torch.Tensor:
        preds = dict(preds)
        if "uncond" in preds and scales.cfg_star:
            CFGStar().apply(preds, self.stats)
        if "uncond" not in preds and "perturbed" not in preds:
            return preds["cond"]
        pred = preds["cond"]
        if "uncond" in preds:
            pred = pred + CFG().contribution(preds, scales.cfg)
        if "perturbed" in preds:
            pred = pred + STG().contribution(preds, scales.stg)
        if scales.rescale != 0.0:
            pred = Rescale().apply(pred, preds["cond"], scales.rescale, self.stats, self.count)
        return pred



# Named sets of defaults (LTX-Video's own configs); explicit flags override any of them.
PRESETS: dict[str, dict] = {
    "ltx-video-2b": dict(  # ltxv-2b-0.9.x: fixed scales, STG on block 19
        steps=40, cfg=(3.0,), stg=(1.0,), rescale=(0.7,), stg_blocks=((19,),), stg_mode="values",
        cfg_star=False, timesteps=(),
    ),
    "ltx-video-13b-0.9.8": dict(  # ltxv-13b-0.9.8-dev, first pass: guidance only in a middle band of sigmas
        steps=30,
        cfg=(1.0, 1.0, 6.0, 8.0, 6.0, 1.0, 1.0),
        stg=(0.0, 0.0, 4.0, 4.0, 4.0, 2.0, 1.0),
        rescale=(1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 1.0),
        stg_blocks=((), (11, 25, 35, 39), (22, 35, 39), (28,), (28,), (28,), (28,)),
        stg_mode="values",
        cfg_star=True,
        timesteps=(1.0, 0.996, 0.9933, 0.9850, 0.9767, 0.9008, 0.6180),
    ),
}
