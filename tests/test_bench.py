"""`usp-infer bench` on CPU: the tiny shape in one process and in a 2-process gloo job, the FLOP formula,
and the transformer changes the benchmark measures (compiled RoPE path, dropped text pads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from dist_utils import run_spawn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from usp_infer.bench import latent_grid, randomize
from usp_infer.bench_cli import bench_command
from usp_infer.ltx_video.bench import random_model, step_flops
from usp_infer.layers import apply_rope, drop_trailing_pads
from usp_infer.ltx_video.model import SHAPES, LTXConfig, rope_pairs, rope_tables

TINY = ["--shape", "ltx-tiny", "--height", "64", "--width", "96", "--num-frames", "17", "--device", "cpu",
        "--dtype", "float32", "--warmup", "1", "--steps", "2", "--dist-timeout", "60"]
TOKENS = 3 * 2 * 3  # 17 frames -> 3 latent frames; 64 x 96 pixels -> 2 x 3 tokens
FIELDS = {"world_size", "cfg", "ring", "ulysses", "a2a_mode", "shape", "tokens", "branches", "ms_per_step",
          "tflops_per_gpu", "peak_mem_gb", "peak_mem_gb_per_rank", "gpu", "gpu_count", "torch", "nccl", "command",
          "flops_per_step", "flops_parts", "matmul_tflops", "fraction_of_matmul_rate"}


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(bench_command)  # one command: invoked without its name
    return app


def _bench(args: list[str]) -> list[dict]:
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(Path(args[args.index("--json-out") + 1]).read_text())


def test_step_flops_by_hand() -> None:
    cfg = SHAPES["ltx-tiny"]  # d = 32, 2 layers, 8 channels in and out, captions of 48
    n, t, d, layers = 18, 24, 32, 2
    by_hand = {
        "self_attn_proj": 4 * (2 * n * d * d) * layers,  # q, k, v, out: 2 FLOPs per multiply-add
        "self_attn_sdpa": 2 * (2 * n * n * d) * layers,  # QK^T and PV
        "cross_attn_proj": (2 * (2 * n * d * d) + 2 * (2 * t * d * d)) * layers,  # q, out on video; k, v on text
        "cross_attn_sdpa": 2 * (2 * n * t * d) * layers,
        "ffn": (2 * n * d * 4 * d + 2 * n * 4 * d * d) * layers,
        "embed_out": 2 * n * 8 * d + 2 * n * d * 8 + 2 * t * (48 * d + d * d) + 2 * (256 * d + d * d + d * 6 * d),
    }
    assert step_flops(cfg, n, 1, t) == by_hand
    assert step_flops(cfg, n, 3, t) == {part: 3 * flops for part, flops in by_hand.items()}
    assert sum(by_hand.values()) == 294912 + 82944 + 344064 + 110592 + 589824 + 172032  # the arithmetic, spelled out


def test_step_flops_match_flop_counter() -> None:
    """The formula against torch's own count of one forward (math SDPA, so attention is counted as matmuls)."""
    cfg = SHAPES["ltx-tiny"]
    model = random_model(cfg, torch.device("cpu"), torch.float32, 0, randomize)
    f, h, w = latent_grid(64, 96, 17)
    n = f * h * w
    mask = torch.arange(40)[None] < 24  # 24 kept text positions: the trailing 16 pads are dropped
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, n, 8), torch.randn(1, 40, 48), torch.tensor([500.0]), mask,
              rope_tables(cfg, f, h, w, (0.32, 32.0, 32.0)))
    assert counter.get_total_flops() == sum(step_flops(cfg, n, 1, 24).values())


