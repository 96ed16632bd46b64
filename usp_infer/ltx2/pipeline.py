"""LTX-2 / LTX-2.3: Gemma text -> connectors -> video + audio latents (+ image) -> four-branch loop -> decode.

Matches diffusers' `LTX2Pipeline` / `LTX2ImageToVideoPipeline` for the same seed: the image latent
(argmax, no RNG), then video noise, then audio noise, drawn from one CPU generator; sigmas
`linspace(1, 1/N, N)` shifted by mu from the video token count; guidance per modality in x0 space

    pred = c + (cfg - 1)(c - u) + stg (c - p) + (mod - 1)(c - m),   then   pred *= r std(c)/std(pred) + 1 - r

with c = cond, u = uncond (negative prompt), p = perturbed (STG blocks' self-attention -> V),
m = isolated (no audio<->video attention). The loop is written for one process against the
parallel `Plan`: video tokens go through `shard.split` / `shard.gather`, guidance statistics of
the video through the shard (global sums), audio stays whole on every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch

from .. import graphs
from ..config import ParallelConfig
from ..guidance import CFG, STG, LocalStats, Rescale, SeqStats
from ..parallel.plan import Plan

# LTX2Pipeline sets its schedule as LTXPipeline does: sigmas linspace(1, 1/N, N), mu linear in the (video) token
# count, extrapolated past max_image_seq_len; one step skips the terminal stretch. diffusers steps the audio
# with a deep copy of the same scheduler, so the stateless Euler update in `Denoiser.step` serves both.
from ..schedule import explicit_schedule, sigma_schedule
from .request import (  # noqa: F401 - the request side, re-exported with the pipeline
    PRESETS,
    LTX2Guidance,
    LTX2Request,
    ModalityGuidance,
    _read_index,
    attention_heads,
    audio_tokens_per_second,
    build_request,
    num_layers,
    read_model_configs,
)

# --- components -----------------------------------------------------------------------------------


@dataclass
class Components:
    model_dir: Path
    transformer: Any  # usp_infer.ltx2.LTX2Transformer (or anything with its forward)
    arch: ModuleType  # the module with rope_tables / LTX2Attention / LOCAL_ATTENTION (usp_infer.ltx2.model)
    vae: torch.nn.Module | None  # None on the ranks that neither encode an image nor decode
    audio_vae: torch.nn.Module | None
    vocoder: torch.nn.Module | None
    connectors: torch.nn.Module | None  # None where the text comes from text_cache
    text_encoder: torch.nn.Module | None  # kept on the CPU; moved to `device` only while encoding
    tokenizer: Any
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    # (prompt, max_sequence_length) -> (video text, audio text, mask) on the CPU, as the connectors made them
    text_cache: dict = field(default_factory=dict)
    fuser: Any = None  # lora.Fuser once a LoRA is asked for: the transformer's weights with the LoRAs of the moment
    upsamplers: dict = field(default_factory=dict)  # folder -> latent upsampler (the main rank, two stages)
    cuda_graphs: bool = False  # replay each stage's block loop as CUDA graphs where the layout allows (graphs.py)

    @property
    def sample_rate(self) -> int:
        return int(self.vocoder.config.output_sampling_rate) if self.vocoder is not None else 0


def load_components(
    model_dir: Path | str, device: torch.device | str, dtype: torch.dtype, transformer: Any = None, arch: Any = None,
    *, main: bool = True, text_encoder: bool = True,
) -> Components:
    """Load an LTX-2 diffusers folder: everything (`main`), or the transformer alone (the other ranks of a
    multi-process run). `text_encoder=False`: no Gemma or connectors; encode_prompts fills text_cache first.
    The text encoder stays on the CPU until a prompt is encoded."""
    import diffusers
    import transformers
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
    )
    from diffusers.pipelines.ltx2 import vocoder as vocoders

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    model_dir, device = Path(model_dir), torch.device(device)
    index = _read_index(model_dir)
    from . import model

    arch = arch or model
    if transformer is None:
        transformer = arch.load_transformer(model_dir / "transformer", device, dtype)
    vocoder_cls = getattr(vocoders, index["vocoder"][1])

    def load(cls, name):
        return cls.from_pretrained(model_dir / name, torch_dtype=dtype).eval()

    encoder, tokenizer, connectors = _load_text(model_dir, device, dtype) if main and text_encoder else (None,) * 3
    return Components(
        model_dir=model_dir,
        transformer=transformer.eval(),
        arch=arch,
        vae=load(AutoencoderKLLTX2Video, "vae").to(device) if main else None,
        audio_vae=load(AutoencoderKLLTX2Audio, "audio_vae").to(device) if main else None,
        vocoder=load(vocoder_cls, "vocoder").to(device) if main else None,
        connectors=connectors,
        text_encoder=encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(FlowMatchEulerDiscreteScheduler.load_config(model_dir / "scheduler")),
        device=device,
        dtype=dtype,
    )


def _load_text(model_dir: Path, device: torch.device, dtype: torch.dtype, encoder_device: str | torch.device = "cpu"):
    """(Gemma on `encoder_device`, its tokenizer, the connectors on `device`). Gemma's weights go from the files
    to `encoder_device`: no copy of the model is built in host memory on the way to a GPU."""
    import transformers
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    transformers.utils.logging.disable_progress_bar()  # --quiet means quiet; the runner says "loading"

    encoder = Gemma3ForConditionalGeneration.from_pretrained(model_dir / "text_encoder", torch_dtype=dtype,
                                                             device_map=str(encoder_device)).eval()
    connectors = LTX2TextConnectors.from_pretrained(model_dir / "connectors", torch_dtype=dtype).eval().to(device)
    return encoder, AutoTokenizer.from_pretrained(model_dir / "tokenizer"), connectors


def compile_blocks(transformer) -> None:
    from .model import compile_blocks as compile_ltx2

    compile_ltx2(transformer)


# --- text -----------------------------------------------------------------------------------------


@torch.no_grad()
def gemma_hidden_states(c: Components, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All Gemma hidden states stacked per token (B, L, D * (layers + 1)) and the left-padded mask (B, L).

    As LTX2Pipeline: prompts stripped, padded on the left to `max_length`, <bos> prepended.
    """
    tok = c.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tokens = tok(
        [p.strip() for p in prompts], padding="max_length", max_length=max_length, truncation=True,
        add_special_tokens=True, return_tensors="pt",
    )
    ids, mask = tokens.input_ids.to(c.device), tokens.attention_mask.to(c.device)
    out = c.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # layers x (B, L, D) -> (B, L, D, layers) -> (B, L, D * layers): the connectors' packed layout
    return torch.stack(out.hidden_states, dim=-1).flatten(2, 3).to(c.dtype), mask


