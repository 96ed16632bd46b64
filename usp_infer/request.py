"""Flags and batch-line keys -> one validated request of the model's family (explicit values > preset >
defaults). `build_request` is the LTX-Video family's; `build_for` dispatches by family."""

from __future__ import annotations

import os
from dataclasses import fields

from .config import GenerateRequest
from .families import ALL_FLAGS, FAMILIES, Family
from .guidance import PRESETS, GuidanceConfig


class UsageError(Exception):
    """A bad flag or input: exit code 2, nothing written."""


# --- option parsing -----------------------------------------------------------------------------


def parse_floats(flag: str, text: str | float | int | list) -> tuple[float, ...]:
    """'3' or '1,1,6,8' (or a JSON number/list from a batch line) -> (floats)."""
    items = text if isinstance(text, list) else str(text).split(",")
    try:
        return tuple(float(x) for x in items)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a number or a comma-separated list of numbers") from None


def parse_blocks(text: str | int | list) -> tuple[tuple[int, ...], ...]:
    """'19' or '11,25,35' (one set) or '11,25;22,35;28' (one set per guidance interval)."""
    if isinstance(text, int):
        return ((text,),)
    if isinstance(text, list):
        return (tuple(int(b) for b in text),)
    try:
        sets = tuple(tuple(int(b) for b in part.split(",") if b.strip()) for part in str(text).split(";"))
    except ValueError:
        raise UsageError(f"--stg-blocks {text!r} must be block indices like 19 or 11,25 or 11,25;22,35") from None
    if any(b < 0 for blocks in sets for b in blocks):
        raise UsageError(f"--stg-blocks {text!r} has a negative block index")
    return sets


# Flag name (as snake case, also the key of a batch line) -> how it becomes a request field.
GUIDANCE_FLAGS = {
    "guidance_scale": ("cfg", lambda v: parse_floats("--guidance-scale", v)),
    "stg_scale": ("stg", lambda v: parse_floats("--stg-scale", v)),
    "guidance_rescale": ("rescale", lambda v: parse_floats("--guidance-rescale", v)),
    "stg_blocks": ("stg_blocks", parse_blocks),
    "stg_mode": ("stg_mode", str),
    "cfg_star": ("cfg_star", bool),
    "guidance_timesteps": ("timesteps", lambda v: parse_floats("--guidance-timesteps", v) if v != "" else ()),
}
REQUEST_FLAGS = {
    "prompt", "negative_prompt", "height", "width", "num_frames", "fps", "steps", "seed",
    "max_sequence_length", "decode_timestep", "decode_noise_scale", "image", "image_strength", "branches",
}
ITEM_KEYS = ALL_FLAGS | {"output"}  # what a batch line may hold
GUIDANCE_DEFAULTS = {f.name: f.default for f in fields(GuidanceConfig)}  # the one set of defaults


def build_request(options: dict) -> GenerateRequest:
    """Flags (None = not given) -> one validated request: explicit flags > preset > defaults."""
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(options.get("image"), str):
        options["image"] = os.path.expanduser(options["image"])  # "~/a.png" from a batch line or a quoted flag
    if "num_inference_steps" in options:
        options.setdefault("steps", options.pop("num_inference_steps"))
    preset_name = options.pop("preset", None)
    if preset_name is not None and preset_name not in PRESETS:
        raise UsageError(f"--preset {preset_name!r} is unknown; use one of {', '.join(PRESETS)}")
    preset = PRESETS.get(preset_name, {})
    guidance = {k: preset.get(k, v) for k, v in GUIDANCE_DEFAULTS.items()}
    for flag, (field_name, parse) in GUIDANCE_FLAGS.items():
        if flag in options:
            guidance[field_name] = parse(options.pop(flag))
    if "steps" not in options and "steps" in preset:
        options["steps"] = preset["steps"]
    try:
        return GenerateRequest(guidance=GuidanceConfig(**guidance), **options)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except TypeError as e:
        raise UsageError(f"bad option: {e}") from None


# --- the shared run: generate is a batch of one -------------------------------------------------


def build_for(options: dict, family: Family, configs: dict, model: object) -> object:
    """Flags -> the request of `family`'s pipeline; a flag only another family takes is refused by name."""
    given = {k for k, v in options.items() if v is not None}
    foreign = family.foreign_flag(given)
    if foreign is not None:
        flag = "--no-audio" if foreign == "audio" else "--" + foreign.replace("_", "-")
        owner = next(f.name for f in FAMILIES if foreign in f.flags)
        raise UsageError(f"{flag} is a flag of {owner} models, but {model} is an {family.name} model; "
                         f"drop the flag or pass an {owner} folder")
    return family.requests().build_request(options, configs)
