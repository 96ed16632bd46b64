"""The CUDA-only paths of the transformer against its CPU/fp32 path; every test skips where CUDA is absent.

Needs torch and usp_infer only, so it runs on a GPU machine without diffusers.
"""

import pytest
import torch
import torch.nn.functional as F

from usp_infer.layers import FeedForward
from usp_infer.ltx_video.model import SHAPES, LTXTransformer, rope_tables

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gelu_epilogue_matches_two_passes(dtype: torch.dtype) -> None:
    """The FFN's GELU in the GEMM epilogue (CUDA, half precision) vs the separate tanh-GELU pass and fp32."""
    torch.manual_seed(0)
    ff = FeedForward(256).cuda()
    x = torch.randn(2, 300, 256, device="cuda")
    reference = ff(x)  # fp32 on CUDA: the two-pass path
    half = ff.to(dtype)
    up, down = half.net[0].proj, half.net[2]
    fused, two_pass = half(x.to(dtype)), down(F.gelu(up(x.to(dtype)), approximate="tanh"))
    assert fused.shape == two_pass.shape == x.shape
    # Both sit at half-precision rounding from fp32 (~3e-3 for bf16); exact GELU instead of tanh, or a
    # missing bias, moves the output by far more than 2e-2.
    assert _rel(two_pass, reference) < 2e-2 and _rel(fused, reference) < 2e-2
    assert _rel(fused, two_pass) < 2e-2


def test_tiny_transformer_bf16_cuda_matches_fp32_cpu() -> None:
    """The whole forward on CUDA in bf16 (cuDNN attention, GELU epilogue, complex RoPE) vs fp32 on the CPU."""
    cfg = SHAPES["ltx-tiny"]
    torch.manual_seed(0)
    model = LTXTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    grid = (3, 4, 6)
    x = torch.randn(2, 72, cfg.in_channels, generator=gen)
    text = torch.randn(2, 10, cfg.caption_channels, generator=gen)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    t = torch.tensor([300.0, 700.0])
    rope = rope_tables(cfg, *grid, (0.32, 32.0, 32.0))
    with torch.no_grad():
        reference = model(x, text, t, mask, rope)
        gpu = model.cuda().to(torch.bfloat16)
        out = gpu(x.cuda().bfloat16(), text.cuda().bfloat16(), t.cuda(), mask.cuda(), tuple(r.cuda() for r in rope))
    assert torch.isfinite(out).all()
    assert _rel(out.cpu(), reference) < 3e-2


def _norm_rope_case(dtype: torch.dtype, layout: str, width: int, heads: int, tokens: slice):
    """A q/k-shaped input, a learned-weight RMSNorm and a RoPE table as the models build them."""
    from usp_infer.ltx2 import model as ltx2
    from usp_infer.ltx_video import model as ltx

    torch.manual_seed(0)
    if layout == "split":
        cfg = ltx2.LTX2Config(num_attention_heads=heads, attention_head_dim=width // heads, cross_attention_dim=width,
                              num_layers=1, rope_type="split")
        table, rope = ltx2.rope_tables(cfg, 5, 8, 12, 24.0, 10, device="cuda").video, ltx2._apply_split_rope
    else:
        cfg = ltx.LTXConfig(num_attention_heads=heads, attention_head_dim=width // heads, cross_attention_dim=width)
        table, rope = ltx.rope_pairs(ltx.rope_tables(cfg, 5, 8, 12, (0.32, 32.0, 32.0), "cuda")), ltx.apply_rope
    table = table[:, tokens]
    norm = torch.nn.RMSNorm(width, eps=1e-6).cuda()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(width))
    x = 2 * torch.randn(3, table.shape[1], width, device="cuda")
    return x.to(dtype), norm, table, rope


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout,width,heads", [("split", 4096, 32), ("split", 2048, 32), ("interleaved", 2048, 32)])
@pytest.mark.parametrize("tokens", [slice(None), slice(100, 333)], ids=["whole", "shard"])
def test_fused_norm_rope_is_as_exact_as_the_torch_ops(dtype, layout, width, heads, tokens) -> None:
    """kernels.rms_norm_rope (one pass) vs the norm then the RoPE as torch ops, both against fp64."""
    from usp_infer import kernels
    from usp_infer.ltx_video import model as ltx

    x, norm, table, rope = _norm_rope_case(dtype, layout, width, heads, tokens)
    assert kernels.available(x)
    with torch.no_grad():
        fused = ltx.norm_rope(x, norm.to(dtype), table, rope)
        unfused = rope(norm.to(dtype)(x), table)
        exact = rope(torch.nn.functional.rms_norm(x.double(), (width,), norm.weight.double(), 1e-6), table.double())
    if dtype == torch.float32:  # the same math summed in another order
        assert _rel(fused, unfused) < 1e-6
    else:  # each rounds the norm's output and the result once: no less exact than torch (bf16: ~3e-3)
        assert _rel(fused, exact) <= 1.05 * _rel(unfused, exact) + 1e-6


