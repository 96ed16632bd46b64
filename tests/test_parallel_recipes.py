"""Two-stage LTX-2 on every layout gives the single-process video and audio (CPU, gloo, fp32): guided, image,
distilled with LoRAs (in float8 weights too), keyframes, an extension and audio-to-video.

Both stages are sharded (stage 2 has 4x the tokens); the upsample and the re-noise run once, on rank 0, and
its stage-2 latents reach every rank as stage 1's do; every rank fuses the stage-2 LoRA into its own weights
(`fp8:` cases: quantized and fused on every rank, as generate --quantize fp8 does).
One spawned job per world size runs all its cases; the single-process references are computed here.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_utils import run_spawn

from usp_infer.config import ParallelConfig
from usp_infer.ltx2.conditions import Condition
from usp_infer.ltx2.pipeline import LTX2Guidance, LTX2Request, ModalityGuidance, load_components
from usp_infer.ltx2.recipes import DISTILLED_SIGMAS, STAGE2_SIGMAS, LoraSpec, Recipe
from usp_infer.ltx2.stages import generate
from usp_infer.ltx2.tiny import make_tiny_ltx2, write_lora
from usp_infer.media import write_audio, write_video
from usp_infer.parallel.plan import Plan
from usp_infer.quant import quantize_

IMAGE = Path(__file__).resolve().parent / "data" / "first_frame.png"
# As tests/test_parallel_ltx2.py: a layout only reorders additions (~1e-7 relative each), through 2 + 3 steps and
# both decoders near 1e-6; a mis-split stage-2 table, a rank-local statistic or an unfused rank moves it by 1e-2.
RTOL = 1e-5


def _requests(model: Path, lora: Path) -> dict[str, LTX2Request]:
    # 192x192 output, 17 frames: stage 1 3 latent frames of 3x3 = 27 tokens, stage 2 of 6x6 = 108 tokens;
    # 27 divides by neither 2 nor 4 (pads in stage 1), 108 by both. 20 fps: 21 audio tokens.
    recipe = Recipe(two_stage=True, upsampler=str(model / "latent_upsampler"), stage2_sigmas=STAGE2_SIGMAS,
                    stage2_loras=(LoraSpec(str(lora), 0.7),))
    base = LTX2Request(
        prompt="a red fox barking in fresh snow", negative_prompt="blurry", height=192, width=192, num_frames=17,
        fps=20.0, steps=2, seed=5, max_sequence_length=16, image_crf=0, recipe=recipe,
        guidance=LTX2Guidance(ModalityGuidance(3.0, 1.0, 2.5, 0.7), ModalityGuidance(5.0, 0.5, 2.0, 0.5), (1,)),
    )
    distilled = replace(base, steps=8, guidance=LTX2Guidance(ModalityGuidance(), ModalityGuidance(), ()),
                        recipe=replace(recipe, sigmas=DISTILLED_SIGMAS, loras=(LoraSpec(str(lora), 0.3),)))
    # Conditions in both stages (stage 2 encodes them again at full size): 25 frames, so stage 1 holds 4 x 3 x 3
    # = 36 grid tokens + 9 of the last-frame keyframe = 45 (4 ranks: 12, 12, 12, 9 -> the keyframe is all of
    # rank 3's; 2 ranks: 23, 22); stage 2 180. The extension's clip and the given sound are beside the model.
    conditioned = replace(base, num_frames=25,
                          conditions=(Condition(str(IMAGE), 0, 1.0), Condition(str(IMAGE), -1, 0.8)))
    files = model.parent
    return {"guided": base, "guided-i2v": replace(base, image=str(IMAGE)), "distilled": distilled,
            "keyframes": conditioned, "extend": replace(base, extend=str(files / "clip.mp4"), extend_frames=9),
            "audio": replace(base, audio_input=str(files / "voice.wav"))}


CASES = {  # world -> (case id, (cfg, ring, ulysses), request)
    2: [("u2", (1, 1, 2), "guided"), ("r2", (1, 2, 1), "guided"), ("cfg2", (2, 1, 1), "guided"),
        ("u2-i2v", (1, 1, 2), "guided-i2v"), ("u2-distilled", (1, 1, 2), "distilled"),
        ("u2-keyframes", (1, 1, 2), "keyframes"), ("r2-audio", (1, 2, 1), "audio"),
        ("cfg2-extend", (2, 1, 1), "extend"), ("u2-fp8-distilled", (1, 1, 2), "fp8:distilled")],
    4: [("u4", (1, 1, 4), "guided"), ("u2r2", (1, 2, 2), "guided"), ("u4-i2v", (1, 1, 4), "guided-i2v"),
        ("u2r2-distilled", (1, 2, 2), "distilled"), ("u4-keyframes", (1, 1, 4), "keyframes"),
        ("cfg2u2-audio", (2, 1, 2), "audio"), ("u2r2-extend", (1, 2, 2), "extend"),
        ("cfg2u2-fp8", (2, 1, 2), "fp8:guided")],
}


@lru_cache(maxsize=2)
def _components(model: str, fp8: bool):
    c = load_components(Path(model), "cpu", torch.float32)
    if fp8:
        quantize_(c.transformer)
    return c


def _generate(model: Path, request: LTX2Request, parallel: ParallelConfig, fp8: bool = False) -> dict | None:
    plan = Plan.build(parallel, "cpu")
    result = generate(_components(str(model), fp8), request, plan, progress=False)
    return {"frames": result.frames, "audio": result.audio} if plan.is_main else None


def _job(world: int, model: Path, lora: Path) -> dict:
    torch.set_num_threads(1)
    requests = _requests(model, lora)
    return {case: _named(model, requests, name, ParallelConfig(*layout, timeout_s=120))
            for case, layout, name in CASES[world]}


def _named(model: Path, requests: dict, name: str, parallel: ParallelConfig) -> dict | None:
    """The request `name` of _requests; "fp8:" first: with the transformer's block linears in float8."""
    return _generate(model, requests[name.removeprefix("fp8:")], parallel, fp8=name.startswith("fp8:"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parallel-recipes")
    model = make_tiny_ltx2(root / "model")
    rng = np.random.default_rng(0)
    tone = (0.5 * np.sin(2 * np.pi * 300 * np.arange(21000) / 24000))[None].astype(np.float32)
    write_video(root / "clip.mp4", rng.random((13, 192, 192, 3)).astype(np.float32), fps=20.0, audio=tone,
                audio_sample_rate=24000)
    write_audio(root / "voice.wav", tone, 24000)
    return model, write_lora(root / "stage2.safetensors", model / "transformer", "lightricks", seed=2)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("world", [2, 4])
def test_two_stage_on_every_layout_equals_one_process(folder, world) -> None:
    model, lora = folder
    results = run_spawn(_job, world, world, model, lora)[0]
    requests = _requests(model, lora)
    refs = {name: _named(model, requests, name, ParallelConfig()) for name in {n for _, _, n in CASES[world]}}
    errors = {case: (_rel(results[case]["frames"], refs[name]["frames"]),
                     _rel(results[case]["audio"], refs[name]["audio"])) for case, _, name in CASES[world]}
    bad = {case: err for case, err in errors.items() if max(err) > RTOL}
    assert not bad, f"world {world}: (frames, audio) relative error above {RTOL}: {bad}"
    # not vacuous: the stage-2 LoRA and the image each change both outputs, by far more than RTOL
    plain = _generate(model, replace(requests["guided"], recipe=replace(requests["guided"].recipe, stage2_loras=())),
                      ParallelConfig())
    for other in (plain, refs.get("guided-i2v")):
        assert _rel(other["frames"], refs["guided"]["frames"]) > 1e-3
        assert _rel(other["audio"], refs["guided"]["audio"]) > 1e-4
    for name in (n for n in refs if n.startswith("fp8:")):  # and the fp8 cases do run in float8
        assert _rel(refs[name]["frames"], _named(model, requests, name[4:], ParallelConfig())["frames"]) > 1e-4
