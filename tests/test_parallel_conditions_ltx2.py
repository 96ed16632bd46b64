"""Keyframes, --extend and --audio on every layout give the single-process video and audio (CPU, gloo, fp32).

One spawned job of 4 processes runs every case: U4, cfg2 x U2, R2 x U2 and cfg2 x R2 (so Ulysses 2 and 4,
ring 2 and cfg 2 all take part). Token counts divide neither 2 nor 4 and the appended keyframe sits on the
last rank: 96x96 at 25 frames is 4 latent frames of 3x3 = 36 grid tokens plus 9 keyframe tokens = 45
(4 ranks: 12, 12, 12, 9 -> the keyframe is all of rank 3's; 2 ranks: 23, 22); the extension and
audio-to-video cases have 27 tokens. Conditioned tokens, their strengths, clean latents and RoPE rows are
split by the same plan as the others; the given audio is on every rank.
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
from usp_infer.ltx2.conditions import Condition
from usp_infer.ltx2.pipeline import LTX2Guidance, LTX2Request, ModalityGuidance, generate, load_components
from usp_infer.media import write_audio, write_video
from usp_infer.parallel.plan import Plan
from usp_infer.parallel.sharding import SeqShard

MODEL = Path(__file__).resolve().parents[1] / "models" / "ltx2-tiny"
IMAGE = Path(__file__).resolve().parent / "data" / "first_frame.png"
RTOL = 1e-5  # as test_parallel_ltx2: a layout only reorders additions (~1e-7 each); a mis-split row moves 1e-2
BASE = LTX2Request(
    prompt="a fox", negative_prompt="blurry", height=96, width=96, num_frames=25, fps=20.0, steps=2, seed=5,
    max_sequence_length=16, image_crf=0,
    guidance=LTX2Guidance(ModalityGuidance(3.0, 1.0, 2.5, 0.7), ModalityGuidance(5.0, 0.5, 2.0, 0.5), (1,)),
)
LAYOUTS = {"u4": (1, 1, 4), "cfg2u2": (2, 1, 2), "r2u2": (1, 2, 2), "cfg2r2": (2, 2, 1)}


def _requests(root: Path) -> dict[str, LTX2Request]:
    return {"keyframes": replace(BASE, conditions=(Condition(str(IMAGE), 0, 1.0), Condition(str(IMAGE), -1, 0.8))),
            "extend": replace(BASE, num_frames=17, extend=str(root / "clip.mp4"), extend_frames=9),
            "audio": replace(BASE, num_frames=17, audio_input=str(root / "voice.wav"))}


@lru_cache(maxsize=1)
def _components():
    return load_components(MODEL, "cpu", torch.float32)


def _generate(request: LTX2Request, parallel: ParallelConfig) -> dict | None:
    plan = Plan.build(parallel, "cpu")
    result = generate(_components(), request, plan, progress=False)
    return {"frames": result.frames, "audio": result.audio} if plan.is_main else None


def _job(root: str) -> dict:
    torch.set_num_threads(1)
    requests = _requests(Path(root))
    return {(layout, name): _generate(req, ParallelConfig(*dims, timeout_s=120))
            for layout, dims in LAYOUTS.items() for name, req in requests.items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("par")
    rng = np.random.default_rng(0)
    tone = (0.5 * np.sin(2 * np.pi * 300 * np.arange(25200) / 24000))[None].astype(np.float32)
    write_video(root / "clip.mp4", rng.random((21, 96, 96, 3)).astype(np.float32), fps=20.0, audio=tone,
                audio_sample_rate=24000)
    write_audio(root / "voice.wav", tone, 24000)
    return root


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_every_layout_equals_one_process(root):
    results = run_spawn(_job, 4, str(root))[0]
    errors = {}
    for name, req in _requests(root).items():
        ref = _generate(req, ParallelConfig())
        for layout in LAYOUTS:
            got = results[layout, name]
            errors[layout, name] = (_rel(got["frames"], ref["frames"]), _rel(got["audio"], ref["audio"]))
    bad = {case: err for case, err in errors.items() if max(err) > RTOL}
    assert not bad, f"(frames, audio) relative error above {RTOL}: {bad}"


def test_the_keyframe_lands_on_the_last_rank():
    """The premise of the layout test: 45 tokens, the 9 appended ones all on the last of 4 ranks, and past the
    first rank's 23 of 2; neither count divides."""
    total, keyframe = 36 + 9, range(36, 45)
    for degree in (2, 4):
        shards = [SeqShard(total, degree, r, None if degree == 1 else object()) for r in range(degree)]
        owner = [next(s.rank for s in shards if s.start <= i < s.start + s.valid) for i in keyframe]
        assert set(owner) == {degree - 1} and total % degree