def test_fused_norm_rope_compiles_without_a_graph_break() -> None:
    from usp_infer.ltx_video import model as ltx

    x, norm, table, rope = _norm_rope_case(torch.bfloat16, "split", 4096, 32, slice(None))
    norm = norm.to(torch.bfloat16)
    with torch.no_grad():
        compiled = torch.compile(lambda t: ltx.norm_rope(t, norm, table, rope) * 2, fullgraph=True)(x)
        assert torch.equal(compiled, ltx.norm_rope(x, norm, table, rope) * 2)


def test_tiny_ltx2_image_to_video_bf16_cuda_matches_fp32_cpu() -> None:
    """An LTX-2 forward with per-token (image-to-video) timesteps on CUDA in bf16 (fused q/k kernel, per-run
    modulation, cuDNN attention) vs fp32 on the CPU."""
    from usp_infer.ltx2 import model as ltx2

    cfg = ltx2.SHAPES["ltx2-tiny"]
    torch.manual_seed(0)
    model = ltx2.LTX2Transformer(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    grid, audio_tokens = (3, 4, 6), 9
    S = grid[0] * grid[1] * grid[2]
    timestep = torch.where(torch.arange(S) < grid[1] * grid[2], 0.0, torch.tensor([[300.0], [700.0]]))
    inputs = dict(video=torch.randn(2, S, cfg.in_channels, generator=gen),
                  audio=torch.randn(2, audio_tokens, cfg.audio_in_channels, generator=gen),
                  text=torch.randn(2, 10, cfg.inner_dim, generator=gen),
                  audio_text=torch.randn(2, 10, cfg.audio_inner_dim, generator=gen),
                  text_mask=None, audio_text_mask=None, timestep=timestep,
                  audio_timestep=torch.tensor([300.0, 700.0]), sigma=torch.tensor([0.3, 0.7]),
                  audio_sigma=torch.tensor([0.3, 0.7]))
    rope = ltx2.rope_tables(cfg, *grid, 24.0, audio_tokens)
    with torch.no_grad():
        reference = model(**inputs, rope=rope, stg_blocks=(1,), stg_rows=torch.tensor([False, True]))
        gpu = model.cuda().to(torch.bfloat16)
        cuda_inputs = {k: None if v is None else v.cuda().to(torch.bfloat16 if v.ndim == 3 else v.dtype)
                       for k, v in inputs.items()}
        cuda_rope = ltx2.LTX2Rope(**{f: getattr(rope, f).cuda() for f in ("video", "video_cross", "audio", "audio_cross")})
        out = gpu(**cuda_inputs, rope=cuda_rope, stg_blocks=(1,), stg_rows=torch.tensor([False, True]))
    for got, expected in zip(out, reference):
        assert torch.isfinite(got).all() and _rel(got.cpu(), expected) < 3e-2


@pytest.mark.parametrize("runs", [False, True], ids=["per-row", "per-run"])
def test_fused_norm_modulate_is_as_exact_as_the_torch_ops(runs) -> None:
    """modulation.norm_modulate eagerly on CUDA (kernels.rms_norm_modulate_ per run) vs norm then addcmul."""
    from usp_infer.modulation import Runs, addcmul, apply, norm_modulate

    torch.manual_seed(0)
    x = 2 * torch.randn(4, 1000, 4096, device="cuda", dtype=torch.bfloat16)
    shift, scale = (0.5 * torch.randn(4, 2 if runs else 1, 4096, device="cuda", dtype=torch.bfloat16) for _ in "ab")
    if runs:
        shift, scale = Runs(shift, (0, 384, 1000)), Runs(scale, (0, 384, 1000))
    norm = torch.nn.RMSNorm(4096, eps=1e-6, elementwise_affine=False)
    with torch.no_grad():
        fused, unfused = norm_modulate(x, norm, shift, scale), addcmul(shift, norm(x), scale)
        exact = addcmul(apply(shift, torch.Tensor.double), norm(x.double()), apply(scale, torch.Tensor.double))
    assert _rel(fused, exact) <= 1.05 * _rel(unfused, exact) + 1e-6


fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                         reason="float8 matmuls need compute capability 8.9+")


