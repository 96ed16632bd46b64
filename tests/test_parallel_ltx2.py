"""LTX-2 on every layout gives the single-process video AND audio (CPU, gloo, fp32).

The video tokens are sharded over the sequence group; audio and text are whole on every rank; the
video->audio attention merges every rank's part by log-sum-exp; guidance statistics are global.
One spawned job per world size runs all its cases and sends back rank 0's outputs; the
single-process references are computed here, in the test process.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_utils import run_spawn

from usp_infer.config import ParallelConfig
from usp_infer.ltx2.pipeline import (
    LTX2Guidance,
    LTX2Request,
    ModalityGuidance,
    generate,
    load_components,
)
from usp_infer.parallel.plan import Plan

MODEL = Path(__file__).resolve().parents[1] / "models" / "ltx2-tiny"
IMAGE = Path(__file__).resolve().parent / "data" / "first_frame.png"
# fp32: a layout changes only the order of additions (attention blocking, the log-sum-exp merges, the
# global sums behind rescale), ~1e-7 relative each; through 2 steps and both decoders that stays near
# 1e-6. A pad used as a key, a rank-local std or a mis-split RoPE table moves the output by 1e-2 or more.
RTOL = 1e-5

# 96x96 pixels, 17 frames: 3 latent frames of 3x3 = 27 video tokens, which neither 2 nor 4 ranks divide
# (4 ranks hold 7, 7, 7, 6); at 20 fps the audio is 21 tokens.
BASE = LTX2Request(
    prompt="a red fox barking in fresh snow", negative_prompt="blurry", height=96, width=96, num_frames=17,
    fps=20.0, steps=2, seed=5, max_sequence_length=16, image_crf=0,
    # every term on, video and audio scales apart; rescale makes a rank-local std visible
    guidance=LTX2Guidance(ModalityGuidance(3.0, 1.0, 2.5, 0.7), ModalityGuidance(5.0, 0.5, 2.0, 0.5), (1,)),
)
REQUESTS = {"full": BASE, "full-i2v": replace(BASE, image=str(IMAGE)),
            "sequential": replace(BASE, branches="sequential"),
            # modality scales 1: three branches (cond, uncond, perturbed), which cfg 2 does not divide
            "three": replace(BASE, guidance=LTX2Guidance(replace(BASE.guidance.video, modality=1.0),
                                                         replace(BASE.guidance.audio, modality=1.0), (1,)))}
CASES = {  # world -> (case id, (cfg, ring, ulysses), a2a mode, request)
    2: [("u2", (1, 1, 2), "direct", "full"), ("u2-functional", (1, 1, 2), "functional", "full"),
        ("r2", (1, 2, 1), "direct", "full"), ("cfg2", (2, 1, 1), "direct", "full"),
        ("u2-i2v", (1, 1, 2), "direct", "full-i2v"), ("cfg2-three", (2, 1, 1), "direct", "three")],
    4: [("u4", (1, 1, 4), "direct", "full"), ("u4-functional", (1, 1, 4), "functional", "full"),
        ("u2r2", (1, 2, 2), "direct", "full"), ("cfg2u2", (2, 1, 2), "direct", "full"),
        ("cfg4", (4, 1, 1), "direct", "full"), ("cfg2u2-seq", (2, 1, 2), "direct", "sequential"),
        ("u4-i2v", (1, 1, 4), "direct", "full-i2v"), ("u2r2-i2v", (1, 2, 2), "direct", "full-i2v"),
        ("cfg2u2-three", (2, 1, 2), "direct", "three")],
}


@lru_cache(maxsize=1)
def _components():
    return load_components(MODEL, "cpu", torch.float32)


class _Recording(Plan):
    """The plan, keeping what every rank holds after the last step (the loop's finite check sees it all)."""

    def check_finite(self, step, steps, *tensors):
        _LAST[:] = [t.detach().clone() for t in tensors]  # (this rank's video shard, the whole audio)
        super().check_finite(step, steps, *tensors)


_LAST: list = []


def _generate(request: LTX2Request, parallel: ParallelConfig) -> dict:
    plan = _Recording.build(parallel, "cpu")  # one default process group serves every case of a job
    result = generate(_components(), request, plan, progress=False)
    m = plan.mesh
    video, audio = _LAST
    mine = {"video": video.cpu(), "audio": audio.cpu(), "seq_rank": m.seq_rank}  # every rank's, to compare
    return {**mine, **({"frames": result.frames, "audio_out": result.audio} if plan.is_main else {})}


def _constant_branches(world: int) -> dict:
    """Plan.run_branches with each branch returning its own constants, for 1-5 branches on every cfg degree
    the world allows: {(cfg, branches): the names that came back with another branch's values}."""
    wrong = {}
    for cfg in (c for c in (2, 4) if world % c == 0):
        plan = Plan.build(ParallelConfig(cfg=cfg, ulysses=world // cfg, timeout_s=120), "cpu")
        for count in range(1, 6):
            names = tuple(f"b{i}" for i in range(count))
            value = {n: (torch.full((1, 3), i + 1.0), torch.full((1, 2), -(i + 1.0))) for i, n in enumerate(names)}
            got = plan.run_branches(names, lambda subset: [value[n] for n in subset], like=(torch.zeros(1, 3), torch.zeros(1, 2)))
            single = plan.run_branches(names, lambda subset: [value[n][0] for n in subset], like=torch.zeros(1, 3))
            wrong[cfg, count] = [n for n in names if set(got) != set(names) or not (
                torch.equal(got[n][0], value[n][0]) and torch.equal(got[n][1], value[n][1])
                and torch.equal(single[n], value[n][0]))]
    return wrong


def _job(world: int) -> dict:
    torch.set_num_threads(1)
    cases = {case: _generate(REQUESTS[name], ParallelConfig(*layout, a2a_mode=mode, timeout_s=120))
             for case, layout, mode, name in CASES[world]}
    return {**cases, "run_branches": _constant_branches(world)}


@lru_cache(maxsize=None)
def _reference(name: str) -> dict:
    return _generate(REQUESTS[name], ParallelConfig())


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def spawned_ranks(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    return request.param, run_spawn(_job, request.param, request.param)  # every rank's results


@pytest.fixture(scope="module")
def spawned(spawned_ranks) -> tuple[int, dict]:
    world, ranks = spawned_ranks
    return world, {case: r for case, r in ranks[0].items()}


def test_every_layout_equals_one_process(spawned: tuple[int, dict]) -> None:
    world, results = spawned
    errors = {}
    for case, _, _, name in CASES[world]:
        ref = _reference(name)
        errors[case] = (_rel(results[case]["frames"], ref["frames"]), _rel(results[case]["audio_out"], ref["audio_out"]))
    bad = {case: err for case, err in errors.items() if max(err) > RTOL}
    assert not bad, f"world {world}: (frames, audio) relative error above {RTOL}: {bad}"


def test_a2a_modes_bitwise_equal(spawned: tuple[int, dict]) -> None:
    world, results = spawned
    direct, functional = results[f"u{world}"], results[f"u{world}-functional"]
    assert np.array_equal(direct["frames"], functional["frames"])
    assert np.array_equal(direct["audio_out"], functional["audio_out"])


def test_the_comparison_is_not_vacuous() -> None:
    """The image and the guidance really change both outputs, so equal outputs mean equal computations."""
    full, i2v = _reference("full"), _reference("full-i2v")
    plain = _generate(replace(BASE, guidance=LTX2Guidance(ModalityGuidance(), ModalityGuidance(), ())),
                      ParallelConfig())
    for other in (i2v, plain, _reference("three")):
        assert _rel(other["frames"], full["frames"]) > 1e-3 and _rel(other["audio_out"], full["audio_out"]) > 1e-3


def test_every_rank_holds_the_same_audio_and_shards(spawned_ranks) -> None:
    """Audio is whole on every rank and must stay identical there (rank 0 decodes it, but every rank feeds it
    to the next step's attention); ranks holding the same video shard (cfg groups) hold it bit for bit."""
    world, ranks = spawned_ranks
    for case, *_ in CASES[world]:
        audio = [r[case]["audio"] for r in ranks]
        assert all(torch.equal(a, audio[0]) for a in audio), f"{case}: the audio differs between ranks"
        by_shard = {}
        for r in ranks:
            by_shard.setdefault(r[case]["seq_rank"], []).append(r[case]["video"])
        assert all(torch.equal(v, shards[0]) for shards in by_shard.values() for v in shards), f"{case}: video shards differ"


def test_run_branches_returns_each_branch_its_own_prediction(spawned_ranks) -> None:
    """1-5 branches on cfg 2 and 4: even and uneven splits, a rank with no branch at all (1 branch on cfg 4)."""
    world, ranks = spawned_ranks
    for r in ranks:
        wrong = {key: names for key, names in r["run_branches"].items() if names}
        assert not wrong, f"world {world}: (cfg, branches) -> branches that got another's prediction: {wrong}"
