"""--condition equals diffusers' LTX2ConditionPipeline for the same seed (fp32, CPU, tiny LTX-2.3 folder).

Our transformer (usp_infer.ltx2.model) against diffusers' whole pipeline: the conditions' preprocessing and
encoding, the replaced and appended tokens, their RoPE positions, the packed noise draws, the shift from the
total token count, per-token timesteps, the x0 blend and the Euler update on every token. Tolerance 1e-4
absolute on frames and audio (what remains is op-order rounding, ~2e-6 here).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTX2ConditionPipeline
from diffusers.pipelines.ltx2 import LTX2LatentUpsamplePipeline
from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition
from diffusers.pipelines.ltx2.utils import STAGE_2_DISTILLED_SIGMA_VALUES
from PIL import Image

from usp_infer.ltx2 import pipeline, stages
from usp_infer.ltx2.conditions import Condition, latent_index, parse_condition
from usp_infer.ltx2.pipeline import LTX2Guidance, LTX2Request, ModalityGuidance, generate, load_components
from usp_infer.ltx2.recipes import STAGE2_SIGMAS, Recipe
from usp_infer.ltx2.tiny import make_tiny_ltx2
from usp_infer.media import read_frames, write_video

# 64x96 pixels, 25 frames: 4 latent frames of 2x3 tokens; a keyframe adds 6 more.
H, W, FRAMES, FPS, STEPS = 64, 96, 25, 24.0, 2
ATOL = 1e-4
FULL = LTX2Guidance(ModalityGuidance(3.0, 1.0, 3.0, 0.7), ModalityGuidance(7.0, 0.5, 2.0, 0.5), stg_blocks=(1,))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    folder = make_tiny_ltx2(root / "m", version="2.3")
    ref = LTX2ConditionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(1)
    first, last = root / "first.png", root / "last.jpg"
    Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(first)  # other aspect: cover + crop
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(last, quality=95)
    clip = root / "clip.mp4"
    write_video(clip, rng.random((9, 72, 100, 3)).astype(np.float32), fps=FPS)
    return dict(ref=ref, ours=load_components(folder, "cpu", torch.float32), first=first, last=last, clip=clip,
                folder=folder)


def _request(conditions, crf: int, guidance: LTX2Guidance, **kw) -> LTX2Request:
    return LTX2Request(prompt="a cat", negative_prompt="blurry", num_frames=FRAMES, fps=FPS, steps=STEPS, seed=7,
                       max_sequence_length=16, guidance=guidance, image_crf=crf,
                       conditions=tuple(Condition(str(p), f, s) for p, f, s in conditions), **kw)


def _reference(setup, conditions, crf: int, g: LTX2Guidance, height: int, width: int, **kw):
    """One LTX2ConditionPipeline call with our guidance's terms (kw: generator, output_type, latents, ...)."""
    frames = lambda p: Image.open(p) if p.suffix != ".mp4" else read_frames(p)  # noqa: E731  what diffusers takes
    return setup["ref"](
        conditions=[LTX2VideoCondition(frames(p), latent_index(f, FRAMES), s, crf) for p, f, s in conditions],
        prompt="a cat", negative_prompt="blurry", height=height, width=width, num_frames=FRAMES, frame_rate=FPS,
        max_sequence_length=16, return_dict=False, guidance_scale=g.video.cfg, stg_scale=g.video.stg,
        modality_scale=g.video.modality, guidance_rescale=g.video.rescale, audio_guidance_scale=g.audio.cfg,
        audio_stg_scale=g.audio.stg, audio_modality_scale=g.audio.modality, audio_guidance_rescale=g.audio.rescale,
        spatio_temporal_guidance_blocks=list(g.stg_blocks) or None, **kw)