@fp8
def test_fp8_row_quantization_kernel_bits_on_the_gpu() -> None:
    """The Triton kernel gives torch's e4m3 bits on the GPU too (bf16 rows, as the blocks feed it), keeps NaN."""
    from usp_infer import kernels, quant

    x = (torch.randn(97, 4096, device="cuda") * torch.logspace(-8, 8, 97, device="cuda")[:, None]).bfloat16()
    x[3], x[5, 7] = 0, float("nan")
    for static in (None, torch.tensor(2.0**-4, device="cuda")):
        (q, s), (rq, rs) = kernels.quantize_rows_fp8(x, static), quant.quantize_rows_torch(x, static)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
        assert int(q.float().isnan().sum()) == 1


@fp8
def test_fp8_tiny_forward_close_to_bf16() -> None:
    """torch._scaled_mm's row-wise path, eager and compiled, within the CPU tests' bound of the bf16 model."""
    import copy

    from usp_infer import quant
    from usp_infer.bench import randomize
    from usp_infer.ltx_video.bench import random_model

    cfg = SHAPES["ltx-tiny"]
    model = random_model(cfg, torch.device("cuda"), torch.bfloat16, 0, randomize)
    gen = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(2, 24, cfg.in_channels, device="cuda", generator=gen).bfloat16()
    text = torch.randn(2, 8, cfg.caption_channels, device="cuda", generator=gen).bfloat16()
    args = (x, text, torch.tensor([500.0, 900.0], device="cuda"), None, rope_tables(cfg, 2, 3, 4, (0.32, 32, 32), "cuda"))
    with torch.no_grad():
        ref = model(*args).float()
        quantized = quant.quantize_(copy.deepcopy(model))
        eager = quantized(*args).float()
        for block in quantized.transformer_blocks:
            block.compile(dynamic=False)
        compiled = quantized(*args).float()
    for got in (eager, compiled):
        assert 0.005 < ((got - ref).norm() / ref.norm()).item() < 0.05


def test_two_stage_on_cuda_equals_the_cpu_run(tmp_path) -> None:
    """--two-stage on the GPU (the upsampler and the re-noise move latents between devices): the frames and
    audio of a fp32 CUDA run equal the CPU run's. Needs diffusers (the VAEs and upsampler)."""
    pytest.importorskip("diffusers")
    import numpy as np
    from test_cli import cli

    torch.backends.cuda.matmul.allow_tf32 = False
    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.npz"
        result = cli("generate", "--model", "ltx2-tiny", "--prompt", "a fox", "--two-stage", "--height", "128",
                     "--width", "128", "--num-frames", "9", "--steps", "2", "--seed", "3", "--device", device,
                     "--dtype", "float32", "-o", out)
        assert result.exit_code == 0, result.output
        runs[device] = np.load(out)
    for key in ("frames", "audio"):
        a, b = runs["cuda"][key].astype(np.float64), runs["cpu"][key].astype(np.float64)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-3, key


