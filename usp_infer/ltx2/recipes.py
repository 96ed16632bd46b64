"""LTX-2 recipes as people run them: explicit sigma schedules, the distilled presets, two stages, LoRAs.

Plain data and checks, no torch (usage errors stay fast): `Recipe` rides in `LTX2Request.recipe`, so the
sidecar and `--resume` see it; `two_stage.py` runs it. Facts (diffusers 0.42.1, Lightricks' ltx-pipelines):

- the distilled model samples `DISTILLED_SIGMAS` (8 steps, the final 0 implied) with every guidance term off;
- two stages: stage 1 at half the output size, the x2 latent upsampler, stage 2 re-noised to the first of
  `STAGE2_SIGMAS` and run on them (3 steps) with guidance off, usually with a distilled LoRA;
- an explicit sigma list runs as given (Lightricks' loops, and the scheduler diffusers' docs swap in for stage 2:
  `use_dynamic_shifting=False, shift_terminal=None`): the folder's dynamic shift and terminal stretch are for
  the default linspace schedule only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from . import lora

DISTILLED_SIGMAS = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875)
STAGE2_SIGMAS = (0.909375, 0.725, 0.421875)


@dataclass(frozen=True)
class LoraSpec:
    path: str
    strength: float = 1.0


@dataclass(frozen=True)
class Recipe:
    """How a request is sampled beyond its guidance: None / False / () = the one-stage default."""

    sigmas: tuple[float, ...] | None = None  # stage 1's (or the only stage's) list; None: linspace + the shift
    two_stage: bool = False
    upsampler: str | None = None  # the latent upsampler folder (two stages)
    stage2_sigmas: tuple[float, ...] | None = None  # two stages: STAGE2_SIGMAS unless given
    loras: tuple[LoraSpec, ...] = ()  # both stages
    stage2_loras: tuple[LoraSpec, ...] = ()  # stage 2 only, on top of `loras`

    @property
    def name(self) -> str:
        stage1 = "distilled" if self.sigmas == DISTILLED_SIGMAS else "custom-sigmas" if self.sigmas else "default"
        return f"two-stage ({stage1} stage 1)" if self.two_stage else f"one-stage ({stage1})"


# Flags (snake case, also batch keys) a Recipe takes; build_recipe pops them.
OPTIONS = ("sigmas", "two_stage", "upsampler", "stage2_sigmas", "lora", "stage2_lora")


def parse_sigmas(flag: str, value) -> tuple[float, ...]:
    """'1,0.99,0.5' (or a JSON list) -> a strictly decreasing tuple in (0, 1]."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        sigmas = tuple(float(x) for x in items)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} {value!r} is not a comma-separated list of numbers, like 1,0.725,0.421875") from None
    if not sigmas:
        raise ValueError(f"{flag} is empty; give at least one sigma in (0, 1]")
    bad = next((s for s in sigmas if not (math.isfinite(s) and 0 < s <= 1)), None)
    if bad is not None:
        raise ValueError(f"{flag} has {bad:g}, outside (0, 1]; sigmas run from at most 1 down to above 0 "
                         "(the final 0 is implied)")
    for before, after in zip(sigmas, sigmas[1:]):
        if after >= before:
            raise ValueError(f"{flag} must be strictly decreasing, but {after:g} follows {before:g}")
    return sigmas


def parse_lora(flag: str, value) -> LoraSpec:
    """'PATH' or 'PATH:STRENGTH' (a JSON object {"path", "strength"} from a batch line too)."""
    if isinstance(value, dict):
        path, strength = value.get("path"), value.get("strength", 1.0)
    else:
        path, strength = str(value), 1.0
        head, sep, tail = path.rpartition(":")
        if sep and head:
            try:
                strength = float(tail)
                path = head
            except ValueError:
                pass  # a ':' that is part of the path
    if not isinstance(path, str) or not path:
        raise ValueError(f"{flag} {value!r} names no file; use PATH or PATH:STRENGTH")
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"{flag} {value!r}: the strength must be a finite number")
    return LoraSpec(str(Path(path).expanduser()), float(strength))


