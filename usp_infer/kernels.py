"""Fused CUDA kernels (Triton) for the memory-bound steps around the GEMMs.

rms_norm_rope: the step between the q/k projections and attention.

Both families RMS-normalize q and k across all heads (learned weight) and then turn channel pairs by their RoPE
angles in fp32. As torch ops that is a norm, then an upcast, products and sums, a downcast: about 22 bytes
moved per element of a (B, S, C) bf16 tensor (bench/NOTES.md). This kernel reads x once, reads each token's
(cos, sin) row once for all B rows, and writes the result: about 5 bytes per element. Inductor fuses the same
ops under torch.compile, but re-reads the fp32 table per batch row.

rms_norm_modulate_: the AdaLN input of each attention and FFN, shift + rms_norm(x) * scale, in one pass instead
of a norm's and an addcmul's (eager only: torch.compile fuses these two itself, with the residual before them).

quantize_rows_fp8: an activation row -> float8 e4m3 with its power-of-two scale (amax, scale, clamp at 448,
round, cast in one pass: 3 bytes an element), the input of every FP8Linear (quant.py) in eager mode.

The math and roundings of the first two follow the unfused path (norm in fp32, rounded to x's dtype as the norm's
output is, then the rotation or the modulation in fp32, rounded once), so they agree with it to an ulp of x's dtype;
the third gives quant.quantize_rows_torch's bits exactly.

Triton ships with torch's CUDA builds; without it (the CPU build) `available()` is False and the callers keep
their torch ops. Registered as custom ops, so torch.compile'd blocks call them without a graph break.
"""

from __future__ import annotations

from typing import Optional

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


    @triton.jit
    def _round_to_e4m3(v):
        # Round to nearest even on the e4m3 grid in fp32, so that the cast after it is exact on every backend
        # (the GPU's cvt rounds the same way; Triton's CPU interpreter does not carry a rounded-up mantissa into
        # the exponent: 126.8 becomes 64). Adding 1.5 * 2^(s + 23) puts fp32's rounding point at 2^s, s the e4m3
        # step of |v|: 2^(exponent - 3), and 2^-9 for the subnormals (exponent below -6).
        a = tl.abs(v)
        exponent = tl.maximum((a.to(tl.int32, bitcast=True) >> 23) - 127, -6)
        magic = (((exponent - 3 + 23 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
        r = (a + magic) - magic
        sign = (v.to(tl.int32, bitcast=True) >> 31) << 31  # v's sign bit, -0 included
        return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


    @triton.jit
    def _quantize_rows_fp8_kernel(x_ptr, out_ptr, scale_ptr, static_ptr, stride_x,
                                  K: tl.constexpr, BLOCK: tl.constexpr, STATIC: tl.constexpr):
        # One program per row, the row held in registers: amax, its power-of-two scale, scale, clamp, round.
        row = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        keep = c < K
        x = tl.load(x_ptr + row * stride_x + c, mask=keep, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(static_ptr)
            inverse = 1.0 / scale
        else:  # quant.pow2_scale, from the bits of amax
            magnitude = tl.where(x == x, tl.abs(x), 0.0)  # NaN left out of the scale, as quant's nan_to_num does
            bits = tl.maximum(tl.max(magnitude, axis=0), 2.0**-100).to(tl.int32, bitcast=True)
            k = (bits >> 23) - 127 - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
            scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
            inverse = ((127 - k) << 23).to(tl.float32, bitcast=True)
        q = _round_to_e4m3(tl.minimum(tl.maximum(x * inverse, -448.0), 448.0))
        q = tl.where(x == x, q, x)  # NaN stays NaN, for the finite checks downstream
        tl.store(out_ptr + row * K + c, q.to(out_ptr.dtype.element_ty), mask=keep)
        tl.store(scale_ptr + row, scale)


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


@torch.library.custom_op("usp_infer::quantize_rows_fp8", mutates_args=())
def quantize_rows_fp8(x: Tensor, input_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """x (M, K), any row stride -> (e4m3 (M, K), fp32 (M, 1) scales) with x ~= q * scale: each row's own
    power-of-two scale, or the static `input_scale` () on every row. quant.quantize_rows_torch in one pass."""
    M, K = x.shape
    assert x.stride(1) == 1
    out = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M:
        _quantize_rows_fp8_kernel[(M,)](
            x, out, scale, scale if input_scale is None else input_scale, x.stride(0), K=K,
            BLOCK=triton.next_power_of_2(K), STATIC=input_scale is not None,
            num_warps=16 if K >= 8192 else 8 if K >= 2048 else 4,
        )
    return out, scale


@quantize_rows_fp8.register_fake
def _(x: Tensor, input_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[0], 1, dtype=torch.float32)
