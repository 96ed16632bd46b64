"""The LTX-2 family's requests and folder checks: plain data and JSON, no torch (usage errors stay fast).

`LTX2Request` is one generation; `build_request` makes it from flags with the weights' own recipe as the
default; `read_model_configs` checks an LTX-2 folder before any weights load. pipeline_ltx2 runs them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import check_video
from .conditions import check_files, check_request, conditioning_options, input_files  # noqa: F401 - check_files: the family surface
from .recipes import DISTILLED_SIGMAS, Recipe, build_recipe, check_two_stage_size, describe_loras  # noqa: F401

BRANCHES = ("cond", "uncond", "perturbed", "isolated")  # batch row order of a batched call


# --- request --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModalityGuidance:
    """Guidance scales of one modality (video or audio). 1 / 0 / 1 / 0 switch a term off."""

    cfg: float = 1.0
    stg: float = 0.0
    modality: float = 1.0
    rescale: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cfg", "stg", "modality", "rescale"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"guidance {name} {v} is invalid; use a finite value >= 0")


@dataclass(frozen=True)
class LTX2Guidance:
    video: ModalityGuidance = ModalityGuidance(3.0, 1.0, 3.0, 0.7)
    audio: ModalityGuidance = ModalityGuidance(7.0, 1.0, 3.0, 0.7)
    stg_blocks: tuple[int, ...] = (28,)

    def branches(self) -> tuple[str, ...]:
        """The branches a step needs: a term whose scale makes it a no-op for both modalities is skipped."""
        v, a = self.video, self.audio
        names = ["cond"]
        if v.cfg != 1.0 or a.cfg != 1.0:
            names.append("uncond")
        if (v.stg != 0.0 or a.stg != 0.0) and self.stg_blocks:
            names.append("perturbed")
        if v.modality != 1.0 or a.modality != 1.0:
            names.append("isolated")
        return tuple(names)


# The recipes of diffusers' LTX2Pipeline docs / Lightricks' configs; explicit values override them.
PRESETS: dict[str, dict] = {
    "ltx-2.3": dict(steps=30, fps=24.0, guidance=LTX2Guidance()),
    "ltx-2": dict(steps=40, fps=24.0, guidance=LTX2Guidance(stg_blocks=(29,))),
    # The distilled weights' recipe (recipes.py): 8 fixed sigmas, every guidance term off.
    "ltx-2.3-distilled": dict(steps=8, fps=24.0, sigmas=DISTILLED_SIGMAS, guidance=LTX2Guidance(
        ModalityGuidance(), ModalityGuidance(), (28,))),
    "ltx-2-distilled": dict(steps=8, fps=24.0, sigmas=DISTILLED_SIGMAS, guidance=LTX2Guidance(
        ModalityGuidance(), ModalityGuidance(), (29,))),
}


@dataclass(frozen=True)
class LTX2Request:
    """One LTX-2 generation. Validated here; the CLI builds it from flags."""

    prompt: str
    negative_prompt: str = ""
    height: int = 512
    width: int = 768
    num_frames: int = 121
    fps: float = 24.0
    steps: int = 30
    seed: int = 0
    max_sequence_length: int = 1024
    guidance: LTX2Guidance = field(default_factory=LTX2Guidance)
    image: str | None = None  # conditioning first frame (PNG/JPEG path)
    image_crf: int = 33  # H.264 re-compression of the image before encoding; 0 = off (diffusers default 33)
    branches: str = "batched"  # "batched": one transformer call per step; "sequential": one per branch
    audio: bool = True  # False: the audio is denoised (it is one model) but not decoded; the mp4 is silent
    recipe: Recipe = Recipe()  # sigma lists, two stages, LoRAs (recipes.py)
    conditions: tuple = ()  # conditions.Condition: images / clips at frames, LTX2ConditionPipeline's way
    audio_input: str | None = None  # audio-to-video: the sound the video follows
    extend: str | None = None  # a clip this video continues: its last extend_frames frames open the video
    extend_frames: int = 17  # conditions.EXTEND_FRAMES

    def __post_init__(self) -> None:
        check_video(self)
        if self.recipe.two_stage:
            check_two_stage_size(self.height, self.width)
        if not 0 <= self.image_crf <= 51:
            raise ValueError(f"--image-crf {self.image_crf} must be in 0..51 (0 = no re-compression)")
        check_request(self)

    def inputs(self) -> list[dict]:
        """Every file this generation reads, with its role (the sidecar adds each one's sha256)."""
        return input_files(self)


def _read_index(model_dir: Path) -> dict:
    path = model_dir / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; --model must be a diffusers-format LTX-2 folder") from None
    for name in ("transformer", "vae", "audio_vae", "vocoder", "connectors", "text_encoder", "tokenizer", "scheduler"):
        if not isinstance(index.get(name), list) or not (model_dir / name).is_dir():
            raise ValueError(f"{model_dir} has no {name}/ component; it must be an LTX-2 pipeline folder")
    if index["vocoder"][1] not in ("LTX2Vocoder", "LTX2VocoderWithBWE"):
        raise ValueError(f"{model_dir}: vocoder class {index['vocoder'][1]!r} is not an LTX-2 vocoder")
    return index


# --- the family surface (families.py) ------------------------------------------------------------


def read_model_configs(model_dir: Path) -> dict[str, dict]:
    """The folder's component configs, checked before any weights load."""
    _read_index(model_dir)
    configs = {}
    for name, file in (("transformer", "config.json"), ("vae", "config.json"), ("audio_vae", "config.json"),
                       ("vocoder", "config.json"), ("connectors", "config.json"), ("text_encoder", "config.json"),
                       ("scheduler", "scheduler_config.json")):
        path = model_dir / name / file
        try:
            configs[name] = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path} is missing; the model folder must be in diffusers layout") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    tokenizer_config = model_dir / "tokenizer" / "tokenizer_config.json"
    if tokenizer_config.is_file():
        configs["tokenizer"] = json.loads(tokenizer_config.read_text())
    configs["folder"] = str(model_dir)  # where recipes.build_recipe finds the weights a LoRA must fit, the upsampler
    upsampler = model_dir / "latent_upsampler" / "config.json"
    if upsampler.is_file():  # optional: what --two-stage uses by default
        configs["latent_upsampler"] = json.loads(upsampler.read_text())
    if not any((model_dir / "transformer").glob("*.safetensors")):
        raise ValueError(f"{model_dir / 'transformer'} holds no *.safetensors weights")
    t, v, a = configs["transformer"], configs["vae"], configs["audio_vae"]
    if v.get("latent_channels") != t.get("in_channels"):
        raise ValueError(f"configs disagree in {model_dir}: vae latent_channels {v.get('latent_channels')} vs "
                         f"transformer in_channels {t.get('in_channels')}; use a matching checkpoint")
    audio_width = a.get("latent_channels", 0) * a.get("mel_bins", 0) // 4
    if t.get("audio_in_channels") not in (None, audio_width):
        raise ValueError(f"configs disagree in {model_dir}: audio_vae latent_channels x mel_bins / 4 = {audio_width} "
                         f"vs transformer audio_in_channels {t.get('audio_in_channels')}; use a matching checkpoint")
    return configs


