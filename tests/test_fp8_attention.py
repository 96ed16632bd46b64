"""The FP8 attention kernel (usp_infer/fp8_attention.py) on the CPU through Triton's interpreter, its sm_90
compile without a GPU, and on CUDA where there is one.

What the interpreter runs is the kernels' own code: offsets, strides, masks, the tail tiles, the online softmax,
the scales and the codes, and tl.dot on 8-bit codes (it multiplies loaded e4m3/int8 codes exactly). What it
cannot show: its fp32 -> fp8 cast truncates and does not saturate, so P gets an exact rounding before the cast
there (EXACT_P; on the GPU cvt.rn.satfinite rounds the same way by itself), and its bf16 output cast truncates;
and nothing about Hopper's MMAs (their reduced-precision accumulation is why each tile's P V product is added
outside the MMA). The compile test checks the sm_90 code uses 8-bit wgmma for both products; the CUDA tests
compare the GPU's results with the same emulation.

The error bound. An e4m3 code keeps 3 mantissa bits: rounding to nearest has a relative RMS error of
eps = 2^-3 sqrt(E[1/m^2] / 12) = 2.65% (m log-uniform in [1, 2)). For inputs of unit variance with diffuse
attention, the output's relative error sums four independent terms: V's codes (eps), P's codes (eps), and
the logits' error from Q's and K's codes, sqrt(2) eps in each product q_d k_d, so sqrt(2) eps in a logit of
unit spread, which moves every weight by that much: sqrt(eps^2 + eps^2 + 2 eps^2) = 2 eps = 5.3%. int8 Q
and K (one step = amax / 127, amax ~3.5 sigma) leave ~1.1% in a logit: sqrt(2 eps^2 + 1.1%^2) = 3.9%. The
checks take 0.08 as the bound (1.5 x the e4m3 estimate) and ask for more than 5x bf16 SDPA's own error
(~0.3%), so a path that silently stayed in bf16 fails. The kernel must also equal the emulation
(fp8_attention.reference: the same codes, tiles and online softmax in fp64) to fp32 rounding, but for the
rare row where a P value sits so close to a rounding tie that fp32 and fp64 logits round it apart.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
BOUND = 0.08

_CHECK = r"""
import json, math, torch
import torch.nn.functional as F
from usp_infer import fp8_attention as fa

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def exact(q, k, v):
    w = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[3]), -1)
    return torch.einsum("bhqk,bkhd->bqhd", w, v.double())

def bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.nan_to_num(-1.0)

def rows_off(a, b):
    # the share of output rows (per query and head) off by more than fp32 rounding: a P code can land on the
    # other side of a rounding tie in one of the two (fp32 vs fp64 logits), moving its row by up to ~1e-2
    rows = (a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)
    return float((rows > 1e-4).double().mean()), float(rows.max())

