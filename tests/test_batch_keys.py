"""Every key of a batch line is checked for its kind on every line before anything loads; all bad lines
are named at once, each with the key, the value and what the key takes."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import FAST, cli, error_line

from usp_infer.batch_keys import KINDS, wrong_kinds
from usp_infer.request import ITEM_KEYS


def test_every_line_key_has_a_kind():
    assert set(KINDS) == ITEM_KEYS  # a new flag must say what a batch line may give it


@pytest.mark.parametrize("key, value", [("steps", 2.5), ("steps", "many"), ("seed", "abc"), ("num_frames", "17"),
                                        ("height", True), ("fps", "25"), ("guidance_scale", [3, "x"]),
                                        ("stg_blocks", [1.5]), ("prompt", 3), ("cfg_star", 1), ("audio", 1), ("two_stage", "yes"),
                                        ("lora", 0.8), ("conditions", {"path": "a.png"}), ("sigmas", [True])])
def test_wrong_kinds_are_named(key, value):
    (message,) = wrong_kinds({key: value})
    assert message.startswith(f'"{key}": ') and " is not " in message


def test_right_kinds_pass():
    good = {"steps": 3, "seed": 0, "fps": 24, "image_strength": 0.5, "guidance_scale": "1,1,6", "stg_scale": [1, 2.5],
            "stg_blocks": "11,25", "cfg_star": False, "prompt": "x", "image_crf": None}
    assert wrong_kinds(good) == []


def test_bad_lines_are_all_refused_before_anything_loads(tmp_path, monkeypatch):
    from usp_infer.ltx_video import pipeline

    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: pytest.fail("loaded before the check"))
    monkeypatch.chdir(tmp_path)
    Path("p.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "x", "steps": 2.5}\n'
                               '{"prompt": "y", "seed": "abc", "num_frames": "17"}\n{"prompt": "z"}\n')
    result = cli("batch", "p.jsonl", *FAST, "--output-dir", "out")
    assert result.exit_code == 2
    assert error_line(result.stderr) == (
        'error: line 2 of p.jsonl: "steps": 2.5 is not a whole number; '
        'line 3 of p.jsonl: "seed": "abc" is not a whole number, "num_frames": "17" is not a whole number')
    assert not Path("out").exists()
