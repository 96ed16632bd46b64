"""The LTX-Video pipeline: text encode -> latents (+ image condition) -> denoising loop -> gather -> decode.

Noise is drawn for the global latent with a CPU generator in the order diffusers' LTX pipelines
draw it (image latent sample, then noise, then decode noise), so a seed gives the same video here
and there, on any number of processes. Latents stay sharded for the whole loop: the Euler step is
elementwise, so it runs on each rank's shard. The loop reads as a single-process loop: whatever a
layout decides comes from the `Plan` passed in (parallel.py), the identity for one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import graphs
from ..config import GenerateRequest
from ..errors import DecodeError
from ..guidance import Guider, StepScales
from ..layers import AttnFn
from ..parallel.plan import Plan
from ..schedule import sigma_schedule
from .model import (
    LTXTransformer,
    Perturbation,
    compile_blocks,  # noqa: F401 - part of the family surface (families.py)
    load_transformer,
    rope_tables,
)


@dataclass
class Components:
    """What one rank holds. Rank 0 holds everything; the other ranks of a run only the transformer (None
    for the rest): rank 0 encodes the text and the image, decodes and writes, and broadcasts its inputs."""

    model_dir: Path
    transformer: LTXTransformer
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    tokenizer: object
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    # (prompt, max_length) -> (embeddings, mask) on the CPU: what encode_prompts made, or what encode_text
    # made with the text encoder here.
    text_cache: dict = field(default_factory=dict)
    cuda_graphs: bool = False  # replay the block loop as CUDA graphs where the layout allows (graphs.py)


def load_components(model_dir: Path, device: torch.device, dtype: torch.dtype, *, main: bool = True,
                    text_encoder: bool = True) -> Components:
    """All components (`main`), or the transformer alone (the other ranks of a multi-process run).
    `text_encoder=False`: no text encoder either; the runner fills text_cache with encode_prompts first."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    transformer = load_transformer(model_dir / "transformer", device, dtype).eval()
    vae = encoder = tokenizer = None
    if main:
        vae = AutoencoderKLLTXVideo.from_pretrained(model_dir / "vae", torch_dtype=dtype).to(device).eval()
        if text_encoder:
            encoder, tokenizer = _load_text_encoder(model_dir, device, dtype)
    scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(model_dir / "scheduler"))
    return Components(model_dir, transformer, vae, encoder, tokenizer, scheduler_config, device, dtype)


def _load_text_encoder(model_dir: Path, device: torch.device, dtype: torch.dtype):
    import transformers
    from transformers import AutoTokenizer, T5EncoderModel

    # encode_prompts loads it before load_components runs: without this --quiet prints transformers' weight bar
    transformers.utils.logging.disable_progress_bar()
    # read straight onto `device`: no host copy of T5-XXL's 9.5 GB (bf16) is built on the way to a GPU
    encoder = T5EncoderModel.from_pretrained(model_dir / "text_encoder", torch_dtype=dtype,
                                             device_map=str(device)).eval()
    return encoder, AutoTokenizer.from_pretrained(model_dir / "tokenizer")


def encode_prompts(model_dir: Path, device: torch.device, dtype: torch.dtype, requests) -> dict:
    """Load the text encoder, encode every prompt (and negative prompt) of `requests` once, and free it:
    returns a text_cache for Components. Run before the transformer loads, the text encoder never shares
    the GPU with it, so a rank's peak is the larger of the two, not their sum."""
    import gc

    encoder, tokenizer = _load_text_encoder(model_dir, device, dtype)
    c = Components(model_dir, None, None, encoder, tokenizer, {}, device, dtype)
    for req in requests:
        for prompt in (req.prompt, req.negative_prompt):
            encode_text(c, prompt, req.max_sequence_length)
    cache = c.text_cache
    del c, encoder
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return cache


@dataclass
class Result:
    frames: np.ndarray | None  # (F, H, W, 3) float32 in [0, 1] (or uint8: generate's uint8_frames); main rank only
    latents: np.ndarray | None  # (C, F', H', W') float32, exactly what the VAE decodes; main rank only
    step_times: list[float] = field(default_factory=list)
    decode_time: float = 0.0
    encode_text_time: float = 0.0
    decode_timestep: float | None = None  # what the VAE decoder was conditioned on (None: not timestep-conditioned)
    vae_tiling: bool = False

    def outputs(self) -> dict:
        """What media.write_video writes besides the frames."""
        return {"latents": self.latents}




