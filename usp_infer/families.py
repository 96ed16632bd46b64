"""Model families: the one place that maps a diffusers folder to the code that runs it.

A folder's family comes from its `model_index.json` (`_class_name`, the diffusers pipeline it was
saved from), never from its path. A family is a folder of the package with the same roles in each:

  usp_infer/<family>/model.py     the transformer: pure torch, diffusers' weight names, no process groups
  usp_infer/<family>/request.py   its requests (no torch, so --help and usage errors stay fast):
    read_model_configs(model_dir) -> dict        every check that needs no weights
    attention_heads(configs) -> int              what a Ulysses degree must divide
    num_layers(configs) -> int                   for --stg-blocks
    build_request(options, configs) -> request   flags (None = not given) -> a validated request
    MAX_TEXT_TOKENS, MAX_BRANCHES
  usp_infer/<family>/pipeline.py  its pipeline:
    encode_prompts(model_dir, device, dtype, requests) -> text cache (rank 0, before the transformer loads)
    load_components(model_dir, device, dtype, main=, text_encoder=) -> components
    generate(components, request, plan, progress, vae_tiling, say, uint8_frames) -> result with .frames,
      .outputs(); uint8_frames: the frames as media.video_frames(uint8=True) makes them (mp4 / png outputs)
    compile_blocks(transformer)
  usp_infer/<family>/tiny.py      the tiny random-weight folder writer (make-tiny, tests)
  usp_infer/<family>/bench.py     its `usp-infer bench` workload: random model, one timed step, FLOPs

Adding a family means adding such a folder and one record below. What the families share sits flat beside
them (layers, modulation, kernels, guidance, schedule, config, media), everything that knows about processes
in `parallel/`, and the run (cli, runner, batch, sidecar) above them all; no module imports one above it
(tests/test_layout.py walks the imports).

The records below are plain data, so the CLI can name a family and check flags without importing torch.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

# Flags every family takes (snake_case, as in batch lines).
COMMON_FLAGS = frozenset({
    "prompt", "negative_prompt", "height", "width", "num_frames", "fps", "steps", "num_inference_steps", "seed",
    "max_sequence_length", "guidance_scale", "stg_scale", "stg_blocks", "guidance_rescale", "preset", "image",
    "branches",
})


@dataclass(frozen=True)
class Family:
    name: str
    summary: str  # what it is and what it needs, for `info` and errors
    pipelines: tuple[str, ...]  # model_index.json `_class_name`s it runs
    front: str  # its torch-free module: read_model_configs, attention_heads, num_layers, build_request, limits
    module: str  # its pipeline module: load_components, encode_prompts, generate, compile_blocks
    flags: frozenset[str]  # request flags it takes, beyond COMMON_FLAGS
    presets: tuple[str, ...]
    audio: bool  # whether its videos have sound (and a .wav output makes sense)

    def pipeline(self) -> ModuleType:
        return importlib.import_module(self.module)

    def requests(self) -> ModuleType:
        """The checks and request building, importable without torch."""
        return importlib.import_module(self.front)

    def foreign_flag(self, given: set[str]) -> str | None:
        """The first given flag this family does not take, if any."""
        return next(iter(sorted(given - COMMON_FLAGS - self.flags)), None)


FAMILIES = (
    Family(
        name="ltx-video",
        summary="LTX-Video 0.9.x: T5 text encoder, video only (transformer LTXVideoTransformer3DModel)",
        pipelines=("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"),
        front="usp_infer.ltx_video.request",
        module="usp_infer.ltx_video.pipeline",
        flags=frozenset({"stg_mode", "cfg_star", "guidance_timesteps", "decode_timestep", "decode_noise_scale",
                         "image_strength"}),
        presets=("ltx-video-2b", "ltx-video-13b-0.9.8"),
        audio=False,
    ),
    Family(
        name="ltx-2",
        summary="LTX-2 / LTX-2.3: Gemma-3 text encoder + connectors, video and audio (LTX2VideoTransformer3DModel, "
                "video and audio VAEs, vocoder)",
        pipelines=("LTX2Pipeline", "LTX2ImageToVideoPipeline"),
        front="usp_infer.ltx2.request",
        module="usp_infer.ltx2.stages",  # pipeline.py + two stages
        flags=frozenset({"modality_scale", "audio_guidance_scale", "audio_stg_scale", "audio_modality_scale",
                         "audio_guidance_rescale", "image_crf", "audio", "no_audio", "audio_input",
                         "condition", "conditions", "extend", "extend_frames"})
        | frozenset({"sigmas", "two_stage", "upsampler", "stage2_sigmas", "lora", "stage2_lora"}),  # ltx2/recipes.py
        presets=("ltx-2", "ltx-2.3", "ltx-2-distilled", "ltx-2.3-distilled"),
        audio=True,
    ),
)
ALL_FLAGS = COMMON_FLAGS.union(*(f.flags for f in FAMILIES))


def family_of(model_dir: Path) -> Family:
    """The family of a diffusers-format folder; ValueError (one line, naming what was found) otherwise."""
    if not model_dir.is_dir():
        raise ValueError(f"--model {model_dir} is not a directory; pass a diffusers-format LTX folder "
                         "(see models/README.md) or a bundled tiny model: ltx-tiny, ltx2-tiny")
    path = model_dir / "model_index.json"
    try:
        found = json.loads(path.read_text()).get("_class_name")
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; --model must be a diffusers-format pipeline folder "
                         "(see models/README.md)") from None
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path} is not a JSON object ({e}); copy the folder again") from None
    for family in FAMILIES:
        if found in family.pipelines:
            return family
    supported = "; ".join(f"{f.name} ({', '.join(f.pipelines)})" for f in FAMILIES)
    raise ValueError(f"{model_dir} holds a {found} folder, which usp-infer does not run; supported: {supported}")


def resolve(model_dir: Path) -> tuple[Family, dict]:
    """The folder's family and its checked configs (no weights are read)."""
    family = family_of(model_dir)
    return family, family.requests().read_model_configs(model_dir)
