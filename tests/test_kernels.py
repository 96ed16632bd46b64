"""The fused kernels (kernels.py) against the torch ops they replace, on the CPU through Triton's interpreter.

The interpreter runs the kernel's own code (offsets, masks, strides, the batch loop) with numpy. Its fp32 ->
bf16 conversion truncates where the GPU rounds to nearest, so bf16 is checked on the GPU (test_gpu.py); here
fp32 and fp16, whose conversions round as the GPU's do.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

# Each case: the kernel and the unfused norm-then-RoPE ops on the same inputs, both against an fp64 reference.
_CHECK = r"""
import json, torch
from torch import nn
from usp_infer import kernels, ltx, ltx2
from usp_infer.modulation import Runs, addcmul, apply

torch.manual_seed(0)
cfg2 = ltx2.LTX2Config(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=8,
                       cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8,
                       audio_num_attention_heads=4, audio_attention_head_dim=4, audio_cross_attention_dim=16,
                       num_layers=1, caption_channels=24, rope_type="split")
cfg1 = ltx.LTXConfig(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=8,
                     cross_attention_dim=32, num_layers=1, caption_channels=16)
split = ltx2.rope_tables(cfg2, 3, 2, 3, 24.0, 5).video  # (1, 18, 4, 2, 4): runs of 4
inter = ltx.rope_pairs(ltx.rope_tables(cfg1, 3, 2, 3, (8 / 25, 32, 32)))  # (1, 18, 16, 2): runs of 1
cases = {"split": (split, ltx2._apply_split_rope), "interleaved": (inter, ltx._apply_rope),
         "per-row-table": (inter.expand(3, -1, -1, -1) * torch.rand(3, 1, 1, 1), ltx._apply_rope),
         "wrong-run": (split, ltx2._apply_split_rope)}
out = {}
for name, (table, rope) in cases.items():
    for tokens in (slice(None), slice(4, 11)):  # the whole table, and a shard's view of it
        t = table[:, tokens]
        for dtype in (torch.float32, torch.float16):
            norm = nn.RMSNorm(32, eps=1e-6)
            with torch.no_grad():
                norm.weight.copy_(1 + 0.3 * torch.randn(32))
            exact_norm = nn.RMSNorm(32, eps=1e-6).double()
            exact_norm.load_state_dict(norm.state_dict())
            norm = norm.to(dtype)
            x = (3 * torch.randn(3, t.shape[1], 40)).to(dtype)[..., 4:36]  # strided, as a slice of a projection
            run = (t.shape[-1] if t.ndim == 5 else 1) * (2 if name == "wrong-run" else 1)
            with torch.no_grad():
                got = kernels.rms_norm_rope(x, norm.weight, norm.eps, t.flatten(2), run)
                ref = rope(norm(x), t)
                exact = rope(exact_norm(x.double()), t.double())
            err = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
            out[f"{name}/{tokens.start}/{str(dtype)[6:]}"] = dict(ref=err(got, ref), exact=err(got, exact),
                                                                  torch_exact=err(ref, exact))
for runs in (False, True):  # norm + modulate, per-sample parameters or per run of tokens
    for dtype in (torch.float32, torch.float16):
        x = (3 * torch.randn(3, 11, 40)).to(dtype)[..., 4:36]
        norm = nn.RMSNorm(32, eps=1e-6, elementwise_affine=False)
        shift, scale = (torch.randn(3, 2 if runs else 1, 32).to(dtype) for _ in range(2))
        if runs:
            shift, scale = (Runs(t, (0, 4, 11)) for t in (shift, scale))
        with torch.no_grad():
            got = torch.empty_like(x)
            spans = ((0, 4, 0), (4, 11, 1)) if runs else ((0, 11, 0),)
            for start, stop, i in spans:
                pick = (lambda t: t.values[:, i : i + 1].contiguous()) if runs else (lambda t: t)
                kernels.rms_norm_modulate_(x[:, start:stop], pick(shift), pick(scale), 1e-6, got[:, start:stop])
            ref = addcmul(shift, norm(x), scale)
            exact = addcmul(apply(shift, torch.Tensor.double), norm(x.double()), apply(scale, torch.Tensor.double))
        err = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
        out[f"modulate-{'runs' if runs else 'rows'}/0/{str(dtype)[6:]}"] = dict(ref=err(got, ref),
                                                                               exact=err(got, exact),
                                                                               torch_exact=err(ref, exact))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def errors() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("layout", ["split", "interleaved", "per-row-table", "modulate-rows", "modulate-runs"])
def test_kernel_equals_the_torch_ops(errors, layout):
    cases = {key: e for key, e in errors.items() if key.startswith(layout + "/")}
    assert len(cases) >= 2
    for key, e in cases.items():
        if key.endswith("float32"):  # the same fp32 math, summed in another order: a few ulps
            assert e["ref"] < 1e-6, (key, e)
        else:  # fp16: both round the norm's output and the result once, so no less exact than torch
            assert e["exact"] <= e["torch_exact"] * 1.01 + 1e-6, (key, e)


def test_the_check_catches_a_wrong_pairing(errors):
    """Pairing the wrong channels is a large error, not an ulp: the checks above can fail."""
    assert all(e["ref"] > 0.1 for key, e in errors.items() if key.startswith("wrong-run/"))
