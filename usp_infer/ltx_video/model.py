"""LTX-Video transformer in pure torch, weight-compatible with diffusers' `LTXVideoTransformer3DModel`.

Same state_dict keys and the same math as diffusers 0.42 (transformer_ltx.py with AdaLayerNormSingle,
PixArtAlphaTextProjection, FeedForward and RMSNorm). Self-attention goes through an injected `AttnFn`
so the sequence-parallel layer can swap it; nothing here knows about process groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..guidance import STG_MODES
from ..layers import (  # noqa: F401 - AttnFn, sdpa_attention and apply_rope are part of this model's surface
    AttnFn,
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
from ..modulation import Runs, addcmul, apply, norm_modulate, token_runs, unbind

# Config keys diffusers stores whose only supported value is the one LTX-Video uses.
_FIXED_KEYS = {"activation_fn": "gelu-approximate", "qk_norm": "rms_norm_across_heads"}


@dataclass(frozen=True)
class LTXConfig:
    """Transformer shape; field names are the keys of a diffusers `transformer/config.json`."""

    in_channels: int = 128
    out_channels: int = 128
    patch_size: int = 1
    patch_size_t: int = 1
    num_attention_heads: int = 32
    attention_head_dim: int = 64
    cross_attention_dim: int = 2048
    num_layers: int = 28
    caption_channels: int = 4096
    norm_eps: float = 1e-6
    norm_elementwise_affine: bool = False
    attention_bias: bool = True
    attention_out_bias: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or value < 1):
                raise ValueError(f"LTXConfig.{f.name}={value!r}: must be a positive integer")
        if self.inner_dim % 2:
            raise ValueError(f"heads x head_dim = {self.inner_dim} is odd: RoPE rotates channel pairs, make it even")
        if self.cross_attention_dim != self.inner_dim:
            # Text is projected to inner_dim before attn2, so its key/value input width must be inner_dim.
            raise ValueError(
                f"cross_attention_dim={self.cross_attention_dim} must equal heads x head_dim = {self.inner_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> LTXConfig:
        """Build from a diffusers config dict; `_`-prefixed bookkeeping keys are ignored."""
        channels = (("out_channels", "in_channels"),)
        return cls(**config_kwargs(cls, d, _FIXED_KEYS, "LTXVideoTransformer3DModel", channels))




SHAPES: dict[str, LTXConfig] = {
    "ltx-video-2b": LTXConfig(),
    "ltx-video-13b": LTXConfig(num_layers=48, attention_head_dim=128, cross_attention_dim=4096),
    # models/ltx-tiny's transformer: the shape CPU tests of the benchmark run.
    "ltx-tiny": LTXConfig(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=8,
                          cross_attention_dim=32, num_layers=2, caption_channels=48),
}


def rope_tables(
    cfg: LTXConfig,
    num_frames: int,
    height: int,
    width: int,
    rope_interpolation_scale: tuple[float, float, float],
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (1, F*H*W, inner_dim) fp32, tokens in f, h, w raster order.

    The ops and their order are those of diffusers' LTXVideoRotaryPosEmbed, so the tables are bit-identical.
    """
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in (num_frames, height, width)]
    f, h, w = torch.meshgrid(*axes, indexing="ij")
    f = f * rope_interpolation_scale[0] * cfg.patch_size_t / 20
    h = h * rope_interpolation_scale[1] * cfg.patch_size / 2048
    w = w * rope_interpolation_scale[2] * cfg.patch_size / 2048
    grid = torch.stack([f, h, w], dim=-1).flatten(0, 2)[None]  # (1, S, 3)
    dim, theta = cfg.inner_dim, 10000.0
    exponents = torch.linspace(
        math.log(1.0, theta), math.log(theta, theta), dim // 6, device=device, dtype=torch.float32
    )
    freqs = theta**exponents * math.pi / 2.0
    freqs = freqs * (grid.unsqueeze(-1) * 2 - 1)  # (1, S, 3, dim // 6)
    freqs = freqs.transpose(-1, -2).flatten(2)  # (1, S, dim // 6 * 3), the 3 axes interleaved per frequency
    cos, sin = freqs.cos().repeat_interleave(2, dim=-1), freqs.sin().repeat_interleave(2, dim=-1)
    if pad := dim % 6:  # channels without a frequency are left unrotated, at the front
        cos = torch.cat([torch.ones_like(cos[:, :, :pad]), cos], dim=-1)
        sin = torch.cat([torch.zeros_like(sin[:, :, :pad]), sin], dim=-1)
    return cos, sin


