"""FP8 attention for Hopper (issue 25): a flash-attention forward (Triton) that multiplies in 8 bits.

Attention is about 45% of an LTX-2.3 step at 24,576 tokens and stays bf16 (cuDNN) when the linears run in
float8. On sm89+ tensor cores 8-bit products run at twice the bf16 rate; this kernel puts both products of
attention there, Q K^T and P V, with fp32 accumulation and an online softmax.

Quantization (every scale factors out of a product, so it is applied to the fp32 result, never to codes):
  Q   per token (row of D), quantized inside the kernel after its one load.
  K   per block of KV_BLOCK tokens; optionally smoothed first (the mean key over the sequence subtracted:
      q.(k - mean) differs from q.k by a constant per query, which softmax drops, while the codes no longer
      spend their range on a shared offset; SageAttention's observation).
  P   exp2(s - m) scaled to [0, 448] by folding log2(448) into the running max, a fixed scale: the 448 of
      the numerator (P V) and the denominator (the row sum, taken from unrounded fp32 P) cancel.
  V   per block of KV_BLOCK tokens and per channel; each tile's P V product (fp32) is multiplied by its
      block's channel scales before it is added to the accumulator. That add, outside the MMA, is also
      SageAttention2's two-level accumulation: Hopper's fp8 MMA adds in reduced precision, so a sum over
      thousands of keys must not run through its accumulator.
  Q and K are e4m3 with power-of-two scales (quant.pow2_scale), or int8 with amax / 127 scales (qk="int8",
  SageAttention's choice for Q K^T: a uniform grid keeps about 2 more bits than e4m3 where a row's values
  are of similar size, and Hopper multiplies int8 at the fp8 rate). P and V are always e4m3.
  log2(e) / sqrt(D) is folded into Q's per-row scale, so the softmax is exp2 of one FMA per logit.

Layout: Q and the output are read and written in place as (B, S, H, D) views, any strides but the last.
K and V go through one pre-pass (`quantize_kv`: one read of bf16, one write of 8-bit codes) into
(B, H, S_pad, D) for K and (B, H, D, S_pad) for V, S_pad the length rounded up to KV_BLOCK (codes 0 there,
so the kernel's K/V loads need no masks; the last partial tile masks its logits). V is written transposed
because Hopper's 8-bit wgmma takes its B operand K-major only: for P V the reduction runs over tokens, so
tokens must be contiguous (as Triton's fused-attention tutorial lays V out for fp8).

Non-finite inputs: a row, block or channel holding NaN or inf gets a NaN scale, so the outputs it reaches
are NaN (SDPA gives NaN or inf there too) and the pipeline's finite checks still fire.

Triton's CPU interpreter rounds fp32 -> fp8 casts wrongly (it truncates and does not saturate), so every
cast is preceded by an exact rounding to the e4m3 grid (kernels._round_to_e4m3) where it is cheap (Q,
the pre-pass); P, in the inner loop, gets it only under the interpreter (the GPU's cvt.rn.satfinite rounds
the same way). `reference` emulates the whole scheme in torch (fp64 sums) for the tests.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

from . import kernels

triton = kernels.triton
if triton is not None:
    import triton.language as tl

KV_BLOCK = 128  # tokens per K scale and per V channel scale; the code buffers' length is a multiple of it
P_SCALE = 448.0  # P in [0, 1] -> [0, 448], e4m3's largest finite value


class Config(NamedTuple):
    block_m: int  # queries per program
    block_n: int  # keys per inner-loop tile (divides KV_BLOCK, so one K scale per tile)
    num_warps: int
    num_stages: int  # the K/V loads' software-pipeline depth


# A few tile shapes to time on the GPU, not an autotune sweep (each compile costs seconds there). Registers
# set the menu: a thread holds the accumulator, the logits and the tile's separate P V product (the two-level
# accumulation), so 128 x 128 tiles need 8 warps (two warpgroups of 64 rows); 128 x 64 on 4 warps spills
# ~1 KB a thread at D = 128 (ptxas, sm_90a). 64 x 128 on one warpgroup fits and leaves room for two programs
# per SM, whose softmax and MMAs can interleave.
CONFIGS = {
    "m128n128w8s3": Config(128, 128, 8, 3),
    "m128n128w8s2": Config(128, 128, 8, 2),
    "m128n64w8s3": Config(128, 64, 8, 3),
    "m64n128w4s3": Config(64, 128, 4, 3),
}
DEFAULT_CONFIG = "m128n128w8s3"
QK_FORMATS = ("e4m3", "int8")


class QuantizedKV(NamedTuple):
    """quantize_kv's output: codes padded to a multiple of KV_BLOCK tokens, and their fp32 scales."""
    k: Tensor  # (B, H, S_pad, D) e4m3 or int8
    k_scale: Tensor  # (B, H, S_pad / KV_BLOCK)
    v: Tensor  # (B, H, D, S_pad) e4m3: transposed
    v_scale: Tensor  # (B, H, S_pad / KV_BLOCK, D)
    length: int  # S, the number of real keys


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


