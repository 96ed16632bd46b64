"""LTX-Video transformer in pure torch, weight-compatible with diffusers' `LTXVideoTransformer3DModel`.

Same state_dict keys and the same math as diffusers 0.42 (transformer_ltx.py with AdaLayerNormSingle,
PixArtAlphaTextProjection, FeedForward and RMSNorm). Self-attention goes through an injected `AttnFn`
so the sequence-parallel layer can swap it; nothing here knows about process groups.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import kernels
from .guidance import STG_MODES
from .modulation import Runs, addcmul, apply, norm_modulate, token_runs, unbind

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


def config_kwargs(cls: type, d: dict, fixed: dict, model: str, out_in: tuple[tuple[str, str], ...]) -> dict:
    """The dataclass `cls`'s fields from a diffusers config dict `d` of class `model`.

    Keys in `fixed` must hold their one supported value; `_`-prefixed bookkeeping keys are ignored; any other
    unknown key is refused. An output-channel key of 0/None takes its input-channel key's value (`out_in`
    pairs), as diffusers does.
    """
    for key, supported in fixed.items():
        if d.get(key, supported) != supported:
            raise ValueError(f"{key}={d[key]!r} is not supported; only {supported!r} is")
    known = {f.name for f in fields(cls)}
    unknown = sorted(k for k in d if k not in known and k not in fixed and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}: not an {model} config?")
    kwargs = {k: v for k, v in d.items() if k in known}
    for out, inp in out_in:
        if out in kwargs and not kwargs[out]:
            kwargs[out] = kwargs.get(inp, getattr(cls, inp))
    return kwargs


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


def _apply_rope(x: Tensor, pairs: Tensor) -> Tensor:
    """Rotate channel pairs (a, b) = (x[2i], x[2i+1]) of x (B, S, C) by their angle, in fp32 like diffusers.

    diffusers writes x * cos + (-b, a) * sin over full-width tables; per pair that is the same products
    and sums, (a cos - b sin, b cos + a sin). Under torch.compile the real form fuses into one kernel;
    run eagerly, the complex product (a + ib)(cos + i sin) takes 3 kernels instead of ~8.
    """
    if torch.compiler.is_compiling():
        cos, sin = pairs[..., :1], pairs[..., 1:]  # (1|B, S, C/2, 1): one angle per pair, broadcast over it
        xp = x.float().unflatten(-1, (-1, 2))  # (B, S, C/2, 2): (a, b)
        turned = xp.flip(-1) * torch.tensor([-1.0, 1.0], device=x.device)  # (-b, a)
        return (xp * cos + turned * sin).flatten(-2).to(x.dtype)
    turned = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * torch.view_as_complex(pairs)
    return torch.view_as_real(turned).flatten(-2).to(x.dtype)


def norm_rope(x: Tensor, norm: nn.RMSNorm, table: Tensor, rope: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """rope(norm(x), table), as one fused kernel on CUDA (kernels.py): the q/k path of both families.

    table: rope_pairs' (1, S, C/2, 2) for pairs (2i, 2i+1), or LTX-2's "split" (1, S, H, 2, r) for (j, j + r).
    """
    if kernels.available(x):
        run = table.shape[-1] if table.ndim == 5 else 1
        return kernels.rms_norm_rope(x, norm.weight, norm.eps, table.flatten(2), run)
    return rope(norm(x), table)


AttnFn = Callable[[Tensor, Tensor, Tensor], Tensor]


# torch tries flash first; cuDNN's kernel uses Hopper's own instructions and ran faster on an H200
# (bf16, 64- and 128-dim heads; bench/NOTES.md). The others stay as fallbacks for shapes cuDNN refuses.
_CUDA_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]


# Kept out of torch.compile'd graphs: there Inductor copies some inputs to the strides it wants before
# the cuDNN kernel (2 copies of a (B, S, D) tensor per block), while the kernel takes the views as they
# are at the same speed (bench/NOTES.md).
@torch.compiler.disable
def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """F.scaled_dot_product_attention on (B, H, S, D), preferring cuDNN's kernel on CUDA."""
    if q.is_cuda:
        with sdpa_kernel(_CUDA_SDPA_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked attention, (B, S, H, D) in and out: the default, single-process AttnFn."""
    return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


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
        q = norm_rope(self.to_q(x), self.norm_q, rope, _apply_rope)
        k = norm_rope(self.to_k(x), self.norm_k, rope, _apply_rope)
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


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """diffusers' FeedForward with gelu-approximate: keys net.0.proj and net.2 (net.1 was a dropout)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        gelu_proj = nn.Module()
        gelu_proj.proj = nn.Linear(dim, 4 * dim)
        self.net = nn.ModuleList([gelu_proj, nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        up = self.net[0].proj
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):  # up always has a bias (nn.Linear's default)
            # GELU in the GEMM's epilogue (cuBLASLt): no separate pass over the 4x-wide activations. On CUDA
            # this op's GELU is the tanh form LTX uses (on the CPU it is the exact one, so it stays CUDA-only).
            hidden = torch._addmm_activation(up.bias, x.flatten(0, -2), up.weight.t(), use_gelu=True)
            return self.net[2](hidden.unflatten(0, x.shape[:-1]))
        return self.net[2](_gelu_tanh(up(x)))


class TwoLayerMLP(nn.Module):
    """linear_1 -> activation -> linear_2: diffusers' TimestepEmbedding (silu) and PixArtAlphaTextProjection."""

    def __init__(self, d_in: int, d_out: int, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.linear_1, self.linear_2, self.act = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out), act

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


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

    Shapes are compiled as they come (dynamic=False): a new resolution or batch compiles once more, and the
    cache holds enough variants for a batch of sizes and the STG blocks' own variants.
    """
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in model.transformer_blocks:
        block.compile(dynamic=False)


def _drop_trailing_pads(text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Cut the text positions after the last one any row keeps: (B, L, C), (B, L) -> (B, L', C), (B, L').

    A masked key gets a -10000 bias, so its attention weight is exactly 0 whenever its row keeps at
    least one key: dropping it changes only the work (T5 pads a ~20-token prompt to 128 positions, and
    every block projects and attends to all of them). A row that keeps nothing attends evenly over its
    pads, so then nothing is cut.
    """
    kept = mask.bool()
    positions = torch.arange(1, kept.shape[1] + 1, device=kept.device)
    length, every_row_keeps = torch.stack([(kept.any(0) * positions).max(), kept.any(1).all()]).tolist()
    if not every_row_keeps:
        return text, mask
    return text[:, :length], mask[:, :length]


def _timestep_features(t: Tensor) -> Tensor:
    """diffusers' get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0): (N,) -> (N, 256)."""
    half = 128
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


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
        self.caption_projection = TwoLayerMLP(cfg.caption_channels, d, _gelu_tanh)
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
    ) -> Tensor:
        """(B, S, in_channels) -> (B, S, out_channels); S may be a shard if rope and timestep match it."""
        B, S, _ = hidden_states.shape
        self._check_inputs(B, S, encoder_hidden_states, timestep, encoder_attention_mask, rope, perturbation)
        text_bias = None
        if encoder_attention_mask is not None:
            encoder_hidden_states, encoder_attention_mask = _drop_trailing_pads(encoder_hidden_states,
                                                                               encoder_attention_mask)
            # diffusers: keep -> 0, pad -> -10000, broadcast over heads and queries
            text_bias = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0)[:, None, None, :]
        x = self.proj_in(hidden_states)
        # Per-token timesteps take few values (image-to-video: two): embed each once, modulate per run of tokens.
        runs = None
        if timestep.ndim == 2:
            timestep, index = torch.unique(timestep, return_inverse=True)  # (K,), (B, S)
            runs = token_runs(index)
        embedded = self.time_embed.emb.timestep_embedder(_timestep_features(timestep).to(x.dtype))  # (B|K, D)
        temb = self.time_embed.linear(F.silu(embedded))  # (B|K, 6*D)
        if runs is None:  # (B, 1, ...): one vector per sample, broadcast over its tokens
            temb, embedded = temb[:, None], embedded[:, None]
        else:  # Runs of (B, R, ...)
            temb, embedded = runs.gather(temb), runs.gather(embedded)
        context = self.caption_projection(encoder_hidden_states)
        rows = None if perturbation is None else perturbation.rows.to(x.device)[:, None, None]  # (B, 1, 1)
        pairs = rope_pairs(rope)
        for i, block in enumerate(self.transformer_blocks):
            perturbed = perturbation is not None and i in perturbation.blocks
            mode = perturbation.mode if perturbed else None
            x = block(x, context, temb, pairs, text_bias, attn_fn, rows if perturbed else None, mode)
        shift, scale = unbind(apply(embedded, lambda e: self.scale_shift_table + e[:, :, None]), -2)  # (B, R, 2, D)
        x = addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=1e-6), apply(scale, lambda t: 1 + t))
        return self.proj_out(x)

    def _check_inputs(
        self,
        B: int,
        S: int,
        context: Tensor,
        timestep: Tensor,
        mask: Tensor | None,
        rope: tuple[Tensor, Tensor],
        perturbation: Perturbation | None,
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


def load_transformer(folder: str | Path, device: torch.device | str, dtype: torch.dtype) -> LTXTransformer:
    """Load a diffusers `transformer/` folder (config.json + one or sharded safetensors) onto `device`."""
    return load_folder(folder, device, dtype, lambda config: LTXTransformer(LTXConfig.from_dict(config)))


def load_folder(
    folder: str | Path, device: torch.device | str, dtype: torch.dtype, build: Callable[[dict], nn.Module]
) -> nn.Module:
    """Build `build(config.json's dict)` on the meta device and assign it the folder's safetensors weights.

    The parameters are the loaded tensors themselves (assign=True): each is read straight to `device` and
    cast there, so weights are never held twice. Every key and shape is checked against the built model.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: pass a diffusers `transformer/` folder")
    config = json.loads(config_path.read_text())
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index_path.is_file():
        files = sorted({folder / name for name in json.loads(index_path.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
        if len(files) > 1:
            raise ValueError(f"{folder} holds {[f.name for f in files]} but no {index_path.name}: keep one file")
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    with torch.device("meta"):
        model = build(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state: dict[str, Tensor] = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{index_path} lists {path.name}, which is not in {folder}")
        for key, tensor in load_file(path, device=str(torch.device(device))).items():
            if key not in expected:
                raise ValueError(f"{path}: unexpected key {key!r}; is this a {type(model).__name__} checkpoint?")
            if tensor.shape != expected[key]:
                raise ValueError(f"{path}: {key!r} has shape {tuple(tensor.shape)}, config.json implies "
                                 f"{tuple(expected[key])}")
            state[key] = tensor.to(dtype)
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise ValueError(f"{folder}: key {missing[0]!r} is in none of {[f.name for f in files]} "
                         f"({len(missing)} missing)")
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)