def rope_pairs(rope: tuple[Tensor, Tensor]) -> Tensor:
    """(cos, sin) tables -> one fp32 (1|B, S, C/2, 2) table of (cos, sin) per channel pair.

    The full tables repeat every angle twice (channels 2i and 2i+1 turn together); the blocks read this
    half-size table instead, built once per forward rather than once per q or k in every block.
    """
    cos, sin = rope
    return torch.stack((cos[..., ::2], sin[..., ::2]), dim=-1)














@dataclass(frozen=True, eq=False)  # eq=False: comparing a Tensor field would raise, identity is what is meant
class Perturbation:
    """Spatio-temporal guidance (Lightricks LTX-Video's SkipLayerStrategy) in `blocks`, for batch `rows` only.

    values:   self-attention output (before to_out) replaced by V                (AttentionValues)
    skip:     self-attention output (before to_out) replaced by its input        (AttentionSkip)
    residual: the block adds no self-attention output (Lightricks' Residual only acts on attention layers
              built with residual_connection=True, which LTX's are not, so there it is a no-op)
    block:    the whole block returns its input                                  (TransformerBlock)
    """

    blocks: tuple[int, ...]
    mode: str
    rows: Tensor  # (B,) bool, True on the perturbed branch

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.mode not in STG_MODES:
            raise ValueError(f"perturbation mode {self.mode!r}: choose one of {STG_MODES}")
        if self.rows.dtype != torch.bool or self.rows.ndim != 1:
            got = f"{self.rows.dtype} {tuple(self.rows.shape)}"
            raise ValueError(f"perturbation rows: need a 1-D bool tensor (one flag per batch row), got {got}")


class Attention(nn.Module):
    """diffusers' LTXAttention: q/k RMS-normed across all heads; to_out.0 is the output projection."""

    def __init__(self, cfg: LTXConfig) -> None:
        super().__init__()
        d, bias = cfg.inner_dim, cfg.attention_bias
        self.heads = cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(d, d, bias=cfg.attention_out_bias)])  # index 1 was a dropout
        # diffusers fixes eps=1e-5 and learned weights here, whatever the config's norm_eps says.
        self.norm_q, self.norm_k = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)

    def self_attention(
        self, x: Tensor, rope: Tensor, attn_fn: AttnFn, rows: Tensor | None, mode: str | None
    ) -> Tensor:
        q = norm_rope(self.to_q(x), self.norm_q, rope, apply_rope)
        k = norm_rope(self.to_k(x), self.norm_k, rope, apply_rope)
        v = self.to_v(x)
        heads = (self.heads, -1)  # (B, S, H*D) <-> (B, S, H, D)
        out = attn_fn(q.unflatten(2, heads), k.unflatten(2, heads), v.unflatten(2, heads)).flatten(2)
        if mode == "values":
            out = torch.where(rows, v, out)
        elif mode == "skip":
            out = torch.where(rows, x, out)
        return self.to_out[0](out)

    def cross_attention(self, x: Tensor, context: Tensor, text_bias: Tensor | None) -> Tensor:
        def heads(t: Tensor) -> Tensor:
            return t.unflatten(2, (self.heads, -1)).transpose(1, 2)  # (B, L, H*D) -> (B, H, L, D)

        q, k, v = heads(self.norm_q(self.to_q(x))), heads(self.norm_k(self.to_k(context))), heads(self.to_v(context))
        out = sdpa(q, k, v, attn_mask=text_bias)  # (B, H, S, D)
        return self.to_out[0](out.transpose(1, 2).flatten(2))








class TransformerBlock(nn.Module):
    """diffusers' LTXVideoTransformerBlock; `rope` is rope_pairs(); `rows` (B, 1, 1) bool and `mode` set this
    block's STG, if any."""

    def __init__(self, cfg: LTXConfig) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.norm1 = nn.RMSNorm(d, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)
        self.attn1 = Attention(cfg)
        self.norm2 = nn.RMSNorm(d, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)
        self.attn2 = Attention(cfg)
        self.ff = FeedForward(d)
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)

    def _modulation(self, temb: Tensor) -> Tensor:
        """(B, R, 6*D) -> (B, R, 6, D) shift, scale, gate for attention then FFN, the scales holding 1 + scale
        (added once to these rows, not at every token of every use)."""
        ada = self.scale_shift_table + temb.unflatten(2, (6, -1))
        ada[:, :, 1::3] += 1
        return ada

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        temb: Tensor | Runs,
        rope: Tensor,
        text_bias: Tensor | None,
        attn_fn: AttnFn,
        rows: Tensor | None = None,
        mode: str | None = None,
    ) -> Tensor:
        ada = apply(temb, self._modulation)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = unbind(ada, -2)
        # addcmul(a, b, c) = a + b * c in one pass instead of two over the (B, S, D) activations.
        h = norm_modulate(x, self.norm1, shift_msa, scale_msa)
        out = addcmul(x, self.attn1.self_attention(h, rope, attn_fn, rows, mode), gate_msa)
        if mode == "residual":
            out = torch.where(rows, x, out)
        out = out + self.attn2.cross_attention(out, context, text_bias)  # un-normed queries, no gate: as diffusers
        out = addcmul(out, self.ff(norm_modulate(out, self.norm2, shift_mlp, scale_mlp)), gate_mlp)
        return torch.where(rows, x, out) if mode == "block" else out