@torch.no_grad()
def encode_text(c: Components, prompts: dict[str, str], max_length: int) -> dict[str, tuple]:
    """{name: (video_text, audio_text, mask)} through Gemma and the connectors, from c.text_cache where it holds
    them. A text encoder kept on the CPU visits the GPU only for this call and goes back, so the transformer
    has the memory to itself during denoising; one loaded on the GPU (encode_prompts) stays there."""
    missing = {p for p in prompts.values() if (p, max_length) not in c.text_cache}
    if missing:
        assert c.text_encoder is not None, "prompt not in text_cache, and no text encoder loaded"
        home = c.text_encoder.device
        c.text_encoder.to(c.device)
        try:
            encoded = {p: gemma_hidden_states(c, [p], max_length) for p in sorted(missing)}
        finally:
            c.text_encoder.to(home)
            if c.device.type == "cuda":
                torch.cuda.empty_cache()
        side = getattr(c.tokenizer, "padding_side", "left")
        for p, (embeds, mask) in encoded.items():
            c.text_cache[p, max_length] = tuple(t.cpu() for t in c.connectors(embeds, mask, padding_side=side))
    return {name: tuple(t.to(c.device) for t in c.text_cache[p, max_length]) for name, p in prompts.items()}


def encode_prompts(model_dir: Path, device: torch.device, dtype: torch.dtype, requests) -> dict:
    """Load Gemma and the connectors, encode every prompt (and negative prompt) of `requests` once, free them:
    a text_cache for Components. Run before the transformer loads, the 12B text encoder never shares the GPU
    with it (the runner does this on rank 0 alone). Gemma loads onto `device` and is freed there: no host copy
    of its 24 GB (bf16) is built first, and none is copied back."""
    import gc

    encoder, tokenizer, connectors = _load_text(Path(model_dir), torch.device(device), dtype, encoder_device=device)
    c = Components(Path(model_dir), None, None, None, None, None, connectors, encoder, tokenizer, {},
                   torch.device(device), dtype)
    for req in requests:
        encode_text(c, {"cond": req.prompt, "uncond": req.negative_prompt}, req.max_sequence_length)
    cache = c.text_cache
    del c
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return cache


