"""Fused CUDA kernels (Triton) for the memory-bound steps around the GEMMs.

rms_norm_rope: the step between the q/k projections and attention.

Both families RMS-normalize q and k across all heads (learned weight) and then turn channel pairs by their RoPE
angles in fp32. As torch ops that is a norm, then an upcast, products and sums, a downcast: about 22 bytes
moved per element of a (B, S, C) bf16 tensor (bench/NOTES.md). This kernel reads x once, reads each token's
(cos, sin) row once for all B rows, and writes the result: about 5 bytes per element. Inductor fuses the same
ops under torch.compile, but re-reads the fp32 table per batch row.

rms_norm_modulate_: the AdaLN input of each attention and FFN, shift + rms_norm(x) * scale, in one pass instead
of a norm's and an addcmul's (eager only: torch.compile fuses these two itself, with the residual before them).

The math and its roundings follow the unfused path (norm in fp32, rounded to x's dtype as the norm's output
is, then the rotation or the modulation in fp32, rounded once), so they agree with it to an ulp of x's dtype.

Triton ships with torch's CUDA builds; without it (the CPU build) `available()` is False and the callers keep
their torch ops. Registered as custom ops, so torch.compile'd blocks call them without a graph break.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch has no Triton
    triton = None


def available(x: Tensor) -> bool:
    """Whether the kernels can run on x: a CUDA tensor, with Triton installed."""
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _rms_norm_rope_kernel(
        x_ptr, w_ptr, t_ptr, out_ptr, batch, eps,
        stride_xb, stride_xs, stride_tb, stride_ts, stride_ob, stride_os,
        C: tl.constexpr, RUN: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One program per token: its table row and the weight are loaded once, then each batch row is done.
        # A row is C/2 pairs; pair p = (channel a, channel a + RUN) with a = (p // RUN) * 2 * RUN + p % RUN
        # ("split": RUN = C / 2H, the halves of each head; "interleaved": RUN = 1, channels 2i and 2i + 1).
        # The table row holds cos at channel a and sin at channel a + RUN, the layout of x.
        s = tl.program_id(0)
        p = tl.arange(0, BLOCK)
        keep = p < C // 2
        a = (p // RUN) * (2 * RUN) + p % RUN
        b = a + RUN
        wa = tl.load(w_ptr + a, mask=keep, other=0.0).to(tl.float32)
        wb = tl.load(w_ptr + b, mask=keep, other=0.0).to(tl.float32)
        for row in range(batch):
            t_row = t_ptr + row * stride_tb + s * stride_ts
            cos = tl.load(t_row + a, mask=keep, other=0.0)
            sin = tl.load(t_row + b, mask=keep, other=0.0)
            x_row = x_ptr + row * stride_xb + s * stride_xs
            xa = tl.load(x_row + a, mask=keep, other=0.0).to(tl.float32)
            xb = tl.load(x_row + b, mask=keep, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt((tl.sum(xa * xa, axis=0) + tl.sum(xb * xb, axis=0)) / C + eps)
            dtype = out_ptr.dtype.element_ty
            na = (xa * rstd * wa).to(dtype).to(tl.float32)  # the norm's output, in x's dtype
            nb = (xb * rstd * wb).to(dtype).to(tl.float32)
            o_row = out_ptr + row * stride_ob + s * stride_os
            tl.store(o_row + a, (na * cos - nb * sin).to(dtype), mask=keep)
            tl.store(o_row + b, (nb * cos + na * sin).to(dtype), mask=keep)


    @triton.jit
    def _rms_norm_modulate_kernel(
        x_ptr, shift_ptr, scale_ptr, out_ptr, batch, eps,
        stride_xb, stride_xs, stride_shift, stride_scale, stride_ob, stride_os,
        C: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One program per token, each batch row in turn: shift + rms_norm(x) * scale with per-row parameters.
        s = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        keep = c < C
        dtype = out_ptr.dtype.element_ty
        for row in range(batch):
            x = tl.load(x_ptr + row * stride_xb + s * stride_xs + c, mask=keep, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
            normed = (x * rstd).to(dtype).to(tl.float32)  # the norm's output, in x's dtype
            shift = tl.load(shift_ptr + row * stride_shift + c, mask=keep, other=0.0).to(tl.float32)
            scale = tl.load(scale_ptr + row * stride_scale + c, mask=keep, other=0.0).to(tl.float32)
            tl.store(out_ptr + row * stride_ob + s * stride_os + c, (shift + normed * scale).to(dtype), mask=keep)


@torch.library.custom_op("usp_infer::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: Tensor, weight: Tensor, eps: float, table: Tensor, run: int) -> Tensor:
    """rope(rms_norm(x) * weight): x (B, S, C); table (1|B, S, C) fp32 with cos at each pair's first channel
    and sin at its second; pairs are (j, j + run) within each block of 2 * run channels."""
    B, S, C = x.shape
    assert x.stride(2) == 1 and table.stride(2) == 1 and table.shape[1:] == (S, C) and C % (2 * run) == 0
    out = torch.empty_like(x)
    if S:
        # The table's rows: only the first when it has one (it is then the same for every batch row).
        stride_tb = 0 if table.shape[0] == 1 else table.stride(0)
        _rms_norm_rope_kernel[(S,)](
            x, weight, table, out, B, eps, x.stride(0), x.stride(1), stride_tb, table.stride(1),
            out.stride(0), out.stride(1), C=C, RUN=run, BLOCK=triton.next_power_of_2(C // 2),
            num_warps=8 if C >= 4096 else 4,
        )
    return out


@rms_norm_rope.register_fake
def _(x: Tensor, weight: Tensor, eps: float, table: Tensor, run: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("usp_infer::rms_norm_modulate_", mutates_args=("out",))
def rms_norm_modulate_(x: Tensor, shift: Tensor, scale: Tensor, eps: float, out: Tensor) -> None:
    """out = shift + rms_norm(x) * scale (no learned weight): x, out (B, S, C); shift, scale (B, 1, C), one
    vector per row, any row stride (views of the modulation table, or expanded). Writes into out, which may be
    a slice of a larger tensor (one run of tokens)."""
    B, S, C = x.shape
    assert x.stride(2) == out.stride(2) == 1 and out.shape == x.shape
    assert shift.shape == scale.shape == (B, 1, C) and shift.stride(2) == scale.stride(2) == 1
    if S:
        _rms_norm_modulate_kernel[(S,)](
            x, shift, scale, out, B, eps, x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
            out.stride(0), out.stride(1), C=C, BLOCK=triton.next_power_of_2(C), num_warps=8 if C >= 4096 else 4,
        )
