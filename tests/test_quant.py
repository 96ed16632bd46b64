"""--quantize fp8 (usp_infer/quant.py) on the CPU: tiny models of both families, fp32 activations.

torch's CPU `_scaled_mm` takes float8 with row-wise scales, so these run the real op (no emulation).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_ltx import CONFIGS as VIDEO_CONFIGS
from test_ltx import make_inputs as video_inputs
from test_ltx import randomize
from test_ltx import run_ours as run_video
from test_ltx2_model import CONFIGS as AV_CONFIGS
from test_ltx2_model import make_inputs as av_inputs
from test_ltx2_model import run_ours as run_av
from torch import nn

from usp_infer import quant
from usp_infer.ltx2.model import LTX2Config, LTX2Transformer
from usp_infer.ltx2.model import load_transformer as load_av
from usp_infer.ltx_video.model import LTXConfig, LTXTransformer

MODELS = Path(__file__).resolve().parents[1] / "models"
# e4m3 keeps 3 mantissa bits: each operand of a matmul is off by ~2.5% RMS, and one forward of the tiny models
# measured 2.6-3.5% (bench/NOTES.md has the full-size figures). 5% is the bound; a layer left in fp32
# moves the error by little, so the call counts below catch that, and the lower bound catches all of them.
BOUND, FLOOR = 0.05, 0.005


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _video():
    torch.manual_seed(0)
    model = randomize(LTXTransformer(LTXConfig(**VIDEO_CONFIGS["tiny"]))).eval().requires_grad_(False)
    batch = video_inputs(VIDEO_CONFIGS["tiny"], 2, "i2v", "padded")
    return model, lambda m: (run_video(m, batch),)


def _av():
    torch.manual_seed(0)
    model = randomize(LTX2Transformer(LTX2Config(**AV_CONFIGS["ltx2.3"]))).eval().requires_grad_(False)
    batch = av_inputs(AV_CONFIGS["ltx2.3"], 2, "i2v")
    return model, lambda m: run_av(m, batch)


FAMILIES = {"ltx-video": _video, "ltx2.3": _av}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_within_bound_and_every_block_linear_in_fp8(family):
    model, run = FAMILIES[family]()
    plain = [(n, m) for n, m in model.transformer_blocks.named_modules() if type(m) is nn.Linear]
    quantized = quant.quantize_(copy.deepcopy(model))
    calls = {}
    for name, m in quantized.named_modules():
        if isinstance(m, (nn.Linear, quant.FP8Linear)):
            m.register_forward_hook(lambda mod, args, out, name=name: calls.__setitem__(name, type(mod)))
    errors = [rel(q, r) for q, r in zip(run(quantized), run(model))]
    assert all(FLOOR < e < BOUND for e in errors), errors
    fp8 = sorted(n for n, t in calls.items() if t is quant.FP8Linear)
    kept = sorted(n for n, t in calls.items() if t is nn.Linear and n.startswith("transformer_blocks."))
    assert len(fp8) == len(plain) - len(kept) > 0  # every swapped layer ran, in fp8
    assert all(n.endswith("to_gate_logits") for n in kept)
    outside = [n for n, m in quantized.named_modules() if isinstance(m, quant.FP8Linear)
               and not n.startswith("transformer_blocks.")]
    assert not outside  # proj_in/out, embedders and caption projections stay in the model dtype


def test_fp8_linear_quantizes_both_operands():
    """The layer is the product of e4m3 input rows and e4m3 weight rows, not of the inputs as they came."""
    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    layer = quant.FP8Linear.from_linear(linear)
    x = torch.randn(2, 7, 48) * torch.logspace(-3, 3, 7)[:, None]  # rows of very different sizes
    weight = layer.weight.float() * layer.weight_scale[:, None]
    rows = x.reshape(-1, 48)
    scale = quant.pow2_scale(rows.abs().amax(1, keepdim=True))[0]
    both = ((rows / scale).to(torch.float8_e4m3fn).float() * scale) @ weight.T + linear.bias
    assert rel(layer(x).reshape(-1, 40), both) < 1e-6
    assert rel(layer(x).reshape(-1, 40), rows @ weight.T + linear.bias) > 0.01  # inputs left as they came
    assert rel(weight, linear.weight) > 0.01  # and the weight is e4m3 too


def test_calibrated_static_scales():
    model, run = _av()
    quantized = quant.quantize_(copy.deepcopy(model))
    with quant.calibrate(quantized):
        run(quantized)
    layers = [m for m in quantized.modules() if isinstance(m, quant.FP8Linear)]
    scales = torch.stack([m.input_scale for m in layers])
    assert torch.equal(torch.frexp(scales).mantissa, torch.full_like(scales, 0.5))  # powers of two
    assert all(m.observed is None for m in layers)
    errors = [rel(q, r) for q, r in zip(run(quantized), run(model))]
    assert all(FLOOR < e < BOUND for e in errors), errors


def test_calibration_headroom_and_layers_it_never_reached():
    """A static scale is the power of two over HEADROOM x the largest input of any call; a layer calibration never
    reached, or reached only with zeros, keeps per-row scales (a scale of 2^-108 would saturate all it sees)."""
    torch.manual_seed(0)
    layers = nn.ModuleDict({n: quant.FP8Linear.from_linear(nn.Linear(16, 8)) for n in ("seen", "zeros", "never")})
    x = torch.randn(5, 16).clamp(-2.5, 2.5)
    x[2, 3] = -3.0
    with quant.calibrate(layers) as scales:
        layers["seen"](x / 2)
        layers["seen"](x)  # the largest input neither first nor last: a max that kept either call fails
        layers["seen"](x / 4)
        layers["zeros"](torch.zeros(2, 16))
    assert quant.HEADROOM == 4.0 and scales.keys() == {"seen"}
    assert layers["seen"].input_scale.item() == 2.0**-5  # 4 x 3 = 12: 12 / 2^-5 = 384 <= 448 < 12 / 2^-6
    assert layers["zeros"].input_scale is None and layers["never"].input_scale is None
    assert all(m.observed is None for m in layers.values())
    big = x * 8  # 8x the calibration's largest input: past the headroom, saturated at 448 x scale, not NaN
    assert torch.isfinite(layers["seen"](big)).all()
    q, _ = quant.quantize_rows(big, layers["seen"].input_scale)
    assert q.float().abs().max().item() == quant.E4M3_MAX


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_rule_names_the_swapped_layers(family):
    """quantized_key (what `usp-infer quantize` converts, from names) == what quantize_ swaps (from modules)."""
    model, _ = FAMILIES[family]()
    by_name = {k for k, v in model.state_dict().items() if quant.quantized_key(k, tuple(v.shape))}
    swapped = {n + ".weight" for n, m in quant.quantize_(copy.deepcopy(model)).named_modules()
               if isinstance(m, quant.FP8Linear)}
    assert by_name == swapped and swapped


def test_weight_scales_are_per_output_channel():
    """Rows 10^6 apart each keep e4m3's precision (one scale for the tensor would flush the small rows to 0)."""
    torch.manual_seed(0)
    weight = torch.randn(6, 64) * torch.logspace(-3, 3, 6)[:, None]
    codes, scales = quant.quantize_tensor(weight)
    assert codes.dtype == torch.float8_e4m3fn and scales.shape == (6,)
    assert torch.equal(scales, quant.pow2_scale(weight.abs().amax(1))[0])
    back = codes.float() * scales[:, None]
    assert all(rel(back[i], weight[i]) < 0.04 for i in range(6))