if triton is not None:

    @triton.jit
    def _scales(amax, INT8: tl.constexpr):
        # (scale, 1 / scale) for codes of an amax: e4m3 with quant.pow2_scale's power of two (from amax's
        # bits, exact), or int8 with amax / 127 (div_rn: IEEE division, as torch's). amax = inf marks a
        # non-finite input: its scale is NaN.
        a = tl.maximum(amax, 2.0**-100)  # quant.AMAX_FLOOR: all-zero rows get a finite scale and codes 0
        if INT8:
            scale = a * (1.0 / 127.0)
            inverse = tl.math.div_rn(tl.full(a.shape, 127.0, tl.float32), a)
        else:
            bits = a.to(tl.int32, bitcast=True)
            k = (bits >> 23) - 127 - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
            scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
            inverse = ((127 - k) << 23).to(tl.float32, bitcast=True)
        return tl.where(amax < float("inf"), scale, float("nan")), inverse

    @triton.jit
    def _codes(x, inverse, INT8: tl.constexpr):
        # x / scale rounded to nearest even: int8 by fp32's own rounding at 1 (adding 1.5 * 2^23; the clamp
        # between the product and the add keeps them from fusing into one FMA), e4m3 by _round_to_e4m3.
        if INT8:
            y = tl.minimum(tl.maximum(x * inverse, -127.0), 127.0)
            codes = ((y + 12582912.0) - 12582912.0).to(tl.int8)
        else:
            codes = kernels._round_to_e4m3(tl.minimum(tl.maximum(x * inverse, -448.0), 448.0)).to(tl.float8e4nv)
        return codes

    @triton.jit
    def _finite(x):
        # (x with non-finite values zeroed, |x| with them as inf): the codes stay defined, the scale NaN
        a = tl.abs(x)
        ok = a < float("inf")
        return tl.where(ok, x, 0.0), tl.where(ok, a, float("inf"))

    @triton.jit
    def _quantize_kv_kernel(k_ptr, v_ptr, mean_ptr, kq_ptr, ks_ptr, vq_ptr, vs_ptr, S, S_pad, H,
                            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                            D: tl.constexpr, BLOCK: tl.constexpr, K_INT8: tl.constexpr, SMOOTH: tl.constexpr):
        # One program per (block of BLOCK tokens, batch row x head): its K and V tiles are read once.
        blk, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H
        n = blk * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, D)
        real = (n < S)[:, None]  # padding rows load as 0 and stay 0
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + n[:, None] * stride_ks + d[None, :], mask=real,
                    other=0.0).to(tl.float32)
        if SMOOTH:
            k = tl.where(real, k - tl.load(mean_ptr + bh * D + d)[None, :], 0.0)
        k, magnitude = _finite(k)
        k_scale, k_inverse = _scales(tl.max(tl.max(magnitude, axis=1), axis=0), K_INT8)
        codes = bh.to(tl.int64) * S_pad * D  # this head's first code, in both buffers
        tl.store(kq_ptr + codes + n[:, None] * D + d[None, :], _codes(k, k_inverse, K_INT8))
        tl.store(ks_ptr + bh * (S_pad // BLOCK) + blk, k_scale)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + n[:, None] * stride_vs + d[None, :], mask=real,
                    other=0.0).to(tl.float32)
        v, magnitude = _finite(v)
        v_scale, v_inverse = _scales(tl.max(magnitude, axis=0), False)  # one per channel
        tl.store(vq_ptr + codes + d[None, :] * S_pad + n[:, None], _codes(v, v_inverse[None, :], False))
        tl.store(vs_ptr + (bh * (S_pad // BLOCK) + blk) * D + d, v_scale)

    @triton.jit
    def _tile(acc, l_i, m_i, q, c, k_codes, v_codes, k_scales, v_scales, start_n, S, S_pad,
              D: tl.constexpr, BLOCK_N: tl.constexpr, KV: tl.constexpr, QK_INT8: tl.constexpr,
              EXACT_P: tl.constexpr, MASK: tl.constexpr):
        # One tile of BLOCK_N keys: logits, online softmax (in log2 units), P V. m_i is the running max of
        # the logits less log2(448), so exp2(s - m_i) lies in [0, 448]: P's fixed fp8 scale.
        n = start_n + tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        k = tl.load(k_codes + n[None, :] * D + d[:, None])  # K^T (D, BLOCK_N), D contiguous: K-major
        qk = tl.dot(q, k)
        if QK_INT8:  # int32 -> fp32 without the conversion unit (as slow as exp2): |qk| <= 127^2 D < 2^22, so
            # qk + 1.5 * 2^23 read as a float is exactly 1.5 * 2^23 + qk
            qk = (qk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        scale = c * tl.load(k_scales + start_n // KV)  # Q's row scales x this block's K scale x log2(e)/sqrt(D)
        if MASK:  # the last, partial tile: scale first, so a zero scale cannot meet -inf (0 * -inf = NaN)
            s = tl.where((n < S)[None, :], qk * scale[:, None], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1) - 8.807354922057604)  # log2(448)
            p = tl.math.exp2(s - m_new[:, None])
        else:  # scale > 0, so max(qk * scale) = max(qk) * scale: one FMA per logit
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale - 8.807354922057604)
            p = tl.math.exp2(tl.fma(qk, scale[:, None], -m_new[:, None]))
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if EXACT_P:  # the interpreter's casts truncate; the GPU's cvt.rn.satfinite gives these codes itself
            p = kernels._round_to_e4m3(tl.minimum(p, 448.0))
        v = tl.load(v_codes + n[:, None] + d[None, :] * S_pad)  # V (BLOCK_N, D) from V^T: tokens contiguous
        v_scale = tl.load(v_scales + (start_n // KV) * D + d)
        # Outside the MMA's accumulator (two-level accumulation), with the block's channel scales.
        acc = tl.fma(tl.dot(p.to(tl.float8e4nv), v), v_scale[None, :], acc * alpha[:, None])
        return acc, l_i, m_new

    @triton.jit
    def _attention_kernel(q_ptr, kq_ptr, ks_ptr, vq_ptr, vs_ptr, o_ptr, Sq, S, S_pad, H, qk_scale,
                          stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV: tl.constexpr,
                          QK_INT8: tl.constexpr, EXACT_P: tl.constexpr):
        # One program per (BLOCK_M queries, batch row x head); consecutive programs share a head's K/V (L2).
        start_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H
        m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        rows = (m < Sq)[:, None]
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + m[:, None] * stride_qs + d[None, :], mask=rows,
                    other=0.0).to(tl.float32)
        q, magnitude = _finite(q)
        q_scale, q_inverse = _scales(tl.max(magnitude, axis=1), QK_INT8)
        q = _codes(q, q_inverse[:, None], QK_INT8)
        c = q_scale * qk_scale
        codes = bh.to(tl.int64) * S_pad * D
        k_codes, v_codes = kq_ptr + codes, vq_ptr + codes
        k_scales, v_scales = ks_ptr + bh * (S_pad // KV), vs_ptr + bh * (S_pad // KV) * D
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        full = (S // BLOCK_N) * BLOCK_N
        for start_n in range(0, full, BLOCK_N):
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, c, k_codes, v_codes, k_scales, v_scales, start_n, S, S_pad,
                                  D, BLOCK_N, KV, QK_INT8, EXACT_P, False)
        if full < S:
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, c, k_codes, v_codes, k_scales, v_scales, full, S, S_pad,
                                  D, BLOCK_N, KV, QK_INT8, EXACT_P, True)
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * stride_ob + h * stride_oh + m[:, None] * stride_os + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=rows)


def _check(x: Tensor, name: str) -> None:
    assert x.dim() == 4 and x.stride(3) == 1, f"{name}: (B, S, H, D) with contiguous channels"
    assert x.shape[3] in (64, 128), f"{name}: head dim {x.shape[3]} (64 or 128)"


def quantize_kv(k: Tensor, v: Tensor, qk: str = "e4m3", smooth_k: bool = True) -> QuantizedKV:
    """k, v (B, S, H, D) -> their codes and scales (QuantizedKV): one read of each, one write of the codes.
    qk: K's format, "e4m3" or "int8" (must match the queries', see fp8_attention)."""
    _check(k, "k")
    _check(v, "v")
    assert k.shape == v.shape and qk in QK_FORMATS and k.shape[1] > 0
    B, S, H, D = k.shape
    S_pad = triton.cdiv(S, KV_BLOCK) * KV_BLOCK
    kq = torch.empty(B, H, S_pad, D, dtype=torch.int8 if qk == "int8" else torch.float8_e4m3fn, device=k.device)
    vq = torch.empty(B, H, D, S_pad, dtype=torch.float8_e4m3fn, device=k.device)
    ks = torch.empty(B, H, S_pad // KV_BLOCK, dtype=torch.float32, device=k.device)
    vs = torch.empty(B, H, S_pad // KV_BLOCK, D, dtype=torch.float32, device=k.device)
    mean = k.mean(1, dtype=torch.float32) if smooth_k else ks  # (B, H, D); ks: an unread placeholder
    _quantize_kv_kernel[(S_pad // KV_BLOCK, B * H)](
        k, v, mean, kq, ks, vq, vs, S, S_pad, H, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), D=D, BLOCK=KV_BLOCK, K_INT8=qk == "int8", SMOOTH=smooth_k, num_warps=8)
    return QuantizedKV(kq, ks, vq, vs, S)


def attention_quantized(q: Tensor, kv: QuantizedKV, config: str = DEFAULT_CONFIG) -> Tensor:
    """softmax(q k^T / sqrt(D)) v from quantize_kv's codes: q (B, Sq, H, D) -> (B, Sq, H, D), q's dtype."""
    _check(q, "q")
    B, Sq, H, D = q.shape
    assert kv.k.shape[:2] == (B, H) and kv.k.shape[3] == D, "q and k/v: different batch, heads or head dim"
    cfg = CONFIGS[config]
    assert KV_BLOCK % cfg.block_n == 0
    out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device)
    if Sq:
        _attention_kernel[(triton.cdiv(Sq, cfg.block_m), B * H)](
            q, kv.k, kv.k_scale, kv.v, kv.v_scale, out, Sq, kv.length, kv.k.shape[2], H,
            math.log2(math.e) / math.sqrt(D), q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
            out.stride(2), D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, KV=KV_BLOCK,
            QK_INT8=kv.k.dtype == torch.int8, EXACT_P=_interpreting(), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    return out


def fp8_attention(q: Tensor, k: Tensor, v: Tensor, config: str = DEFAULT_CONFIG, qk: str = "e4m3",
                  smooth_k: bool = True) -> Tensor:
    """Unmasked, non-causal attention with scale 1/sqrt(D), (B, S, H, D) in and out, as layers.sdpa_attention;
    Sq may differ from Sk. Q K^T in `qk` ("e4m3" or "int8"), P V in e4m3, fp32 accumulation (module doc)."""
    return attention_quantized(q, quantize_kv(k, v, qk, smooth_k), config)


# ---- torch emulation, for the tests ----

def _scales_torch(amax: Tensor, int8: bool) -> tuple[Tensor, Tensor]:
    """_scales: amax fp32, inf where an input was non-finite."""
    a = amax.clamp(min=2.0**-100)
    if int8:
        scale, inverse = a * (1.0 / 127.0), torch.full_like(a, 127.0) / a  # tensor / tensor: IEEE division
    else:
        bits = a.view(torch.int32)
        k = (bits >> 23) - 127 - 8 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
        scale, inverse = ((k + 127) << 23).view(torch.float32), ((127 - k) << 23).view(torch.float32)
    return torch.where(amax < torch.inf, scale, torch.nan), inverse


def _codes_torch(x: Tensor, inverse: Tensor, int8: bool) -> Tensor:
    if int8:
        return (x * inverse).clamp(-127, 127).round().to(torch.int8)  # round: half to even, as the kernel
    return (x * inverse).clamp(-448, 448).to(torch.float8_e4m3fn)


def _finite_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    ok = x.abs() < torch.inf
    return torch.where(ok, x, 0.0), torch.where(ok, x.abs(), torch.inf)


def quantize_kv_torch(k: Tensor, v: Tensor, qk: str = "e4m3", smooth_k: bool = True) -> QuantizedKV:
    """quantize_kv in torch ops: the same codes and scales."""
    B, S, H, D = k.shape
    S_pad = -(-S // KV_BLOCK) * KV_BLOCK
    blocks = lambda x: torch.nn.functional.pad(x.float().transpose(1, 2), (0, 0, 0, S_pad - S)).unflatten(  # noqa: E731
        2, (S_pad // KV_BLOCK, KV_BLOCK))  # (B, H, S_pad / KV_BLOCK, KV_BLOCK, D)
    kb = blocks(k)
    if smooth_k:
        real = (torch.arange(S_pad, device=k.device) < S).view(S_pad // KV_BLOCK, KV_BLOCK, 1)
        kb = torch.where(real, kb - k.mean(1, dtype=torch.float32)[:, :, None, None], 0.0)
    kb, magnitude = _finite_torch(kb)
    k_scale, k_inverse = _scales_torch(magnitude.amax((3, 4)), qk == "int8")
    kq = _codes_torch(kb, k_inverse[..., None, None], qk == "int8").flatten(2, 3)
    vb, magnitude = _finite_torch(blocks(v))
    v_scale, v_inverse = _scales_torch(magnitude.amax(3), False)
    vq = _codes_torch(vb, v_inverse[:, :, :, None], False).flatten(2, 3).transpose(2, 3).contiguous()
    return QuantizedKV(kq, k_scale, vq, v_scale, S)


def reference(q: Tensor, k: Tensor, v: Tensor, config: str = DEFAULT_CONFIG, qk: str = "e4m3",
              smooth_k: bool = True) -> Tensor:
    """fp8_attention emulated in torch: the same codes and scales, the same tiles and online softmax, with the
    sums in fp64 (the kernel's fp32 sums differ by rounding). (B, Sq, H, D) fp64."""
    int8, block_n = qk == "int8", CONFIGS[config].block_n
    kv = quantize_kv_torch(k, v, qk, smooth_k)
    qf, magnitude = _finite_torch(q.float().transpose(1, 2))  # (B, H, Sq, D)
    q_scale, q_inverse = _scales_torch(magnitude.amax(3, keepdim=True), int8)
    qc = _codes_torch(qf, q_inverse, int8).double()
    c = q_scale * torch.tensor(math.log2(math.e) / math.sqrt(q.shape[3]), dtype=torch.float32)
    S, S_pad = kv.length, kv.k.shape[2]
    m = torch.full(qc.shape[:3] + (1,), -math.inf, dtype=torch.float64)
    l_i = torch.zeros_like(m)
    acc = torch.zeros(qc.shape, dtype=torch.float64)
    for start in range(0, S, block_n):
        n = slice(start, start + block_n)
        scale = (c * kv.k_scale[:, :, start // KV_BLOCK, None, None]).double()
        s = (qc @ kv.k[:, :, n].double().transpose(2, 3)) * scale
        s = s.masked_fill(torch.arange(start, start + block_n, device=q.device) >= S, -math.inf)
        m_new = torch.maximum(m, s.amax(3, keepdim=True) - math.log2(P_SCALE))
        p = torch.exp2(s - m_new)
        alpha = torch.exp2(m - m_new)
        l_i = l_i * alpha + p.sum(3, keepdim=True)
        pv = p.float().clamp(max=P_SCALE).to(torch.float8_e4m3fn).double() @ kv.v[:, :, :, n].double().transpose(2, 3)
        acc = acc * alpha + pv * kv.v_scale[:, :, start // KV_BLOCK, None].double()
        m = m_new
    assert S_pad >= S
    return (acc / l_i).transpose(1, 2)