def _free_memory(device: torch.device) -> int:
    """Bytes a decode may still take on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 1 << 62  # unknown: assume it fits; a failure still keeps the latents


def decode_memory(vae, latent_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """A rough estimate of a full (untiled) decode's peak: ~6 activations of the decoder's last stage, which runs
    at the output's frames and 1/patch of its height and width with decoder_block_out_channels[0] channels."""
    _, _, frames, height, width = latent_shape
    s_ratio, t_ratio = vae.spatial_compression_ratio, vae.temporal_compression_ratio
    pixels = ((frames - 1) * t_ratio + 1) * height * s_ratio * width * s_ratio
    values = pixels // vae.config.patch_size**2 * vae.config.decoder_block_out_channels[0]
    return 6 * values * torch.empty((), dtype=dtype).element_size()


def decode_latents(vae, latents: torch.Tensor, decode_t: torch.Tensor | None, tiling: bool,
                   uint8: bool = False) -> np.ndarray:
    """VAE input latents (1, C, F', H', W') -> frames (F, H, W, 3) float32 in [0, 1] (uint8:
    media.video_frames); tiled on request."""
    from ..media import video_frames

    if tiling:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    video = vae.decode(latents.to(vae.dtype), decode_t, return_dict=False)[0]
    return video_frames(video[0], uint8)


def needs_tiling(vae, latent_shape: tuple[int, ...], device: torch.device, asked: bool) -> bool:
    return asked or decode_memory(vae, latent_shape, vae.dtype) > _free_memory(device)