def test_fp8_linear_returns_the_input_dtype():
    """bfloat16 in, bfloat16 out (the rest of the block runs in it), from the float8 product."""
    layer = quant.FP8Linear.from_linear(nn.Linear(32, 16).to(torch.bfloat16))
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 16)
    assert rel(out.float(), layer(x.float()).float()) < 0.02  # the same product, rounded once more


def test_pow2_scale_edges():
    amax = torch.tensor([448.0, 14.0, torch.nextafter(torch.tensor(14.0), torch.tensor(15.0)).item(), 0.0, 1e30])
    scale, inverse = quant.pow2_scale(amax)
    assert scale[:3].tolist() == [1.0, 2.0**-5, 2.0**-4]
    assert (amax / scale <= 448).all() and (amax[:3] / scale[:3] > 224).all()
    assert torch.equal(scale * inverse, torch.ones(5)) and 0 < scale[3] < 1e-20


def _tensors(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_quantized_folder_loads_as_on_the_fly(tmp_path):
    """`usp-infer quantize`'s folder, loaded, equals quantizing the original after loading it, bit for bit."""
    out = tmp_path / "fp8"  # bfloat16: the fp32 checkpoint's weights are rounded twice, as loading them is
    layers = quant.write_quantized(MODELS / "ltx2-tiny", out, torch.bfloat16, torch.device("cpu"))
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["_quantization"]["layers"] == layers > 0
    stored = _tensors(out / "transformer")
    assert sum(t.dtype == torch.float8_e4m3fn for t in stored.values()) == layers
    loaded = load_av(out / "transformer", "cpu", torch.bfloat16)
    on_the_fly = quant.quantize_(load_av(MODELS / "ltx2-tiny" / "transformer", "cpu", torch.bfloat16))
    a, b = loaded.state_dict(), on_the_fly.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
               if a[k].dtype == torch.float8_e4m3fn else torch.equal(a[k], b[k]) for k in a)
    # every other component is the same file
    for f in (MODELS / "ltx2-tiny").rglob("*"):
        if f.is_file() and f.parent.name != "transformer":
            assert (out / f.relative_to(MODELS / "ltx2-tiny")).read_bytes() == f.read_bytes()
    with pytest.raises(ValueError, match="already quantized"):
        quant.write_quantized(out, tmp_path / "twice", torch.float32, torch.device("cpu"))
    assert not (tmp_path / "twice").exists()
    # input scales for layers this model lacks (a calibration of another model): refused, nothing left behind
    scales = {"transformer_blocks.0.attn1.to_q": torch.tensor(0.5), "transformer_blocks.9.ff.proj": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="transformer_blocks.9.ff.proj: its input scales were calibrated on another"):
        quant.write_quantized(MODELS / "ltx2-tiny", tmp_path / "other", torch.bfloat16, torch.device("cpu"), scales)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp8"]