MAX_TEXT_TOKENS = 1024  # where the tokenizer names no limit: LTX2Pipeline's (and the connectors') length
MAX_BRANCHES = 4  # cond, uncond, STG-perturbed, modality-isolated


def attention_heads(configs: dict) -> int:
    """A Ulysses degree must divide the video heads; it is held to the audio heads too (32 and 32 in the real
    models), so the audio stream could be split the same way."""
    t = configs["transformer"]
    return math.gcd(t.get("num_attention_heads", 32), t.get("audio_num_attention_heads", 32))


def workload(request: LTX2Request, configs: dict, a2a_mode: str = "direct", compiled: bool = False):
    """What a step of `request` computes, for the layout chooser (parallel/costmodel.py): the guidance's branches
    (STG's only with perturbable weights, as the pipeline runs them), 25 audio tokens a second, the text K/V
    once per prompt, the perturbed row computed from the first STG block on where it shares a forward with cond."""
    from ..parallel.costmodel import from_config

    t = configs["transformer"]
    names = tuple(n for n in request.guidance.branches() if n != "perturbed" or t.get("perturbed_attn", False))
    first = min(request.guidance.stg_blocks) if "perturbed" in names else None
    return from_config(t, height=request.height, width=request.width, num_frames=request.num_frames, branches=names,
                       text_tokens=request.max_sequence_length, batched=request.branches == "batched",
                       audio_tokens=round(request.num_frames / request.fps * 25), text_kv_per_prompt=True,
                       a2a_mode=a2a_mode, compiled=compiled, stg_first_block=first)


