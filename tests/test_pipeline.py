"""The whole pipeline equals diffusers' LTX pipelines on the embedded tiny checkpoint."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LTXImageToVideoPipeline, LTXPipeline
from PIL import Image
from typer.testing import CliRunner

from usp_infer.cli import app

MODEL = Path(__file__).resolve().parents[1] / "models" / "ltx-tiny"
# 64x96 pixels, 17 frames -> 3 latent frames of 2x3 tokens: 18 tokens, which 4 ranks do not divide.
SIZE = dict(height=64, width=96, num_frames=17)
SETTINGS = dict(
    prompt="a red fox running through fresh snow", negative_prompt="blurry, low quality",
    num_inference_steps=3, guidance_scale=3.0, max_sequence_length=24,
    decode_timestep=0.05, decode_noise_scale=0.025, frame_rate=25,
)
# Frames are in [0, 1]; the two sides run the same fp32 math with the same random draws, so they differ
# only by op-order rounding (~1e-7) amplified through 3 steps and the decoder: 1e-4 is far above that and far
# below any real difference (a wrong seed, shift or mask moves frames by > 1e-2).
ATOL = 1e-4


def run_cli(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out.npz"
    args = [
        "generate", "--model", str(MODEL), "--prompt", SETTINGS["prompt"], "--negative-prompt", SETTINGS["negative_prompt"],
        "--height", "64", "--width", "96", "--num-frames", "17", "--steps", "3", "--guidance-scale", "3",
        "--max-sequence-length", "24", "--decode-timestep", "0.05", "--decode-noise-scale", "0.025", "--fps", "25",
        "--seed", "42", "--output", str(out), "--quiet", *extra,
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return dict(np.load(out))


def test_text_to_video_equals_diffusers(tmp_path):
    pipe = LTXPipeline.from_pretrained(MODEL)
    ref = pipe(**SETTINGS, **SIZE, generator=torch.Generator().manual_seed(42), output_type="np").frames[0]
    ours = run_cli(tmp_path)
    assert ours["frames"].shape == ref.shape == (17, 64, 96, 3)
    assert ours["latents"].shape == (8, 3, 2, 3) and ours["latents"].dtype == np.float32
    np.testing.assert_allclose(ours["frames"], ref, rtol=0, atol=ATOL)
    # A different seed must change the video: the comparison above is not vacuous.
    other = run_cli(tmp_path, "--seed", "43", "--overwrite")
    assert np.abs(other["frames"] - ref).max() > 1e-2


@pytest.mark.parametrize("scaling_factor", [None, 0.7], ids=["committed", "scaling-0.7"])
def test_image_to_video_equals_diffusers(tmp_path, scaling_factor):
    """96x160 (3 x 5 tokens a frame), 17 frames, 3 steps. Every LTX VAE has scaling_factor 1, which hides where
    it enters (diffusers: not into the image latent, into the decode): a copy with 0.7 must match too."""
    model = MODEL
    if scaling_factor is not None:
        model = tmp_path / "scaled"
        shutil.copytree(MODEL, model)
        config = model / "vae" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "scaling_factor": scaling_factor}))
    size = dict(height=96, width=160, num_frames=17)
    image_path = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8)).save(image_path)
    pipe = LTXImageToVideoPipeline.from_pretrained(model)
    ref = pipe(
        image=Image.open(image_path), **SETTINGS, **size, generator=torch.Generator().manual_seed(42), output_type="np"
    ).frames[0]
    at_size = ["--model", str(model), "--height", "96", "--width", "160"]  # the later flag wins
    ours = run_cli(tmp_path, *at_size, "--image", str(image_path))
    np.testing.assert_allclose(ours["frames"], ref, rtol=0, atol=ATOL)
    if scaling_factor is None:
        plain = run_cli(tmp_path, *at_size, "--overwrite")
        assert np.abs(plain["frames"] - ref).max() > 1e-2  # the image really conditions the video


# --- soft image conditioning (--image-strength < 1) against LTX-Video's formulas, written out here ----


def _ltx_video_soft_loop(latents, conditioning_mask, timesteps, sigmas, model):
    """LTX-Video's loop for conditioned tokens (and diffusers' LTXConditionPipeline, which ports it), written
    from their code: a token with conditioning mask m sees the timestep min(t, (1 - m) * 1000); the scheduler
    steps each token from its own sigma to the largest schedule sigma below it; and only tokens with
    t / 1000 - 1e-6 < 1 - m are updated (tokens_to_denoise_mask)."""
    x = latents.clone()
    for t in timesteps:
        per_token_t = torch.min(t.expand(conditioning_mask.shape), (1 - conditioning_mask) * 1000.0)  # (1, S)
        pred = model(x, per_token_t)
        own = per_token_t / 1000.0
        below = sigmas[:, None, None] < own[None] - 1e-6
        next_sigma = (below * sigmas[:, None, None]).max(dim=0).values
        denoised = x - (own - next_sigma)[..., None] * pred  # scheduler.step(-pred, ...): sample + dt * (-pred)
        update = (t / 1000 - 1e-6 < (1.0 - conditioning_mask))[..., None]
        x = torch.where(update, denoised, x)
    return x


def test_soft_image_conditioning_step_follows_ltx_video():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from usp_infer.schedule import sigma_schedule

    from usp_infer.config import ParallelConfig
    from usp_infer.guidance import Guider, StepScales
    from usp_infer.ltx_video.pipeline import Denoiser
    from usp_infer.parallel.plan import Plan

    tokens, channels, steps = 18, 4, 8
    g = torch.Generator().manual_seed(0)
    start = torch.randn(1, tokens, channels, generator=g, dtype=torch.float64)
    weights = torch.randn(channels, channels, generator=g, dtype=torch.float64)

    def velocity(x, timestep):  # depends on the latents and on each token's timestep
        return torch.tanh(x @ weights) + (timestep / 1000.0)[..., None] * x

    class Transformer:  # the Denoiser's view of a transformer: (latents, text, timestep, mask, rope) -> velocity
        def __call__(self, x, embeds, timestep, mask, rope, attn_fn=None, perturbation=None, stg_source=None):
            return velocity(x, timestep.expand(x.shape[:2]))

    timesteps, sigmas = sigma_schedule(dict(FlowMatchEulerDiscreteScheduler.load_config(MODEL / "scheduler")), steps, tokens)
    sigmas = sigmas.double()
    for strength in (0.6, 0.3, 1.0):
        mask = torch.zeros(1, tokens, dtype=torch.float64)
        mask[:, :6] = strength  # the first latent frame (2 x 3 tokens) holds the image
        want = _ltx_video_soft_loop(start, mask, timesteps.double(), sigmas, velocity)

        text = {"cond": (torch.zeros(1, 1, 2, dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool))}
        denoiser = Denoiser(Transformer(), Plan.build(ParallelConfig(), "cpu"), text, rope=(None, None),
                            attn_fn=None, guider=Guider())
        cfg_off = StepScales(1.0, 0.0, 0.0, False, ())
        got, level = start.clone(), (1.0 - mask)[..., None]
        for i, t in enumerate(timesteps.double()):
            got = denoiser.step(got, t, sigmas[i], sigmas[i + 1], cfg_off, level)
        # The Denoiser casts each prediction to float32 (~6e-8 relative) over 8 steps: ~1e-7 here; a wrong
        # timestep (min -> product) or update rule moves tokens by 1e-2 and more.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if strength < 1:  # the conditioned tokens did move: the comparison is not vacuous
            assert (got[:, :6] - start[:, :6]).abs().max() > 1e-2


def test_soft_image_conditioning_initial_latents_follow_ltx_video():
    """LTX-Video starts a conditioned frame at lerp(noise, image latent, strength); noise is drawn after the
    image latent's sample, from one CPU generator (diffusers' order)."""
    from usp_infer.config import GenerateRequest
    from usp_infer.ltx_video.pipeline import load_components, prepare_inputs
    from usp_infer.media import load_image

    image_path = Path(__file__).resolve().parent / "data" / "first_frame.png"
    c = load_components(MODEL, torch.device("cpu"), torch.float32)
    req = GenerateRequest(prompt="x", height=64, width=96, num_frames=17, steps=2, seed=5, max_sequence_length=8,
                          image=str(image_path), image_strength=0.6)
    inputs, _ = prepare_inputs(c, req, schedule=[])
    g = torch.Generator().manual_seed(5)
    image = load_image(image_path, 64, 96)[None, :, None]
    mean, std = (getattr(c.vae, n).view(1, -1, 1, 1, 1) for n in ("latents_mean", "latents_std"))
    encoded = (c.vae.encode(image).latent_dist.sample(g) - mean) / std
    noise = torch.randn((1, 8, 3, 2, 3), generator=g)
    want = noise.clone()
    want[:, :, :1] = torch.lerp(noise[:, :, :1], encoded, 0.6)
    torch.testing.assert_close(inputs.latents, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inputs.level[0, :, 0], torch.tensor([0.4] * 6 + [1.0] * 12), rtol=1e-6, atol=1e-6)


def test_t5_is_read_straight_onto_the_device(monkeypatch):
    """encode_prompts reads T5 onto the device it encodes on (a host copy first would hold 9.5 GB of host
    memory for T5-XXL and copy it once more); the prompts come back as the text cache."""
    import transformers

    from usp_infer.ltx_video import pipeline
    from usp_infer.config import GenerateRequest

    maps = []
    real = transformers.T5EncoderModel.from_pretrained.__func__
    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: (maps.append(k.get("device_map")), real(cls, *a, **k))[1]))
    req = GenerateRequest(prompt="a fox", negative_prompt="blur", max_sequence_length=8)
    cache = pipeline.encode_prompts(MODEL, torch.device("cpu"), torch.float32, [req])
    assert maps == ["cpu"] and set(cache) == {("a fox", 8), ("blur", 8)}


def test_guidance_rescale_equals_diffusers(tmp_path):
    """--guidance-rescale against LTXPipeline(guidance_rescale=...): the rescale's std is over each sample's
    every channel and token, as diffusers' rescale_noise_cfg takes it."""
    pipe = LTXPipeline.from_pretrained(MODEL)
    ref = pipe(**SETTINGS, **SIZE, guidance_rescale=0.7, generator=torch.Generator().manual_seed(42),
               output_type="np").frames[0]
    np.testing.assert_allclose(run_cli(tmp_path, "--guidance-rescale", "0.7")["frames"], ref, rtol=0, atol=ATOL)