def test_lightricks_layout_loads(tmp_path):
    """Per-tensor weight_scale and a static input_scale (Lightricks' fp8-scaled-mm keys), and a layer the file
    keeps in high precision: the loader builds FP8Linears only where the file has e4m3 weights."""
    src = MODELS / "ltx2-tiny" / "transformer"
    state = _tensors(src)
    name = "transformer_blocks.0.attn1.to_q"
    w = state[f"{name}.weight"].float()
    state[f"{name}.weight_scale"] = w.abs().max() / 448  # not a power of two, one per tensor: ()
    state[f"{name}.weight"] = (w / state[f"{name}.weight_scale"]).to(torch.float8_e4m3fn)
    state[f"{name}.input_scale"] = torch.tensor(0.013)
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text((src / "config.json").read_text())
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    model = load_av(folder, "cpu", torch.float32)
    layer = model.get_submodule(name)
    assert isinstance(layer, quant.FP8Linear) and layer.input_scale is not None
    assert type(model.get_submodule("transformer_blocks.0.attn1.to_k")) is nn.Linear  # bf16 in the file: kept
    assert layer.weight_scale.shape == (layer.out_features,)
    x = torch.randn(3, 5, layer.in_features)
    q = (x / 0.013).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.013
    weight = state[f"{name}.weight"].float() * state[f"{name}.weight_scale"]  # as the file says
    expected = q @ weight.T + state[f"{name}.bias"]
    assert rel(layer(x), expected) < 1e-6


def test_weight_memory_from_headers_matches_the_model():
    model, _ = _av()
    model = model.to(torch.bfloat16)
    headers = {k: ("BF16", tuple(v.shape)) for k, v in model.state_dict().items()}
    plain, fp8 = quant.weight_memory(headers)
    assert plain == quant.weight_bytes(model)
    assert fp8 == quant.weight_bytes(quant.quantize_(model)) < plain


def test_device_check(monkeypatch):
    assert quant.check_device(torch.device("cpu"), torch.float32) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    message = quant.check_device(torch.device("cuda:0"), torch.bfloat16)
    assert "8.9" in message and "8.0" in message and "A100" in message and "\n" not in message
    for ok in ((8, 9), (9, 0), (10, 0)):  # Ada (the first with e4m3 tensor cores), Hopper, Blackwell
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, ok=ok: ok)
        assert quant.check_device(torch.device("cuda:0"), torch.bfloat16) is None
    assert "bfloat16" in quant.check_device(torch.device("cuda:0"), torch.float32)


