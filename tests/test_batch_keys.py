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


def test_the_json_forms_each_key_has_pass():
    """What the flags' own parsers take from a line: a fractional frame rate, lists of LoRAs and of stage-2
    sigmas, conditions as objects or as the flag's PATH@FRAME text, a sound file's path."""
    good = {"fps": 23.976, "lora": ["a.safetensors:0.8", "b.safetensors"], "stage2_lora": ["c.safetensors"],
            "stage2_sigmas": [0.909375, 0.725, 0.421875], "sigmas": "1,0.5", "condition": ["a.png@0"],
            "conditions": ["a.png@0", {"path": "b.png", "frame": 8}], "audio": "voice.wav", "stg_blocks": [11, 25]}
    assert wrong_kinds(good) == []


def test_a_lines_json_values_build_what_the_flags_text_builds():
    """A batch line's number, list or number list reaches the request as the flag's text form does."""
    from usp_infer.ltx_video.request import request_from_flags
    from usp_infer.request import parse_blocks, parse_floats

    assert parse_floats("--stg-scale", [1, 2.5]) == parse_floats("--stg-scale", "1,2.5") == (1.0, 2.5)
    assert parse_floats("--guidance-scale", 3) == (3.0,)
    assert parse_blocks(19) == parse_blocks("19") == ((19,),)
    assert parse_blocks([11, 25]) == parse_blocks("11,25") == ((11, 25),)
    as_json = request_from_flags({"prompt": "x", "stg_scale": [1, 2], "guidance_timesteps": [1.0, 0.5],
                                  "stg_blocks": 1})
    as_text = request_from_flags({"prompt": "x", "stg_scale": "1,2", "guidance_timesteps": "1.0,0.5",
                                  "stg_blocks": "1"})
    assert as_json.guidance == as_text.guidance and as_json.guidance.stg_blocks == ((1,),)


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