def test_step_flops_of_a_perturbed_row_sharing_the_cond_rows_first_blocks() -> None:
    """A perturbed row that starts from the cond row at block 1 (stg_source) skips block 0: the counter sees one
    block of one row less, plus the kept rows' text and timestep embeddings made again for the prefix. The
    bench counts it only where the code shares (batched branches, cond and perturbed on one cfg rank)."""
    from types import SimpleNamespace

    from usp_infer.bench import Setup
    from usp_infer.ltx_video.bench import shared_blocks
    from usp_infer.ltx_video.model import Perturbation

    cfg = SHAPES["ltx-tiny"]
    model = random_model(cfg, torch.device("cpu"), torch.float32, 0, randomize)
    f, h, w = latent_grid(64, 96, 17)
    n = f * h * w
    x, text, mask = torch.randn(1, n, 8).expand(3, -1, -1), torch.randn(1, 40, 48).expand(3, -1, -1), None
    t, rope = torch.full((3,), 500.0), rope_tables(cfg, f, h, w, (0.32, 32.0, 32.0))
    perturbation = Perturbation((1,), "values", torch.tensor([False, False, True]))
    counts = []
    for source in (None, 1):
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            model(x, text, t, mask, rope, perturbation=perturbation, stg_source=source)
        counts.append(counter.get_total_flops())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model._condition(text[:2], None, t[:2], torch.float32)
    prefix = counter.get_total_flops()
    full, shared = (sum(step_flops(cfg, n, 3, 40, k).values()) for k in (0, 1))
    assert counts[0] == full and counts[1] == shared + prefix < full
    one_branch = step_flops(cfg, n, 1, 40)
    assert full - shared == (sum(one_branch.values()) - one_branch["embed_out"]) // cfg.num_layers  # one block
    guidance = Setup.guidance.__get__(SimpleNamespace(branches=3, cfg=cfg))  # STG block 1 of the tiny model's 2
    batched, sequential = (SimpleNamespace(guidance=guidance, branch_mode=m) for m in ("batched", "sequential"))
    assert [shared_blocks(batched, c) for c in (1, 2, 3, None)] == [1, 0, 0, 0]  # cfg 2: cond, perturbed apart
    assert shared_blocks(sequential, 1) == 0


@pytest.mark.parametrize("shape", ["ltx-tiny", "ltx2-tiny"])
def test_records_count_the_work_each_case_does(shape) -> None:
    """A record's FLOPs: ours skip the perturbed row's blocks before the STG block where cond shares its forward
    (batched, cfg 1), eager and compiled blocks alike; cfg 2 for LTX-Video and diffusers do not."""
    from usp_infer.bench import Case, Setup, _record

    s = Setup(shape, 64, 96, 17, 4 if shape == "ltx2-tiny" else 3, "batched", 1, 2, torch.device("cpu"), torch.float32)
    env = {"matmul_tflops": 1.0, "matmul_tflops_sustained": 1.0}

    def count(case: Case | None, implementation: str = "usp-infer") -> float:
        return _record(s, case, 1, [1.0], [0.0], True, env, implementation, 24)["flops_per_step"]

    eager, compiled = Case((1, 1, 1), "direct", False), Case((1, 1, 1), "direct", True)
    assert count(eager) == count(compiled) < count(None, "diffusers")
    if shape == "ltx-tiny":  # branches uncond, cond, perturbed: cfg 2 puts cond and perturbed apart
        assert count(Case((2, 1, 1), "direct", False)) == count(None, "diffusers")


