"""The fused fp8 activation quantization (kernels.quantize_rows_fp8) against quant.quantize_rows_torch, on the
CPU through Triton's interpreter (as tests/test_kernels.py runs the other kernels).

Both compute power-of-two scales from amax's bits and round to nearest even on the e4m3 grid, so they must agree
bit for bit: no tolerance.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

_CHECK = r"""
import json, torch
from usp_infer import kernels, quant

torch.manual_seed(0)
e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
e4m3 = e4m3[e4m3.isfinite()].unique()
ladder = torch.cat([e4m3, (e4m3[1:] + e4m3[:-1]) / 2, torch.linspace(-448, 448, 2001),  # every value, every tie
                    torch.logspace(-5, 2.65, 1000), -torch.logspace(-5, 2.65, 1000), torch.tensor([500.0, -1e6])])
rows = torch.randn(9, 301) * 3
rows[1] = 0  # all zeros: a finite scale, zeros out, no NaN
rows[2, 5] = 1e4  # one outlier sets the row's scale
rows[3] *= 1e-30  # far below the subnormals of any sane scale
rows[4:7] = rows[4:7].clamp(-13, 13)
rows[4, 0] = 448.0  # amax exactly 448: scale 1
rows[5, 0] = -14.0  # 1.75 * 8: the edge of the scale's rule, 14 / 2^-5 = 448
rows[6, 0] = torch.nextafter(torch.tensor(14.0), torch.tensor(15.0))  # just past it: the next power of two
nan_row = torch.randn(1, 301)
nan_row[0, 3] = float("nan")  # left out of the scale; stays NaN on the GPU (test_gpu.py), but the interpreter casts
# NaN to e4m3 as 384, so here only the scale and the other values are compared
wide = torch.randn(5, 40, 70)[:, 3:, 4:68]  # strided rows (a view), as a projection's slice

def bits(t):
    return t.view(torch.uint8)

def case(x, static=None):
    got_q, got_s = kernels.quantize_rows_fp8(x, static)
    ref_q, ref_s = quant.quantize_rows_torch(x, static)
    same_nan = got_q.float().isnan() == ref_q.float().isnan()
    return dict(q_differ=int((bits(got_q) != bits(ref_q)).sum()), s_differ=int((got_s != ref_s).sum()),
                nan_differ=int((~same_nan).sum()), nan=int(got_q.float().isnan().sum()),
                max=float(got_q.float().nan_to_num(0).abs().amax()) if got_q.numel() else 0.0, shape=list(got_q.shape),
                scale_shape=list(got_s.shape), dtype=str(got_q.dtype))

out = {}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    name = str(dtype)[6:]
    out[f"rows/{name}"] = case(rows.to(dtype))
    out[f"strided/{name}"] = case(wide.to(dtype)[0])
    out[f"static-ladder/{name}"] = case(ladder.to(dtype)[None], torch.tensor(1.0))
    out[f"static-small/{name}"] = case(rows.to(dtype), torch.tensor(2.0 ** -5))  # most values saturate
out["zero-rows"] = case(torch.zeros(3, 64))
got_q, got_s = kernels.quantize_rows_fp8(nan_row, None)
ref_q, ref_s = quant.quantize_rows_torch(nan_row, None)
out["nan-row"] = dict(s_equal=bool(torch.equal(got_s, ref_s)), ref_nan=int(ref_q.float().isnan().sum()),
                      others_equal=bool(torch.equal(bits(got_q)[0, 4:], bits(ref_q)[0, 4:])))
out["empty"] = case(torch.zeros(0, 64))
q, s = kernels.quantize_rows_fp8(rows, None)
out["zero-row-scale"] = float(s[1, 0])
out["row4-scale"], out["row5-scale"], out["row6-scale"] = float(s[4, 0]), float(s[5, 0]), float(s[6, 0])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_bit_identical_to_torch(results):
    cases = {k: v for k, v in results.items() if isinstance(v, dict) and k != "nan-row"}
    assert len(cases) == 14
    for key, r in cases.items():
        assert r["q_differ"] == r["s_differ"] == r["nan_differ"] == 0, (key, r)
        assert r["dtype"] == "torch.float8_e4m3fn" and r["scale_shape"] == [r["shape"][0], 1], (key, r)


def test_saturates_at_448_and_keeps_nan(results):
    for key, r in results.items():
        if isinstance(r, dict) and r.get("shape", [0])[0]:
            assert r["max"] <= 448.0, (key, r)
    assert results["static-small/float32"]["max"] == 448.0  # values past the static range clamp, not NaN
    assert results["static-ladder/float32"]["nan"] == 0
    nan = results["nan-row"]  # NaN sets no scale; the torch path keeps it NaN
    assert nan["s_equal"] and nan["others_equal"] and nan["ref_nan"] == 1, nan


def test_scales(results):
    assert 0 < results["zero-row-scale"] < 1e-20 and results["zero-rows"]["nan"] == 0
    # amax 448 -> 1; amax 14 = 1.75 * 8 -> 2^-5 (14 / 2^-5 = 448); a hair above -> 2^-4
    assert (results["row4-scale"], results["row5-scale"], results["row6-scale"]) == (1.0, 2.0**-5, 2.0**-4)
