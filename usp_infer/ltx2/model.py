"""LTX-2 / LTX-2.3 audio+video transformer in pure torch, weight-compatible with diffusers' LTX2VideoTransformer3DModel.

Same state_dict keys and the same math as diffusers 0.42.1 (transformer_ltx2.py): a video and an audio stream,
each block running video/audio self-attention, text cross-attention per stream, audio<->video cross-attention
and the two FFNs, all AdaLN-modulated. LTX-2.0 (caption_projection, no gates) and LTX-2.3 (gated attention,
cross_attn_mod with the sigma-driven prompt modulation) are flag sets of one model. Every attention goes
through an injected `LTX2Attention` function, so the sequence-parallel layer can swap them; nothing here knows
about process groups.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import (
    FeedForward,
    TwoLayerMLP,
    apply_rope,
    compile_each,
    config_kwargs,
    drop_trailing_pads,
    gelu_tanh,
    load_folder,
    norm_rope,
    pick_rows,
    sdpa,
    sdpa_attention,
    timestep_features,
)
from ..modulation import (
    Runs,
    TokenRuns,
    addcmul,
    apply,
    norm_modulate,
    token_runs,
    unbind,
)

# Config keys whose only supported value is the one given (the first two are the only ones diffusers has;
# the others are LTX-2.5 features this file does not implement).
_FIXED_KEYS = {
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "use_keyframes_abs_pos_embedding": False,
    "ff_bias": True,
    "audio_ff_bias": True,
}
ROPE_TYPES = ("interleaved", "split")


@dataclass(frozen=True)
class LTX2Config:
    """Transformer shape and flags; field names are the keys of a diffusers `transformer/config.json`.

    Defaults are diffusers' class defaults (note rope_type "interleaved": the real checkpoints say "split").
    """

    in_channels: int = 128
    out_channels: int = 128
    patch_size: int = 1
    patch_size_t: int = 1
    num_attention_heads: int = 32
    attention_head_dim: int = 128
    cross_attention_dim: int = 4096
    vae_scale_factors: tuple[int, int, int] = (8, 32, 32)
    pos_embed_max_pos: int = 20
    base_height: int = 2048
    base_width: int = 2048
    gated_attn: bool = False
    cross_attn_mod: bool = False
    audio_in_channels: int = 128
    audio_out_channels: int = 128
    audio_patch_size: int = 1
    audio_patch_size_t: int = 1
    audio_num_attention_heads: int = 32
    audio_attention_head_dim: int = 64
    audio_cross_attention_dim: int = 2048
    audio_scale_factor: int = 4
    audio_pos_embed_max_pos: int = 20
    audio_sampling_rate: int = 16000
    audio_hop_length: int = 160
    audio_gated_attn: bool = False
    audio_cross_attn_mod: bool = False
    num_layers: int = 48
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    caption_channels: int = 3840
    attention_bias: bool = True
    attention_out_bias: bool = True
    rope_theta: float = 10000.0
    rope_double_precision: bool = True
    causal_offset: int = 1
    timestep_scale_multiplier: int = 1000
    cross_attn_timestep_scale_multiplier: int = 1000
    rope_type: str = "interleaved"
    use_prompt_embeddings: bool = True
    perturbed_attn: bool = False
    use_prompt_adaln_single: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "vae_scale_factors", tuple(self.vae_scale_factors))
        for f in fields(self):
            value, least = getattr(self, f.name), 0 if f.name == "causal_offset" else 1  # 0: a non-causal VAE
            if f.type == "int" and (not isinstance(value, int) or value < least):
                raise ValueError(f"LTX2Config.{f.name}={value!r}: must be an integer >= {least}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r}: choose one of {ROPE_TYPES}")
        # Text reaches attn2 (and the prompt modulation tables) at the stream's width: the caption projection
        # or the connectors make it so, so the key/value input widths must equal the stream widths.
        if self.cross_attention_dim != self.inner_dim:
            raise ValueError(f"cross_attention_dim={self.cross_attention_dim} must equal heads x head_dim = "
                             f"{self.inner_dim}")
        if self.audio_cross_attention_dim != self.audio_inner_dim:
            raise ValueError(f"audio_cross_attention_dim={self.audio_cross_attention_dim} must equal audio heads "
                             f"x head_dim = {self.audio_inner_dim} (it is also the audio<->video RoPE width)")
        # RoPE turns channel pairs; "split" pairs the two halves of each of `heads` equal chunks. diffusers
        # chunks the audio<->video tables of both streams by the video head count (a2v/v2a use audio heads).
        for name, dim, chunks in (("video", self.inner_dim, self.num_attention_heads),
                                  ("audio", self.audio_inner_dim, self.audio_num_attention_heads),
                                  ("audio<->video", self.audio_cross_attention_dim, self.num_attention_heads)):
            if dim % (2 * chunks if self.rope_type == "split" else 2):
                raise ValueError(f"{name} RoPE width {dim} cannot be cut into {self.rope_type} pairs of {chunks} heads")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def audio_inner_dim(self) -> int:
        return self.audio_num_attention_heads * self.audio_attention_head_dim

    @property
    def prompt_modulation(self) -> bool:
        """LTX-2.3's cross_attn_mod: the text K/V of every block are modulated by a per-block table."""
        return self.cross_attn_mod or self.audio_cross_attn_mod

    @classmethod
    def from_dict(cls, d: dict) -> LTX2Config:
        """Build from a diffusers config dict; `_`-prefixed bookkeeping keys are ignored."""
        channels = (("out_channels", "in_channels"), ("audio_out_channels", "audio_in_channels"))
        return cls(**config_kwargs(cls, d, _FIXED_KEYS, "LTX2VideoTransformer3DModel", channels))