@pytest.mark.parametrize("static", [False, True], ids=["per-row", "static"])
def test_compiled_equals_eager(static):
    """torch.compile of a quantized block (Inductor on the CPU) gives the eager result, with per-row input
    scales and with calibrated static ones (a folder from `quantize --calibrate`)."""
    model, run = _av()
    quantized = quant.quantize_(copy.deepcopy(model))
    if static:
        with quant.calibrate(quantized) as scales:
            run(quantized)
        assert scales
    eager = run(quantized)
    quantized.transformer_blocks[0].compile(dynamic=False)
    compiled = run(quantized)
    assert all(rel(c, e) < 1e-5 for c, e in zip(compiled, eager))


# --- every layout: each rank quantizes its own copy by the same ops, so Ulysses 2 equals one process --------------

def _fp8_generate(world: int) -> dict | None:
    from test_parallel_ltx2 import BASE

    from usp_infer.config import ParallelConfig
    from usp_infer.ltx2.pipeline import generate, load_components
    from usp_infer.parallel.plan import Plan

    torch.set_num_threads(1)
    components = load_components(MODELS / "ltx2-tiny", "cpu", torch.float32)
    quant.quantize_(components.transformer)
    plan = Plan.build(ParallelConfig(ulysses=world, timeout_s=120), "cpu")
    result = generate(components, BASE, plan, progress=False)
    return {"frames": result.frames, "audio": result.audio} if plan.is_main else None


def test_ulysses_2_equals_one_process_in_fp8():
    import numpy as np
    from dist_utils import run_spawn
    from test_parallel_ltx2 import _reference

    spawned = run_spawn(_fp8_generate, 2, 2)[0]
    alone = _fp8_generate(1)
    full = _reference("full")  # the same request unquantized: fp8 must change it (the comparison can fail)
    plain = {"frames": full["frames"], "audio": full["audio_out"]}
    err = {k: float(np.linalg.norm(spawned[k] - alone[k]) / np.linalg.norm(alone[k])) for k in alone}
    moved = {k: float(np.linalg.norm(plain[k] - alone[k]) / np.linalg.norm(plain[k])) for k in alone}
    # fp32 around the e4m3 products: a layout reorders sums by ~1e-7, which flips no e4m3 rounding here
    assert max(err.values()) < 1e-5, err
    # the frames move by ~3%; the vocoder's waveform by ~6e-4: both far above the layouts' 1e-5
    assert moved["frames"] > 1e-2 and moved["audio"] > 1e-4, moved


@pytest.mark.parametrize("shape", ["ltx-tiny", "ltx2-tiny"])
def test_bench_rows_beside_each_other(tmp_path, shape, monkeypatch):
    """bench --quantize: the model-dtype rows, then fp8, fp8-kernel and fp8-static ones from the same launch and
    weights (fp8-kernel's compiled-kernel switch is put back after)."""
    from test_bench import _bench

    from usp_infer import bench

    switch, real_case = [], bench._run_case  # the kernel switch as each case is timed (the CPU has no Triton)
    monkeypatch.setattr(bench, "_run_case", lambda *a, **k: switch.append(quant.COMPILED_KERNEL) or real_case(*a, **k))
    out = tmp_path / "r.json"
    records = _bench(["--shape", shape, "--height", "64", "--width", "96", "--num-frames", "9", "--device", "cpu",
                      "--dtype", "float32", "--warmup", "1", "--steps", "1", "--quantize", "fp8-static,fp8-kernel,fp8",
                      "--json-out", str(out)])
    assert switch == [False, False, True, False]
    assert [(r["implementation"], r["quantize"]) for r in records] == [
        ("usp-infer", "none"), ("usp-infer-fp8", "fp8"), ("usp-infer-fp8-kernel", "fp8-kernel"),
        ("usp-infer-fp8-static", "fp8-static")]
    assert all(r["finite"] for r in records) and quant.COMPILED_KERNEL is False
    plain, fp8, kernel, static = (r["weight_gib_per_rank"] for r in records)
    assert fp8 == kernel < static < plain  # static adds one fp32 input scale a layer
    # fp8-kernel the last method: the switch is put back all the same
    _bench(["--shape", shape, "--height", "64", "--width", "96", "--num-frames", "9", "--device", "cpu", "--dtype",
            "float32", "--warmup", "1", "--steps", "1", "--quantize", "fp8-kernel", "--json-out", str(out)])
    assert switch[-1] is True and quant.COMPILED_KERNEL is False


# --- the command line ------------------------------------------------------------------------------------------