@pytest.mark.parametrize("mode", ["eager", "compiled", "fp8"])
def test_cuda_graphs_replay_the_plain_generation(tmp_path, monkeypatch, mode) -> None:
    """--cuda-graphs on the GPU: four branches with the STG prefix and an image (per-token timesteps), each
    stage's block loop captured once and replayed, against the same generation without graphs (fp32; fp8:
    float8 blocks in bf16, eager). Needs diffusers (the VAEs)."""
    pytest.importorskip("diffusers")
    import numpy as np
    from PIL import Image

    from usp_infer import graphs
    from usp_infer.ltx2 import pipeline
    from usp_infer.ltx2.tiny import make_tiny_ltx2

    torch.backends.cuda.matmul.allow_tf32 = False
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9+")
    dtype = torch.bfloat16 if mode == "fp8" else torch.float32
    c = pipeline.load_components(make_tiny_ltx2(tmp_path / "m", version="2.3"), "cuda", dtype)
    if mode == "compiled":
        pipeline.compile_blocks(c.transformer)
    if mode == "fp8":
        from usp_infer.quant import quantize_

        quantize_(c.transformer)
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 160, 3), dtype=np.uint8)).save(image)
    g = pipeline.LTX2Guidance(pipeline.ModalityGuidance(cfg=3.0, stg=1.0, modality=3.0, rescale=0.7),
                              pipeline.ModalityGuidance(cfg=7.0, stg=0.5, modality=2.0, rescale=0.5), stg_blocks=(1,))
    req = pipeline.LTX2Request(prompt="a cat", negative_prompt="blurry", height=96, width=160, num_frames=17,
                               fps=24.0, steps=graphs.MIN_STEPS + 2, seed=7, max_sequence_length=16, guidance=g,
                               image=str(image), image_crf=0)
    plain = pipeline.generate(c, req, progress=False)
    made, build = [], graphs.for_stage
    monkeypatch.setattr(graphs, "for_stage", lambda *a: made.append(build(*a)) or made[-1])
    c.cuda_graphs = True
    replayed = pipeline.generate(c, req, progress=False)
    assert [(m.captures, len(m.entries)) for m in made] == [(1, 1)]
    for got, expected in ((replayed.frames, plain.frames), (replayed.audio, plain.audio)):
        got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


def test_cuda_graphs_replay_the_plain_ltx_video_generation(monkeypatch) -> None:
    """--cuda-graphs for LTX-Video on the GPU: cfg + STG whose perturbed block changes, then no guidance (a graph
    per signature), against the same generation without graphs (fp32)."""
    pytest.importorskip("diffusers")
    from pathlib import Path

    import numpy as np

    from usp_infer import graphs
    from usp_infer.config import GenerateRequest, ParallelConfig
    from usp_infer.guidance import GuidanceConfig
    from usp_infer.ltx_video import pipeline as ltxv
    from usp_infer.parallel.plan import Plan

    torch.backends.cuda.matmul.allow_tf32 = False
    c = ltxv.load_components(Path(__file__).resolve().parents[1] / "models" / "ltx-tiny", torch.device("cuda"),
                             torch.float32)
    g = GuidanceConfig(cfg=(3.0, 3.0, 1.0), stg=(1.0, 1.0, 0.0), rescale=(0.7,), stg_blocks=((1,), (0,), (0,)),
                       timesteps=(0.9, 0.5, 0.2))  # as tests/test_graphs.py: three signatures, each captured
    req = GenerateRequest(prompt="a fox", negative_prompt="blurry", height=64, width=96, num_frames=17,
                          steps=graphs.MIN_STEPS, seed=5, max_sequence_length=8, guidance=g)
    plan = Plan.build(ParallelConfig(), "cuda")
    plain = ltxv.generate(c, req, plan, progress=False)
    made, build = [], graphs.for_stage
    monkeypatch.setattr(graphs, "for_stage", lambda *a: made.append(build(*a)) or made[-1])
    c.cuda_graphs = True
    replayed = ltxv.generate(c, req, plan, progress=False)
    assert len(made) == 1 and made[0].captures == 3
    got, expected = np.asarray(replayed.frames, np.float64), np.asarray(plain.frames, np.float64)
    assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