out = {"prepass": {}, "attention": {}}
torch.manual_seed(0)
# ---- the K/V pre-pass against its torch twin: codes and scales, bit for bit ----
for D in (64, 128):
    packed = torch.randn(2, 300, 3, 2, D)  # (B, S, k|v|other, H, D): strided views, as a fused projection's
    packed[0, :128, 0, 0] *= 1e-30  # a block far below any normal scale
    packed[0, 128:256, 0:2, 1] = 0  # all-zero K and V blocks: finite scales, codes 0
    packed[1, :128, 0, 0, :] = 3.0
    packed[1, 5, 0, 0, 3] = 1792.0  # amax 448 * 4: its code is exactly 448 (no saturation to NaN)
    packed[1, 130:140, 1, 1, 7] = -5e4  # one channel of one V block much larger than the rest
    nonfinite = packed.clone()
    nonfinite[1, 270, 0, 1, 2] = float("nan")  # that K block's scale NaN
    nonfinite[1, 20, 1, 0, 9] = float("inf")  # that V block's channel-9 scale NaN
    # each format with and without smoothing across the two head dims; fp32 input once; non-finite values
    combos = [("values", torch.bfloat16, "e4m3", D == 64), ("values", torch.bfloat16, "int8", D == 128),
              ("nonfinite", torch.bfloat16, "e4m3" if D == 64 else "int8", D == 128)]
    combos += [("values", torch.float32, "e4m3", True)] if D == 64 else []
    for name, dtype, qk, smooth in combos:
        x = (packed if name == "values" else nonfinite).to(dtype)
        k, v = x[:, :, 0], x[:, :, 1]
        got, ref = fa.quantize_kv(k, v, qk, smooth), fa.quantize_kv_torch(k, v, qk, smooth)
        key = f"{name}/D{D}/{str(dtype)[6:]}/{qk}/smooth{int(smooth)}"
        out["prepass"][key] = dict(
            differ={f: int((bits(a) != bits(b)).sum()) for f, a, b in zip(got._fields[:4], got, ref)},
            shapes=[list(t.shape) for t in got[:4]], length=got.length,
            k_max=float(got.k.float().abs().max()), v_max=float(got.v.float().abs().max()),
            code_nan=int(got.k.float().isnan().sum() + got.v.float().isnan().sum()),
            k_scale_nan=int(got.k_scale.isnan().sum()), v_scale_nan=int(got.v_scale.isnan().sum()),
            zero_block_scales_finite=bool(got.k_scale[0, 1, 1].isfinite() and got.v_scale[0, 1, 1].isfinite().all()),
            zero_block_codes=int((got.k[0, 1, 128:256].float() != 0).sum() * (not smooth)  # smoothed: k - mean
                                 + (got.v[0, 1, :, 128:256].float() != 0).sum()))

# ---- attention: the kernel vs its emulation, and both vs fp64 ----
# name: (B, Sq, Sk, H, D, config, qk, q scale, k scale, v scale)
cases = {
    "self-d128": (1, 256, 256, 2, 128, "m128n128w8s3", "e4m3", 1, 1, 1),
    "tails-d64": (2, 200, 200, 1, 64, "m128n64w8s3", "e4m3", 1, 1, 1),  # 200 = 3 x 64 + 8
    "cross-d128": (1, 70, 300, 2, 128, "m64n128w4s3", "e4m3", 1, 1, 1),  # Sq = 64 + 6, Sk = 2 x 128 + 44
    "cross-short-k": (1, 300, 40, 2, 64, "m128n128w8s2", "e4m3", 1, 1, 1),  # one partial K tile only
    "int8-d128": (1, 150, 260, 2, 128, "m128n128w8s3", "int8", 1, 1, 1),
    "int8-d64": (2, 130, 129, 1, 64, "m128n64w8s3", "int8", 1, 1, 1),
    "large": (1, 140, 200, 2, 128, "m128n128w8s3", "e4m3", 100.0, 0.01, 1e4),  # same logits, large values
    "small": (1, 140, 200, 2, 64, "m128n64w8s3", "e4m3", 1e-3, 1e-3, 1e-4),  # near-uniform weights
}
for name, (B, Sq, Sk, H, D, config, qk, sq, sk, sv) in cases.items():
    gen = torch.Generator().manual_seed(len(name))
    packed = torch.randn(B, Sq, 3, H, D, generator=gen)  # q a strided view
    q = (packed[:, :, 1] * sq).bfloat16()
    k, v = (torch.randn(B, Sk, H, D, generator=gen) * s for s in (sk, sv))
    k, v = k.bfloat16(), v.bfloat16()
    got = fa.fp8_attention(q, k, v, config, qk)
    emulated, truth = fa.reference(q, k, v, config, qk), exact(q, k, v)
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    got32 = fa.fp8_attention(q.float(), k.float(), v.float(), config, qk)  # fp32 in and out: no bf16 rounding
    emulated32 = fa.reference(q.float(), k.float(), v.float(), config, qk)
    out["attention"][name] = dict(vs_emulation=rel(got, emulated), fp32_vs_emulation=rel(got32, emulated32),
        fp32_rows_off=rows_off(got32, emulated32), error=rel(got, truth), emulation_error=rel(emulated, truth),
        bf16_sdpa_error=rel(sdpa, truth), shape=list(got.shape), dtype=str(got.dtype),
        finite=bool(got.isfinite().all()))