def compile_blocks(model: LTXTransformer) -> None:
    """torch.compile each transformer block in place. Attention stays eager (sdpa and USPAttention are
    compiler-disabled), so the graphs hold the projections, norms, RoPE, modulation and FFN around it.

    Every shape static (layers.compile_each).
    """
    compile_each(model.transformer_blocks)


class LTXTransformer(nn.Module):
    def __init__(self, cfg: LTXConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.inner_dim
        self.proj_in = nn.Linear(cfg.in_channels, d)
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.time_embed = nn.Module()  # diffusers' AdaLayerNormSingle: emb.timestep_embedder, then linear
        self.time_embed.emb = nn.ModuleDict({"timestep_embedder": TwoLayerMLP(256, d, F.silu)})
        self.time_embed.linear = nn.Linear(d, 6 * d)
        self.caption_projection = TwoLayerMLP(cfg.caption_channels, d, gelu_tanh)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.num_layers)])
        self.proj_out = nn.Linear(d, cfg.out_channels)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: Tensor,
        encoder_attention_mask: Tensor | None,
        rope: tuple[Tensor, Tensor],
        attn_fn: AttnFn = sdpa_attention,
        perturbation: Perturbation | None = None,
        stg_source: int | None = None,
        blocks: Callable | None = None,
    ) -> Tensor:
        """(B, S, in_channels) -> (B, S, out_channels); S may be a shard if rope and timestep match it.

        stg_source: an unperturbed row whose inputs (latents, text, mask, timestep) the caller vouches are every
        perturbed row's own (the perturbed branch is the cond branch with some blocks perturbed): the perturbed
        rows are then not computed before the first perturbed block, where they start as copies of that row's
        hidden states. The same function, fewer FLOPs.
        blocks: what runs `run_blocks` (with its arguments), e.g. a graphs.GraphedCall of it.
        """
        B, S, _ = hidden_states.shape
        self._check_inputs(B, S, encoder_hidden_states, timestep, encoder_attention_mask, rope, perturbation,
                           stg_source)
        x = self.proj_in(hidden_states)
        context, text_bias, temb, embedded = self._condition(encoder_hidden_states, encoder_attention_mask,
                                                             timestep, x.dtype)
        rows = None if perturbation is None else perturbation.rows.to(x.device)[:, None, None]  # (B, 1, 1)
        pairs = rope_pairs(rope)
        perturbed, mode = ((), None) if perturbation is None else (tuple(sorted(perturbation.blocks)), perturbation.mode)
        prefix = kept = source = kept_pairs = None
        if stg_source is not None and perturbed:
            # Before the first perturbed block a perturbed row computes what its source row computes: run the
            # other rows alone that far, then give each perturbed row a copy of its source's hidden states.
            flags = perturbation.rows.tolist()
            kept = tuple(i for i in range(B) if not flags[i])
            pick = lambda t: None if t is None else t[list(kept)]  # noqa: E731  the kept rows of a per-row input
            prefix = self._condition(*map(pick, (encoder_hidden_states, encoder_attention_mask, timestep)), x.dtype)
            kept_pairs = pairs if pairs.shape[0] == 1 else pairs[list(kept)]
            source = tuple(kept.index(stg_source if f else i) for i, f in enumerate(flags))
        x = (blocks or self.run_blocks)(x, context, temb, pairs, text_bias, attn_fn, rows, perturbed, mode, prefix,
                                        kept, source, kept_pairs)
        shift, scale = unbind(apply(embedded, lambda e: self.scale_shift_table + e[:, :, None]), -2)  # (B, R, 2, D)
        x = addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=1e-6), apply(scale, lambda t: 1 + t))
        return self.proj_out(x)

    def run_blocks(self, x: Tensor, context: Tensor, temb, pairs: Tensor, text_bias: Tensor | None, attn_fn: AttnFn,
                   rows: Tensor | None, perturbed: tuple[int, ...], mode: str | None, prefix: tuple | None,
                   kept: tuple[int, ...] | None, source: tuple[int, ...] | None, kept_pairs: Tensor | None) -> Tensor:
        """The blocks, from the projected input to the last block's hidden states. With a `prefix` conditioning
        the rows `kept` run alone up to the first perturbed block, then row b continues from kept row
        source[b]. Reads nothing back to the host (rows are picked by slicing): a CUDA graph can hold it."""
        first = 0
        if prefix is not None:
            first = perturbed[0]
            xk = pick_rows(x, kept)
            for block in self.transformer_blocks[:first]:
                xk = block(xk, prefix[0], prefix[2], kept_pairs, prefix[1], attn_fn, None, None)
            x = pick_rows(xk, source)
        for i, block in enumerate(self.transformer_blocks[first:], start=first):
            hit = i in perturbed
            x = block(x, context, temb, pairs, text_bias, attn_fn, rows if hit else None, mode if hit else None)
        return x

    def _condition(self, text: Tensor, mask: Tensor | None, timestep: Tensor, dtype: torch.dtype) -> tuple:
        """What every block of a batch reads: (projected text, its score bias or None, the modulation of each
        block, the timestep embedding the output head reads)."""
        text_bias = None
        if mask is not None:
            text, mask = drop_trailing_pads(text, mask)
            # diffusers: keep -> 0, pad -> -10000, broadcast over heads and queries
            text_bias = ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]
        # Per-token timesteps take few values (image-to-video: two): embed each once, modulate per run of tokens.
        runs = None
        if timestep.ndim == 2:
            timestep, index = torch.unique(timestep, return_inverse=True)  # (K,), (B, S)
            runs = token_runs(index)
        embedded = self.time_embed.emb.timestep_embedder(timestep_features(timestep).to(dtype))  # (B|K, D)
        temb = self.time_embed.linear(F.silu(embedded))  # (B|K, 6*D)
        if runs is None:  # (B, 1, ...): one vector per sample, broadcast over its tokens
            temb, embedded = temb[:, None], embedded[:, None]
        else:  # Runs of (B, R, ...)
            temb, embedded = runs.gather(temb), runs.gather(embedded)
        return self.caption_projection(text), text_bias, temb, embedded

    def _check_inputs(
        self,
        B: int,
        S: int,
        context: Tensor,
        timestep: Tensor,
        mask: Tensor | None,
        rope: tuple[Tensor, Tensor],
        perturbation: Perturbation | None,
        stg_source: int | None = None,
    ) -> None:
        if context.ndim != 3 or context.shape[0] != B:
            raise ValueError(f"encoder_hidden_states {tuple(context.shape)}: expected ({B}, T, caption_channels)")
        if tuple(timestep.shape) not in ((B,), (B, S)):
            raise ValueError(f"timestep {tuple(timestep.shape)}: expected ({B},) or per token ({B}, {S})")
        if mask is not None and tuple(mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"encoder_attention_mask {tuple(mask.shape)}: expected {tuple(context.shape[:2])}")
        for table in rope:
            if table.ndim != 3 or table.shape[0] not in (1, B) or table.shape[1:] != (S, self.cfg.inner_dim):
                raise ValueError(
                    f"rope table {tuple(table.shape)}: expected (1 or {B}, {S}, {self.cfg.inner_dim}); "
                    "slice rope_tables() with the same plan as the hidden states"
                )
        if perturbation is not None:
            bad = [i for i in perturbation.blocks if not 0 <= i < self.cfg.num_layers]
            if bad:
                raise ValueError(f"perturbed blocks {bad} out of range: the model has {self.cfg.num_layers} blocks")
            if perturbation.rows.shape[0] != B:
                raise ValueError(f"perturbation rows has {perturbation.rows.shape[0]} entries for a batch of {B}")
        if stg_source is not None and (not 0 <= stg_source < B or perturbation is None
                                       or bool(perturbation.rows[stg_source])):
            raise ValueError(f"stg_source {stg_source}: need an unperturbed batch row (0..{B - 1}) and a perturbation")


def load_transformer(folder: str | Path, device: torch.device | str, dtype: torch.dtype) -> LTXTransformer:
    """Load a diffusers `transformer/` folder (config.json + one or sharded safetensors) onto `device`."""
    return load_folder(folder, device, dtype, lambda config: LTXTransformer(LTXConfig.from_dict(config)))


