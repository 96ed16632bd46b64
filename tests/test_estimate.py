"""Before a long CPU run, one line says what it is and roughly how long; short runs say nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import FAST, cli

from usp_infer.estimate import cpu_note, parameters
from usp_infer.ltx2 import request as ltx2_request
from usp_infer.ltx_video import request as ltx_video_request

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("front, model, expected", [
    (ltx_video_request, ROOT / "models" / "ltx-tiny", "704x480x121 = 5,280 video tokens x 40 steps x 2 branches"),
    (ltx2_request, ROOT / "models" / "ltx2-tiny", "768x512x121 = 6,144 video tokens x 30 steps x 4 branches"),
])
def test_the_defaults_on_the_cpu_get_a_note_and_a_small_run_none(front, model, expected):
    configs = front.read_model_configs(model)
    defaults = front.build_request({"prompt": "a fox"}, configs)
    note = cpu_note(model, configs, [defaults], front.MAX_BRANCHES)
    assert note.startswith(f"note: on the CPU {expected}: roughly ") and "--steps 4" in note
    longer = cpu_note(model, configs, [front.build_request({"prompt": "a fox", "num_frames": 1001}, configs)], 3)
    assert _minutes(longer) > 10 * _minutes(note)  # attention grows with the square of the tokens
    small = front.build_request({"prompt": "a fox", "height": 64, "width": 96, "num_frames": 9, "steps": 4}, configs)
    assert cpu_note(model, configs, [small], front.MAX_BRANCHES) is None


def _minutes(note: str) -> float:
    value, unit = note.split("roughly ")[1].split(" of denoising")[0].split()
    return float(value) / (60 if unit == "s" else 1)


def test_durations_read_in_their_unit():
    from usp_infer.estimate import _duration

    assert (_duration(75), _duration(89), _duration(90), _duration(120), _duration(3600)) == (
        "75 s", "89 s", "2 min", "2 min", "60 min")


def test_parameters_come_from_the_headers():
    from safetensors.torch import load_file

    folder = ROOT / "models" / "ltx-tiny" / "transformer"
    assert parameters(folder) == sum(t.numel() for t in load_file(next(folder.glob("*.safetensors"))).values())


def test_generate_says_it_before_loading(tmp_path, monkeypatch):
    from usp_infer.ltx_video import pipeline

    def stop(*args, **kwargs):
        raise RuntimeError("stopped here by the test")

    monkeypatch.setattr(pipeline, "encode_prompts", stop)
    result = cli("generate", "--prompt", "a fox", "--device", "cpu", "-o", tmp_path / "a.mp4")
    lines = result.stderr.splitlines()
    assert lines[0].startswith("note: on the CPU 704x480x121 = 5,280 video tokens x 40 steps") and lines[1].startswith("loading")
    quick = cli("generate", "--prompt", "a fox", *FAST, "--device", "cpu", "-o", tmp_path / "b.mp4")
    assert "note:" not in quick.stderr


@pytest.mark.parametrize("front, model, measured_s", [
    (ltx_video_request, ROOT / "models" / "ltx-tiny", 19.2),  # 40 steps of 2 branches (the module's docstring)
    (ltx2_request, ROOT / "models" / "ltx2-tiny", 36.0),  # 30 steps of 4 branches at 1.2 s a step
])
def test_the_figure_is_near_what_a_two_core_box_took(front, model, measured_s):
    configs = front.read_model_configs(model)
    note = cpu_note(model, configs, [front.build_request({"prompt": "a fox"}, configs)], front.MAX_BRANCHES)
    assert measured_s / 2 <= 60 * _minutes(note) <= measured_s * 2


def test_a_batch_note_counts_every_item_and_shows_the_first():
    model = ROOT / "models" / "ltx-tiny"
    configs = ltx_video_request.read_model_configs(model)
    big = ltx_video_request.build_request({"prompt": "a fox"}, configs)
    small = ltx_video_request.build_request({"prompt": "a fox", "height": 64, "width": 96, "num_frames": 9,
                                             "steps": 4}, configs)
    one = cpu_note(model, configs, [big], 3)
    both = cpu_note(model, configs, [big, small], 3)
    assert both.startswith("note: on the CPU 704x480x121 = 5,280 video tokens x 40 steps x 2 branches "
                           "(and 1 more item): roughly ")
    assert cpu_note(model, configs, [small, big], 3).startswith("note: on the CPU 96x64x9 = 12 video tokens")
    assert _minutes(cpu_note(model, configs, [big, big], 3)) == pytest.approx(2 * _minutes(one), abs=1 / 60)


def test_branches_are_the_first_steps():
    """LTX-2: the guidance's own list (the distilled recipe runs one); LTX-Video: the schedule's at sigma 1."""
    from usp_infer.estimate import branch_count

    configs = ltx2_request.read_model_configs(ROOT / "models" / "ltx2-tiny")
    distilled = ltx2_request.build_request({"prompt": "x", "preset": "ltx-2.3-distilled"}, configs)
    assert branch_count(distilled.guidance, ltx2_request.MAX_BRANCHES) == 1
    scheduled = ltx_video_request.request_from_flags({"prompt": "x", "guidance_scale": "1,6",
                                                       "guidance_timesteps": "1.0,0.5"})
    assert branch_count(scheduled.guidance, ltx_video_request.MAX_BRANCHES) == 1  # cfg 1 at sigma 1: cond alone