def test_cli_generate_quantize_and_info(tmp_path):
    from test_cli import FAST, MODEL, cli, error_line, snapshot

    out = tmp_path / "fp8.npz"  # latents and frames as arrays: the property is the weights', not the encoder's
    assert cli("generate", "--prompt", "a fox", *FAST, "--quantize", "fp8", "-o", out).exit_code == 0
    recorded = json.loads(out.with_name(out.name + ".json").read_text())["quantization"]
    assert (recorded["method"], recorded["source"], recorded["activations"]) == ("fp8", "on-the-fly", "per row")
    plain = tmp_path / "plain.npz"
    assert cli("generate", "--prompt", "a fox", *FAST, "-o", plain).exit_code == 0
    assert json.loads(plain.with_name(plain.name + ".json").read_text())["quantization"]["method"] == "none"

    folder = tmp_path / "ltx-tiny-fp8"
    assert cli("quantize", "ltx-tiny", folder, "--dtype", "float32").exit_code == 0  # a bundled model by name
    again = tmp_path / "again.npz"
    assert cli("generate", "--prompt", "a fox", *FAST, "--model", folder, "-o", again).exit_code == 0
    sidecar = json.loads(again.with_name(again.name + ".json").read_text())
    assert sidecar["quantization"]["source"] == "checkpoint"
    with np.load(out) as made, np.load(again) as loaded:  # the folder's weights are --quantize fp8's, bit for bit
        assert all(np.array_equal(made[k], loaded[k]) for k in ("latents", "frames"))

    shown = cli("info", folder).stdout
    assert "with --quantize fp8" in shown and "holds the fp8 weights" in shown
    summary = json.loads(cli("info", MODEL, "--json").stdout)["transformer_weights_per_rank_gib"]
    assert summary["fp8"] < summary["bfloat16"] and not summary["quantized"]

    before = snapshot(tmp_path)
    for args, words in ((["generate", "--prompt", "a", "--quantize", "int4", "-o", tmp_path / "x.mp4"], "int4"),
                        (["quantize", MODEL, folder], "not an empty directory"),
                        (["quantize", folder, tmp_path / "twice"], "already quantized"),
                        (["quantize", tmp_path / "nope", tmp_path / "n"], "MODEL " + str(tmp_path / "nope"))):
        result = cli(*args)
        assert result.exit_code == 2 and words in error_line(result.stderr), result.stderr
    assert snapshot(tmp_path) == before


def test_cli_quantize_with_calibration(tmp_path):
    """`quantize --calibrate FILE`: static scales from FILE's generations (an image line included) written per
    layer; the folder loads them; a generation from it differs from the per-row fp8 one (the scales are used)
    and from fp32 by little; bad calibration files exit 2 with nothing written."""
    from test_cli import ROOT, cli, error_line, snapshot

    from usp_infer.calibrate import input_scales
    from usp_infer.cli import _calibration_requests
    from usp_infer.families import resolve

    model = MODELS / "ltx2-tiny"
    size = {"height": 64, "width": 64, "num_frames": 9, "max_sequence_length": 16}
    calib = tmp_path / "calib.jsonl"
    taken = tmp_path / "taken.mp4"  # a line's output is never written, so one that exists does not matter
    taken.write_bytes(b"someone's video")
    calib.write_text("\n".join(json.dumps(line) for line in (
        {"prompt": "a red fox in snow", "steps": 3, "seed": 1, "output": str(taken), **size},
        {"prompt": "waves at dusk", "steps": 2, "seed": 2, "image": str(ROOT / "tests/data/first_frame.png"), **size})))
    folder = tmp_path / "static"
    result = cli("quantize", model, folder, "--calibrate", calib, "--dtype", "float32")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("calibrating on generation") == 2
    assert taken.read_bytes() == b"someone's video" and not list(tmp_path.glob("taken.mp4.*"))
    stored = _tensors(folder / "transformer")
    written = {k.removesuffix(".input_scale"): v for k, v in stored.items() if k.endswith(".input_scale")}
    assert len(written) == sum(k.endswith(".weight_scale") for k in stored) > 0
    config = json.loads((folder / "transformer" / "config.json").read_text())["_quantization"]
    assert config["activations"]["scales"] == "static in every layer" and config["activations"]["headroom"] == 4.0

    # the file holds the calibration's scales, layer by layer, and the loader builds static layers from them
    again = input_scales(model, _calibration_requests(calib, model), resolve(model)[0], torch.device("cpu"),
                         torch.float32, lambda message: None, progress=False)
    assert again.keys() == written.keys() and all(torch.equal(again[k], written[k]) for k in again)
    loaded = load_av(folder / "transformer", "cpu", torch.float32)
    static = {n: m.input_scale for n, m in loaded.named_modules() if isinstance(m, quant.FP8Linear)}
    assert static.keys() == written.keys() and all(torch.equal(static[k], written[k]) for k in static)

    dynamic = tmp_path / "dynamic"
    assert cli("quantize", model, dynamic, "--dtype", "float32").exit_code == 0
    latents = {}
    for name, where in (("fp32", model), ("static", folder), ("dynamic", dynamic)):
        out = tmp_path / f"{name}.npz"  # another prompt and size than the calibration's
        run = cli("generate", "--prompt", "a bird over a lake", "--model", where, "--height", "64", "--width", "96",
                  "--num-frames", "9", "--steps", "3", "--max-sequence-length", "16", "--dtype", "float32", "-o", out)
        assert run.exit_code == 0, run.stderr
        with np.load(out) as saved:
            latents[name] = {k: torch.from_numpy(saved[k]) for k in ("latents", "audio_latents")}
        if name == "static":
            assert json.loads(out.with_name(out.name + ".json").read_text())["quantization"]["activations"] == "static"
    for key in ("latents", "audio_latents"):
        # Powers of two only move exponents: static and per-row scales round alike but where a value goes
        # subnormal, so the two differ, yet very little (7e-7 here); a loader ignoring input_scale: equal.
        assert 0 < rel(latents["static"][key], latents["dynamic"][key]) < FLOOR / 10
        # three steps' worth of the per-forward bound: 4.0% video, 7.4% audio here
        assert FLOOR < rel(latents["static"][key], latents["fp32"][key]) < 3 * BOUND

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "image": str(tmp_path / "missing.png")}) + "\n")
    before = snapshot(tmp_path)
    for args, words in ((["--calibrate", tmp_path / "absent.jsonl"], "cannot be read"),
                        (["--calibrate", bad], "line 1"),
                        (["--calibrate", calib, "--device", "gpu"], "--device 'gpu'")):
        result = cli("quantize", model, tmp_path / "never", *args)
        assert result.exit_code == 2 and words in error_line(result.stderr), result.stderr
    assert snapshot(tmp_path) == before