def test_bench_one_process(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    records = _bench([*TINY, "--branch-mode", "sequential", "--baseline", "diffusers", "--json-out", str(out)])
    ours, theirs = records
    assert FIELDS <= ours.keys() and FIELDS <= theirs.keys()
    assert (ours["implementation"], theirs["implementation"]) == ("usp-infer", "diffusers")
    assert (ours["world_size"], ours["cfg"], ours["ring"], ours["ulysses"], ours["tokens"]) == (1, 1, 1, 1, TOKENS)
    assert (ours["branches"], ours["branch_mode"], ours["text_tokens"], theirs["text_tokens"]) == (3, "sequential", 24, 128)
    assert ours["flops_per_step"] == sum(step_flops(SHAPES["ltx-tiny"], TOKENS, 3, 24).values())
    assert ours["ms_per_step"] > 0 and len(ours["ms_per_step_all"]) == 2 and ours["finite"]
    assert ours["gpu"] is None and ours["gpu_count"] == 0 and ours["torch"] == torch.__version__
    assert "with it: ok" in theirs["note"]  # one process: diffusers takes the mask; it fails only under Ulysses


def _two_process_job(out: str, profiles: str) -> None:
    torch.set_num_threads(1)
    result = CliRunner().invoke(_app(), [*TINY, "--layouts", "all", "--a2a-mode", "both", "--comm-share",
                                         "--profile", profiles, "--json-out", out])
    assert result.exit_code == 0, (result.output, result.exception)


def test_bench_two_processes_gloo(tmp_path: Path) -> None:
    out, profiles = tmp_path / "r.json", tmp_path / "profiles"
    run_spawn(_two_process_job, 2, str(out), str(profiles))
    records = json.loads(out.read_text())
    found = {(r["cfg"], r["ring"], r["ulysses"], r["a2a_mode"]) for r in records}
    assert found == {(1, 1, 2, "direct"), (1, 1, 2, "functional"), (1, 2, 1, "direct"), (1, 2, 1, "functional"),
                     (2, 1, 1, "direct")}  # cfg 2 exchanges nothing: one mode is enough
    for r in records:
        assert FIELDS <= r.keys() and r["world_size"] == 2 and len(r["peak_mem_gb_per_rank"]) == 2
        if r["ring"] * r["ulysses"] > 1:
            # fp32 on CPU: a few roundings of ~6e-8 per element; a misplaced chunk gives errors of order 1
            assert r["attention_check_rel_err"] <= 1e-5
    shares = [r for r in records if "a2a_share" in r]
    assert [(r["ulysses"], r["a2a_mode"]) for r in shares] == [(2, "direct")]  # Ulysses only, first mode only
    # --profile: a kernel table of one step for every configuration (the 5 records and the local-exchange
    # estimate), from each rank
    tables = sorted(path.name for path in profiles.iterdir())
    configurations = ["w2-1x1x2-direct", "w2-1x1x2-direct-local", "w2-1x1x2-functional",
                      "w2-1x2x1-direct", "w2-1x2x1-functional", "w2-2x1x1-direct"]
    assert tables == sorted(f"{c}-rank{r}.txt" for c in configurations for r in (0, 1))
    assert all("Self CPU" in (profiles / name).read_text() for name in tables)


@pytest.mark.parametrize("args, message", [
    (["--shape", "ltx-video-7b"], "--shape 'ltx-video-7b' is unknown"),
    (["--height", "100"], "--height 100 is not a positive multiple of 32"),
    (["--layouts", "1x2x1"], "cfg 1 x ring 2 x ulysses 1 = 2 but the world size is 1"),
    (["--cfg-degree", "2"], "cfg 2 x ring 1 x ulysses 1 = 2 but the world size is 1"),  # generate's alias
    (["--layouts", "1x1x3"], "--ulysses-degree 3 does not divide 4 attention heads"),
    (["--layouts", "2-2"], "'2-2' is not CxRxU"),
    (["--a2a-mode", "fast"], "--a2a-mode 'fast' is unknown"),
    (["--cuda-graphs", "--warmup", "1"], "--cuda-graphs captures in the second step: use --warmup 2 or more"),
])
def test_bench_rejects_bad_flags(args: list[str], message: str) -> None:
    result = CliRunner().invoke(_app(), [*TINY, *args])
    assert result.exit_code == 2 and message in result.output


def test_graph_cases_only_where_the_sequence_is_whole() -> None:
    """--cuda-graphs adds a graphed twin of each case whose ranks hold the whole sequence (one GPU, cfg-parallel),
    eager and compiled; Ulysses and ring layouts exchange inside the loop and get none."""
    from usp_infer.bench import Case, _cases

    cases = _cases(4, None, [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 1)], ["direct"], True, False, True)
    graphed = [(c.layout, c.compiled) for c in cases if c.graphs]
    assert graphed == [((1, 1, 1), False), ((2, 1, 1), False), ((1, 1, 1), True), ((2, 1, 1), True)]
    assert Case((1, 1, 1), "direct", True) in cases and len(cases) == 12
    assert not any(c.graphs for c in _cases(4, None, [(1, 1, 1)], ["direct"], True, False))


