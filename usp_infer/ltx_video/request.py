"""The LTX-Video family's folder checks and requests: configs read and cross-checked before any weights load,
flags -> request; no torch (usage errors stay fast). pipeline.py runs what this validates."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

from ..config import GenerateRequest
from ..errors import UsageError
from ..guidance import PRESETS, GuidanceConfig
from ..request import parse_blocks, parse_floats

# Transformer classes we run, by the `_class_name` diffusers writes into transformer/config.json.
SUPPORTED_TRANSFORMERS = {"LTXVideoTransformer3DModel": "LTX-Video 0.9.x"}


def _check_family(model_dir: Path) -> None:
    """Name the transformer class a folder holds when it is not one we run (Wan, CogVideoX, ...)."""
    try:
        found = json.loads((model_dir / "transformer" / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return  # missing or unreadable: the component checks below say so
    if found is not None and found not in SUPPORTED_TRANSFORMERS:
        supported = ", ".join(f"{family} ({cls})" for cls, family in SUPPORTED_TRANSFORMERS.items())
        raise ValueError(f"--model {model_dir} holds a {found} transformer, but its model_index.json names an "
                         f"LTX-Video pipeline, which runs {supported}; is the folder a mix of two models?")


COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; the model folder must be in diffusers layout (see models/README.md)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def read_model_configs(model_dir: Path) -> dict[str, dict]:
    """Read and cross-check a diffusers-format LTX folder's configs, before any weights load."""
    if not model_dir.is_dir():
        raise ValueError(f"--model {model_dir} is not a directory; pass a diffusers-format LTX folder (see models/README.md)")
    _check_family(model_dir)
    for name in COMPONENTS:
        if not (model_dir / name).is_dir():
            raise ValueError(f"--model {model_dir} has no {name}/ folder; it must be a diffusers-format LTX pipeline")
    configs = {
        "transformer": _read_json(model_dir / "transformer" / "config.json"),
        "vae": _read_json(model_dir / "vae" / "config.json"),
        "text_encoder": _read_json(model_dir / "text_encoder" / "config.json"),
        "scheduler": _read_json(model_dir / "scheduler" / "scheduler_config.json"),
    }
    if (model_dir / "tokenizer" / "tokenizer_config.json").is_file():
        configs["tokenizer"] = _read_json(model_dir / "tokenizer" / "tokenizer_config.json")
    if not any((model_dir / "transformer").glob("*.safetensors")):
        raise ValueError(f"{model_dir / 'transformer'} holds no *.safetensors weights")
    t, v, te = configs["transformer"], configs["vae"], configs["text_encoder"]
    if v.get("latent_channels") != t.get("in_channels") or t.get("in_channels") != t.get("out_channels", t.get("in_channels")):
        raise ValueError(
            f"configs disagree in {model_dir}: vae latent_channels {v.get('latent_channels')} vs transformer "
            f"in_channels {t.get('in_channels')} / out_channels {t.get('out_channels')}; use a matching checkpoint"
        )
    if te.get("d_model") != t.get("caption_channels"):
        raise ValueError(
            f"configs disagree in {model_dir}: text_encoder d_model {te.get('d_model')} vs transformer "
            f"caption_channels {t.get('caption_channels')}; use a matching checkpoint"
        )
    if t.get("patch_size", 1) != 1 or t.get("patch_size_t", 1) != 1:
        raise ValueError(f"{model_dir}: transformer patch sizes other than 1 are not supported")
    return configs


# --- the family surface (families.py) ------------------------------------------------------------


MAX_TEXT_TOKENS = 512  # where the tokenizer names no limit: T5's relative positions were trained up to 512
MAX_BRANCHES = 3  # uncond, cond, STG-perturbed


def attention_heads(configs: dict) -> int:
    return configs["transformer"].get("num_attention_heads", 32)


def num_layers(configs: dict) -> int:
    return configs["transformer"].get("num_layers", 0)


def workload(request: GenerateRequest, configs: dict, a2a_mode: str = "direct", compiled: bool = False):
    """What a step of `request` computes, for the layout chooser (parallel/costmodel.py): the first step's
    branches (a guidance schedule may change them later), the perturbed row computed from the first STG block on
    where it shares a forward with cond."""
    from ..parallel.costmodel import from_config

    scales = request.guidance.at(1.0)
    first = min(scales.stg_blocks) if "perturbed" in scales.branches else None
    return from_config(configs["transformer"], height=request.height, width=request.width,
                       num_frames=request.num_frames, branches=scales.branches,
                       text_tokens=request.max_sequence_length, batched=request.branches == "batched",
                       a2a_mode=a2a_mode, compiled=compiled, stg_first_block=first)


def build_request(options: dict, configs: dict):
    """Flags -> request (request_from_flags), with --stg-blocks checked against the model's depth."""
    req = request_from_flags(options)
    layers, block = num_layers(configs), req.guidance.max_block()
    if block >= layers:
        raise UsageError(f"--stg-blocks {block} is out of range: the model has {layers} blocks (0..{layers - 1})")
    return req


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


GUIDANCE_DEFAULTS = {f.name: f.default for f in fields(GuidanceConfig)}  # the one set of defaults


def request_from_flags(options: dict) -> GenerateRequest:
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
