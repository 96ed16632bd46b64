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
            "sequential": replace(BASE, branches="sequential")}
CASES = {  # world -> (case id, (cfg, ring, ulysses), a2a mode, request)
    2: [("u2", (1, 1, 2), "direct", "full"), ("u2-functional", (1, 1, 2), "functional", "full"),
        ("r2", (1, 2, 1), "direct", "full"), ("cfg2", (2, 1, 1), "direct", "full"),
        ("u2-i2v", (1, 1, 2), "direct", "full-i2v")],
    4: [("u4", (1, 1, 4), "direct", "full"), ("u4-functional", (1, 1, 4), "functional", "full"),
        ("u2r2", (1, 2, 2), "direct", "full"), ("cfg2u2", (2, 1, 2), "direct", "full"),
        ("cfg4", (4, 1, 1), "direct", "full"), ("cfg2u2-seq", (2, 1, 2), "direct", "sequential"),
        ("u4-i2v", (1, 1, 4), "direct", "full-i2v"), ("u2r2-i2v", (1, 2, 2), "direct", "full-i2v")],
}


@lru_cache(maxsize=1)
def _components():
    return load_components(MODEL, "cpu", torch.float32)


def _generate(request: LTX2Request, parallel: ParallelConfig) -> dict | None:
    plan = Plan.build(parallel, "cpu")  # one default process group serves every case of a job
    result = generate(_components(), request, plan, progress=False)
    return {"frames": result.frames, "audio": result.audio} if plan.is_main else None


def _job(world: int) -> dict:
    torch.set_num_threads(1)
    return {case: _generate(REQUESTS[name], ParallelConfig(*layout, a2a_mode=mode, timeout_s=120))
            for case, layout, mode, name in CASES[world]}


@lru_cache(maxsize=None)
def _reference(name: str) -> dict:
    return _generate(REQUESTS[name], ParallelConfig())


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def spawned(request: pytest.FixtureRequest) -> tuple[int, dict]:
    return request.param, run_spawn(_job, request.param, request.param)[0]


def test_every_layout_equals_one_process(spawned: tuple[int, dict]) -> None:
    world, results = spawned
    errors = {}
    for case, _, _, name in CASES[world]:
        ref = _reference(name)
        errors[case] = (_rel(results[case]["frames"], ref["frames"]), _rel(results[case]["audio"], ref["audio"]))
    bad = {case: err for case, err in errors.items() if max(err) > RTOL}
    assert not bad, f"world {world}: (frames, audio) relative error above {RTOL}: {bad}"


def test_a2a_modes_bitwise_equal(spawned: tuple[int, dict]) -> None:
    world, results = spawned
    direct, functional = results[f"u{world}"], results[f"u{world}-functional"]
    assert np.array_equal(direct["frames"], functional["frames"])
    assert np.array_equal(direct["audio"], functional["audio"])


def test_the_comparison_is_not_vacuous() -> None:
    """The image and the guidance really change both outputs, so equal outputs mean equal computations."""
    full, i2v = _reference("full"), _reference("full-i2v")
    plain = _generate(replace(BASE, guidance=LTX2Guidance(ModalityGuidance(), ModalityGuidance(), ())),
                      ParallelConfig())
    for other in (i2v, plain):
        assert _rel(other["frames"], full["frames"]) > 1e-3 and _rel(other["audio"], full["audio"]) > 1e-3
