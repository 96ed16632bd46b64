"""Two-stage LTX-2 generation: stage 1 at half size, the x2 latent upsampler, a short re-noised stage 2.

Equals diffusers' chain for one generator `g`:

    video, audio = LTX2Pipeline(h/2, w/2, ..., generator=g, output_type="latent")
    up = LTX2LatentUpsamplePipeline(vae, latent_upsampler)(latents=video, output_type="latent")
    LTX2Pipeline(latents=up, audio_latents=audio, noise_scale=s2[0], sigmas=s2, guidance off, generator=g)

with stage 2's scheduler running `s2` as given (with conditions: LTX2ConditionPipeline in both calls, stage 2
given the same conditions at full size). Stage 1 is the one-stage path at half size (its recipe: steps or
sigmas, guidance, image or conditions, given audio, LoRAs); the upsample and the re-noise run once, on rank 0,
which draws every noise from the one generator in diffusers' order (stage 1's video then audio; stage 2's
video then audio) and hands the stage-2 latents to every rank as it does stage 1's; stage 2 runs sharded like
stage 1, one branch a step, with the stage-2 LoRAs fused on top of the others (every rank fuses its own copy
of the weights).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from ..schedule import explicit_schedule
from . import pipeline as p
from .pipeline import compile_blocks, encode_prompts, load_components  # noqa: F401 - the family's pipeline surface
from .request import LTX2Guidance, LTX2Request, ModalityGuidance

OFF = LTX2Guidance(ModalityGuidance(), ModalityGuidance(), ())  # every term off: one branch a step


@torch.no_grad()
def stage2_latents(c: p.Components, req: LTX2Request, lay: p.Layout, start: tuple[torch.Tensor, torch.Tensor],
                   noise_scale: float, generator: torch.Generator):
    """Stage 2's starting latents (video, conditioning mask or None, audio[, conditioned sequence]): the upsampled
    stage-1 tokens with the request's conditioning applied again at full size, re-noised to `noise_scale`.

    - --condition / --extend: the condition files encoded again at the output size, placed and re-noised as
      LTX2ConditionPipeline(latents=upsampled, conditions=..., noise_scale=...) does (one packed draw over the
      grid and the appended keyframes); Lightricks' keyframe pipeline re-encodes them at full size too;
    - --image: the upsampled latent frame 0 is kept, as diffusers' image-to-video chain does (Lightricks
      re-encodes the image instead);
    - --audio: the given sound's tokens as they are (held clean, no draw), as Lightricks' audio-to-video
      stage 2 does; otherwise the stage-1 audio is re-noised after the video."""
    video, audio = (t.float().cpu() for t in start)  # drawn on the CPU, as the first stage's noise
    if req.conditions or req.extend:
        from .conditions import prepare

        conditioned = prepare(c, req, lay, generator, req.height, req.width, noise_scale, start=video)
        return conditioned.latents, None, renoise_audio(req, audio, noise_scale, generator), conditioned
    video, mask = renoise(req, lay, video, noise_scale, generator)
    return video, mask, renoise_audio(req, audio, noise_scale, generator)


def renoise_audio(req: LTX2Request, audio: torch.Tensor, noise_scale: float, generator: torch.Generator):
    """Audio tokens re-noised to `noise_scale` (drawn in the packed shape, as LTX2Pipeline for given latents),
    or kept as they are for --audio, whose tokens stay clean in every stage."""
    if req.audio_input is not None:
        return audio
    noise = torch.randn(audio.shape, generator=generator, dtype=torch.float32)
    return noise_scale * noise + (1 - noise_scale) * audio


def renoise(req: LTX2Request, lay: p.Layout, video: torch.Tensor, noise_scale: float, generator: torch.Generator):
    """Packed, normalised video tokens re-noised to `noise_scale`, drawn as LTX2Pipeline draws for given latents
    (in the packed shape); with an image, as LTX2ImageToVideoPipeline: the noise in the 5-D shape, latent frame 0
    kept (its mask holds). Returns (video, mask or None)."""
    if req.image is None:
        noise = torch.randn(video.shape, generator=generator, dtype=torch.float32)
        return noise_scale * noise + (1 - noise_scale) * video, None
    cond = torch.zeros((1, 1, lay.frames, lay.height, lay.width))
    cond[:, :, 0] = 1.0
    grid = p.unpack_video(video, lay.frames, lay.height, lay.width)
    noise = torch.randn(grid.shape, generator=generator, dtype=torch.float32)
    scale = noise_scale * (1 - cond)
    return p.pack_video(scale * noise + (1 - scale) * grid), p.pack_video(cond)[..., 0]


@torch.no_grad()
def upsample(c: p.Components, folder: str, tokens: torch.Tensor, lay: p.Layout) -> torch.Tensor:
    """Packed normalised video tokens -> the x2 upsampler's, packed and normalised: the upsampler works in the
    VAE's raw units (denormalise, upsample, normalise), as LTX2LatentUpsamplePipeline + LTX2Pipeline(latents=)."""
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    if folder not in c.upsamplers:
        c.upsamplers[folder] = LTX2LatentUpsamplerModel.from_pretrained(Path(folder), torch_dtype=c.dtype).to(c.device).eval()
    model = c.upsamplers[folder]
    mean, std = p._video_stats(c.vae)
    scaling = c.vae.config.scaling_factor
    raw = p.unpack_video(tokens.float().cpu(), lay.frames, lay.height, lay.width) * std / scaling + mean
    up = model(raw.to(c.device, model.dtype)).float().cpu()
    return p.pack_video((up - mean) * scaling / std)


