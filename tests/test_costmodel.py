"""The cost model and layout chooser (usp_infer/parallel/costmodel.py): its decisions, its constants, its
validation against the committed multi-GPU records, and the bytes it counts against what the collectives carry."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_spawn

from usp_infer.parallel import costmodel as cm

ROOT = Path(__file__).resolve().parent.parent
B1, B2, B3 = ("cond",), ("uncond", "cond"), ("uncond", "cond", "perturbed")
B4 = B3 + ("isolated",)
L2 = ("cond", "uncond", "perturbed", "isolated")  # LTX-2's batch order (ltx2/request.py LTX2Guidance.branches)


def _validator():
    spec = importlib.util.spec_from_file_location("validate_costmodel", ROOT / "bench" / "validate_costmodel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ltx_video(tokens: int, branches: tuple[str, ...], heads: int = 32) -> cm.Workload:
    """LTX-Video 13B's widths (48 layers, 4,096 wide), 24 text tokens."""
    return cm.Workload(48, cm.Stream(tokens, heads, 4096 // heads), 24, branches)


def ltx2(tokens: int, branches: tuple[str, ...], stg: int | None = None, batched: bool = True) -> cm.Workload:
    """LTX-2.3's widths: video 32 x 128, audio 32 x 64 at 126 tokens (121 frames), 1,024 text tokens; `stg` the
    first STG block, from which on a perturbed row sharing a forward with cond is computed (None: every block)."""
    return cm.Workload(48, cm.Stream(tokens, 32, 128), 1024, branches, cm.Stream(126, 32, 64), batched=batched,
                       text_kv_per_prompt=True, stg_first_block=stg)


# (world, workload, expected layout, why): each derived by hand from what the layouts do, not read off the model.
CHOICES = [
    (1, ltx_video(6144, B3), (1, 1, 1), "one process: nothing to split"),
    (2, ltx_video(6144, B3), (1, 1, 2), "cfg 2 splits 3 branches 2 + 1: its slow rank does 2/3 of a step, Ulysses 2 half plus its exchange"),
    (2, ltx_video(6144, B2), (2, 1, 1), "2 branches on 2 ranks: half a step each, no all-to-all, one small gather"),
    (2, ltx_video(6144, B1), (1, 1, 2), "one branch: no cfg; Ulysses has no fp32 merges, ring 2 has one per layer"),
    (3, ltx_video(6144, B3), (3, 1, 1), "one branch per rank and no exchange; ring 3 pays two fp32 merges a layer"),
    (3, ltx_video(6144, B1), (1, 3, 1), "3 divides no 32 heads and one branch allows no cfg: ring 3 is the only layout"),
    (4, ltx_video(6144, B3), (1, 1, 4), "measured fastest on 4 H200s (2026-11-28): cfg 2 leaves a 2-branch rank"),
    (4, ltx_video(27588, B3), (1, 1, 4), "measured fastest at 27,588 tokens too"),
    (5, ltx_video(6144, B3), (1, 5, 1), "5 divides no 32 heads and exceeds 3 branches: ring 5 only"),
    (6, ltx_video(6144, B3), (3, 1, 2), "one branch per cfg rank, then Ulysses 2 (6 divides no 32, so no Ulysses 6)"),
    (2, ltx2(6144, B4), (2, 1, 1), "LTX-2.3's 4 branches split 2 + 2: no all-to-all at all"),
    (4, ltx2(6144, B4), (4, 1, 1), "one branch per rank: no all-to-all, no merge; audio is replicated anyway"),
    (3, ltx2(6144, B4), (1, 3, 1), "cfg 3 splits 4 branches 2 + 1 + 1 (half a step on one rank); ring 3 does a third plus merges"),
    (8, ltx_video(6144, B3), (1, 1, 8), "3 branches split badly over 2, 4 or 8 cfg ranks; Ulysses 8 divides 32 heads"),
    # LTX-2.3 as it runs: the perturbed row starts at block 28 of 48 where it shares a forward with cond.
    (2, ltx2(6144, L2, stg=28), (1, 1, 2), "cfg 2 puts cond + perturbed (1.42 rows) on one rank and uncond + "
     "isolated (2 full rows) on the other, which sets the pace; Ulysses 2 carries 3.42 rows over 2 ranks (1.71) "
     "plus its exchange"),
    (4, ltx2(6144, L2, stg=28), (1, 1, 4), "cfg 4 runs one branch per rank and shares nothing: 1 row; Ulysses 4 "
     "carries 3.42 / 4 = 0.85 rows plus an exchange of ~3% of a step"),
    (2, ltx2(6144, L2, stg=28, batched=False), (2, 1, 1), "one branch per forward shares nothing: as without the "
     "sharing, cfg 2 splits the 4 branches 2 + 2 with no all-to-all"),
]


@pytest.mark.parametrize("world,work,expected,why", CHOICES, ids=[f"w{c[0]}-{c[2]}" for c in CHOICES])
def test_chooser_decisions(world, work, expected, why):
    choice = cm.choose(world, work)
    assert choice.best.layout == expected, (why, [(p.layout, round(p.ms, 1)) for p in cm.ranked(world, work)])
    assert choice.runner_up is None or choice.runner_up.ms >= choice.best.ms * (1 - 0.01)


@pytest.mark.parametrize("heads", [32, 24, 4])
def test_every_world_gets_a_layout_that_runs(heads):
    """Odd worlds included: ring takes any degree, so some layout always fits; Ulysses divides the heads."""
    for world in range(1, 10):
        for branches in (B1, B2, B3):
            choice = cm.choose(world, ltx_video(6144, branches, heads))
            c, r, u = choice.best.layout
            assert c * r * u == world and heads % u == 0 and c <= len(branches)


def test_ties_go_to_the_larger_ulysses_degree():
    work = ltx_video(6144, B2)
    assert cm.ranked(2, work)[0].layout == (2, 1, 1)  # clearly faster: cfg 2 (one branch each, no exchange)
    costs = {**cm.load_costs(), "tie_fraction": {"value": 10.0}}  # every prediction within the tie band
    assert cm.ranked(2, work, costs)[0].layout == (1, 1, 2)
    # Within 1% the larger Ulysses degree goes first, then the smaller ring degree; beyond it the faster.
    near = [cm.Prediction((2, 1, 4), 100.0), cm.Prediction((1, 2, 4), 100.4), cm.Prediction((1, 1, 8), 100.9)]
    assert cm.fastest(near).layout == (1, 1, 8)
    assert cm.fastest(near[1:2] + near[:1]).layout == (2, 1, 4)  # same Ulysses degree: the smaller ring
    assert cm.fastest([cm.Prediction((2, 1, 4), 100.0), cm.Prediction((1, 1, 8), 101.5)]).layout == (2, 1, 4)


def test_uneven_cfg_split_is_paced_by_the_busier_rank():
    two, one = cm.predict(ltx_video(6144, B2), (1, 1, 1)), cm.predict(ltx_video(6144, B1), (1, 1, 1))
    assert cm.predict(ltx_video(6144, B3), (2, 1, 1)).ms == pytest.approx(two.ms, rel=0.01)
    assert cm.predict(ltx_video(6144, B2), (2, 1, 1)).ms == pytest.approx(one.ms, rel=0.01)


def test_stg_sharing_follows_the_branch_placement():
    """Branch j runs on cfg rank j % cfg; the perturbed row skips blocks 0..27 only in a forward that holds cond."""
    shared = 28 / 48
    work = ltx2(6144, L2, stg=28)
    assert cm.block_rows(work, 1) == pytest.approx([4 - shared])
    assert cm.block_rows(work, 2) == pytest.approx([2 - shared, 2])  # (cond, perturbed), (uncond, isolated)
    assert cm.block_rows(work, 3) == [2, 1, 1]  # (cond, isolated), (uncond,), (perturbed,): no pair
    assert cm.block_rows(work, 4) == [1, 1, 1, 1]
    assert cm.block_rows(ltx2(6144, L2, stg=28, batched=False), 1) == [4]  # one forward per branch
    assert cm.block_rows(ltx2(6144, L2), 2) == [2, 2]  # no first STG block: full rows (LTX-Video)
    assert cm.block_rows(ltx2(6144, ("uncond", "perturbed"), stg=28), 1) == [2]  # no cond to share with


def test_stg_sharing_changes_each_ranks_work():
    """The prediction follows the rows: with cfg 2 the rank of uncond + isolated becomes the slower one (without the
    sharing cond + perturbed, two cross-modal rows, set the pace) and costs what those two branches cost on one GPU;
    the exchanges of blocks before 28 carry one row fewer."""
    work, full = ltx2(6144, L2, stg=28), ltx2(6144, L2)
    rank0, rank1 = ltx2(6144, ("cond", "perturbed"), stg=28), ltx2(6144, ("uncond", "isolated"), stg=28)
    assert cm.predict(rank0, (1, 1, 1)).ms < cm.predict(rank1, (1, 1, 1)).ms
    assert cm.predict(work, (2, 1, 1)).ms == pytest.approx(cm.predict(rank1, (1, 1, 1)).ms, rel=0.01)
    assert cm.predict(work, (2, 1, 1)).ms < cm.predict(full, (2, 1, 1)).ms
    assert cm.predict(full, (2, 1, 1)).ms == pytest.approx(cm.predict(ltx2(6144, ("cond", "perturbed")), (1, 1, 1)).ms,
                                                           rel=0.01)
    assert cm.predict(work, (4, 1, 1)).ms == pytest.approx(cm.predict(full, (4, 1, 1)).ms)  # nothing shared
    one, before = cm.predict(work, (1, 1, 1)).ms, cm.predict(full, (1, 1, 1)).ms
    assert one / before == pytest.approx(cm.step_flops(work) / cm.step_flops(full), rel=0.02)
    assert cm.step_flops(work) / cm.step_flops(full) == pytest.approx(0.852, abs=0.002)  # per-block work x 3.42 / 4
    shared, unshared = cm.exchange_bytes(work, (1, 1, 2)), cm.exchange_bytes(full, (1, 1, 2))
    assert shared["ulysses_all_to_all"] / unshared["ulysses_all_to_all"] == pytest.approx((4 * 48 - 28) / (4 * 48))
    # cross-modal rows (isolated runs none): 2 in blocks 0..27, 3 from 28 on, against 3 in every block
    assert shared["v2a_merge"] / unshared["v2a_merge"] == pytest.approx((2 * 28 + 3 * 20) / (3 * 48))


def test_the_familys_workload_names_the_first_stg_block():
    """LTX-2 with perturbable weights and LTX-Video: the request's first STG block (clamped to the tiny model's 2
    blocks); no STG branch: None."""
    from usp_infer.families import resolve

    no_stg = {"stg_scale": "0", "audio_stg_scale": "0"}
    for folder, flags, expected in (("ltx2-tiny", {}, 1), ("ltx2-tiny", no_stg, None),
                                    ("ltx-tiny", {"stg_scale": "1", "stg_blocks": "1"}, 1),
                                    ("ltx-tiny", {"stg_scale": "0"}, None)):
        family, configs = resolve(ROOT / "models" / folder)
        front = family.requests()
        request = front.build_request({"prompt": "a fox", "height": 64, "width": 96, "num_frames": 9, **flags}, configs)
        work = front.workload(request, configs)
        assert work.stg_first_block == expected, (folder, flags)
        assert front.workload(request, configs, compiled=True).stg_first_block == expected  # compiled blocks too
        assert ("perturbed" in work.branches) == (expected is not None)


def test_ltx2_workload_follows_the_weights_and_the_clip_length():
    """LTX-2.0-style weights (no perturbable attention) run no STG row, as the pipeline runs them; the audio stream
    is 25 tokens a second of the clip; a Ulysses degree must divide the audio heads as well as the video heads."""
    from usp_infer.ltx2 import request as front

    configs = {"transformer": {"num_layers": 48, "num_attention_heads": 32, "audio_num_attention_heads": 24,
                               "cross_attn_mod": True, "perturbed_attn": True},
               "audio_vae": {"sample_rate": 16000, "mel_hop_length": 160}}
    request = front.build_request({"prompt": "x", "num_frames": 121, "fps": 24}, configs)
    work = front.workload(request, configs)
    assert work.branches == L2 and work.audio.tokens == 126  # round(121 / 24 * 25)
    assert front.attention_heads(configs) == 8
    configs["transformer"]["perturbed_attn"] = False
    work = front.workload(request, configs)
    assert "perturbed" not in work.branches and work.stg_first_block is None


def test_ltx_video_workload_has_the_first_steps_branches():
    """A guidance schedule: the layout is chosen for the first step's branches (sigma 1), here cond alone."""
    from usp_infer.ltx_video import request as front

    configs = front.read_model_configs(ROOT / "models" / "ltx-tiny")
    request = front.build_request({"prompt": "x", "height": 64, "width": 96, "num_frames": 9, "guidance_scale": "1,6",
                                   "guidance_timesteps": "1.0,0.5"}, configs)
    assert front.workload(request, configs).branches == ("cond",)


def test_memory_per_rank_against_the_one_gpu_records():
    """LTX-2.3 bf16 (18.99 B parameters): 37.70 GiB eager at 6,144 tokens (the calibration) and 44.32 at 24,576
    (2026-12-01 records, not fitted); sharding the tokens only shrinks the activations."""
    weights = 18.988838144e9 * 2
    assert cm.memory_gib(ltx2(6144, B4), (1, 1, 1), weights) == pytest.approx(37.70, abs=0.1)
    assert cm.memory_gib(ltx2(24576, B4), (1, 1, 1), weights) == pytest.approx(44.32, rel=0.02)
    assert cm.memory_gib(ltx2(24576, B4), (1, 1, 4), weights) < cm.memory_gib(ltx2(24576, B4), (1, 1, 2), weights)
    act = lambda layout: cm.memory_gib(ltx2(24576, B4), layout, weights) - weights / 2**30  # noqa: E731
    assert act((2, 1, 1)) == pytest.approx(act((1, 1, 1)) / 2)  # a cfg split halves each rank's rows
    assert act((1, 2, 1)) == pytest.approx(act((1, 1, 2))) == pytest.approx(act((1, 1, 1)) / 2)  # ring as Ulysses


def test_ring_transfer_time_follows_its_bytes():
    """The ring's exposed k/v time is the bytes exchange_bytes counts (checked against real collectives below)
    over the P2P rate, for every ring step."""
    costs = cm.load_costs()
    for layout in ((1, 2, 1), (1, 4, 1), (1, 2, 2)):
        w = ltx2(24576, B4)
        sent = cm.exchange_bytes(w, layout)["ring_p2p"]
        want = sent / (costs["ring_p2p_gbps"]["value"] * 1e6) * (1 - costs["ring_p2p_overlap"]["value"])
        assert cm.predict(w, layout).parts["ring_exposed"] == pytest.approx(want, rel=2e-2), layout


def test_the_perturbed_row_shares_the_cond_forward_only_on_its_rank():
    from usp_infer.parallel.plan import stg_shares_forward

    assert stg_shares_forward(L2, 1) and stg_shares_forward(L2, 2)  # rows 0 and 2: cfg rank 0 of 1 or 2
    assert not stg_shares_forward(L2, 4) and not stg_shares_forward(B3, 2)  # each its own rank
    assert not stg_shares_forward(L2, 1, "sequential") and not stg_shares_forward(B2, 1)


def test_every_constant_says_where_it_came_from():
    data = json.loads((ROOT / "usp_infer" / "parallel" / "costs.json").read_text())
    sets = [data["shared"], *data["sets"].values()]
    for constants in sets:
        for name, c in constants.items():
            if name != "about":  # the set's own note
                assert set(c) == {"value", "source"} and len(c["source"]) > 20, name
    assert set(data["sets"]["current"]) == set(data["sets"]["2026-11-28"])  # both sets carry every constant


def test_the_validation_table_reproduces():
    """bench/validate_costmodel.py over the committed 2026-11-28 records: the error costs.json states, and the
    measured fastest layout in every launch group."""
    v = _validator()
    rows, worst = v.validate(v.load_rows())
    assert len(rows) == 96
    assert worst <= cm.load_costs()["validation_max_error"]["value"] + 1e-3
    assert all(measured == predicted for _, measured, predicted in v.winners(rows))


BYTE_LAYOUTS = [(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1), (4, 1, 1)]
BYTE_SHAPES = [("ltx-tiny", 3), ("ltx2-tiny", 4)]  # 64x96x17: 18 video tokens, which 4 ranks split with pads


def _count_collectives() -> tuple[dict, callable]:
    """Wrap the collectives the exchanges use; count each call's payload (own chunk included) as
    costmodel.exchange_bytes defines it. The video->audio merge's all-reduces are the >= 3-d ones (the
    guidance statistics and the finite check reduce 1-d and 2-d tensors)."""
    sent = {"ulysses_all_to_all": 0, "ring_p2p": 0, "cfg_gather": 0, "v2a_merge": 0}
    real = {name: getattr(dist, name) for name in ("all_to_all_single", "batch_isend_irecv", "all_gather", "all_reduce")}

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    def all_to_all_single(out, x, *a, **k):
        sent["ulysses_all_to_all"] += nbytes(x)
        return real["all_to_all_single"](out, x, *a, **k)

    def batch_isend_irecv(ops):
        sent["ring_p2p"] += sum(nbytes(op.tensor) for op in ops if op.op is dist.isend)
        return real["batch_isend_irecv"](ops)

    def all_gather(outs, x, *a, **k):
        sent["cfg_gather"] += nbytes(x)
        return real["all_gather"](outs, x, *a, **k)

    def all_reduce(t, *a, **k):
        sent["v2a_merge"] += nbytes(t) if t.ndim >= 3 else 0
        return real["all_reduce"](t, *a, **k)

    for name, fn in (("all_to_all_single", all_to_all_single), ("batch_isend_irecv", batch_isend_irecv),
                     ("all_gather", all_gather), ("all_reduce", all_reduce)):
        setattr(dist, name, fn)
    return sent, lambda: [setattr(dist, name, fn) for name, fn in real.items()]


def _shares_stg_blocks() -> bool:
    """Whether this checkout's LTX-2 transformer computes a perturbed row only from the first STG block on when it
    shares a forward with cond (forward's stg_source): the model's bytes must then count the same."""
    import inspect

    from usp_infer.ltx2.model import LTX2Transformer

    return "stg_source" in inspect.signature(LTX2Transformer.forward).parameters


def _bytes_job() -> dict:
    """One real step of each tiny family's bench workload per layout (the plan, USP attention, ring, the cfg
    gather, the video->audio merge as generate runs them); rank 0's payload per collective."""
    from usp_infer import bench
    from usp_infer.config import ParallelConfig
    from usp_infer.parallel.dist import init_mesh
    from usp_infer.parallel.plan import Plan

    found = {}
    for shape, branches in BYTE_SHAPES:
        s = bench.Setup(shape, 64, 96, 17, branches, "batched", 1, 1, torch.device("cpu"), torch.float32)
        family = bench._workload(s)
        model = family.random_model(s.cfg, s.device, s.dtype, 0, bench.randomize)
        for layout in BYTE_LAYOUTS:
            step, _ = family.make_step(model, s, Plan(init_mesh(ParallelConfig(*layout), "cpu")), None)
            sent, restore = _count_collectives()
            try:
                with torch.no_grad():
                    step()
            finally:
                restore()
            found[shape, layout] = sent
    return found


def test_exchange_bytes_are_what_the_collectives_carry():
    """The model's bytes (all-to-all, ring k/v, cfg gather, video->audio merge) against a real step on 4 gloo
    ranks, every layout, both families, a token count with pads."""
    found = run_spawn(_bytes_job, 4)[0]
    v = _validator()
    for (shape, layout), sent in found.items():
        branches = dict(BYTE_SHAPES)[shape]
        work = v.shape_workload(shape, 64, 96, 17, branches, dtype_bytes=4, stg_shared=_shares_stg_blocks())
        want = cm.exchange_bytes(work, layout)
        assert sent == want, (shape, layout)
        assert any(sent.values()) or layout == (1, 1, 1)


# --- the chooser at the edge: flags, odd worlds through a family's request, info, a torchrun run -------------

def _cli(*args):
    from typer.testing import CliRunner

    from usp_infer.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


FAST = ["--height", "64", "--width", "96", "--num-frames", "9", "--steps", "2", "--max-sequence-length", "16"]


@pytest.mark.parametrize("flags, needle", [
    (["--layout", "2x2"], "--layout '2x2' is neither auto nor CxRxU"),
    (["--layout", "1x1x2", "--ulysses-degree", "2"], "--layout 1x1x2 and degree flags both name the layout"),
])
def test_layout_flag_errors(flags, needle, tmp_path):
    result = _cli("generate", "--prompt", "a fox", *FAST, "-o", tmp_path / "v.npz", *flags)
    assert result.exit_code == 2 and needle in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("folder, world, expected", [
    ("ltx-tiny", 3, (1, 3, 1)),  # 4 heads, 2 branches: neither Ulysses 3 nor cfg 3 fits; ring takes any degree
    ("ltx2-tiny", 3, (3, 1, 1)),  # 4 branches over 3 cfg ranks (2 + 1 + 1): host-bound tiny work, fewest collectives
])
def test_auto_layout_for_an_odd_world_through_the_familys_request(folder, world, expected):
    from usp_infer.config import ParallelConfig
    from usp_infer.families import resolve
    from usp_infer.parallel.dist import choose_parallel, validate_layout

    family, configs = resolve(ROOT / "models" / folder)
    front = family.requests()
    request = front.build_request({"prompt": "a fox", "height": 64, "width": 96, "num_frames": 9}, configs)
    chosen = choose_parallel(ParallelConfig(auto=True), world, front.workload(request, configs))
    assert (chosen.cfg, chosen.ring, chosen.ulysses) == expected and chosen.choice["chosen"] == list(expected)
    validate_layout(chosen, world, front.attention_heads(configs))
    assert choose_parallel(ParallelConfig(ulysses=2), 2, None) == ParallelConfig(ulysses=2)  # explicit: untouched


def test_info_lists_every_layout_with_predictions():
    result = _cli("info", ROOT / "models" / "ltx2-tiny", "--gpus", "4", "--height", "512", "--width", "768",
                  "--num-frames", "121", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    layouts = {(x["cfg"], x["ring"], x["ulysses"]) for x in summary["layouts"]}
    assert layouts == {(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1), (4, 1, 1)}  # cfg-parallel ones too
    assert all(x["predicted_ms_per_step"] > 0 and x["predicted_gib_per_rank"] >= 0 for x in summary["layouts"])
    assert "predicted" in summary["predictions"] and "6144 video tokens" in summary["predictions"]
    text = _cli("info", ROOT / "models" / "ltx2-tiny", "--gpus", "4").stdout
    assert "ms/step" in text and "(predicted)" in text


def test_auto_layout_under_torchrun_is_said_and_recorded(tmp_path):
    """Two gloo processes, no degree flag: rank 0 says the choice once, the sidecar records it and the runner-up."""
    import os
    import subprocess
    import sys

    out = tmp_path / "fox.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "usp_infer",
                          "generate", "--model", str(ROOT / "models" / "ltx-tiny"), "--prompt", "a fox", *FAST,
                          "-o", str(out)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.count("layout auto: cfg 2 x ring 1 x ulysses 1") == 1, run.stderr[-2000:]
    parallel = json.loads(out.with_name(out.name + ".json").read_text())["parallel"]
    assert (parallel["cfg"], parallel["ring"], parallel["ulysses"]) == (2, 1, 1)
    choice = parallel["layout_choice"]
    assert choice["mode"] == "auto" and choice["chosen"] == [2, 1, 1] and choice["runner_up"] == [1, 1, 2]
    assert choice["runner_up_ms_per_step"] >= choice["predicted_ms_per_step"]


PROFILES = ROOT / "bench" / "results" / "2026-11-28-h200x4" / "profiles"


def _profile_ms(name: str) -> dict[str, float]:
    """A committed rank-0 profile (torch.profiler's table): Self CUDA ms per row name, and "total"."""
    found = {}
    for line in (PROFILES / name).read_text().splitlines():
        cells = [c for c in line.strip().split("  ") if c.strip()]
        if line.startswith("Self CUDA time total:"):
            found["total"] = float(line.split(":")[1].strip().removesuffix("ms"))
        elif len(cells) == 11 and cells[6].strip().endswith("s") and cells[6].strip()[0].isdigit():
            text = cells[6].strip()
            found[cells[0].strip()] = float(text[:-2]) / (1000 if text.endswith("us") else 1)
    return found


def test_the_exchange_is_on_the_critical_path():
    """The code waits for each Ulysses exchange at once, so the model counts the whole NCCL kernel time of the
    rank-0 profiles (13B, 6,144 tokens, 3 branches; 33.1 ms at 2 ranks, 30.1 at 4). The profiles leave no room for
    more: each one's kernels sum to its step less 3-7 ms of gaps, at 1, 2 and 4 GPUs alike, where hiding 63% of the
    exchange at 4 ranks (the overlap bench --comm-share suggested) would need 19 ms of idle gaps. --comm-share agrees
    at 2 ranks (step - step with local copies + the copies); at 4 it reads 11 ms, its local-copy step (251.6 ms)
    slower than the profile's compute (224 ms of kernels) + copies: costs.json's all_to_all_overlap says why."""
    v = _validator()
    costs = cm.load_costs("2026-11-28")
    rows = {}  # the first eager, direct, one-chunk Ulysses row of each run and degree
    for r in v.load_rows():
        if (r["tokens"] == 6144 and r["ring"] == r["cfg"] == 1 and not r["compiled"] and r["a2a_mode"] == "direct"
                and r.get("overlap_chunks", 1) == 1):
            rows.setdefault((r["run"], r["ulysses"]), r)
    one_gpu = json.loads((ROOT / "bench/results/2026-11-28-h200x4/run2-final/13b-6144-w1.json").read_text())
    steps = {("run2-final", 1): next(r["ms_per_step"] for r in one_gpu
                                     if r["implementation"] == "usp-infer" and not r["compiled"])}
    steps |= {key: r["ms_per_step"] for key, r in rows.items()}
    nccl = "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)"
    for name, run, u in (("run2-13b-6144-w1-eager-rank0.txt", "run2-final", 1),
                         ("run2-13b-6144-w2-u2-eager-rank0.txt", "run2-final", 2),
                         ("run2-13b-6144-w4-u4-eager-rank0.txt", "run2-final", 4),
                         ("run3-13b-6144-w4-u4-eager-rank0.txt", "run3-ulysses", 4)):
        kernels = _profile_ms(name)
        assert 3.0 < steps[run, u] - kernels["total"] < 7.0, name  # every kernel on the critical path
        if u > 1:
            work = v.record_workload(rows[run, u])
            assert cm.predict(work, (1, 1, u), costs).parts["all_to_all"] == pytest.approx(kernels[nccl], rel=0.1)
    r = rows["run3-ulysses", 2]
    work = v.record_workload(r)
    copies = cm.exchange_bytes(work, (1, 1, 2))["ulysses_all_to_all"] * 2 / (costs["copy_tbps"]["value"] * 1e9)
    exposed = r["ms_per_step"] - r["ms_per_step_local_exchange"] + copies
    assert cm.predict(work, (1, 1, 2), costs).parts["all_to_all"] == pytest.approx(exposed, rel=0.15)