# The real checkpoints, as diffusers' scripts/convert_ltx2_to_diffusers.py converts them.
_REAL = dict(num_layers=48, caption_channels=3840, rope_type="split")
SHAPES: dict[str, LTX2Config] = {
    "ltx-2-19b": LTX2Config(**_REAL),
    "ltx-2.3-22b": LTX2Config(**_REAL, gated_attn=True, cross_attn_mod=True, audio_gated_attn=True,
                              audio_cross_attn_mod=True, use_prompt_embeddings=False, perturbed_attn=True),
    # models/ltx2-tiny's transformer (LTX-2.3 flags): the shape CPU runs of the pipeline and the benchmark use.
    "ltx2-tiny": LTX2Config(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=4,
                            cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8,
                            audio_num_attention_heads=4, audio_attention_head_dim=2, audio_cross_attention_dim=8,
                            num_layers=2, caption_channels=24, rope_type="split", gated_attn=True,
                            cross_attn_mod=True, audio_gated_attn=True, audio_cross_attn_mod=True,
                            use_prompt_embeddings=False, perturbed_attn=True),
}


# ---------------------------------------------------------------------------------------------------------------
# RoPE


@dataclass(frozen=True, eq=False)  # eq=False: comparing Tensor fields would raise, identity is what is meant
class LTX2Rope:
    """RoPE operands of one forward, fp32, every table with tokens on dim 1.

    rope_type "interleaved": (1, S, C/2, 2), the (cos, sin) of each channel pair (2i, 2i+1).
    rope_type "split":       (1, S, H, 2, C/2H), [..., 0, :] cos and [..., 1, :] sin of the pairs (j, j + C/2H)
                             within each of H chunks: the attention heads (for video_cross, as diffusers
                             does, the video head count, which equals the audio one in the real models).
    video, audio: self-attention (3-D positions, 1-D time); video_cross, audio_cross: the audio<->video
    attentions (time only, in seconds, at the audio width).
    """

    video: Tensor
    video_cross: Tensor
    audio: Tensor
    audio_cross: Tensor

    def map_video(self, fn: Callable[[Tensor], Tensor]) -> LTX2Rope:
        """A copy with `fn` applied to the two per-video-token tables (how a sequence plan shards them)."""
        return dataclasses.replace(self, video=fn(self.video), video_cross=fn(self.video_cross))


def video_coords(cfg: LTX2Config, frames: int, height: int, width: int, fps: float, device) -> Tensor:
    """diffusers' prepare_video_coords for one sample: (1, 3, S, 2) [start, end) of each patch, time in seconds."""
    axes = [torch.arange(0, n, step, dtype=torch.float32, device=device)
            for n, step in ((frames, cfg.patch_size_t), (height, cfg.patch_size), (width, cfg.patch_size))]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # (3, F, H, W)
    patch = torch.tensor((cfg.patch_size_t, cfg.patch_size, cfg.patch_size), dtype=torch.float32, device=device)
    coords = torch.stack([grid, grid + patch.view(3, 1, 1, 1)], dim=-1).flatten(1, 3)[None]  # (1, 3, S, 2)
    pixels = coords * torch.tensor(cfg.vae_scale_factors, device=device).view(1, 3, 1, 1)
    # The causal VAE's first latent frame covers one pixel frame, not vae_scale_factors[0].
    time = (pixels[:, 0] + cfg.causal_offset - cfg.vae_scale_factors[0]).clamp(min=0) / fps
    return torch.cat([time[:, None], pixels[:, 1:]], dim=1)


def _audio_coords(cfg: LTX2Config, tokens: int, device) -> Tensor:
    """diffusers' prepare_audio_coords for one sample: (1, 1, S_a, 2) [start, end) in seconds."""
    grid = torch.arange(0, tokens, cfg.audio_patch_size_t, dtype=torch.float32, device=device)
    factor = cfg.audio_scale_factor

    def seconds(latent: Tensor) -> Tensor:
        mel = (latent * factor + cfg.causal_offset - factor).clip(min=0)
        return mel * cfg.audio_hop_length / cfg.audio_sampling_rate

    return torch.stack([seconds(grid), seconds(grid + cfg.audio_patch_size_t)], dim=-1)[None, None]


def _rope_table(cfg: LTX2Config, coords: Tensor, max_positions: tuple[int, ...], dim: int, chunks: int) -> Tensor:
    """diffusers' LTX2AudioVideoRotaryPosEmbed.forward, same ops in the same order, as one table (see LTX2Rope)."""
    start, end = coords.chunk(2, dim=-1)
    coords = ((start + end) / 2.0).squeeze(-1)  # (1, P, S) patch midpoints
    axes = coords.shape[1]
    grid = torch.stack([coords[:, i] / max_positions[i] for i in range(axes)], dim=-1)  # (1, S, P)
    dtype = torch.float64 if cfg.rope_double_precision else torch.float32
    exponents = torch.linspace(0.0, 1.0, dim // (2 * axes), dtype=dtype, device=coords.device)
    freqs = (torch.pow(cfg.rope_theta, exponents) * torch.pi / 2.0).to(torch.float32)
    angles = ((grid.unsqueeze(-1) * 2 - 1) * freqs).transpose(-1, -2).flatten(2)  # (1, S, dim//(2P) * P)
    cos, sin = angles.cos(), angles.sin()
    if pad := dim // 2 - angles.shape[-1]:  # pairs without a frequency are left unrotated, at the front
        cos = torch.cat([torch.ones_like(cos[..., :pad]), cos], dim=-1)
        sin = torch.cat([torch.zeros_like(sin[..., :pad]), sin], dim=-1)
    if cfg.rope_type == "interleaved":
        return torch.stack([cos, sin], dim=-1)  # (1, S, dim/2, 2)
    return torch.stack([cos.unflatten(-1, (chunks, -1)), sin.unflatten(-1, (chunks, -1))], dim=-2)  # (1, S, H, 2, r)


def rope_tables(
    cfg: LTX2Config,
    latent_frames: int,
    latent_height: int,
    latent_width: int,
    fps: float,
    audio_tokens: int,
    device: torch.device | str | None = None,
    video: Tensor | None = None,
) -> LTX2Rope:
    """The four RoPE tables of one forward, for a video latent grid (tokens f, h, w raster) and audio_tokens;
    `video`: the video tokens' own coords (1, 3, S, 2) instead of the grid's (a grid plus appended keyframes)."""
    video = video_coords(cfg, latent_frames, latent_height, latent_width, fps, device) if video is None else video
    audio = _audio_coords(cfg, audio_tokens, device)
    cross_max = (max(cfg.pos_embed_max_pos, cfg.audio_pos_embed_max_pos),)
    return LTX2Rope(
        video=_rope_table(cfg, video, (cfg.pos_embed_max_pos, cfg.base_height, cfg.base_width), cfg.inner_dim,
                          cfg.num_attention_heads),
        video_cross=_rope_table(cfg, video[:, :1], cross_max, cfg.audio_cross_attention_dim, cfg.num_attention_heads),
        audio=_rope_table(cfg, audio, (cfg.audio_pos_embed_max_pos,), cfg.audio_inner_dim,
                          cfg.audio_num_attention_heads),
        audio_cross=_rope_table(cfg, audio, cross_max, cfg.audio_cross_attention_dim, cfg.audio_num_attention_heads),
    )


def _apply_split_rope(x: Tensor, table: Tensor) -> Tensor:
    """Turn the pairs (a, b) = (x[j], x[j + r]) of each head chunk of x (B, S, C) by their angle, in fp32 like
    diffusers: (a cos - b sin, b cos + a sin)."""
    halves = x.unflatten(-1, (table.shape[2], 2, -1))  # (B, S, H, 2, r): the two halves of each chunk
    a, b = halves[..., 0, :], halves[..., 1, :]
    cos, sin = table[..., 0, :], table[..., 1, :]  # (1, S, H, r)
    if torch.compiler.is_compiling():  # one fused kernel
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-2).flatten(-3).to(x.dtype)
    # Eager: each half goes straight into the output (mixed-dtype ops compute in fp32 and round once), about
    # 14 bytes moved per element instead of ~44 for upcast copy, rotated copy, products and downcast.
    out = torch.empty_like(x)
    turned = out.unflatten(-1, (table.shape[2], 2, -1))
    torch.addcmul(a * cos, b, sin, value=-1, out=turned[..., 0, :])
    torch.addcmul(b * cos, a, sin, out=turned[..., 1, :])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Attention