def generate(c: p.Components, req: LTX2Request, plan=None, progress: bool = True, vae_tiling: bool = False,
             say=None, uint8_frames: bool = False) -> p.Result:
    """The family's generate (families.py): one stage (pipeline.generate), or two with --two-stage."""
    if not req.recipe.two_stage:
        return p.generate(c, req, plan, progress, vae_tiling, say, uint8_frames)
    plan = plan or p.Plan.build(p.ParallelConfig(), str(c.device))  # one process: no process group
    return generate_two_stage(c, req, plan, progress, vae_tiling, say or (lambda message: None), uint8_frames)


def generate_two_stage(c: p.Components, req: LTX2Request, plan, progress: bool, vae_tiling: bool, say,
                       uint8_frames: bool = False) -> p.Result:
    r = req.recipe
    half = replace(req, height=req.height // 2, width=req.width // 2, recipe=replace(r, two_stage=False))
    generator = torch.Generator("cpu").manual_seed(req.seed)  # rank 0 draws from it, stage 1 then stage 2
    start = time.perf_counter()
    first = p.run_one_stage(c, half, plan, progress, say, generator)
    phases = {"stage1_s": time.perf_counter() - start - first.encode_text_time}

    start = time.perf_counter()
    loras = p.use_loras(c, r.loras + r.stage2_loras)  # stage 2's LoRAs on top; the next item's stage 1 takes them out
    phases["stage2_lora_fuse_s"] = time.perf_counter() - start

    def prepare() -> tuple:
        """Rank 0: the upsampled stage-1 video and both streams re-noised to stage 2's first sigma."""
        say("upsampling")
        begin = time.perf_counter()
        lay = p.layout(c, req)
        video = upsample(c, r.upsampler, first.video, first.layout)
        upsample_s = time.perf_counter() - begin
        latents = stage2_latents(c, req, lay, (video, first.audio), r.stage2_sigmas[0], generator)
        return lay, latents, upsample_s

    lay, latents, phases["upsample_s"] = plan.from_main(prepare)
    start = time.perf_counter()
    timesteps, sigmas = explicit_schedule(c.scheduler_config, r.stage2_sigmas)  # as given: no shift, no stretch
    video, audio, times = p.run_stage(c, replace(req, guidance=OFF), plan, lay, first.text, latents, timesteps,
                                      sigmas, ("cond",), progress)
    phases["stage2_s"] = time.perf_counter() - start
    recipe = {"name": r.name, "stage1": first.record, "upsampler": r.upsampler,
              "stage2": {"steps": len(timesteps), "sigmas": sigmas[:-1].tolist(), "noise_scale": r.stage2_sigmas[0],
                         "guidance": "off", "loras": loras}}
    stage = p.Stage(video, audio, lay, first.text, first.step_times + times, first.encode_text_time, recipe["stage2"])
    return p.finish(c, req, plan, stage, recipe, phases, vae_tiling, say, uint8_frames)
