"""The command line's conditioning: --condition, --extend, --audio PATH, in generate and batch lines, the
sidecar's record of every input (with its sha256), and the bad inputs: one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import cli, error_line, snapshot

from usp_infer.media import read_video, write_audio, write_video

ROOT = Path(__file__).resolve().parents[1]
LTX2 = ROOT / "models" / "ltx2-tiny"
FAST = ["--model", LTX2, "--height", "64", "--width", "64", "--num-frames", "17", "--steps", "2",
        "--max-sequence-length", "16", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)).save(root / "wide.png")
    (root / "broken.png").write_bytes(b"not an image")
    t = np.arange(22050) / 22050
    write_audio(root / "voice.wav", (0.5 * np.sin(2 * np.pi * 300 * t))[None].astype(np.float32), 22050)
    write_audio(root / "short.wav", np.full((1, 2205), 0.5, np.float32), 22050)
    write_audio(root / "silent.wav", np.zeros((1, 22050), np.float32), 22050)
    tone = (0.4 * np.sin(2 * np.pi * 440 * np.arange(21000) / 24000))[None].astype(np.float32)
    write_video(root / "clip.mp4", rng.random((21, 64, 64, 3)).astype(np.float32), fps=24.0, audio=tone,
                audio_sample_rate=24000)
    write_video(root / "mute.mp4", rng.random((9, 64, 64, 3)).astype(np.float32), fps=24.0)
    write_video(root / "eight.mp4", rng.random((8, 64, 64, 3)).astype(np.float32), fps=24.0)
    write_video(root / "fast.mp4", rng.random((9, 64, 64, 3)).astype(np.float32), fps=30.0)
    return root


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_conditions_and_audio_are_recorded_with_sha256(files, tmp_path):
    out = tmp_path / "k.mp4"
    result = cli("generate", "--prompt", "x", *FAST[:-1], "--condition", f"{files / 'a.png'}@0",  # not --quiet
                 "--condition", f"{files / 'wide.png'}@-1:0.8", "--audio", files / "voice.wav", "-o", out)
    assert result.exit_code == 0, result.output
    assert "wide.png is 96x48; it is resized to cover 64x64 and center-cropped" in result.stderr
    side = json.loads((tmp_path / "k.mp4.json").read_text())
    assert side["request"]["conditions"] == [{"path": str(files / "a.png"), "frame": 0, "strength": 1.0},
                                             {"path": str(files / "wide.png"), "frame": -1, "strength": 0.8}]
    assert side["inputs"] == [
        {"role": "condition", "path": str(files / "a.png"), "sha256": sha(files / "a.png"), "latent_frame": 0},
        {"role": "condition", "path": str(files / "wide.png"), "sha256": sha(files / "wide.png"), "latent_frame": 2},
        {"role": "audio", "path": str(files / "voice.wav"), "sha256": sha(files / "voice.wav")},
    ]


def test_batch_lines_take_conditions_extend_and_audio(files, tmp_path):
    lines = [{"prompt": "one", "conditions": [{"path": str(files / "a.png"), "frame": 8, "strength": 0.5}],
              "output": str(tmp_path / "one.npz")},
             {"prompt": "two", "extend": str(files / "clip.mp4"), "extend_frames": 9, "output": str(tmp_path / "two.npz")},
             {"prompt": "three", "audio": str(files / "voice.wav"), "output": str(tmp_path / "three.npz")}]
    batch = tmp_path / "b.jsonl"
    batch.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = cli("batch", batch, *FAST[:-1], "--quiet")
    assert result.exit_code == 0, result.output
    two = json.loads((tmp_path / "two.npz.json").read_text())
    assert two["inputs"] == [{"role": "extend", "path": str(files / "clip.mp4"), "sha256": sha(files / "clip.mp4")}]
    assert np.load(tmp_path / "two.npz")["frames"].shape[0] == 21 + 17 - 9
    assert json.loads((tmp_path / "one.npz.json").read_text())["inputs"][0]["latent_frame"] == 1


@pytest.mark.parametrize("stages", [[], ["--two-stage"]], ids=["one-stage", "two-stage"])
def test_extend_output_starts_with_the_clip_and_its_sound_continues(files, tmp_path, stages):
    out = tmp_path / "e.npz"
    result = cli("generate", "--prompt", "more", *FAST, "--extend", files / "clip.mp4", "--extend-frames", "9",
                 *stages, "-o", out)
    assert result.exit_code == 0, result.output
    got = np.load(out)
    clip, _ = read_video(files / "clip.mp4")
    frames = got["frames"]
    assert frames.shape[0] == 21 + 17 - 9
    assert np.array_equal(np.round(frames[:21] * 255).astype(np.uint8), clip)  # copied: bit-exact
    rate, audio = int(got["audio_sample_rate"]), got["audio"]
    clip_part = round(21 / 24 * rate)
    tone = 0.4 * np.sin(2 * np.pi * 440 * np.arange(clip_part) / rate)
    # the clip's own sound first (AAC-coded there, resampled from 24 kHz): the tone, within codec error
    assert np.sqrt(np.mean((audio[0, 2048:clip_part - 2048] - tone[2048:-2048]) ** 2)) < 0.05
    new = audio[:, clip_part:]  # then the generated sound, with no silent gap at the join
    assert new.shape[1] > 0.9 * (17 - 9) / 24 * rate and np.abs(new[:, :rate // 100]).max() > 0
    # the new sound is the segment's from 9/24 s on: at most its 8 frames' worth (the causal audio VAE decodes
    # a few ms short), so the clip's sound was cut to the clip and nothing is inserted or repeated at the join
    segment = round((17 - 9) / 24 * rate)
    assert segment - rate // 50 <= new.shape[1] <= segment
    assert np.sqrt(np.mean(new[:, rate // 50:rate // 25] ** 2)) > 0.01  # sound, not padding, right after the join


@pytest.mark.parametrize("stages", [[], ["--two-stage"]], ids=["one-stage", "two-stage"])
def test_extend_generates_what_the_clip_as_a_condition_generates(files, tmp_path, stages):
    """An extension is its clip's last K frames as a condition at frame 0, strength 1, in every stage: with a
    clip of exactly K frames, the new frames equal those of `--condition clip@0` (whose path equals diffusers'
    LTX2ConditionPipeline and its two-stage chain, tests/test_conditions_ltx2.py)."""
    outs = {}
    for name, args in (("extend", ["--extend", files / "mute.mp4", "--extend-frames", "9"]),
                       ("condition", ["--condition", f"{files / 'mute.mp4'}@0"])):
        outs[name] = tmp_path / f"{name}.npz"
        result = cli("generate", "--prompt", "more", *FAST, *args, *stages, "-o", outs[name])
        assert result.exit_code == 0, result.output
    extend, condition = (np.load(outs[name])["frames"] for name in ("extend", "condition"))
    assert extend.shape == condition.shape == (17, 64, 64, 3)
    np.testing.assert_array_equal(extend[9:], condition[9:])
    assert "audio" not in np.load(outs["extend"]).files  # a clip without sound gives a silent output


def test_extend_takes_the_clip_s_frame_rate_and_runs_without_audio(files, tmp_path):
    """A 30 fps clip gives a 30 fps extension (fps left out); --no-audio with --extend writes frames alone."""
    out = tmp_path / "fast.mp4"
    result = cli("generate", "--prompt", "more", *FAST, "--extend", files / "fast.mp4", "--extend-frames", "9", "-o", out)
    assert result.exit_code == 0, result.output
    assert read_video(out)[1] == 30.0 and json.loads((tmp_path / "fast.mp4.json").read_text())["request"]["fps"] == 30.0
    quiet = tmp_path / "quiet.npz"
    result = cli("generate", "--prompt", "more", *FAST, "--extend", files / "clip.mp4", "--extend-frames", "9",
                 "--no-audio", "-o", quiet)
    assert result.exit_code == 0, result.output
    got = np.load(quiet)
    assert got["frames"].shape[0] == 21 + 17 - 9 and "audio" not in got.files


def test_a_condition_of_another_aspect_ratio_is_said(files):
    """The warning compares the condition's height/width with the output's, not with its inverse."""
    from usp_infer.ltx2.conditions import Condition, check_files
    from usp_infer.ltx2.request import LTX2Request

    def warnings(name: str, height: int, width: int) -> list[str]:
        return check_files(LTX2Request(prompt="x", height=height, width=width, num_frames=17,
                                       conditions=(Condition(str(files / name), 0),)))

    assert warnings("wide.png", 64, 128) == []  # 96x48 onto 128x64: the same shape
    assert warnings("a.png", 64, 128) == [f"--condition {files / 'a.png'} is 64x64; it is resized to cover 128x64 "
                                          "and center-cropped, as --image"]


@pytest.mark.parametrize("extra,message", [
    (["--condition", "{f}/a.png@17"], "FRAME is outside the video's 17 frames"),
    (["--condition", "{f}/a.png@-18"], "FRAME is outside the video's 17 frames"),
    (["--condition", "{f}/a.png@0:1.2"], r"STRENGTH must be in [0, 1]"),
    (["--condition", "{f}/a.png"], "is not PATH@FRAME[:STRENGTH]"),
    (["--condition", "{f}/broken.png@0"], "--condition {f}/broken.png"),
    (["--condition", "{f}/missing.png@0"], "--condition {f}/missing.png does not exist"),
    (["--condition", "{f}/a.png@0", "--image", "{f}/a.png"], "pass the image as --condition PATH@0"),
    (["--audio", "{f}/short.wav"], "lasts 0.100 s but the video lasts 0.708 s"),
    (["--audio", "{f}/silent.wav"], "is silent"),
    (["--audio", "{f}/broken.png"], "broken.png has no audio stream"),
    (["--audio", "{f}/mute.mp4"], "--audio {f}/mute.mp4 has no audio stream"),
    (["--audio", "{f}/voice.wav", "--no-audio"], "with --no-audio"),
    (["--extend", "{f}/clip.mp4", "--extend-frames", "10"], "--extend-frames 10 must be of the form 8k+1"),
    (["--extend", "{f}/mute.mp4", "--extend-frames", "17"], "has 9 frames, fewer than --extend-frames 17"),
    (["--extend", "{f}/eight.mp4", "--extend-frames", "9"], "has 8 frames, fewer than --extend-frames 9"),
    (["--extend", "{f}/clip.mp4", "--extend-frames", "9", "--image", "{f}/a.png"], "pass the image as --condition PATH@0"),
    (["--extend", "{f}/clip.mp4", "--width", "96"], "--width 96 differs from the --extend clip's 64"),
    (["--extend", "{f}/clip.mp4", "--extend-frames", "9", "--audio", "{f}/voice.wav"], "--extend with --audio"),
    (["--extend", "{f}/clip.mp4"], "--extend-frames 17 must be of the form 8k+1 and below --num-frames 17 (the new "
                                   "frames are the rest); e.g. 9"),
    (["--extend", "{f}/broken.png"], "cannot be read as a video"),
    (["--condition", "{f}/a.png@0", "--two-stage", "--width", "96"], "--width 96 is not a multiple of 64"),
])
def test_bad_inputs_fail_in_one_line_before_anything_is_written(files, tmp_path, extra, message):
    before = snapshot(tmp_path)
    args = [a.replace("{f}", str(files)) for a in extra]
    result = cli("generate", "--prompt", "x", *FAST, *args, "-o", tmp_path / "never.mp4")
    assert result.exit_code == 2, result.output
    assert message.replace("{f}", str(files)) in error_line(result.stderr)
    assert snapshot(tmp_path) == before


def test_extend_conditions_the_segment_on_the_clip_s_last_frames(files):
    from usp_infer.ltx2.conditions import Condition, sources
    from usp_infer.ltx2.request import LTX2Request

    req = LTX2Request(prompt="x", height=64, width=64, num_frames=17, extend=str(files / "clip.mp4"), extend_frames=9,
                      conditions=(Condition(str(files / "a.png"), -1, 0.5),))
    (clip, frame, strength), (image, *rest) = sources(req)
    assert np.array_equal(clip, read_video(files / "clip.mp4")[0][-9:]) and (frame, strength) == (0, 1.0)
    assert image.shape == (1, 64, 64, 3) and rest == [-1, 0.5]