AttnFn = Callable[[Tensor, Tensor, Tensor], Tensor]


# The injected functions are called straight from the block's frame and kept out of its graphs (like the
# USP ones): a compiled block then breaks once per attention, not once per frame of nested helpers.
local_attention = torch.compiler.disable(sdpa_attention)


@torch.compiler.disable
def local_text_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """Text cross-attention, (B, S, H, D) in and out; bias (B, 1, 1, L) is added to the scores."""
    return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias).transpose(1, 2)


@dataclass(frozen=True)
class LTX2Attention:
    """The attention functions a forward uses, all (B, S, H, D) in and out.

    video_to_audio's keys are the video tokens: with a sharded video sequence it must combine every rank's part.
    """

    video_self: AttnFn
    audio_self: AttnFn
    text: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
    audio_to_video: AttnFn
    video_to_audio: AttnFn


LOCAL_ATTENTION = LTX2Attention(video_self=local_attention, audio_self=local_attention, text=local_text_attention,
                                audio_to_video=local_attention, video_to_audio=local_attention)


class Attention(nn.Module):
    """diffusers' LTX2Attention: q/k RMS-normed across all heads (learned, eps 1e-6), optional per-head gates."""

    def __init__(self, cfg: LTX2Config, query_dim: int, kv_dim: int, heads: int, head_dim: int, gated: bool) -> None:
        super().__init__()
        inner, bias = heads * head_dim, cfg.attention_bias
        self.heads = heads
        self.rope_fn = apply_rope if cfg.rope_type == "interleaved" else _apply_split_rope
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k, self.to_v = nn.Linear(kv_dim, inner, bias=bias), nn.Linear(kv_dim, inner, bias=bias)
        self.norm_q, self.norm_k = nn.RMSNorm(inner, eps=1e-6), nn.RMSNorm(inner, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=cfg.attention_out_bias)])  # 1 was a dropout
        self.to_gate_logits = nn.Linear(query_dim, heads) if gated else None

    def project(
        self, x: Tensor, context: Tensor, q_rope: Tensor | None = None, k_rope: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, S, query_dim) queries, context (B, L, kv_dim) keys/values -> q, k, v as (B, S|L, H, D)."""
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if q_rope is None:
            q, k = self.norm_q(q), self.norm_k(k)
        else:
            q = norm_rope(q, self.norm_q, q_rope, self.rope_fn)
            k = norm_rope(k, self.norm_k, k_rope, self.rope_fn)
        heads = (self.heads, -1)  # (B, S, H*D) -> (B, S, H, D)
        return q.unflatten(2, heads), k.unflatten(2, heads), v.unflatten(2, heads)

    def output(self, x: Tensor, out: Tensor, v: Tensor | None = None, values_rows: Tensor | None = None) -> Tensor:
        """Attention result (B, S, H, D) -> (B, S, query_dim); x is the query input (the gates read it).
        values_rows (B, 1, 1, 1) bool: those rows take V instead of the attention result (STG)."""
        if values_rows is not None:
            out = torch.where(values_rows, v, out)
        if self.to_gate_logits is not None:  # 2 sigmoid: zero logits give gates of 1
            out = out * (2.0 * torch.sigmoid(self.to_gate_logits(x))).unsqueeze(-1)
        return self.to_out[0](out.flatten(2))


# ---------------------------------------------------------------------------------------------------------------
# Blocks


@dataclass(frozen=True, eq=False)
class _Conditioning:
    """Everything a block reads that no block changes: built once per forward.

    Modulation embeddings are (N, n, D): per sample (N = B) when the runs are None, else one row per distinct
    video timestep (N = K), and the runs say which row each run of tokens takes (modulation.py).
    """

    video_temb: Tensor  # (B|K, 6|9, D)
    video_runs: TokenRuns | None  # the runs of tokens sharing a timestep, or None for per-sample timesteps
    audio_temb: Tensor  # (B, 6|9, D_a)
    video_cross: Tensor  # (B|K, 5, D): a2v/v2a scale, shift, scale, shift, a2v gate
    video_cross_runs: TokenRuns | None
    audio_cross: Tensor  # (B, 5, D_a)
    prompt: Tensor | None  # (U, 2, D) text K/V shift, scale (LTX-2.3 prompt_adaln), or None
    audio_prompt: Tensor | None
    text: Tensor  # (U, L, D): one row per distinct prompt
    audio_text: Tensor  # (U, L_a, D_a)
    text_bias: Tensor | None  # (B, 1, 1, L)
    audio_text_bias: Tensor | None
    text_rows: list[int] | None  # batch row -> text row; None: the text has the batch's rows
    cross_rows: int  # rows [0, cross_rows) run the audio<->video attentions; the trailing ones are isolated
    keep_cross: Tensor | None  # (B, 1, 1) 0. on isolated rows that are not trailing, 1. elsewhere; or None


def _modulation(table: Tensor, emb: Tensor, runs: TokenRuns | None, scales: slice) -> tuple[Tensor | Runs, ...]:
    """table (n, D) + emb (N, n, D) -> n vectors, per sample (B, 1, D) or per run of tokens (Runs).

    The `scales` slots come back as 1 + scale: the 1 is added to the N rows here, not to every token's row
    at every use.
    """
    ada = table + emb
    ada[:, scales] += 1
    return ada[:, None].unbind(2) if runs is None else unbind(runs.gather(ada), -2)


# Slots of the modulation vectors that scale (x * (1 + scale) + shift); the others shift or gate.
_BLOCK_SCALES = slice(1, None, 3)  # shift, scale, gate for self-attention, FFN, and (9 slots) text queries
_CROSS_SCALES = slice(0, 4, 2)  # a2v scale, shift, v2a scale, shift, gate
_SHIFT_SCALE = slice(1, 2)  # shift, scale: the prompt (text K/V) and output modulations


class TransformerBlock(nn.Module):
    """diffusers' LTX2VideoTransformerBlock."""

    def __init__(self, cfg: LTX2Config) -> None:
        super().__init__()
        d, da = cfg.inner_dim, cfg.audio_inner_dim
        video = (cfg.num_attention_heads, cfg.attention_head_dim)
        audio = (cfg.audio_num_attention_heads, cfg.audio_attention_head_dim)

        def norm(dim: int) -> nn.RMSNorm:
            return nn.RMSNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)

        self.norm1, self.attn1 = norm(d), Attention(cfg, d, d, *video, cfg.gated_attn)
        self.audio_norm1, self.audio_attn1 = norm(da), Attention(cfg, da, da, *audio, cfg.audio_gated_attn)
        self.norm2 = norm(d)
        self.attn2 = Attention(cfg, d, cfg.cross_attention_dim, *video, cfg.gated_attn)
        self.audio_norm2 = norm(da)
        self.audio_attn2 = Attention(cfg, da, cfg.audio_cross_attention_dim, *audio, cfg.audio_gated_attn)
        # The audio<->video attentions use the audio head layout in both directions.
        self.audio_to_video_norm = norm(d)
        self.audio_to_video_attn = Attention(cfg, d, da, *audio, cfg.gated_attn)
        self.video_to_audio_norm = norm(da)
        self.video_to_audio_attn = Attention(cfg, da, d, *audio, cfg.audio_gated_attn)
        self.norm3, self.ff = norm(d), FeedForward(d)
        self.audio_norm3, self.audio_ff = norm(da), FeedForward(da)
        self.scale_shift_table = nn.Parameter(torch.randn(9 if cfg.cross_attn_mod else 6, d) / d**0.5)
        self.audio_scale_shift_table = nn.Parameter(torch.randn(9 if cfg.audio_cross_attn_mod else 6, da) / da**0.5)
        self.video_query_mod, self.audio_query_mod = cfg.cross_attn_mod, cfg.audio_cross_attn_mod
        self.prompt_modulation = cfg.prompt_modulation
        if cfg.prompt_modulation:
            self.prompt_scale_shift_table = nn.Parameter(torch.randn(2, d))
            self.audio_prompt_scale_shift_table = nn.Parameter(torch.randn(2, da))
        self.video_a2v_cross_attn_scale_shift_table = nn.Parameter(torch.randn(5, d))
        self.audio_a2v_cross_attn_scale_shift_table = nn.Parameter(torch.randn(5, da))

    def forward(
        self, x: Tensor, a: Tensor, c: _Conditioning, rope: LTX2Rope, attn: LTX2Attention, stg: Tensor | None,
        stg_audio: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """x (B, S_v, D) video, a (B, S_a, D_a) audio; stg (B, 1, 1, 1) bool: rows whose self-attention is V
        (the audio's too unless not stg_audio).

        Every injected attention is called right here, not in a helper, so a compiled block has one graph
        between each two of them.
        """
        vmod = _modulation(self.scale_shift_table, c.video_temb, c.video_runs, _BLOCK_SCALES)
        amod = _modulation(self.audio_scale_shift_table, c.audio_temb, None, _BLOCK_SCALES)

        # 1. Self-attention. addcmul(a, b, c) = a + b * c in one pass over the activations instead of two;
        # every scale that _modulation returns already holds 1 + scale.
        h = norm_modulate(x, self.norm1, vmod[0], vmod[1])
        q, k, v = self.attn1.project(h, h, rope.video, rope.video)
        x = addcmul(x, self.attn1.output(h, attn.video_self(q, k, v), v, stg), vmod[2])
        h = norm_modulate(a, self.audio_norm1, amod[0], amod[1])
        q, k, v = self.audio_attn1.project(h, h, rope.audio, rope.audio)
        a = addcmul(a, self.audio_attn1.output(h, attn.audio_self(q, k, v), v, stg if stg_audio else None), amod[2])

        # 2. Text cross-attention. LTX-2.3 modulates the text per block, and each stream's queries (shift, scale,
        # gate = mod[6:9]); LTX-2.0 attends from the plain norm and adds the result ungated.
        text, audio_text = c.text, c.audio_text
        if self.prompt_modulation:
            text = addcmul(*_prompt_shift_scale(self.prompt_scale_shift_table, c.prompt, text))
            audio_text = addcmul(*_prompt_shift_scale(self.audio_prompt_scale_shift_table, c.audio_prompt,
                                                            audio_text))
        h = norm_modulate(x, self.norm2, vmod[6], vmod[7]) if self.video_query_mod else self.norm2(x)
        q, k, v = self.attn2.project(h, text)
        out = self.attn2.output(h, attn.text(q, *_per_row(c.text_rows, k, v), c.text_bias))
        x = addcmul(x, out, vmod[8]) if self.video_query_mod else x + out
        h = norm_modulate(a, self.audio_norm2, amod[6], amod[7]) if self.audio_query_mod else self.audio_norm2(a)
        q, k, v = self.audio_attn2.project(h, audio_text)
        out = self.audio_attn2.output(h, attn.text(q, *_per_row(c.text_rows, k, v), c.audio_text_bias))
        a = addcmul(a, out, amod[8]) if self.audio_query_mod else a + out

        # 3. Audio-to-video (queries video, keys audio) and video-to-audio, both from the norms before either.
        # Only rows [0, n) take part: trailing modality-isolated rows skip them, as diffusers' isolated call does.
        if n := c.cross_rows:
            rows = lambda v: apply(v, lambda t: t[:n])  # noqa: E731  (B, ...) -> (n, ...)
            v_a2v_scale, v_a2v_shift, v_v2a_scale, v_v2a_shift, a2v_gate = map(rows, _modulation(
                self.video_a2v_cross_attn_scale_shift_table, c.video_cross, c.video_cross_runs, _CROSS_SCALES))
            a_a2v_scale, a_a2v_shift, a_v2a_scale, a_v2a_shift, v2a_gate = map(rows, _modulation(
                self.audio_a2v_cross_attn_scale_shift_table, c.audio_cross, None, _CROSS_SCALES))
            if c.keep_cross is not None:  # isolated rows among the others add nothing: their gates are 0
                a2v_gate, v2a_gate = apply(a2v_gate, lambda g: g * c.keep_cross), v2a_gate * c.keep_cross
            xn, an, x_norm, a_norm = x[:n], a[:n], self.audio_to_video_norm, self.video_to_audio_norm
            h = norm_modulate(xn, x_norm, v_a2v_shift, v_a2v_scale)
            kv = norm_modulate(an, a_norm, a_a2v_shift, a_a2v_scale)
            q, k, v = self.audio_to_video_attn.project(h, kv, rope.video_cross, rope.audio_cross)
            x_a2v = self.audio_to_video_attn.output(h, attn.audio_to_video(q, k, v))
            h = norm_modulate(an, a_norm, a_v2a_shift, a_v2a_scale)
            kv = norm_modulate(xn, x_norm, v_v2a_shift, v_v2a_scale)
            q, k, v = self.video_to_audio_attn.project(h, kv, rope.audio_cross, rope.video_cross)
            a_v2a = self.video_to_audio_attn.output(h, attn.video_to_audio(q, k, v))
            x_n, a_n = addcmul(xn, x_a2v, a2v_gate), addcmul(an, a_v2a, v2a_gate)
            if n == x.shape[0]:
                x, a = x_n, a_n
            else:  # new tensors, as many bytes as writing the rows in place: a compiled block whose inputs
                # alias (x and x[:n] across a graph break) and are written fails AOTAutograd once the batch
                # turns dynamic ("Expected !size_bytes_is_heap_allocated_"; the STG prefix's recompile, torch 2.11)
                x, a = torch.cat([x_n, x[n:]]), torch.cat([a_n, a[n:]])

        # 4. FFNs.
        x = addcmul(x, self.ff(norm_modulate(x, self.norm3, vmod[3], vmod[4])), vmod[5])
        a = addcmul(a, self.audio_ff(norm_modulate(a, self.audio_norm3, amod[3], amod[4])), amod[5])
        return x, a


def _per_row(rows: list[int] | None, *per_text: Tensor) -> tuple[Tensor, ...]:
    """Text-row tensors (U, ...) -> batch-row ones (B, ...)."""
    return per_text if rows is None else tuple(pick_rows(t, rows) for t in per_text)


def _prompt_shift_scale(table: Tensor, emb: Tensor | None, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """addcmul operands of text * (1 + scale) + shift; without prompt_adaln the table alone is the modulation."""
    shift, scale = _modulation(table, emb, None, _SHIFT_SCALE) if emb is not None else (table[0], 1 + table[1])
    return shift, text, scale


def compile_blocks(model: LTX2Transformer) -> None:
    """torch.compile each transformer block in place. Attention stays eager (sdpa and the USP functions are
    compiler-disabled), so the graphs hold the projections, norms, RoPE, modulation and FFNs around it.

    Every shape static (layers.compile_each).
    """
    compile_each(model.transformer_blocks)


# ---------------------------------------------------------------------------------------------------------------
# Model


class AdaLayerNormSingle(nn.Module):
    """diffusers' LTX2AdaLayerNormSingle: timestep -> (n modulation vectors, the embedding itself)."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.emb = nn.ModuleDict({"timestep_embedder": TwoLayerMLP(256, dim, F.silu)})
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(N,) -> (N, n, D), (N, D)."""
        embedded = self.emb.timestep_embedder(timestep_features(t).to(dtype))
        return self.linear(F.silu(embedded)).unflatten(1, (-1, embedded.shape[1])), embedded


def _cross_rows(isolate_rows: Tensor | None, B: int, device, dtype) -> tuple[int, Tensor | None]:
    """(rows [0, n) that run the audio<->video attentions, gates for isolated rows before n or None).

    The branches put the modality-isolated row last, so its attentions are skipped, not computed and zeroed.
    """
    isolated = [] if isolate_rows is None else isolate_rows.tolist()
    if isolated == sorted(isolated):  # False... then True...: the isolated rows trail
        return B - sum(isolated), None
    return B, (~isolate_rows).to(device, dtype)[:, None, None]


def _text_bias(text: Tensor, mask: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(B, L, C) text and (B, L) mask -> the text without trailing pads and its (B, 1, 1, L') score bias.

    diffusers' bias is 0 on kept tokens and -10000 on pads; when nothing is masked (the connectors' output)
    it is all 0 and is dropped, so attention can take its unmasked kernels.
    """
    if mask is None:
        return text, None
    text, mask = drop_trailing_pads(text, mask)
    if bool(mask.bool().all()):
        return text, None
    return text, ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]


class LTX2Transformer(nn.Module):
    def __init__(self, cfg: LTX2Config) -> None:
        super().__init__()
        self.cfg = cfg
        d, da = cfg.inner_dim, cfg.audio_inner_dim
        self.proj_in = nn.Linear(cfg.in_channels, d)
        self.audio_proj_in = nn.Linear(cfg.audio_in_channels, da)
        if cfg.use_prompt_embeddings:  # LTX-2.0; 2.3's connectors project the text themselves
            self.caption_projection = TwoLayerMLP(cfg.caption_channels, d, gelu_tanh)
            self.audio_caption_projection = TwoLayerMLP(cfg.caption_channels, da, gelu_tanh)
        self.time_embed = AdaLayerNormSingle(d, 9 if cfg.cross_attn_mod else 6)
        self.audio_time_embed = AdaLayerNormSingle(da, 9 if cfg.audio_cross_attn_mod else 6)
        self.av_cross_attn_video_scale_shift = AdaLayerNormSingle(d, 4)
        self.av_cross_attn_audio_scale_shift = AdaLayerNormSingle(da, 4)
        self.av_cross_attn_video_a2v_gate = AdaLayerNormSingle(d, 1)
        self.av_cross_attn_audio_v2a_gate = AdaLayerNormSingle(da, 1)
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.audio_scale_shift_table = nn.Parameter(torch.randn(2, da) / da**0.5)
        if cfg.prompt_modulation and cfg.use_prompt_adaln_single:
            self.prompt_adaln = AdaLayerNormSingle(d, 2)
            self.audio_prompt_adaln = AdaLayerNormSingle(da, 2)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.num_layers)])
        self.proj_out = nn.Linear(d, cfg.out_channels)
        self.audio_proj_out = nn.Linear(da, cfg.audio_out_channels)
        # LTX-2.3 modulates each stream's audio<->video attention by the other stream's sigma; 2.0 by its own
        # timestep. A plain attribute, so a caller can override what the weights imply.
        self.use_cross_timestep = cfg.prompt_modulation

    def forward(
        self,
        video: Tensor,
        audio: Tensor,
        text: Tensor,
        audio_text: Tensor,
        text_mask: Tensor | None,
        audio_text_mask: Tensor | None,
        timestep: Tensor,
        audio_timestep: Tensor,
        sigma: Tensor,
        audio_sigma: Tensor,
        rope: LTX2Rope,
        attn: LTX2Attention = LOCAL_ATTENTION,
        stg_blocks: tuple[int, ...] = (),
        stg_rows: Tensor | None = None,
        isolate_rows: Tensor | None = None,
        text_rows: tuple[int, ...] | None = None,
        stg_audio: bool = True,
        stg_source: int | None = None,
        blocks: Callable | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(B, S_v, in_channels), (B, S_a, audio_in_channels) -> the two velocity predictions, same shapes but
        out_channels. video may be a shard of the tokens if rope.video/video_cross and a per-token timestep are
        sharded alike. timestep (B,) or (B, S_v), already x1000; audio_timestep, sigma, audio_sigma (B,).
        stg_rows (B,) bool: rows whose self-attentions in stg_blocks output V (None with stg_blocks: every row);
        as in diffusers, only perturbed_attn weights (LTX-2.3) have STG: for LTX-2.0 ones stg_blocks do nothing.
        isolate_rows (B,) bool: rows with no audio<->video attention in any block.
        text_rows: for branches that share a prompt, text/audio_text and their masks hold one row per distinct
        prompt and text_rows[b] names batch row b's; the text's keys and values are then projected once per
        prompt. Rows sharing a prompt must share sigma and audio_sigma (they modulate the text).
        stg_audio False: STG perturbs the video's self-attention alone (Lightricks' audio-to-video).
        stg_source: a row that is neither STG nor isolated and shares its text row with every STG row, whose
        inputs (video, audio, timesteps) the caller vouches are the STG rows' own (the perturbed branch is the
        cond branch with some blocks perturbed): the STG rows are then not computed before the first STG block,
        where they start as copies of that row's hidden states. The same function, fewer FLOPs: LTX-2.3's
        perturbed branch runs 20 of its 48 blocks.
        blocks: what runs `run_blocks` (with its arguments), e.g. a graphs.GraphedCall of it.
        """
        self._check_inputs(video, audio, text, audio_text, text_mask, audio_text_mask, timestep,
                           (audio_timestep, sigma, audio_sigma), rope, stg_blocks, stg_rows, isolate_rows, text_rows,
                           stg_source)
        cfg, B, dtype = self.cfg, video.shape[0], video.dtype
        x, a = self.proj_in(video), self.audio_proj_in(audio)
        per_row = (timestep, audio_timestep, sigma, audio_sigma, isolate_rows, text_rows)
        context = (text, audio_text, text_mask, audio_text_mask)
        c, head = self._condition(*context, *per_row, dtype)

        if stg_rows is None:
            stg_rows = torch.ones(B, dtype=torch.bool)
        stg = stg_rows.to(x.device)[:, None, None, None]  # (B, 1, 1, 1) against (B, S, H, D)
        # Only blocks built with perturbed_attn (LTX-2.3 weights) can be perturbed; diffusers ignores the STG
        # blocks of an LTX-2.0 model, and so does this.
        perturbed = tuple(sorted(set(stg_blocks))) if cfg.perturbed_attn else ()
        prefix = kept = source = None
        if stg_source is not None and perturbed:
            # Before the first perturbed block an STG row computes what its source row computes: run the other
            # rows alone that far, then give each STG row a copy of its source's hidden states.
            flags = stg_rows.tolist()
            kept = tuple(i for i in range(B) if not flags[i])
            pick = lambda t: None if t is None else (  # noqa: E731  the kept rows of a per-row input
                tuple(t[i] for i in kept) if isinstance(t, tuple) else t[list(kept)])
            prefix, _ = self._condition(*context, *map(pick, per_row), dtype)
            source = tuple(kept.index(stg_source if flags[i] else i) for i in range(B))
        x, a = (blocks or self.run_blocks)(x, a, c, prefix, kept, source, rope, attn, stg, perturbed, stg_audio)

        video_embedded, runs, audio_embedded = head
        shift, scale = _modulation(self.scale_shift_table, video_embedded[:, None], runs, _SHIFT_SCALE)
        x = addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=1e-6), scale)  # scale holds 1 + scale
        shift, scale = _modulation(self.audio_scale_shift_table, audio_embedded[:, None], None, _SHIFT_SCALE)
        a = torch.addcmul(shift, F.layer_norm(a, (a.shape[-1],), eps=1e-6), scale)
        return self.proj_out(x), self.audio_proj_out(a)

    def run_blocks(self, x: Tensor, a: Tensor, c: _Conditioning, prefix: _Conditioning | None,
                   kept: tuple[int, ...] | None, source: tuple[int, ...] | None, rope: LTX2Rope,
                   attn: LTX2Attention, stg: Tensor, perturbed: tuple[int, ...], stg_audio: bool) -> tuple[Tensor, Tensor]:
        """The blocks, from the projected inputs to the last block's hidden states. With a `prefix` conditioning
        the rows `kept` run alone up to the first perturbed block, then row b continues from kept row
        source[b]. Reads nothing back to the host (rows are picked by slicing): a CUDA graph can hold it."""
        first = 0
        if prefix is not None:
            first = perturbed[0]
            xk, ak = pick_rows(x, kept), pick_rows(a, kept)
            for block in self.transformer_blocks[:first]:
                xk, ak = block(xk, ak, prefix, rope, attn, None, stg_audio)
            x, a = pick_rows(xk, source), pick_rows(ak, source)
        for i, block in enumerate(self.transformer_blocks[first:], start=first):
            x, a = block(x, a, c, rope, attn, stg if i in perturbed else None, stg_audio)
        return x, a

    def _condition(
        self,
        text: Tensor,
        audio_text: Tensor,
        text_mask: Tensor | None,
        audio_text_mask: Tensor | None,
        timestep: Tensor,
        audio_timestep: Tensor,
        sigma: Tensor,
        audio_sigma: Tensor,
        isolate_rows: Tensor | None,
        text_rows: tuple[int, ...] | None,
        dtype: torch.dtype,
    ) -> tuple[_Conditioning, tuple]:
        """What every block of a batch reads (see forward), and the output head's (video embedding, runs, audio
        embedding)."""
        cfg, B, device = self.cfg, timestep.shape[0], timestep.device
        # Per-token timesteps take few values (two in image-to-video): embed each once, modulate per run of tokens.
        if timestep.ndim == 2:
            t, index = torch.unique(timestep, return_inverse=True)  # (K,), (B, S_v)
            runs = token_runs(index)
        else:
            t, runs = timestep, None
        video_temb, video_embedded = self.time_embed(t, dtype)
        audio_temb, audio_embedded = self.audio_time_embed(audio_timestep, dtype)
        gate_factor = cfg.cross_attn_timestep_scale_multiplier / cfg.timestep_scale_multiplier
        video_cross_t, video_cross_runs = (audio_sigma, None) if self.use_cross_timestep else (t, runs)
        audio_cross_t = sigma if self.use_cross_timestep else audio_timestep
        video_cross = torch.cat([self.av_cross_attn_video_scale_shift(video_cross_t, dtype)[0],
                                 self.av_cross_attn_video_a2v_gate(video_cross_t * gate_factor, dtype)[0]], dim=1)
        audio_cross = torch.cat([self.av_cross_attn_audio_scale_shift(audio_cross_t, dtype)[0],
                                 self.av_cross_attn_audio_v2a_gate(audio_cross_t * gate_factor, dtype)[0]], dim=1)
        prompt = audio_prompt = None
        if cfg.prompt_modulation and cfg.use_prompt_adaln_single:  # per text row: the first batch row's sigma
            first = slice(None) if text_rows is None else [text_rows.index(u) for u in range(text.shape[0])]
            prompt = self.prompt_adaln(sigma[first], dtype)[0]
            audio_prompt = self.audio_prompt_adaln(audio_sigma[first], dtype)[0]

        if cfg.use_prompt_embeddings:
            text, audio_text = self.caption_projection(text), self.audio_caption_projection(audio_text)
        text, text_bias = _text_bias(text, text_mask, dtype)
        audio_text, audio_text_bias = _text_bias(audio_text, audio_text_mask, dtype)
        rows = None if text_rows is None else list(text_rows)
        text_bias, audio_text_bias = (None if t is None else _per_row(rows, t)[0] for t in (text_bias, audio_text_bias))
        cross_rows, keep_cross = _cross_rows(isolate_rows, B, device, dtype)
        c = _Conditioning(video_temb, runs, audio_temb, video_cross, video_cross_runs, audio_cross, prompt,
                          audio_prompt, text, audio_text, text_bias, audio_text_bias, rows, cross_rows, keep_cross)
        return c, (video_embedded, runs, audio_embedded)

    def _check_inputs(
        self,
        video: Tensor,
        audio: Tensor,
        text: Tensor,
        audio_text: Tensor,
        text_mask: Tensor | None,
        audio_text_mask: Tensor | None,
        timestep: Tensor,
        per_sample: tuple[Tensor, ...],
        rope: LTX2Rope,
        stg_blocks: tuple[int, ...],
        stg_rows: Tensor | None,
        isolate_rows: Tensor | None,
        text_rows: tuple[int, ...] | None,
        stg_source: int | None,
    ) -> None:
        cfg = self.cfg
        B, S, S_a = video.shape[0], video.shape[1], audio.shape[1]
        U = B if text_rows is None else text.shape[0]
        if text_rows is not None:
            if len(text_rows) != B or sorted(set(text_rows)) != list(range(U)):
                raise ValueError(f"text_rows {text_rows}: need one entry per batch row ({B}) naming each of the "
                                 f"{U} text rows")
            first = torch.tensor([text_rows.index(u) for u in text_rows])
            if not all(torch.equal(t.cpu(), t.cpu()[first]) for t in per_sample[1:]):
                raise ValueError("rows that share a text row must share sigma and audio_sigma")
        widths = (cfg.caption_channels,) * 2 if cfg.use_prompt_embeddings else (cfg.inner_dim, cfg.audio_inner_dim)
        for name, t, width, rows in (("video", video, cfg.in_channels, B), ("audio", audio, cfg.audio_in_channels, B),
                                     ("text", text, widths[0], U), ("audio_text", audio_text, widths[1], U)):
            if t.ndim != 3 or t.shape[0] != rows or t.shape[2] != width:
                raise ValueError(f"{name} {tuple(t.shape)}: expected ({rows}, tokens, {width})")
        for name, mask, context in (("text_mask", text_mask, text), ("audio_text_mask", audio_text_mask, audio_text)):
            if mask is not None and tuple(mask.shape) != tuple(context.shape[:2]):
                raise ValueError(f"{name} {tuple(mask.shape)}: expected {tuple(context.shape[:2])}")
        if tuple(timestep.shape) not in ((B,), (B, S)):
            raise ValueError(f"timestep {tuple(timestep.shape)}: expected ({B},) or per video token ({B}, {S})")
        for name, t in zip(("audio_timestep", "sigma", "audio_sigma"), per_sample):
            if tuple(t.shape) != (B,):
                raise ValueError(f"{name} {tuple(t.shape)}: expected ({B},)")
        for name, table, tokens in (("video", rope.video, S), ("video_cross", rope.video_cross, S),
                                    ("audio", rope.audio, S_a), ("audio_cross", rope.audio_cross, S_a)):
            if table.shape[1] != tokens:
                raise ValueError(f"rope.{name} has {table.shape[1]} tokens for {tokens}: slice rope_tables() "
                                 "with the same plan as the tokens")
        bad = [i for i in stg_blocks if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"stg_blocks {bad} out of range: the model has {cfg.num_layers} blocks")
        for name, rows in (("stg_rows", stg_rows), ("isolate_rows", isolate_rows)):
            if rows is not None and (rows.dtype != torch.bool or tuple(rows.shape) != (B,)):
                raise ValueError(f"{name}: need ({B},) bool, one flag per batch row, got {rows.dtype} "
                                 f"{tuple(rows.shape)}")
        if stg_source is not None:
            stg = [True] * B if stg_rows is None else stg_rows.tolist()
            isolated = [False] * B if isolate_rows is None else isolate_rows.tolist()
            if not 0 <= stg_source < B or stg[stg_source] or isolated[stg_source]:
                raise ValueError(f"stg_source {stg_source}: need a batch row (0..{B - 1}) that is neither STG nor "
                                 "isolated")
            if text_rows is None or any(f and text_rows[i] != text_rows[stg_source] for i, f in enumerate(stg)):
                raise ValueError(f"stg_source {stg_source}: every STG row must share its text row (text_rows "
                                 f"{text_rows})")


def load_transformer(
    folder: str | Path, device: torch.device | str, dtype: torch.dtype, use_cross_timestep: bool | None = None
) -> LTX2Transformer:
    """Load a diffusers LTX-2 `transformer/` folder (config.json + one or sharded safetensors) onto `device`.

    use_cross_timestep None keeps what the weights imply (on for LTX-2.3's cross_attn_mod, off for 2.0).
    """
    model = load_folder(folder, device, dtype, lambda config: LTX2Transformer(LTX2Config.from_dict(config)))
    if use_cross_timestep is not None:
        model.use_cross_timestep = use_cross_timestep
    return model


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def flops(cfg: LTX2Config, video_tokens: int, audio_tokens: int, text_tokens: int, batch: int,
          isolated: int = 0, shared_blocks: int = 0) -> dict[str, float]:
    """Analytic forward FLOPs (2 per multiply-add) by part; each attention counts its projections and its
    score/value products. "other" is the input/output and caption projections, timestep embeddings and gates.
    `isolated` of the batch rows are modality-isolated: they run no audio<->video attention. `shared_blocks`:
    block evaluations a perturbed row does not run (the blocks before the first STG block, where it starts
    from the cond row's hidden states: forward's stg_source), summed over such rows."""
    Sv, Sa, L = video_tokens, audio_tokens, text_tokens
    d, da = cfg.inner_dim, cfg.audio_inner_dim

    def attention(queries: int, keys: int, query_dim: int, kv_dim: int, inner: int) -> float:
        projections = 2 * queries * query_dim * inner * 2 + 2 * keys * kv_dim * inner * 2  # q, out; k, v
        return projections + 2 * 2 * queries * keys * inner  # q k^T, p v

    per_block = {
        "video_self_attention": attention(Sv, Sv, d, d, d),
        "audio_self_attention": attention(Sa, Sa, da, da, da),
        "text_cross_attention": attention(Sv, L, d, d, d) + attention(Sa, L, da, da, da),
        # With the gate logits of audio_to_video (video side) and video_to_audio (audio side), audio heads.
        "audio_video_cross_attention": attention(Sv, Sa, d, da, da) + attention(Sa, Sv, da, d, da)
        + 2 * cfg.audio_num_attention_heads * (cfg.gated_attn * Sv * d + cfg.audio_gated_attn * Sa * da),
        "ffn": 2 * 2 * 4 * (Sv * d * d + Sa * da * da),
        # Gate logits of attn1 and attn2 in each stream.
        "other": 2 * 2 * (cfg.gated_attn * Sv * d * cfg.num_attention_heads
                          + cfg.audio_gated_attn * Sa * da * cfg.audio_num_attention_heads),
    }
    # Block evaluations: every row through every block, less the shared ones; no isolated row runs the
    # audio<->video attentions (a perturbed row sharing blocks is never isolated).
    runs = batch * cfg.num_layers - shared_blocks
    result = {k: float(v * (runs - isolated * cfg.num_layers if k == "audio_video_cross_attention" else runs))
              for k, v in per_block.items()}
    caption = 2 * L * (cfg.caption_channels * (d + da) + d * d + da * da) if cfg.use_prompt_embeddings else 0
    # One embedding per sample (per distinct timestep for per-token ones): 256 -> D -> D -> n*D.
    embedders = [(d, 9 if cfg.cross_attn_mod else 6), (da, 9 if cfg.audio_cross_attn_mod else 6),
                 (d, 4), (da, 4), (d, 1), (da, 1)]
    if cfg.prompt_modulation and cfg.use_prompt_adaln_single:
        embedders += [(d, 2), (da, 2)]
    embeddings = sum(2 * (256 * dim + dim * dim + dim * n * dim) for dim, n in embedders)
    io = 2 * (Sv * d * (cfg.in_channels + cfg.out_channels) + Sa * da * (cfg.audio_in_channels + cfg.audio_out_channels))
    result["other"] += float((caption + embeddings + io) * batch)
    result["total"] = sum(result.values())
    return result