# A shared offset on the keys (as a learned norm weight can give): smoothing takes it out of the codes.
gen = torch.Generator().manual_seed(7)
q, k, v = (torch.randn(1, 200, 2, 128, generator=gen) for _ in range(3))
k = (k + 5 * torch.randn(128, generator=gen)).bfloat16()
q, v = q.bfloat16(), v.bfloat16()
truth = exact(q, k, v)
out["offset"] = {f"smooth{int(s)}": rel(fa.fp8_attention(q, k, v, smooth_k=s), truth) for s in (False, True)}

# Non-finite inputs reach the outputs they touch; all-zero queries and a zero last K block give no NaN.
q, k, v = (torch.randn(1, 150, 2, 64, generator=gen).bfloat16() for _ in range(3))
bad_q, bad_k, bad_v = q.clone(), k.clone(), v.clone()
bad_q[0, 3, 0, 5] = float("nan")
bad_k[0, 140, 1, 0] = float("nan")
bad_v[0, 7, 0, 9] = float("inf")
zero_q, zero_k = q.clone(), k.clone()
zero_q[0, :10] = 0
zero_k[0, 128:] = 0
nan_rows = fa.fp8_attention(bad_q, k, v).isnan()
nan_heads = fa.fp8_attention(q, bad_k, v).isnan()
bad_channel = ~fa.fp8_attention(q, k, bad_v).isfinite()
zeros = fa.fp8_attention(zero_q, zero_k, v, smooth_k=False)  # zero codes and scales: 0 * 0 logits, no 0 * -inf
out["nonfinite"] = dict(
    q_row=bool(nan_rows[0, 3, 0].all()), q_others=int(nan_rows.sum()) - 64,
    k_head=bool(nan_heads[0, :, 1].all()), k_others=int(nan_heads[0, :, 0].sum()),
    v_channel=bool(bad_channel[0, :, 0, 9].all()), v_others=int(bad_channel.sum()) - 150,
    zeros_finite=bool(zeros.isfinite().all()), zeros_error=rel(zeros, exact(zero_q, zero_k, v)))
out["empty"] = list(fa.fp8_attention(q[:, :0], k, v).shape)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_prepass_equals_torch_bit_for_bit(results):
    cases = results["prepass"]
    assert len(cases) == 7
    for key, r in cases.items():
        assert r["differ"] == {"k": 0, "k_scale": 0, "v": 0, "v_scale": 0}, (key, r)
        D = int(key.split("/")[1][1:])
        assert r["shapes"] == [[2, 2, 384, D], [2, 2, 3], [2, 2, D, 384], [2, 2, 3, D]] and r["length"] == 300


def test_prepass_saturates_and_keeps_zeros_and_nan(results):
    for key, r in results["prepass"].items():
        assert r["code_nan"] == 0 and r["v_max"] <= 448 and r["k_max"] <= (127 if "int8" in key else 448), (key, r)
        if "smooth0" in key and "e4m3" in key:
            assert r["k_max"] == 448  # the 1792 = 448 * 4 outlier
        assert r["zero_block_scales_finite"] and r["zero_block_codes"] == 0, (key, r)
        nonfinite = key.startswith("nonfinite")
        # one K block (every K block with smoothing: the NaN enters the mean) and one V block's channel
        assert r["v_scale_nan"] == int(nonfinite), (key, r)
        assert r["k_scale_nan"] == (0 if not nonfinite else 3 if "smooth1" in key else 1), (key, r)


@pytest.mark.parametrize("case", ["self-d128", "tails-d64", "cross-d128", "cross-short-k", "int8-d128",
                                  "int8-d64", "large", "small"])
def test_attention_equals_its_emulation_and_is_within_the_fp8_bound(results, case):
    r = results["attention"][case]
    assert r["finite"] and r["dtype"] == "torch.bfloat16", r
    # The same algorithm: fp32 sums vs fp64 (and the interpreter's truncating bf16 output cast)
    share, worst = r["fp32_rows_off"]
    assert r["fp32_vs_emulation"] < 1e-3 and share <= 0.01 and worst < 0.05 and r["vs_emulation"] < 1e-2, r
    assert abs(r["error"] - r["emulation_error"]) < 0.01, r
    # Quantized, not bf16: well above SDPA's own error, below the e4m3 bound
    assert 5 * r["bf16_sdpa_error"] < r["error"] < BOUND, r
    assert r["error"] > 0.01, r