def test_rope_paths_match_diffusers_formula() -> None:
    """Both forms of apply_rope (complex product eagerly, real pairs under torch.compile) on the half-size
    table equal diffusers' x * cos + (-b, a) * sin over the full tables."""
    x = torch.randn(2, 7, 16)
    cfg = LTXConfig(num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16)  # 16 % 6: 4 unrotated
    cos, sin = rope_tables(cfg, 7, 1, 1, (1.0, 1.0, 1.0))  # (1, 7, 16) each
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    reference = x * cos + torch.stack((-b, a), dim=-1).flatten(-2) * sin
    pairs = rope_pairs((cos, sin))
    traced = torch.compile(apply_rope, backend="eager", fullgraph=True)(x, pairs)  # no inductor: fast
    eager = apply_rope(x, pairs)
    for out in (traced, eager):  # fp32: an ulp or two apart (1e-7); a wrong pairing is off by order 1
        assert ((out - reference).norm() / reference.norm()).item() <= 1e-6
    assert ((eager - x).norm() / x.norm()).item() > 1e-2  # the rotation did something


def test_drop_trailing_pads() -> None:
    text = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 1, 0]], dtype=torch.bool)
    cut_text, cut_mask = drop_trailing_pads(text, mask)
    assert torch.equal(cut_text, text[:, :5]) and torch.equal(cut_mask, mask[:, :5])  # last kept position: 4
    empty_row = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    kept_text, kept_mask = drop_trailing_pads(text, empty_row)  # that row attends evenly over its pads: keep all
    assert kept_text is text and kept_mask is empty_row