def test_calibration_covers_every_generation_it_is_given():
    """A layer's static scale covers the largest input over all the generations it is given: that of two equals
    the larger of each one's own (one taken from the first alone would saturate the other's larger inputs)."""
    from usp_infer.calibrate import input_scales
    from usp_infer.families import resolve

    model = MODELS / "ltx2-tiny"
    family, configs = resolve(model)
    size = {"height": 64, "width": 64, "num_frames": 9, "max_sequence_length": 16, "steps": 2}
    first = family.requests().build_request({"prompt": "a red fox in snow", "seed": 1, **size}, configs)
    second = family.requests().build_request({"prompt": "waves at dusk", "seed": 2, "guidance_scale": "9",
                                              "stg_scale": "3", **size}, configs)

    def scales(requests):
        return input_scales(model, requests, family, torch.device("cpu"), torch.float32, lambda message: None,
                            progress=False)

    a, b, both = scales([first]), scales([second]), scales([first, second])
    assert both.keys() == a.keys() == b.keys()
    assert any(b[k] > a[k] for k in a) and any(a[k] > b[k] for k in a)  # each has layers where it sees more
    assert all(torch.equal(both[k], torch.maximum(a[k], b[k])) for k in both)


def test_cli_quantize_with_calibration_ltx_video(tmp_path):
    """The same for an LTX-Video folder (its pipeline takes the calibration's generations too)."""
    from test_cli import FAST, MODEL, cli

    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"prompt": "a red fox in snow", "height": 64, "width": 96, "num_frames": 9,
                                 "steps": 2, "max_sequence_length": 16}) + "\n")
    folder = tmp_path / "static"
    result = cli("quantize", MODEL, folder, "--calibrate", calib, "--dtype", "float32")
    assert result.exit_code == 0, result.stderr
    stored = _tensors(folder / "transformer")
    assert sum(k.endswith(".input_scale") for k in stored) == sum(k.endswith(".weight_scale") for k in stored) > 0
    out = tmp_path / "fox.mp4"
    assert cli("generate", "--prompt", "an owl", *FAST, "--model", folder, "-o", out).exit_code == 0
    assert json.loads(out.with_name(out.name + ".json").read_text())["quantization"]["activations"] == "static"