def _loras(flag: str, value) -> tuple[LoraSpec, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(parse_lora(flag, v) for v in values)


def build_recipe(o: dict, preset_sigmas: tuple[float, ...] | None, configs: dict, model_dir: Path) -> Recipe:
    """Pop the recipe options out of `o` (flags, None = not given) and check them against the folder.
    Sets o["steps"] from a sigma list; ValueError (one line) for bad input."""
    sigmas = parse_sigmas("--sigmas", o.pop("sigmas")) if "sigmas" in o else preset_sigmas
    if sigmas is not None:
        if "steps" in o and o["steps"] != len(sigmas):
            raise ValueError(f"--steps {o['steps']} disagrees with the sigma schedule's {len(sigmas)} steps; "
                             "drop --steps (a schedule sets the step count)")
        o["steps"] = len(sigmas)
    two_stage = bool(o.pop("two_stage", False))
    stage2 = {name: o.pop(name) for name in ("upsampler", "stage2_sigmas", "stage2_lora") if name in o}
    if stage2 and not two_stage:
        given = ", ".join("--" + name.replace("_", "-") for name in stage2)
        raise ValueError(f"{given} only apply with --two-stage; add --two-stage or drop them")
    recipe = Recipe(
        sigmas=sigmas,
        two_stage=two_stage,
        stage2_sigmas=parse_sigmas("--stage2-sigmas", stage2["stage2_sigmas"]) if "stage2_sigmas" in stage2
        else STAGE2_SIGMAS if two_stage else None,
        loras=_loras("--lora", o.pop("lora", None)),
        stage2_loras=_loras("--stage2-lora", stage2.get("stage2_lora")),
    )
    if recipe.loras or recipe.stage2_loras:
        weights = lora.weight_table(model_dir / "transformer")
        for flag, specs in (("--lora", recipe.loras), ("--stage2-lora", recipe.stage2_loras)):
            for spec in specs:
                lora.check(Path(spec.path), weights, flag)
    if two_stage:
        upsampler = Path(stage2.get("upsampler") or model_dir / "latent_upsampler").expanduser()
        check_upsampler(upsampler, configs, given="upsampler" in stage2)
        recipe = replace(recipe, upsampler=str(upsampler))
    return recipe


def check_two_stage_size(height: int, width: int) -> None:
    """Stage 1 runs at half the output size, itself a multiple of 32: the output's sides are multiples of 64."""
    for flag, value in (("--height", height), ("--width", width)):
        if value % 64:
            raise ValueError(f"{flag} {value} is not a multiple of 64, which --two-stage needs (stage 1 runs at half "
                             f"size, a multiple of 32); try {max(64, round(value / 64) * 64)}")


def check_upsampler(folder: Path, configs: dict, given: bool) -> dict:
    """The latent upsampler folder's config, checked: spatial x2, the transformer's latent channels."""
    path = folder / "config.json"
    if not path.is_file():
        if given:
            raise ValueError(f"--upsampler {folder} has no config.json; pass an LTX2LatentUpsamplerModel folder")
        raise ValueError(f"--two-stage needs a latent upsampler, but {folder.parent} has no latent_upsampler/ folder; "
                         "pass --upsampler DIR (an LTX2LatentUpsamplerModel folder)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} holds no *.safetensors weights; copy the latent upsampler again")
    channels = configs["transformer"].get("in_channels")
    spatial = config.get("spatial_upsample", True) and not config.get("temporal_upsample", False)
    scale = config.get("rational_spatial_scale", 2.0) if config.get("use_rational_resampler", True) else 2.0
    if not spatial or scale != 2.0:
        raise ValueError(f"{folder} is not a x2 spatial latent upsampler (spatial_upsample "
                         f"{config.get('spatial_upsample')}, temporal_upsample {config.get('temporal_upsample')}, "
                         f"scale {scale}); --two-stage needs one")
    if config.get("in_channels", 128) != channels:
        raise ValueError(f"{folder} upsamples {config.get('in_channels', 128)}-channel latents, but the transformer's "
                         f"are {channels}-channel; use the upsampler of this model")
    return config


def describe_loras(configs: dict, loras: list, stage2_loras: list) -> list[dict]:
    """What `usp-infer info MODEL --lora ... --stage2-lora ...` lists: each LoRA a run would apply, checked."""
    weights = lora.weight_table(Path(configs["folder"]) / "transformer")
    described = []
    for flag, stage, values in (("--lora", "both stages", loras), ("--stage2-lora", "stage 2", stage2_loras)):
        for spec in _loras(flag, values):
            found = lora.check(Path(spec.path), weights, flag)
            header = lora.read_header(Path(spec.path))
            described.append({"path": spec.path, "strength": spec.strength, "stage": stage, "modules": len(found),
                              "rank": sorted({header[f.a]["shape"][0] for f in found.values()})})
    return described