@pytest.mark.parametrize("shape", ["ltx2-tiny", "ltx-tiny"])
def test_bench_steps_with_cuda_graphs_equal_plain_ones(shape, monkeypatch) -> None:
    """`bench --cuda-graphs`: the timed step with its block loop replayed (the setup's device is "cuda", the
    tensors' "cuda:0": the same device to the graphs) against plain steps from the same inputs (fp32)."""
    from test_graphs import bench_steps

    torch.backends.cuda.matmul.allow_tf32 = False
    made, (plain, replayed) = bench_steps(shape, "cuda", monkeypatch)
    assert len(made) == 1 and made[0].captures == 1 and len(made[0].entries) == 1
    plain, replayed = plain.double(), replayed.double()
    assert (replayed - plain).norm() <= 1e-5 * plain.norm() and plain.norm() > 0


def test_cli_cuda_graphs_sidecar_says_so_and_the_output_is_the_plain_one(tmp_path) -> None:
    """`generate --cuda-graphs` on the GPU: the sidecar's cuda_graphs is true (false without the flag), and the
    frames equal the plain run's (fp32). Needs diffusers (the VAE)."""
    pytest.importorskip("diffusers")
    import json

    import numpy as np
    from test_cli import FAST, cli

    from usp_infer import graphs

    torch.backends.cuda.matmul.allow_tf32 = False
    steps = ["--steps", str(graphs.MIN_STEPS)]
    runs = {}
    for name, flags in (("plain", []), ("graphs", ["--cuda-graphs"])):
        out = tmp_path / f"{name}.npz"
        result = cli("generate", "--prompt", "a fox", *FAST, *steps, "--device", "cuda", "--dtype", "float32",
                     *flags, "-o", out)
        assert result.exit_code == 0, result.output
        runs[name] = (np.load(out)["frames"].astype(np.float64),
                      json.loads(out.with_name(out.name + ".json").read_text())["cuda_graphs"])
    assert runs["plain"][1] is False and runs["graphs"][1] is True
    got, expected = runs["graphs"][0], runs["plain"][0]
    assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


@fp8
def test_calibrated_fp8_folder_on_the_gpu(tmp_path) -> None:
    """`quantize --calibrate` on CUDA (bf16): the folder's static scales drive a compiled generation that stays
    within a hair of the per-row fp8 one (powers of two round alike but below e4m3's normal range), and the
    sidecar says static. Needs diffusers (the VAEs)."""
    pytest.importorskip("diffusers")
    import json

    import numpy as np
    from test_cli import ROOT, cli

    model = ROOT / "models" / "ltx2-tiny"
    size = ["--height", "64", "--width", "96", "--num-frames", "9", "--max-sequence-length", "16"]
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"prompt": "a red fox in snow", "steps": 3, "height": 64, "width": 64,
                                 "num_frames": 9, "max_sequence_length": 16}) + "\n")
    folders = {"static": tmp_path / "static", "per-row": tmp_path / "per-row"}
    assert cli("quantize", model, folders["static"], "--calibrate", calib, "--device", "cuda").exit_code == 0
    assert cli("quantize", model, folders["per-row"], "--device", "cuda").exit_code == 0
    frames = {}
    for name, folder in folders.items():
        out = tmp_path / f"{name}.npz"
        result = cli("generate", "--model", folder, "--prompt", "an owl", *size, "--steps", "3", "--device", "cuda",
                     "--compile", "-o", out)
        assert result.exit_code == 0, result.output
        frames[name] = np.load(out)["frames"].astype(np.float64)
        recorded = json.loads(out.with_name(out.name + ".json").read_text())["quantization"]["activations"]
        assert recorded == ("static" if name == "static" else "per row")
    assert np.linalg.norm(frames["static"] - frames["per-row"]) <= 1e-2 * np.linalg.norm(frames["per-row"])
