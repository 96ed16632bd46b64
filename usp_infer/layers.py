"""The building blocks both transformer families share, in pure torch: the attention function type and
SDPA, RoPE on channel pairs, the fused q/k norm + RoPE, diffusers' FeedForward and two-layer MLPs, the
timestep features, text-pad trimming, config parsing and the meta-device weight loader.

Nothing here knows about process groups: the parallel layer swaps in its own `AttnFn`.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import kernels, quant


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


def apply_rope(x: Tensor, pairs: Tensor) -> Tensor:
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


def compile_each(blocks: nn.ModuleList) -> None:
    """torch.compile each block in place, every shape static: a new resolution, batch (the STG prefix's rows) or
    number of distinct timesteps compiles once more. Dynamo's automatic dynamic shapes are turned off too: torch
    2.11 on a GPU made the batch of a block's graphs symbolic after such recompiles despite dynamic=False."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.automatic_dynamic_shapes = False
    for block in blocks:
        block.compile(dynamic=False)


def gelu_tanh(x: Tensor) -> Tensor:
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
        # (not for quant.py's FP8Linear, which multiplies in float8 itself)
        if type(up) is nn.Linear and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):  # up has a bias
            # GELU in the GEMM's epilogue (cuBLASLt): no separate pass over the 4x-wide activations. On CUDA
            # this op's GELU is the tanh form LTX uses (on the CPU it is the exact one, so it stays CUDA-only).
            hidden = torch._addmm_activation(up.bias, x.flatten(0, -2), up.weight.t(), use_gelu=True)
            return self.net[2](hidden.unflatten(0, x.shape[:-1]))
        return self.net[2](gelu_tanh(up(x)))


class TwoLayerMLP(nn.Module):
    """linear_1 -> activation -> linear_2: diffusers' TimestepEmbedding (silu) and PixArtAlphaTextProjection."""

    def __init__(self, d_in: int, d_out: int, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.linear_1, self.linear_2, self.act = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out), act

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def pick_rows(t: Tensor, rows: Sequence[int]) -> Tensor:
    """t[list(rows)] by slices: no index tensor to copy to the device (inside a CUDA graph it could not be)."""
    return torch.cat([t[i:i + 1] for i in rows])


def drop_trailing_pads(text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
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


def timestep_features(t: Tensor) -> Tensor:
    """diffusers' get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0): (N,) -> (N, 256)."""
    half = 128
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def load_folder(
    folder: str | Path, device: torch.device | str, dtype: torch.dtype, build: Callable[[dict], nn.Module]
) -> nn.Module:
    """Build `build(config.json's dict)` on the meta device and assign it the folder's safetensors weights.

    The parameters are the loaded tensors themselves (assign=True): each is read straight to `device` and
    cast there, so weights are never held twice. Every key and shape is checked against the built model. Block
    linears stored in e4m3 load as quant.FP8Linear (e4m3 weights and fp32 scales stay as stored).
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
        model = build(config).to(dtype)
    state: dict[str, Tensor] = {}
    where: dict[str, Path] = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{index_path} lists {path.name}, which is not in {folder}")
        for key, tensor in load_file(path, device=str(torch.device(device))).items():
            state[key], where[key] = tensor, path
    # A checkpoint's e4m3 layers (`usp-infer quantize`, Lightricks' FP8 files) become FP8Linears first.
    quant.prepare_for_state(model, state)
    expected = model.state_dict()
    for key, tensor in state.items():
        if key not in expected:
            raise ValueError(f"{where[key]}: unexpected key {key!r}; is this a {type(model).__name__} checkpoint?")
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{where[key]}: {key!r} has shape {tuple(tensor.shape)}, config.json implies "
                             f"{tuple(expected[key].shape)}")
        state[key] = tensor.to(expected[key].dtype)  # as the model holds it: `dtype`, or e4m3 and fp32 scales
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise ValueError(f"{folder}: key {missing[0]!r} is in none of {[f.name for f in files]} "
                         f"({len(missing)} missing)")
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)