def test_dropped_pads_change_nothing() -> None:
    """Extra masked text positions at the tail leave the transformer's output as it was."""
    cfg = SHAPES["ltx-tiny"]
    model = random_model(cfg, torch.device("cpu"), torch.float32, 0, randomize)
    gen = torch.Generator().manual_seed(0)
    f, h, w = latent_grid(64, 96, 17)
    x, text = torch.randn(2, f * h * w, 8, generator=gen), torch.randn(2, 5, 48, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    rope, t = rope_tables(cfg, f, h, w, (0.32, 32.0, 32.0)), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        base = model(x, text, t, mask, rope)
        padded = model(x, torch.cat([text, torch.randn(2, 3, 48, generator=gen)], 1),
                       t, torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1), rope)
    # The pads are cut before any arithmetic; only the text's memory layout differs (a slice of a longer
    # tensor), which can change how a matmul kernel blocks its sums: fp32 roundings of ~1e-7. A pad that
    # reached the attention would move the output by order 1e-2.
    assert ((padded - base).norm() / base.norm()).item() <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_gpu(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = [a for a in TINY if a not in ("cpu", "float32")]
    args = [a for a in args if a not in ("--device", "--dtype")]
    (record,) = _bench([*args, "--device", "cuda", "--json-out", str(out)])
    assert record["gpu"] and record["nccl"] and record["gpu_count"] == 1 and record["matmul_tflops"] > 0


def test_bench_ltx2_one_process(tmp_path: Path) -> None:
    """The LTX-2 workload: four branches (the isolated one without audio<->video attention in the count),
    1,024 text tokens on record, image-to-video steps, diffusers called both ways."""
    from usp_infer.ltx2 import bench as bench_ltx2
    from usp_infer.ltx2 import model as ltx2

    out = tmp_path / "r.json"
    args = ["--shape", "ltx2-tiny", "--height", "64", "--width", "96", "--num-frames", "17", "--device", "cpu",
            "--dtype", "float32", "--warmup", "1", "--steps", "2", "--image", "--baseline", "diffusers",
            "--json-out", str(out)]
    ours, pipeline, batched = _bench(args)
    assert [r["implementation"] for r in (ours, pipeline, batched)] == ["usp-infer", "diffusers-pipeline",
                                                                       "diffusers-batched"]
    def count(shared: int) -> float:
        return ltx2.flops(ltx2.SHAPES["ltx2-tiny"], TOKENS, bench_ltx2.audio_tokens(17), 1024, 4, isolated=1,
                          shared_blocks=shared)["total"]

    for r in (ours, pipeline, batched):
        assert (r["branches"], r["text_tokens"], r["image_to_video"], r["finite"]) == (4, 1024, True, True)
    # ours: the perturbed row (STG block 1 of the tiny model's 2) starts from the cond row at block 1
    assert ours["flops_per_step"] == count(1) < pipeline["flops_per_step"] == batched["flops_per_step"] == count(0)


def test_cudnn_fp8_attention_probe_runs_on_the_cpu(tmp_path: Path) -> None:
    """bench/fp8_attention_cudnn.py --cpu-smoke: everything but the cuDNN graph itself (which needs a GPU) runs,
    the model level included (it swaps the video self-attention of the package's LTX-2 model). The emulated
    per-tensor fp8 error lands where e4m3 puts it (~2 eps), and smoothing K removes a shared key offset's cost:
    an emulation that skipped a rounding (or a scale) would come out far below, a wrong scale far above."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, str(root / "bench/fp8_attention_cudnn.py"), "--cpu-smoke", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["failures"] == []
    errors = result["shapes"]["self"]["rel_err"]
    assert 0.04 < errors["randn"]["emulated-fp8"] < 0.08
    assert errors["randn"]["sdpa-cudnn"] < 0.005
    assert errors["k-offset"]["emulated-fp8-smooth"] < 0.6 * errors["k-offset"]["emulated-fp8"]
    (row,) = result["model"].values()
    assert set(row["ms"]) == {f"{w} linears, {a} attention" for w in ("bf16", "fp8") for a in ("bf16", "fp8")}
    for label, by_sigma in row["rel_err"].items():
        for err in by_sigma.values():
            assert 0.001 < err["video"] < 0.1 and 0.001 < err["audio"] < 0.1, (label, err)


def test_cudnn_fp8_attention_scales_follow_cudnns_meaning() -> None:
    """The probe's bf16 -> bf16 call around cuDNN's sdpa_fp8, with the graph replaced by what cuDNN documents it
    computes (a code times its descale is the value; O times scale_o is O's code): the result is attention within
    fp8's error. Swapping a scale for its inverse (descale vs scale, or O's scale) is off by orders of magnitude."""
    import importlib.util
    import math

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("fp8_attention_cudnn", root / "bench/fp8_attention_cudnn.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)

    class Graph(probe.CudnnFp8):
        def __init__(self) -> None:  # no cuDNN: only what call() and scales() read
            self.p_scales = [torch.full((1, 1, 1, 1), x) for x in (1 / probe.P_SCALE, probe.P_SCALE)]

        def kernel(self, q8, k8, v8, scales, plan=None):
            dq, dk, dv, ds, ss, so = (x.item() for x in scales)
            assert ds * ss == pytest.approx(1.0)
            logits = torch.einsum("bqhd,bkhd->bhqk", q8.float() * dq, k8.float() * dk) / math.sqrt(q8.shape[-1])
            out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v8.float() * dv)
            return (out * so).clamp(-448, 448).to(torch.float8_e4m3fn)

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 32, generator=gen).bfloat16() * m for m in (0.5, 3.0, 7.0))  # scales != 1
    ref = probe.reference(q, k, v)
    for smooth in (False, True):
        err = probe.rel_err(Graph().call(q, k, v, smooth=smooth), ref)
        assert 0.005 < err < 0.1, (smooth, err)