def _run(setup, conditions: list[tuple[Path, int, float]], crf: int, guidance: LTX2Guidance = FULL):
    """(our frames, audio), (diffusers' frames, audio) for conditions given as (file, pixel frame, strength)."""
    ours = generate(setup["ours"], _request(conditions, crf, guidance, height=H, width=W), progress=False)
    video, audio = _reference(setup, conditions, crf, guidance, H, W, num_inference_steps=STEPS, output_type="np",
                              generator=torch.Generator().manual_seed(7))
    return (ours.frames, ours.audio), (video[0], np.asarray(audio[0], dtype=np.float32))


def _run_two_stage(setup, conditions, crf: int, guidance: LTX2Guidance = FULL):
    """--two-stage at 2H x 2W against diffusers' chain with one generator: LTX2ConditionPipeline at H x W
    (latent output) -> LTX2LatentUpsamplePipeline -> LTX2ConditionPipeline(latents=, audio_latents=, the same
    conditions at full size, noise_scale=, stage-2 sigmas as given, every term off)."""
    upsampler = setup["folder"] / "latent_upsampler"
    recipe = Recipe(two_stage=True, upsampler=str(upsampler), stage2_sigmas=STAGE2_SIGMAS)
    ours = stages.generate(setup["ours"], _request(conditions, crf, guidance, height=2 * H, width=2 * W,
                                                   recipe=recipe), progress=False)
    g = torch.Generator().manual_seed(7)
    ref = setup["ref"]
    video, audio = _reference(setup, conditions, crf, guidance, H, W, num_inference_steps=STEPS,
                              output_type="latent", generator=g)
    up = LTX2LatentUpsamplePipeline(vae=ref.vae, latent_upsampler=LTX2LatentUpsamplerModel.from_pretrained(upsampler))
    up.set_progress_bar_config(disable=True)
    video = up(latents=video, output_type="latent", return_dict=False)[0]
    scheduler = ref.scheduler
    ref.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, use_dynamic_shifting=False,
                                                                shift_terminal=None)
    try:
        off = LTX2Guidance(ModalityGuidance(), ModalityGuidance(), ())
        video, audio = _reference(setup, conditions, crf, off, 2 * H, 2 * W, latents=video, audio_latents=audio,
                                  noise_scale=STAGE_2_DISTILLED_SIGMA_VALUES[0], sigmas=STAGE_2_DISTILLED_SIGMA_VALUES,
                                  num_inference_steps=3, output_type="np", generator=g)
    finally:
        ref.scheduler = scheduler
    return (ours.frames, ours.audio), (video[0], np.asarray(audio[0], dtype=np.float32))


def _close(pair):
    (frames, audio), (ref_frames, ref_audio) = pair
    assert frames.shape == ref_frames.shape and audio.shape == ref_audio.shape
    np.testing.assert_allclose(frames, ref_frames, rtol=0, atol=ATOL)
    np.testing.assert_allclose(audio, ref_audio, rtol=0, atol=ATOL)


@pytest.mark.parametrize("strength", [1.0, 0.8])
@pytest.mark.parametrize("crf", [0, 33])
def test_first_and_last_frame(setup, strength, crf):
    _close(_run(setup, [(setup["first"], 0, strength), (setup["last"], -1, strength)], crf))


def test_keyframe_in_the_middle(setup, monkeypatch):
    tokens = []
    schedule = pipeline.sigma_schedule
    monkeypatch.setattr(pipeline, "sigma_schedule", lambda cfg, steps, n: tokens.append(n) or schedule(cfg, steps, n))
    _close(_run(setup, [(setup["last"], 12, 1.0)], 33))  # frame 12 -> latent 2, appended at pixel 9
    # the shift counts the appended tokens, as diffusers' mu from latents.shape[1]: 4 x 2 x 3 grid + 2 x 3
    # (too small a change of mu to show in a 2-step tiny video)
    assert tokens == [4 * 2 * 3 + 2 * 3]


def test_nine_frame_clip_at_frame_zero(setup):
    _close(_run(setup, [(setup["clip"], 0, 1.0)], 33))  # a clip is not re-compressed; it replaces latents 0-1


