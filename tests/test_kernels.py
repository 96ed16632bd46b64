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
from usp_infer import kernels
from usp_infer.ltx_video import model as ltx
from usp_infer.ltx2 import model as ltx2
from usp_infer.modulation import Runs, addcmul, apply, norm_modulate

torch.manual_seed(0)
cfg2 = ltx2.LTX2Config(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=8,
                       cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8,
                       audio_num_attention_heads=4, audio_attention_head_dim=4, audio_cross_attention_dim=16,
                       num_layers=1, caption_channels=24, rope_type="split")
cfg1 = ltx.LTXConfig(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=8,
                     cross_attention_dim=32, num_layers=1, caption_channels=16)
split = ltx2.rope_tables(cfg2, 3, 2, 3, 24.0, 5).video  # (1, 18, 4, 2, 4): runs of 4
inter = ltx.rope_pairs(ltx.rope_tables(cfg1, 3, 2, 3, (8 / 25, 32, 32)))  # (1, 18, 16, 2): runs of 1
cases = {"split": (split, ltx2._apply_split_rope), "interleaved": (inter, ltx.apply_rope),
         "per-row-table": (inter.expand(3, -1, -1, -1) * torch.rand(3, 1, 1, 1), ltx.apply_rope),
         "wrong-run": (split, ltx2._apply_split_rope)}
out = {}
for name, (table, rope) in cases.items():
    for tokens, magnitude in ((slice(None), 3.0), (slice(4, 11), 3.0), (slice(None), 1e-4)):
        t = table[:, tokens]  # the whole table, or a shard's view of it; 1e-4: eps is most of the mean square
        for dtype in (torch.float32, torch.float16):
            norm = nn.RMSNorm(32, eps=1e-6)
            with torch.no_grad():
                norm.weight.copy_(1 + 0.3 * torch.randn(32))
            exact_norm = nn.RMSNorm(32, eps=1e-6).double()
            exact_norm.load_state_dict(norm.state_dict())
            norm = norm.to(dtype)
            x = (magnitude * torch.randn(3, t.shape[1], 40)).to(dtype)[..., 4:36]  # strided, as a projection slice
            run = (t.shape[-1] if t.ndim == 5 else 1) * (2 if name == "wrong-run" else 1)
            with torch.no_grad():
                got = kernels.rms_norm_rope(x, norm.weight, norm.eps, t.flatten(2), run)
                ref = rope(norm(x), t)
                exact = rope(exact_norm(x.double()), t.double())
            err = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
            out[f"{name}/{tokens.start}-{magnitude}/{str(dtype)[6:]}"] = dict(ref=err(got, ref), exact=err(got, exact),
                                                                  torch_exact=err(ref, exact))
err = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
# A width that is not a power of two (48): the kernels' blocks (64) run past the row, and only their masks
# keep those lanes from reading the next token or writing into it.
angle = torch.rand(1, 7, 24) * 6.0
table48 = torch.stack((angle.cos(), angle.sin()), dim=-1)  # (1, S, C/2, 2) as ltx.rope_pairs makes
norm48 = nn.RMSNorm(48, eps=1e-6)
with torch.no_grad():
    norm48.weight.copy_(1 + 0.3 * torch.randn(48))
    x48 = torch.randn(2, 7, 48)
    got = kernels.rms_norm_rope(x48, norm48.weight, norm48.eps, table48.flatten(2), 1)
    out["width48-rope/0/float32"] = dict(ref=err(got, ltx.apply_rope(norm48(x48), table48)))
    big = torch.full((2, 8, 48), 7.0)  # the output a slice of a larger tensor: the token after it stays 7
    shift48, scale48 = torch.randn(2, 1, 48), torch.randn(2, 1, 48)
    kernels.rms_norm_modulate_(x48, shift48, scale48, 1e-6, big[:, :7])
    plain = addcmul(shift48, nn.RMSNorm(48, eps=1e-6, elementwise_affine=False)(x48), scale48)
    out["width48-modulate/0/float32"] = dict(ref=err(big[:, :7], plain) + float((big[:, 7] != 7).any()))