# --- latents --------------------------------------------------------------------------------------


def pack_video(latents: torch.Tensor) -> torch.Tensor:
    # (B, C, F, H, W) -> (B, F*H*W, C): tokens in f, h, w raster order (patch size 1)
    return latents.flatten(2).transpose(1, 2)


def unpack_video(tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    # (B, F*H*W, C) -> (B, C, F, H, W)
    return tokens.transpose(1, 2).unflatten(2, (frames, height, width))


def pack_audio(latents: torch.Tensor) -> torch.Tensor:
    # (B, C, L, M) -> (B, L, C*M): one token per latent audio frame, channels outer, mel bins inner
    return latents.transpose(1, 2).flatten(2, 3)


def unpack_audio(tokens: torch.Tensor, mel_bins: int) -> torch.Tensor:
    # (B, L, C*M) -> (B, C, L, M)
    return tokens.unflatten(2, (-1, mel_bins)).transpose(1, 2)


@dataclass(frozen=True)
class Layout:
    """Latent sizes of one request."""

    frames: int  # latent frames F'
    height: int  # latent H'
    width: int  # latent W'
    channels: int
    audio_frames: int  # audio tokens L
    audio_channels: int
    audio_mel: int  # latent mel bins M

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width


def layout(c: Components, req: LTX2Request) -> Layout:
    s, t = c.vae.spatial_compression_ratio, c.vae.temporal_compression_ratio
    a = c.audio_vae
    per_second = audio_tokens_per_second(a.config)
    return Layout(
        frames=(req.num_frames - 1) // t + 1,
        height=req.height // s,
        width=req.width // s,
        channels=c.vae.config.latent_channels,
        audio_frames=round(req.num_frames / req.fps * per_second),
        audio_channels=a.config.latent_channels,
        audio_mel=a.config.mel_bins // a.mel_compression_ratio,
    )


def _video_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    return vae.latents_mean.view(1, -1, 1, 1, 1).float().cpu(), vae.latents_std.view(1, -1, 1, 1, 1).float().cpu()


@torch.no_grad()
def initial_latents(c: Components, req: LTX2Request, lay: Layout, generator: torch.Generator):
    """(video tokens (1, T_v, C), conditioning mask (1, T_v) or None, audio tokens (1, L, C_a*M), the
    conditioned sequence or None), float32 CPU.

    Draw order as diffusers: image latent (argmax: no draw), video noise, audio noise. With --condition, as
    LTX2ConditionPipeline: both noises drawn in the packed token shape, over the appended tokens too.
    """
    from ..media import load_image

    shape = (1, lay.channels, lay.frames, lay.height, lay.width)
    mask = conditioned = None
    if req.conditions or req.extend:
        from .conditions import prepare

        conditioned = prepare(c, req, lay, generator, req.height, req.width)
        video = conditioned.latents
    elif req.image is None:
        video = pack_video(torch.randn(shape, generator=generator, dtype=torch.float32))
    else:
        pixels = load_image(Path(req.image), req.height, req.width, crf=req.image_crf)
        pixels = pixels.to(c.device, c.dtype)[None, :, None]  # (3, H, W) -> (1, 3, 1, H, W)
        encoded = c.vae.encode(pixels.to(c.vae.dtype)).latent_dist.mode().float().cpu()
        mean, std = _video_stats(c.vae)
        # As LTX2ImageToVideoPipeline (and LTX-Video's image path): per-channel statistics, no scaling_factor
        # (which the decode divides by); every LTX-2 VAE has 1, where the two readings agree.
        encoded = (encoded - mean) / std
        cond = torch.zeros((1, 1, lay.frames, lay.height, lay.width))
        cond[:, :, 0] = 1.0
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        video = pack_video(encoded.repeat(1, 1, lay.frames, 1, 1) * cond + noise * (1 - cond))
        mask = pack_video(cond)[..., 0]  # (1, T_v): 1 on the image's tokens
    if req.audio_input is not None:  # audio-to-video: the given sound, encoded, held clean (no noise drawn)
        from .audio_input import encode_waveform, load_input

        waveform, rate = load_input(req.audio_input, req.num_frames / req.fps)
        audio = encode_waveform(c.audio_vae, torch.from_numpy(waveform), rate, lay.audio_frames)
    elif conditioned is not None:
        audio = torch.randn((1, lay.audio_frames, lay.audio_channels * lay.audio_mel), generator=generator)
    else:
        audio = pack_audio(torch.randn((1, lay.audio_channels, lay.audio_frames, lay.audio_mel), generator=generator))
    return video, mask, audio, conditioned


# --- guidance -------------------------------------------------------------------------------------


class Modality:
    """LTX-2's modality-isolation term: away from the prediction made without audio<->video attention."""

    def contribution(self, preds: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        return (scale - 1.0) * (preds["cond"] - preds["isolated"])


def guide(
    preds: dict[str, torch.Tensor], scales: ModalityGuidance, stats: SeqStats, count: int
) -> torch.Tensor:
    """Combine one modality's x0 predictions; terms of branches not run are absent (zero)."""
    pred = preds["cond"]
    if "uncond" in preds:
        pred = pred + CFG().contribution(preds, scales.cfg)
    if "perturbed" in preds:
        pred = pred + STG().contribution(preds, scales.stg)
    if "isolated" in preds:
        pred = pred + Modality().contribution(preds, scales.modality)
    if scales.rescale > 0:
        pred = Rescale().apply(pred, preds["cond"], scales.rescale, stats, count)
    return pred


# --- the loop -------------------------------------------------------------------------------------


@dataclass
class Result:
    frames: np.ndarray | None  # (F, H, W, 3) float32 in [0, 1] (or uint8: generate's uint8_frames); main rank only
    audio: np.ndarray | None  # (channels, samples) float32 in [-1, 1]; main rank only
    sample_rate: int
    latents: np.ndarray | None  # (C, F', H', W') float32, what the video VAE decodes
    audio_latents: np.ndarray | None  # (C_a, L, M) float32, what the audio VAE decodes
    step_times: list[float] = field(default_factory=list)
    decode_time: float = 0.0
    encode_text_time: float = 0.0
    vae_tiling: bool = False
    recipe: dict = field(default_factory=dict)  # for the sidecar: each stage's sigmas and LoRAs, the upsampler
    phases: dict = field(default_factory=dict)  # seconds per phase (stage1_s, upsample_s, stage2_s, ...)

    def outputs(self) -> dict:
        """What media.write_video writes besides the frames."""
        return {"latents": self.latents, "audio": self.audio, "audio_sample_rate": self.sample_rate,
                "audio_latents": self.audio_latents}


@dataclass
class BranchForward:
    """Runs the transformer for a subset of branches: one batched call (rows in `names` order) or one call each."""

    transformer: Any
    text: dict  # "cond"/"uncond" -> (video text, audio text, mask)
    rope: Any  # this rank's LTX2Rope
    attn: Any  # LTX2Attention
    stg_blocks: tuple[int, ...]
    branches: str = "batched"
    # Audio-to-video, as Lightricks' A2V pipeline: the audio tokens sit at timestep 0 (their sigma stays the
    # step's), the uncond branch keeps the positive prompt for the audio, STG perturbs the video alone.
    audio_frozen: bool = False
    blocks: Any = None  # what runs the transformer's block loop (graphs.GraphedCall), or None: the plain loop

    def __call__(self, names, video, audio, timestep, t) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.branches == "sequential":
            return [p for n in names for p in self._forward((n,), video, audio, timestep, t)]
        return self._forward(tuple(names), video, audio, timestep, t)

    def _forward(self, names, video, audio, timestep, t):
        b, dev, dt = len(names), video.device, self.text["cond"][0].dtype
        # One text row per (video prompt, audio prompt): the cond, STG and isolated branches share the positive
        # one (and its K/V).
        audio_uncond = "cond" if self.audio_frozen else "uncond"
        prompts = [("uncond", audio_uncond) if n == "uncond" else ("cond", "cond") for n in names]
        distinct = list(dict.fromkeys(prompts))
        video_texts, audio_texts = [self.text[p] for p, _ in distinct], [self.text[p] for _, p in distinct]
        rows = lambda flag: torch.tensor([n == flag for n in names])  # noqa: E731  on the host: read there
        tt = t.expand(b).to(dev)
        extra = ({"stg_audio": False} if self.audio_frozen else {}) | ({"blocks": self.blocks} if self.blocks else {})
        video_out, audio_out = self.transformer(
            video.to(dt).expand(b, -1, -1),
            audio.to(dt).expand(b, -1, -1),
            torch.cat([x[0] for x in video_texts]),
            torch.cat([x[1] for x in audio_texts]),
            torch.cat([x[2] for x in video_texts]).bool(),
            torch.cat([x[2] for x in audio_texts]).bool(),
            timestep.expand(b, *timestep.shape[1:]),
            tt * 0 if self.audio_frozen else tt,  # audio_timestep
            tt,  # sigma: LTX2Pipeline passes the timestep (x1000) here
            tt,  # audio_sigma
            self.rope,
            attn=self.attn,
            stg_blocks=self.stg_blocks if "perturbed" in names else (),
            stg_rows=rows("perturbed") if "perturbed" in names else None,
            isolate_rows=rows("isolated") if "isolated" in names else None,
            text_rows=tuple(distinct.index(p) for p in prompts) if len(distinct) < b else None,
            # the perturbed branch is the cond branch up to the first STG block: computed from there on only
            stg_source=names.index("cond") if "perturbed" in names and "cond" in names else None,
            **extra,
        )
        return list(zip(video_out.float().split(1), audio_out.float().split(1)))


@dataclass
class Denoiser:
    """One LTX-2 denoising step: the branches' forward, per-modality guidance in x0 space, both Euler updates.

    `generate` runs it every step and `usp-infer bench` times it; every layout decision comes from `plan`.
    """

    forward: BranchForward
    plan: Plan
    names: tuple[str, ...]  # the branches each step runs
    guidance: LTX2Guidance
    video_stats: SeqStats  # the video shard: global sums, pads excluded
    video_count: int  # values per sample, globally
    audio_count: int
    keep: torch.Tensor | None = None  # (1, T, 1) True on the image's tokens, which are never stepped
    level: torch.Tensor | None = None  # (1, T) per-token timestep factor (0 on the image's tokens)
    strength: torch.Tensor | None = None  # (1, T, 1) conditions' strength m: x0 <- x0 (1 - m) + clean m
    clean: torch.Tensor | None = None  # (1, T, C) the conditions' latents where m > 0
    audio_frozen: bool = False  # audio-to-video: the audio tokens are the given sound and never move

    def step(self, video, audio, t, sigma: float, dsigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        timestep = t.expand(1) if self.level is None else t * self.level  # (1,) or per video token (1, T)
        preds = self.plan.run_branches(self.names, lambda subset: self.forward(subset, video, audio, timestep, t),
                                       like=(video, audio))
        # velocity -> x0 per branch, guidance per modality, x0 -> velocity
        video_x0 = {n: video - sigma * p[0] for n, p in preds.items()}
        audio_x0 = {n: audio - sigma * p[1] for n, p in preds.items()}
        video_x0 = guide(video_x0, self.guidance.video, self.video_stats, self.video_count)
        if self.strength is not None:  # as LTX2ConditionPipeline, in x0 space
            video_x0 = video_x0 * (1 - self.strength) + self.clean * self.strength
        stepped = video + dsigma * ((video - video_x0) / sigma)
        video = stepped if self.keep is None else torch.where(self.keep, video, stepped)
        if self.audio_frozen:
            return video, audio
        audio_v = (audio - guide(audio_x0, self.guidance.audio, LocalStats(), self.audio_count)) / sigma
        return video, audio + dsigma * audio_v


@torch.no_grad()
def generate(c: Components, req: LTX2Request, plan: Plan | None = None, progress: bool = True,
             vae_tiling: bool = False, say: Callable[[str], None] | None = None, uint8_frames: bool = False) -> Result:
    """One video with sound, one stage (stages.generate runs two); `say` hears what is happening around the
    step bar (the main rank's only); uint8_frames: Result.frames as the mp4 / png writers take them."""
    say = say or (lambda message: None)
    plan = plan or Plan.build(ParallelConfig(), str(c.device))  # one process: no process group
    start = time.perf_counter()
    stage = run_one_stage(c, req, plan, progress, say, torch.Generator("cpu").manual_seed(req.seed))
    phases = {"stage1_s": time.perf_counter() - start - stage.encode_text_time}
    return finish(c, req, plan, stage, {"name": req.recipe.name, "stage1": stage.record}, phases, vae_tiling, say,
                  uint8_frames)


@dataclass
class Stage:
    """One denoising stage's outcome: the final latents, whole on every rank, and what made them."""

    video: torch.Tensor  # (1, T_v, C) packed, normalised
    audio: torch.Tensor  # (1, L, C_a*M)
    layout: Layout
    text: dict  # name -> (video text, audio text, mask) on the device
    step_times: list[float]
    encode_text_time: float
    record: dict  # for the sidecar: steps, sigmas, LoRAs


def use_loras(c: Components, specs) -> list[dict]:
    """Fuse exactly the LoRAs `specs` into this rank's transformer (lora.Fuser); what the sidecar records."""
    if c.fuser is None:
        if not specs:
            return []
        from .lora import Fuser

        c.fuser = Fuser(c.transformer)
    return c.fuser.use(specs)


def schedule(c: Components, req: LTX2Request, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas + [0]): the request's sigma list as given, else linspace with the folder's shift
    from the video token count."""
    if req.recipe.sigmas is not None:
        return explicit_schedule(c.scheduler_config, req.recipe.sigmas)
    return sigma_schedule(c.scheduler_config, req.steps, tokens)


def run_one_stage(c: Components, req: LTX2Request, plan: Plan, progress: bool, say: Callable[[str], None],
                  generator: torch.Generator) -> Stage:
    """The text, the initial latents (rank 0 draws them from `generator`) and the loop of `req`."""
    blocks = getattr(getattr(c.transformer, "cfg", None), "num_layers", None)
    if blocks is not None and any(not 0 <= b < blocks for b in req.guidance.stg_blocks):
        raise ValueError(f"--stg-blocks {list(req.guidance.stg_blocks)} out of range: the model has blocks 0..{blocks - 1}")
    guidance = req.guidance
    if req.audio_input is not None:  # audio-to-video: the audio is given, so only the video's terms count
        guidance = replace(guidance, audio=ModalityGuidance())
    names = guidance.branches()
    if not c.transformer.cfg.perturbed_attn:  # LTX-2.0 weights: STG changes nothing, so skip its forward
        names = tuple(n for n in names if n != "perturbed")
    prompts = {"cond": req.prompt} | ({"uncond": req.negative_prompt} if "uncond" in names else {})
    loras = use_loras(c, req.recipe.loras)

    def prepare() -> tuple:
        """Rank 0's part (it holds the VAEs and the text): the sizes, the text, the initial latents, on the CPU."""
        say("encoding text")
        start = time.perf_counter()
        text = {name: tuple(t.cpu() for t in v) for name, v in encode_text(c, prompts, req.max_sequence_length).items()}
        lay = layout(c, req)
        latents = initial_latents(c, req, lay, generator)
        return lay, text, latents, time.perf_counter() - start

    lay, text, latents, encode_text_time = plan.from_main(prepare)
    text = {name: tuple(t.to(c.device) for t in v) for name, v in text.items()}
    # The grid's tokens, plus appended keyframes' (which count for the shift, as in diffusers).
    timesteps, sigmas = schedule(c, req, latents[0].shape[1])
    video, audio, step_times = run_stage(c, req, plan, lay, text, latents, timesteps, sigmas, names, progress,
                                         guidance)
    record = {"steps": len(timesteps), "sigmas": sigmas[:-1].tolist(), "loras": loras}
    return Stage(video, audio, lay, text, step_times, encode_text_time, record)


def run_stage(c: Components, req: LTX2Request, plan: Plan, lay: Layout, text: dict, latents: tuple,
              timesteps: torch.Tensor, sigmas: torch.Tensor, names: tuple[str, ...], progress: bool,
              guidance: LTX2Guidance | None = None):
    """The denoising loop from `latents` = (video, conditioning mask or None, audio[, conditioned sequence or
    None]), whole, on the CPU: (video gathered on every rank, audio, step times)."""
    from tqdm import tqdm

    video, cond_mask, audio, conditioned = (*latents, None)[:4]
    guidance = guidance or req.guidance
    tokens = video.shape[1]
    # Video tokens are sharded for the whole loop (appended keyframes with them); audio is whole on every rank.
    shard = plan.shard(tokens)
    video = shard.split(video).to(c.device)
    audio = audio.to(c.device)
    keep = None if cond_mask is None else shard.split(cond_mask).to(c.device)[..., None] > 0  # (1, T, 1)
    level = None if cond_mask is None else 1.0 - shard.split(cond_mask).to(c.device)  # per-token timestep factor
    strength = clean = coords = None
    if conditioned is not None:
        strength, clean = shard.split(conditioned.strength).to(c.device), shard.split(conditioned.clean).to(c.device)
        level, coords = 1.0 - strength[..., 0], conditioned.coords.to(c.device)
    rope = c.arch.rope_tables(
        c.transformer.cfg, lay.frames, lay.height, lay.width, req.fps, lay.audio_frames, c.device,
        **({} if coords is None else {"video": coords}),  # a grid plus appended keyframes: their own positions
    ).map_video(lambda x: shard.split(x, dim=1))
    attn = replace(
        c.arch.LOCAL_ATTENTION,
        video_self=plan.self_attention(shard),
        video_to_audio=plan.kv_sharded_attention(shard),
    )
    frozen = req.audio_input is not None
    forward = BranchForward(c.transformer, text, rope, attn, req.guidance.stg_blocks, req.branches, frozen,
                            graphs.for_stage(c.transformer.run_blocks, plan, len(timesteps)) if c.cuda_graphs else None)
    denoiser = Denoiser(forward, plan, names, guidance, shard, tokens * lay.channels,
                        audio.shape[1] * audio.shape[2], keep, level, strength, clean, frozen)

    step_times = []
    steps = len(timesteps)
    bar = tqdm(total=steps, disable=not (progress and plan.is_main), unit="step", dynamic_ncols=True)
    for i, t in enumerate(timesteps):
        start = time.perf_counter()
        sigma, dsigma = sigmas[i].item(), (sigmas[i + 1] - sigmas[i]).item()
        video, audio = denoiser.step(video, audio, t.to(c.device), sigma, dsigma)
        plan.check_finite(i, steps, video, audio)
        step_times.append(time.perf_counter() - start)
        bar.set_postfix_str(f"{step_times[-1] * 1000:.0f} ms/step")
        bar.update()
    bar.close()
    return shard.gather(video)[:, :lay.video_tokens], audio, step_times  # appended keyframe tokens go


def finish(c: Components, req: LTX2Request, plan: Plan, stage: Stage, recipe: dict, phases: dict,
           vae_tiling: bool, say: Callable[[str], None], uint8_frames: bool = False) -> Result:
    """Decode the last stage's latents on the main rank (the others return timings only); uint8_frames: the
    frames as the mp4 / png writers take them (decode_video)."""
    lay, times = stage.layout, stage.step_times
    if not plan.is_main:
        return Result(None, None, c.sample_rate, None, None, times, encode_text_time=stage.encode_text_time,
                      recipe=recipe, phases=phases)
    start = time.perf_counter()
    say("decoding" + (" in tiles" if vae_tiling else ""))
    if vae_tiling:
        c.vae.enable_tiling()
    frames, latents = decode_video(c, stage.video, lay, uint8_frames)
    phases["video_decode_s"] = time.perf_counter() - start
    rate = c.sample_rate
    if req.audio_input is not None:  # the output carries the given sound itself, as Lightricks' A2V returns it
        from .audio_input import load_input

        waveform, rate = load_input(req.audio_input, req.num_frames / req.fps)
        audio_latents = _audio_latents(c, stage.audio, lay)[0].numpy()
    else:
        waveform, audio_latents = decode_audio(c, stage.audio, lay) if req.audio else (None, None)
    phases["audio_decode_s"] = time.perf_counter() - start - phases["video_decode_s"]
    if req.extend is not None:  # the clip, then the new frames after the overlap (and the sounds likewise)
        from .extend import join

        frames, waveform = join(req, frames, waveform, rate)
    return Result(frames, waveform, rate, latents, audio_latents, times, time.perf_counter() - start,
                  stage.encode_text_time, vae_tiling, recipe, phases)


@torch.no_grad()
def decode_video(c: Components, tokens: torch.Tensor, lay: Layout, uint8: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Packed normalised video latents -> frames (F, H, W, 3) in [0, 1] (uint8: media.video_frames), and the
    latents the VAE decoded."""
    from ..media import video_frames

    mean, std = _video_stats(c.vae)
    latents = unpack_video(tokens.float().cpu(), lay.frames, lay.height, lay.width)
    latents = latents * std / c.vae.config.scaling_factor + mean
    decode_t = None
    if c.vae.config.timestep_conditioning:  # the real 2.x VAEs are not; diffusers' default decode_timestep is 0
        decode_t = torch.zeros(1, device=c.device, dtype=c.vae.dtype)
    video = c.vae.decode(latents.to(c.device, c.vae.dtype), decode_t, return_dict=False)[0]
    return video_frames(video[0], uint8), latents[0].numpy()


@torch.no_grad()
def decode_audio(c: Components, tokens: torch.Tensor, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Packed normalised audio latents -> waveform (channels, samples), and the latents the audio VAE decoded.

    The audio VAE's statistics are per packed feature (C_a * M), so denormalise before unpacking.
    """
    a = c.audio_vae
    latents = _audio_latents(c, tokens, lay)  # (1, C_a, L, M)
    mel = a.decode(latents.to(c.device, a.dtype), return_dict=False)[0]  # (1, 2, T, mel_bins)
    waveform = c.vocoder(mel.to(c.vocoder.dtype))  # (1, channels, samples)
    return waveform[0].float().cpu().numpy(), latents[0].float().cpu().numpy()


def _audio_latents(c: Components, tokens: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Packed normalised audio tokens -> the audio VAE's latents (1, C_a, L, M); its statistics are per packed
    feature (C_a * M), so denormalise before unpacking."""
    a = c.audio_vae
    tokens = tokens.float() * a.latents_std.float().to(tokens.device) + a.latents_mean.float().to(tokens.device)
    return unpack_audio(tokens, lay.audio_mel)