def test_int8_qk_is_more_exact_than_e4m3_on_unit_inputs(results):
    a = results["attention"]
    assert a["int8-d128"]["error"] < a["self-d128"]["error"]


def test_smoothing_removes_a_shared_key_offset(results):
    off = results["offset"]
    assert off["smooth1"] < BOUND and off["smooth0"] > 1.5 * off["smooth1"], off


def test_nonfinite_inputs_reach_their_outputs(results):
    r = results["nonfinite"]
    assert r["q_row"] and r["q_others"] == 0, r  # the query's row only
    assert r["k_head"] and r["k_others"] == 0, r  # every query of that head
    assert r["v_channel"] and r["v_others"] == 0, r  # that channel of that head
    assert r["zeros_finite"] and r["zeros_error"] < BOUND, r
    assert results["empty"] == [1, 0, 2, 64]


# ---- sm_90 code without a GPU: both products on 8-bit wgmma, P's cast the saturating one ----

_COMPILE = r"""
import json, re, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from usp_infer import fp8_attention as fa

def compile(fn, types, constants, options):
    sig = {name: types.get(name, "constexpr" if name in constants else "i32") for name in fn.arg_names}
    # pointers and sizes aligned to 16, as the launches' are (H is not)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constants and name not in ("H", "qk_scale")}
    return triton.compile(ASTSource(fn, sig, constants, attrs), target=GPUTarget("cuda", 90, 32), options=options)

@triton.jit
def probe(x_ptr):
    tl.store(x_ptr, 1.0)

try:  # the toolchain itself (the NVIDIA backend, ptxas): without it, nothing to check here
    compile(probe, {"x_ptr": "*fp32"}, {}, {})
except Exception as e:
    print(json.dumps({"skip": f"{type(e).__name__}: {e}"[:300]}))
    sys.exit(0)
out = {}
for qk in fa.QK_FORMATS:
    c = fa.CONFIGS[fa.DEFAULT_CONFIG]
    codes = "*i8" if qk == "int8" else "*fp8e4nv"
    kernel = compile(fa._attention_kernel, dict(q_ptr="*bf16", kq_ptr=codes, ks_ptr="*fp32", vq_ptr="*fp8e4nv",
                     vs_ptr="*fp32", o_ptr="*bf16", qk_scale="fp32"),
                     dict(D=128, BLOCK_M=c.block_m, BLOCK_N=c.block_n, KV=fa.KV_BLOCK, QK_INT8=qk == "int8",
                          EXACT_P=False), dict(num_warps=c.num_warps, num_stages=c.num_stages))
    ptx = kernel.asm["ptx"]
    mmas = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.(\w+\.\w+\.\w+)", ptx)
    out[qk] = dict(wgmma=sorted(set(mmas)),
                   mma_sync="mma.sync" in ptx, p_cast="cvt.rn.satfinite.e4m3x2.f32" in ptx)
    prepass = compile(fa._quantize_kv_kernel, dict(k_ptr="*bf16", v_ptr="*bf16", mean_ptr="*fp32", kq_ptr=codes,
                      ks_ptr="*fp32", vq_ptr="*fp8e4nv", vs_ptr="*fp32"),
                      dict(D=128, BLOCK=fa.KV_BLOCK, K_INT8=qk == "int8", SMOOTH=True), dict(num_warps=8))
    out[qk]["prepass"] = len(prepass.asm["cubin"]) > 0
print(json.dumps(out))
"""


def test_compiles_for_hopper_with_8_bit_wgmma(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    script = tmp_path / "compile_sm90.py"  # a file: @triton.jit needs its source
    script.write_text(_COMPILE)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.splitlines()[-1])
    if "skip" in r:
        pytest.skip(f"no sm_90 toolchain in this Triton: {r['skip']}")
    assert r["e4m3"]["wgmma"] == ["f32.e4m3.e4m3"], r  # Q K^T and P V
    assert r["int8"]["wgmma"] == ["f32.e4m3.e4m3", "s32.s8.s8"], r
    for qk in ("e4m3", "int8"):
        assert not r[qk]["mma_sync"] and r[qk]["p_cast"] and r[qk]["prepass"], r