@torch.no_grad()
def encode_text(c: Components, prompt: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 embeddings (1, L, D) and their attention mask (1, L) on the CPU, as LTXPipeline computes them."""
    key = (prompt, max_length)
    if key not in c.text_cache:
        assert c.text_encoder is not None, "prompt not in text_cache, and no text encoder loaded"
        tokens = c.tokenizer(
            [prompt], padding="max_length", max_length=max_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        embeds = c.text_encoder(tokens.input_ids.to(c.device))[0].to(c.dtype)
        c.text_cache[key] = (embeds.cpu(), tokens.attention_mask.bool())
    return c.text_cache[key]


def pack(latents: torch.Tensor) -> torch.Tensor:
    # (B, C, F, H, W) -> (B, F*H*W, C): tokens in f, h, w raster order (patch size 1)
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    # (B, F*H*W, C) -> (B, C, F, H, W)
    return tokens.transpose(1, 2).unflatten(2, (frames, height, width))


def _latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    return vae.latents_mean.view(1, -1, 1, 1, 1).float().cpu(), vae.latents_std.view(1, -1, 1, 1, 1).float().cpu()




@dataclass
class Denoiser:
    """One LTX-Video denoising step: the guidance branches' forward, the guidance combine, the Euler update.

    `generate` runs it every step and `usp-infer bench` times it; every layout decision comes from `plan`.
    """

    transformer: LTXTransformer
    plan: Plan
    text: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "cond"/"uncond" -> (embeddings, mask)
    rope: tuple[torch.Tensor, torch.Tensor]  # this rank's rows of the RoPE tables
    attn_fn: AttnFn
    guider: Guider
    branches: str = "batched"  # or "sequential"
    stg_mode: str = "values"
    blocks: Any = None  # what runs the transformer's block loop (graphs.GraphedCall), or None: the plain loop

    def _forward(self, names: tuple[str, ...], latents, timestep, scales: StepScales) -> list[torch.Tensor]:
        b = len(names)
        embeds = torch.cat([self.text["uncond" if n == "uncond" else "cond"][0] for n in names])
        mask = torch.cat([self.text["uncond" if n == "uncond" else "cond"][1] for n in names])
        perturbation = source = None
        if "perturbed" in names:
            rows = torch.tensor([n == "perturbed" for n in names])  # on the host: the forward reads them there
            perturbation = Perturbation(scales.stg_blocks, self.stg_mode, rows)
            # the perturbed branch is the cond branch up to its first perturbed block: computed from there on only
            source = names.index("cond") if "cond" in names else None
        out = self.transformer(
            latents.to(embeds.dtype).expand(b, -1, -1), embeds, timestep.expand(b, *timestep.shape[1:]),
            mask, self.rope, attn_fn=self.attn_fn, perturbation=perturbation, stg_source=source,
            **({"blocks": self.blocks} if self.blocks else {}),
        )
        return list(out.float().split(1))

    def predict(self, latents, timestep, scales: StepScales) -> torch.Tensor:
        """The guided velocity for this rank's tokens."""
        def forward(names: tuple[str, ...]) -> list[torch.Tensor]:
            if self.branches == "sequential":
                return [p for n in names for p in self._forward((n,), latents, timestep, scales)]
            return self._forward(names, latents, timestep, scales)

        return self.guider.combine(self.plan.run_branches(scales.branches, forward, like=latents), scales)

    def step(self, latents, t, sigma, sigma_next, scales: StepScales, level=None) -> torch.Tensor:
        """Latents one step on. `level` (per token, (1, S, 1)) is the noise level a conditioned token starts
        at (1 - strength): as in LTX-Video (and diffusers' LTXConditionPipeline, whose per-token Euler step
        this is), such a token sees the timestep min(t, level) and is stepped only once sigma has come down
        to its level, from min(sigma, level) to the next sigma; until then it is kept as it is."""
        timestep = t.expand(1) if level is None else torch.minimum(t, level[..., 0] * 1000.0)
        pred = self.predict(latents, timestep, scales)
        if level is None:
            return latents + (sigma_next - sigma) * pred
        active = sigma - 1e-6 < level  # LTX-Video's tokens_to_denoise_mask, with its epsilon
        return torch.where(active, latents + (sigma_next - torch.minimum(sigma, level)) * pred, latents)


@dataclass
class Inputs:
    """What rank 0 prepares for one item and every rank receives (CPU tensors)."""

    text: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "cond"/"uncond" -> (embeddings, mask)
    latents: torch.Tensor  # (1, C, F, H, W): the global initial latent (noise, with the image latent mixed in)
    level: torch.Tensor | None  # (1, S, 1): per-token noise level conditioned tokens never go above
    ratios: tuple[int, int]  # the VAE's (temporal, spatial) compression


@torch.no_grad()
def prepare_inputs(c: Components, req: GenerateRequest, schedule) -> tuple[Inputs, torch.Generator]:
    """Rank 0's part before the loop: text embeddings and the global initial latent, drawn exactly as diffusers
    draws it (image latent sample, then noise); the generator goes on to draw the decode noise."""
    from ..media import load_image

    s_ratio, t_ratio = c.vae.spatial_compression_ratio, c.vae.temporal_compression_ratio
    frames, height, width = (req.num_frames - 1) // t_ratio + 1, req.height // s_ratio, req.width // s_ratio
    channels = c.transformer.cfg.in_channels
    generator = torch.Generator("cpu").manual_seed(req.seed)
    text = {"cond": encode_text(c, req.prompt, req.max_sequence_length)}
    if any("uncond" in s.branches for s in schedule):
        text["uncond"] = encode_text(c, req.negative_prompt, req.max_sequence_length)

    mean, std = _latent_stats(c.vae)
    level = None
    if req.image is not None:
        image = load_image(Path(req.image), req.height, req.width).to(c.device, c.dtype)
        encoded = c.vae.encode(image[None, :, None]).latent_dist.sample(generator).float().cpu()
        encoded = (encoded - mean) / std
        noise = torch.randn((1, channels, frames, height, width), generator=generator)
        cond_mask = torch.zeros((1, 1, frames, height, width))
        cond_mask[:, :, 0] = req.image_strength
        latents = encoded.repeat(1, 1, frames, 1, 1) * cond_mask + noise * (1 - cond_mask)
        level = 1.0 - pack(cond_mask)
    else:
        latents = torch.randn((1, channels, frames, height, width), generator=generator)
    return Inputs(text, latents, level, (t_ratio, s_ratio)), generator


@torch.no_grad()
def generate(c: Components, req: GenerateRequest, plan: Plan, progress: bool = True, vae_tiling: bool = False,
             say=lambda message: None, uint8_frames: bool = False) -> Result:
    """`say` prints what is happening (the main rank's progress lines); the step bar shows the loop;
    uint8_frames: Result.frames as the mp4 / png writers take them (media.video_frames)."""
    from tqdm import tqdm

    t_cfg = c.transformer.cfg
    if req.guidance.max_block() >= t_cfg.num_layers:
        raise ValueError(
            f"--stg-blocks {req.guidance.max_block()} is out of range: the model has {t_cfg.num_layers} blocks "
            f"(0..{t_cfg.num_layers - 1})"
        )
    # The schedule depends on the token count, which needs the VAE's ratios: the other ranks have no VAE, so
    # rank 0 works it out and they take the ratios from its inputs (the schedule is cheap to redo).
    def schedule_for(ratios):
        t_ratio, s_ratio = ratios
        grid = ((req.num_frames - 1) // t_ratio + 1, req.height // s_ratio, req.width // s_ratio)
        timesteps, sigmas = sigma_schedule(c.scheduler_config, req.steps, grid[0] * grid[1] * grid[2])
        return grid, timesteps, sigmas, [req.guidance.at(float(s)) for s in sigmas[:-1]]

    kept = {}

    def prepare() -> Inputs:
        say("encoding text")
        start = time.perf_counter()
        _, _, _, schedule = schedule_for((c.vae.temporal_compression_ratio, c.vae.spatial_compression_ratio))
        inputs, kept["generator"] = prepare_inputs(c, req, schedule)
        kept["encode_text_time"] = time.perf_counter() - start
        return inputs

    inputs = plan.from_main(prepare)
    (frames, height, width), timesteps, sigmas, schedule = schedule_for(inputs.ratios)
    t_ratio, s_ratio = inputs.ratios
    tokens = frames * height * width
    text = {name: (e.to(c.device), m.to(c.device)) for name, (e, m) in inputs.text.items()}

    shard = plan.shard(tokens)
    latents = shard.split(pack(inputs.latents)).to(c.device)
    level = None
    if inputs.level is not None:
        # Pads get level 0: they are never stepped and stay exactly zero.
        level = shard.split(inputs.level).to(c.device)
    rope = tuple(shard.split(r) for r in rope_tables(t_cfg, frames, height, width, (t_ratio / req.fps, s_ratio, s_ratio), c.device))
    denoiser = Denoiser(c.transformer, plan, text, rope, plan.self_attention(shard),
                        Guider(stats=shard, count=tokens * t_cfg.in_channels), req.branches, req.guidance.stg_mode,
                        graphs.for_stage(c.transformer.run_blocks, plan, req.steps) if c.cuda_graphs else None)
    sigmas = sigmas.to(c.device)

    step_times = []
    bar = tqdm(total=req.steps, disable=not progress, unit="step", dynamic_ncols=True)
    for i, t in enumerate(timesteps.to(c.device)):
        start = time.perf_counter()
        latents = denoiser.step(latents, t, sigmas[i], sigmas[i + 1], schedule[i], level)
        plan.check_finite(i, req.steps, latents)
        step_times.append(time.perf_counter() - start)
        bar.set_postfix_str(f"{step_times[-1] * 1000:.0f} ms/step")
        bar.update()
    bar.close()

    latents = shard.gather(latents)
    if not plan.is_main:
        return Result(None, None, step_times)
    start = time.perf_counter()
    generator = kept["generator"]
    mean, std = _latent_stats(c.vae)
    latents = unpack(latents.float().cpu(), frames, height, width)
    latents = (latents * std / c.vae.config.scaling_factor + mean).to(c.dtype)
    decode_t = None
    if c.vae.config.timestep_conditioning:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
        latents = (1 - req.decode_noise_scale) * latents + req.decode_noise_scale * noise
        decode_t = torch.tensor([req.decode_timestep], device=c.device, dtype=latents.dtype)
    latents = latents.to(c.device)
    tiling = needs_tiling(c.vae, tuple(latents.shape), c.device, vae_tiling)
    result = Result(None, latents[0].float().cpu().numpy(), step_times, 0.0, kept["encode_text_time"],
                    None if decode_t is None else req.decode_timestep, tiling)
    if tiling and not vae_tiling:
        say(f"decoding in tiles: a full decode needs ~{decode_memory(c.vae, tuple(latents.shape), c.vae.dtype) / 2**30:.1f} GiB, "
            "more than is free")
    else:
        say("decoding" + (" in tiles" if tiling else ""))
    try:
        result.frames = decode_latents(c.vae, latents, decode_t, tiling, uint8_frames)
    except (RuntimeError, MemoryError) as e:  # out of memory (torch raises RuntimeError on the CPU), a kernel failure
        raise DecodeError(f"the VAE decode failed ({type(e).__name__}: {e})", result) from e
    result.decode_time = time.perf_counter() - start
    return result