torch_path = kernels.available
kernels.available = lambda x: True  # the callers' fused branch, on the CPU (the interpreter runs the kernels)
for runs in (False, True):  # modulation.norm_modulate: per-sample parameters, or per run of tokens
    for magnitude in (3.0, 1e-4):  # 1e-4: eps (1e-6) is most of the mean square, so leaving it out shows
        for dtype in (torch.float32, torch.float16):
            x = (magnitude * torch.randn(3, 11, 40)).to(dtype)[..., 4:36]
            norm = nn.RMSNorm(32, eps=1e-6, elementwise_affine=False)
            table = torch.randn(3, 2 if runs else 1, 2, 32).to(dtype)  # (B, R, shift|scale, C), as ada is
            shift = table.unbind(2)[0]  # a strided view, like the models' modulation vectors
            scale = torch.randn(1, 2 if runs else 1, 32).to(dtype)  # one for every row: another row stride
            if runs:
                shift, scale = Runs(shift, (0, 4, 11)), Runs(scale, (0, 4, 11))
            with torch.no_grad():
                got = norm_modulate(x, norm, shift, scale)
                ref = addcmul(shift, norm(x), scale)
                exact = addcmul(apply(shift, torch.Tensor.double), norm(x.double()), apply(scale, torch.Tensor.double))
            out[f"modulate-{'runs' if runs else 'rows'}/{magnitude}/{str(dtype)[6:]}"] = dict(
                ref=err(got, ref), exact=err(got, exact), torch_exact=err(ref, exact))

# Whole forwards of both families (fp32, image-to-video timesteps, STG, an isolated row, shared text rows):
# every call site of the kernels, fused vs the torch path.
from test_ltx2_model import CONFIGS as CONFIGS2, make_inputs as inputs2, make_reference as reference2, run_ours as run2
from test_ltx2_model import from_reference as from_reference2
from test_ltx import CONFIGS as CONFIGS1, from_reference as from_reference1, make_inputs as inputs1
from test_ltx import make_reference as reference1, run_ours as run1

model2 = from_reference2(reference2(CONFIGS2["ltx2.3"]))
batch = inputs2(CONFIGS2["ltx2.3"], batch=3, timestep="i2v")
batch.update(text=batch["text"][:2], audio_text=batch["audio_text"][:2], text_mask=batch["text_mask"][:2],
             audio_text_mask=batch["audio_text_mask"][:2], sigma=batch["sigma"][[0, 1, 0]],
             audio_sigma=batch["audio_sigma"][[0, 1, 0]])
kwargs2 = dict(stg_blocks=(1,), stg_rows=torch.tensor([False, False, True]),
               isolate_rows=torch.tensor([False, True, True]), text_rows=(0, 1, 0))
model1 = from_reference1(reference1(CONFIGS1["tiny"]))  # no learned norm weights: both kernels
batch1 = inputs1(CONFIGS1["tiny"], 2, "i2v", "padded")
fused = (run2(model2, batch, **kwargs2), run1(model1, batch1))
kernels.available = torch_path
plain = (run2(model2, batch, **kwargs2), run1(model1, batch1))
out["forward-ltx2/0/float32"] = dict(ref=max(err(f, p) for f, p in zip(fused[0], plain[0])))
out["forward-ltx-video/0/float32"] = dict(ref=err(fused[1], plain[1]))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def errors() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("layout", ["split", "interleaved", "per-row-table", "modulate-rows", "modulate-runs",
                                    "width48-rope", "width48-modulate", "forward-ltx2", "forward-ltx-video"])
def test_kernel_equals_the_torch_ops(errors, layout):
    cases = {key: e for key, e in errors.items() if key.startswith(layout + "/")}
    assert cases
    for key, e in cases.items():
        if key.endswith("float32"):  # the same fp32 math, summed in another order: a few ulps
            assert e["ref"] < 1e-6, (key, e)
        else:  # fp16: both round the norm's output and the result once, so no less exact than torch
            assert e["exact"] <= e["torch_exact"] * 1.01 + 1e-6, (key, e)


def test_the_check_catches_a_wrong_pairing(errors):
    """Pairing the wrong channels is a large error, not an ulp: the checks above can fail."""
    assert all(e["ref"] > 0.1 for key, e in errors.items() if key.startswith("wrong-run/"))