def test_clip_at_the_last_frame_is_cut_to_fit_and_not_recompressed(setup):
    """A 9-frame clip at -1: only one pixel frame is left there, so it is cut to that frame, and it stays a clip
    (diffusers re-compresses only conditions that came as one frame): equal at crf 33."""
    _close(_run(setup, [(setup["clip"], -1, 1.0)], 33))


def test_clip_keyframe_and_partial_strengths_together(setup):
    """A clip at 0 at strength 0.5, an image keyframe at 0.7, the clip again as an appended keyframe."""
    _close(_run(setup, [(setup["clip"], 0, 0.5), (setup["last"], 5, 0.7), (setup["clip"], 16, 1.0)], 33,
                LTX2Guidance(ModalityGuidance(cfg=3.0), ModalityGuidance(cfg=3.0), ())))


def test_the_comparison_is_not_vacuous(setup):
    """Each thing the tests compare moves the video: the keyframe's frame, its strength, the crf."""
    base, _ = _run(setup, [(setup["first"], 0, 1.0), (setup["last"], -1, 1.0)], 33)
    for conditions, crf in (([(setup["first"], 0, 1.0), (setup["last"], 9, 1.0)], 33),
                            ([(setup["first"], 0, 1.0), (setup["last"], -1, 0.8)], 33),
                            ([(setup["first"], 0, 1.0), (setup["last"], -1, 1.0)], 0)):
        other, _ = _run(setup, conditions, crf)
        assert np.abs(other[0] - base[0]).max() > 1e-3


@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_two_stage_first_and_last_frame_equal_the_diffusers_chain(setup, strength):
    """Stage 2 encodes the conditions again at the output size and re-noises around them."""
    _close(_run_two_stage(setup, [(setup["first"], 0, strength), (setup["last"], -1, strength)], 33))


def test_two_stage_keyframe_and_clip_equal_the_diffusers_chain(setup):
    _close(_run_two_stage(setup, [(setup["clip"], 0, 1.0), (setup["last"], 12, 0.7)], 0,
                          LTX2Guidance(ModalityGuidance(cfg=3.0), ModalityGuidance(cfg=3.0), ())))


def test_two_stage_conditions_are_applied_again_at_full_size(setup, monkeypatch):
    """The comparison is not vacuous: stage 2 without its conditions (the upsampled tokens re-noised only)
    gives another video."""
    conditions = [(setup["first"], 0, 1.0), (setup["last"], -1, 1.0)]
    (ours, _), (ref, _) = _run_two_stage(setup, conditions, 33)
    prepare = stages.stage2_latents

    def without(c, req, *args):
        return prepare(c, replace(req, conditions=()), *args)

    monkeypatch.setattr(stages, "stage2_latents", without)
    (other, _), _ = _run_two_stage(setup, conditions, 33)
    assert np.abs(other - ref).max() > 1e-3 and np.abs(ours - ref).max() < ATOL


def test_parse_and_latent_index():
    assert parse_condition("a@b.png@-1:0.5") == Condition("a@b.png", -1, 0.5)
    assert parse_condition({"path": "x.mp4", "frame": 8}) == Condition("x.mp4", 8, 1.0)
    # pixel frame -> the latent frame holding it: 0 | 1..8 | 9..16 | ...; -1 is the last one
    assert [latent_index(f, 25) for f in (0, 1, 8, 9, 16, 17, 24, -1, -25)] == [0, 1, 1, 2, 2, 3, 3, 3, 0]
    for bad in ("a.png", "a.png@x", "@3", "a.png@1:y"):
        with pytest.raises(ValueError, match="PATH@FRAME"):
            parse_condition(bad)
    with pytest.raises(ValueError, match=r"STRENGTH must be in \[0, 1\]"):
        parse_condition("a.png@0:1.5")
    req = LTX2Request(prompt="x", height=H, width=W, num_frames=FRAMES)
    for frame in (FRAMES, -FRAMES - 1):
        with pytest.raises(ValueError, match="outside the video's 25 frames"):
            replace(req, conditions=(Condition("a.png", frame),))