# ---- on CUDA (sm89+): the GPU's casts, exp2 and MMAs against the same emulation ----

fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                         reason="float8 MMAs need compute capability 8.9+")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _close_to_emulation(got: torch.Tensor, emulated: torch.Tensor) -> bool:
    """Equal to fp32 rounding but for a few rows (one P code on the other side of a rounding tie: the GPU's
    exp2 is approximate, the emulation's logits fp64), each still within a few e4m3 steps of one weight."""
    rows = (got.double() - emulated).norm(dim=-1) / emulated.norm(dim=-1)
    return _rel(got, emulated) < 1e-3 and float((rows > 1e-4).double().mean()) <= 0.01 and float(rows.max()) < 0.05


@fp8
@pytest.mark.parametrize("qk", ["e4m3", "int8"])
def test_prepass_bits_on_the_gpu(qk) -> None:
    from usp_infer import fp8_attention as fa

    torch.manual_seed(0)
    magnitudes = torch.logspace(-3, 3, 4, device="cuda")[:, None]  # one per head
    k, v = ((torch.randn(1, 1000, 4, 128, device="cuda") * magnitudes).bfloat16() for _ in range(2))
    for smooth in (False, True):
        got, ref = fa.quantize_kv(k, v, qk, smooth), fa.quantize_kv_torch(k, v, qk, smooth)
        for a, b in zip(got[:4], ref[:4]):
            assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                               b.view(torch.uint8) if b.element_size() == 1 else b)


@fp8
@pytest.mark.parametrize("config", ["m128n128w8s3", "m128n128w8s2", "m128n64w8s3", "m64n128w4s3"])
@pytest.mark.parametrize("qk", ["e4m3", "int8"])
def test_attention_on_the_gpu_equals_the_emulation(config, qk) -> None:
    from usp_infer import fp8_attention as fa

    torch.manual_seed(0)
    for B, Sq, Sk, H, D in ((1, 1000, 1000, 2, 128), (2, 333, 77, 2, 64)):
        q, k, v = (torch.randn(B, S, H, D, device="cuda") for S in (Sq, Sk, Sk))
        emulated = fa.reference(q, k, v, config, qk)  # fp32 in: no bf16 rounding on either side
        assert _close_to_emulation(fa.fp8_attention(q, k, v, config, qk), emulated)
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        got = fa.fp8_attention(q, k, v, config, qk)
        truth = torch.nn.functional.scaled_dot_product_attention(
            *(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        assert _rel(got, fa.reference(q, k, v, config, qk)) < 1e-2  # bf16 output rounding
        assert 0.01 < _rel(got, truth) < BOUND


@fp8
def test_nonfinite_inputs_reach_their_outputs_on_the_gpu() -> None:
    """The GPU's max ignores NaN (numpy's does not): NaN must still reach exactly the outputs it touches."""
    from usp_infer import fp8_attention as fa

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 300, 2, 128, device="cuda").bfloat16() for _ in range(3))
    bad_q, bad_k, bad_v = q.clone(), k.clone(), v.clone()
    bad_q[0, 3, 0, 5] = float("nan")
    bad_k[0, 140, 1, 0] = float("nan")
    bad_v[0, 7, 0, 9] = float("inf")
    for qk in ("e4m3", "int8"):
        rows = ~fa.fp8_attention(bad_q, k, v, qk=qk).isfinite()
        assert rows[0, 3, 0].all() and int(rows.sum()) == 128
        heads = ~fa.fp8_attention(q, bad_k, v, qk=qk).isfinite()
        assert heads[0, :, 1].all() and not heads[0, :, 0].any()
        channel = ~fa.fp8_attention(q, k, bad_v, qk=qk).isfinite()
        assert channel[0, :, 0, 9].all() and int(channel.sum()) == 300