def num_layers(configs: dict) -> int:
    return configs["transformer"].get("num_layers", 48)


def version_preset(configs: dict) -> str:
    """The recipe of the weights' version: LTX-2.3 weights modulate the text cross-attention, 2.0's do not."""
    return "ltx-2.3" if configs["transformer"].get("cross_attn_mod") else "ltx-2"


# Flag (snake case, also a batch line's key) -> the ModalityGuidance field it sets, per modality.
_VIDEO_FLAGS = {"guidance_scale": "cfg", "stg_scale": "stg", "modality_scale": "modality", "guidance_rescale": "rescale"}
_AUDIO_FLAGS = {f"audio_{flag}": name for flag, name in _VIDEO_FLAGS.items()}


def build_request(options: dict, configs: dict) -> LTX2Request:
    """Flags (None = not given) -> one validated request: explicit flags > preset > the weights' own recipe."""
    from ..errors import UsageError
    from ..request import parse_blocks, parse_floats

    o = {k: v for k, v in options.items() if v is not None}
    try:
        o = conditioning_options(o)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if "num_inference_steps" in o:
        o.setdefault("steps", o.pop("num_inference_steps"))
    name = o.pop("preset", None) or version_preset(configs)
    if name not in PRESETS:
        raise UsageError(f"--preset {name!r} is not an LTX-2 preset; use one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    try:
        recipe = build_recipe(o, preset.get("sigmas"), configs, Path(configs.get("folder", ".")))  # sets steps from sigmas
    except ValueError as e:
        raise UsageError(str(e)) from None
    o.setdefault("steps", preset["steps"])
    o.setdefault("fps", preset["fps"])

    def scales(flags: dict[str, str], base: ModalityGuidance) -> ModalityGuidance:
        given = {}
        for flag, field_name in flags.items():
            if flag in o:
                values = parse_floats(f"--{flag.replace('_', '-')}", o.pop(flag))
                if len(values) != 1:
                    raise UsageError(f"--{flag.replace('_', '-')} takes one value for LTX-2 models (no schedules)")
                if not math.isfinite(values[0]) or values[0] < 0:
                    raise UsageError(f"--{flag.replace('_', '-')} {values[0]} is invalid; use a finite value >= 0")
                given[field_name] = values[0]
        return replace(base, **given)

    g = preset["guidance"]
    try:
        video, audio = scales(_VIDEO_FLAGS, g.video), scales(_AUDIO_FLAGS, g.audio)
        layers = num_layers(configs)
        # The recipe's STG block of a 48-block model; a shallower one (the tiny test models) takes its last.
        blocks = tuple(sorted({min(b, layers - 1) for b in g.stg_blocks}))
        if "stg_blocks" in o:
            sets = parse_blocks(o.pop("stg_blocks"))
            if len(sets) != 1:
                raise UsageError("--stg-blocks takes one set of blocks for LTX-2 models (no per-interval sets)")
            blocks = sets[0]
        if any(b >= layers for b in blocks):
            raise UsageError(f"--stg-blocks {max(blocks)} is out of range: the model has {layers} blocks "
                             f"(0..{layers - 1})")
        req = LTX2Request(guidance=LTX2Guidance(video, audio, tuple(blocks)), recipe=recipe, **o)
        _check_audio_tokens(req, configs["audio_vae"])
        return req
    except ValueError as e:
        raise UsageError(str(e)) from None
    except TypeError as e:
        raise UsageError(f"bad option: {e}") from None


def audio_tokens_per_second(audio_vae_config: dict) -> float:
    """Latent audio frames a second: mel frames (sample rate / hop) over the audio VAE's 4x time compression."""
    return audio_vae_config.get("sample_rate", 16000) / audio_vae_config.get("mel_hop_length", 160) / 4.0


def _check_audio_tokens(req: LTX2Request, audio_vae_config: dict) -> None:
    from ..errors import UsageError

    per_second = audio_tokens_per_second(audio_vae_config)
    if round(req.num_frames / req.fps * per_second) < 1:
        frames = math.ceil(0.5 * req.fps / per_second)
        raise UsageError(f"--num-frames {req.num_frames} at --fps {req.fps:g} lasts {req.num_frames / req.fps:.3f} s, "
                         f"which gives no audio token ({per_second:g} a second); use at least "
                         f"{8 * math.ceil((frames - 1) / 8) + 1} frames or a lower --fps")