def test_scheduled_guidance_takes_each_step_s_own_sigma(monkeypatch):
    """With --guidance-timesteps, step i runs the scales of sigma_i (the first threshold at or below it), not of
    the sigma it steps to."""
    from usp_infer.config import GenerateRequest, ParallelConfig
    from usp_infer.guidance import GuidanceConfig
    from usp_infer.ltx_video import pipeline
    from usp_infer.parallel.plan import Plan

    seen = []
    real = pipeline.Denoiser.step

    def spy(self, latents, t, sigma, sigma_next, scales, level=None):
        seen.append((float(sigma), scales.cfg))
        return real(self, latents, t, sigma, sigma_next, scales, level)

    monkeypatch.setattr(pipeline.Denoiser, "step", spy)
    g = GuidanceConfig(cfg=(4.0, 2.5, 2.0), stg=(0.0,) * 3, rescale=(0.0,) * 3, stg_blocks=((),) * 3,
                       timesteps=(1.0, 0.9, 0.5))
    req = GenerateRequest(prompt="a fox", height=64, width=96, num_frames=17, steps=3, max_sequence_length=16,
                          guidance=g)
    c = pipeline.load_components(MODEL, torch.device("cpu"), torch.float32)
    pipeline.generate(c, req, Plan.build(ParallelConfig(), "cpu"), progress=False)
    assert [cfg for _, cfg in seen] == [g.at(sigma).cfg for sigma, _ in seen] and seen[0] == (1.0, 4.0)
    assert len({cfg for _, cfg in seen}) > 1  # the schedule changes within the run
