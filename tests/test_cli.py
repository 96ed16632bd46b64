"""The command line end to end: every bad input, batch runs, sidecars, info, help, --quiet/--json, examples.

Most cases run in-process through typer's CliRunner (stdout and stderr apart, no start-up cost); a few run
`python -m usp_infer` for real, to see exactly what a user's terminal gets. Every size is the smallest the
tiny model takes, so the whole file stays within seconds of start-up time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

import usp_infer
from usp_infer.cli import app
from usp_infer.ltx_video import pipeline

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "ltx-tiny"
IMAGE = ROOT / "tests" / "data" / "first_frame.png"
# 64x96 pixels, 9 frames -> 2 latent frames of 2x3 tokens; 2 steps; 16 text tokens: a run takes ~0.2 s.
FAST = ["--height", "64", "--width", "96", "--num-frames", "9", "--steps", "2", "--max-sequence-length", "16"]


def cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    # Anything but SystemExit would have been a traceback in a terminal.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under root (hidden ones too), with size and mtime: 'nothing written' compares these."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def model_copy(tmp: Path) -> Path:
    shutil.copytree(MODEL, tmp / "model")
    return tmp / "model"


def error_line(stderr: str) -> str:
    """Our errors are exactly one line, starting 'error:'."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# --- bad input: exit code, one line naming the value and the fix, nothing written -----------------


def _no_weights(tmp: Path) -> list:
    model = model_copy(tmp)
    (model / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    return ["--model", model]


def _truncated(tmp: Path) -> list:
    model = model_copy(tmp)
    path = model / "transformer" / "diffusion_pytorch_model.safetensors"
    os.truncate(path, path.stat().st_size // 2)  # a download cut off half way
    return ["--model", model]


def _garbled_header(tmp: Path) -> list:
    model = model_copy(tmp)
    path = model / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00" * 32  # the JSON header right after its 8-byte length
    path.write_bytes(bytes(data))
    return ["--model", model]


def _configs_disagree(tmp: Path) -> list:
    model = model_copy(tmp)
    path = model / "vae" / "config.json"
    config = json.loads(path.read_text())
    config["latent_channels"] = 16  # the transformer has 8 in/out channels
    path.write_text(json.dumps(config))
    return ["--model", model]


def _edited(component: str, **changes):
    """A copy of the model whose component config.json has `changes`."""
    def make(tmp: Path) -> list:
        model = model_copy(tmp)
        path = model / component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return ["--model", model]
    return make


def _no_tokenizer(tmp: Path) -> list:
    model = model_copy(tmp)
    shutil.rmtree(model / "tokenizer")
    return ["--model", model]


def _not_an_image(tmp: Path) -> list:
    (tmp / "notes.png").write_text("not pixels")
    return ["--image", "notes.png"]


def _parent_is_file(tmp: Path) -> list:
    (tmp / "file.txt").write_text("x")
    return ["-o", tmp / "file.txt" / "out.mp4"]


def _output_exists(tmp: Path) -> list:
    (tmp / "old.mp4").write_bytes(b"an earlier video")
    return ["-o", "old.mp4"]


def _other_family(tmp: Path) -> list:
    model = model_copy(tmp)
    path = model / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["_class_name"] = "WanTransformer3DModel"  # as Wan's folders name it; it has no caption_channels
    del config["caption_channels"]
    path.write_text(json.dumps(config))
    return ["--model", model]


BAD_INPUTS = {
    # id: (make the situation -> extra args, exit code, what stderr must name)
    "model-missing": (lambda t: ["--model", t / "nope"], 2, ["--model", "nope", "is not a directory", "diffusers-format"]),
    "no-transformer-weights": (_no_weights, 2, ["model/transformer holds no *.safetensors"]),
    "truncated-safetensors": (_truncated, 1, ["transformer/diffusion_pytorch_model.safetensors is truncated or corrupted", "copy or download it again"]),
    "corrupted-safetensors": (_garbled_header, 1, ["vae/diffusion_pytorch_model.safetensors is truncated or corrupted"]),
    "configs-disagree": (_configs_disagree, 2, ["configs disagree", "vae latent_channels 16 vs transformer in_channels 8", "matching checkpoint"]),
    "out-channels-disagree": (_edited("transformer", out_channels=16), 2, ["configs disagree", "in_channels 8 / out_channels 16"]),
    "caption-channels-disagree": (_edited("text_encoder", d_model=64), 2, ["configs disagree", "text_encoder d_model 64 vs transformer caption_channels 48"]),
    "temporal-patch": (_edited("transformer", patch_size_t=2), 2, ["transformer patch sizes other than 1 are not supported"]),
    "no-tokenizer": (_no_tokenizer, 2, ["has no tokenizer/ folder", "diffusers-format LTX pipeline"]),
    "stg-block-out-of-range": (lambda t: ["--stg-scale", "1", "--stg-blocks", "2"], 2, ["--stg-blocks 2 is out of range: the model has 2 blocks (0..1)"]),
    "image-missing": (lambda t: ["--image", "nope.png"], 2, ["--image nope.png does not exist", "PNG or JPEG"]),
    "image-not-an-image": (_not_an_image, 2, ["--image notes.png is not a readable PNG or JPEG image"]),
    "frames-not-8k+1": (lambda t: ["--num-frames", "10"], 2, ["--num-frames 10 is not of the form 8k+1; try 9"]),
    "height-not-32x": (lambda t: ["--height", "100"], 2, ["--height 100 is not a positive multiple of 32; try 96"]),
    "width-not-32x": (lambda t: ["--width", "50"], 2, ["--width 50 is not a positive multiple of 32; try 64"]),
    "steps-zero": (lambda t: ["--steps", "0"], 2, ["--steps 0 must be at least 1"]),
    "steps-negative": (lambda t: ["--steps", "-3"], 2, ["--steps -3 must be at least 1"]),
    "scale-nan": (lambda t: ["--guidance-scale", "nan"], 2, ["--guidance-scale nan is invalid; use a finite value >= 0"]),
    "scale-inf": (lambda t: ["--stg-scale", "inf"], 2, ["--stg-scale inf is invalid; use a finite value >= 0"]),
    "scale-negative": (lambda t: ["--guidance-scale", "-1"], 2, ["--guidance-scale -1.0 is invalid; use a finite value >= 0"]),
    "rescale-negative": (lambda t: ["--guidance-rescale", "-0.5"], 2, ["--guidance-rescale -0.5 is invalid"]),
    "ulysses-not-dividing-heads": (lambda t: ["--ulysses-degree", "3"], 2, ["--ulysses-degree 3 does not divide 4 attention heads; use one of 1, 2, 4"]),
    "degrees-not-world-size": (lambda t: ["--ulysses-degree", "2"], 2, ["ulysses 2 = 2 but the world size is 1", "no degree flags"]),
    "output-dir-not-creatable": (_parent_is_file, 2, ["cannot create output directory", "file.txt is a file", "choose another output path"]),
    "output-exists": (_output_exists, 2, ["old.mp4 exists; pass --overwrite to replace it"]),
    "output-kind": (lambda t: ["-o", "out.avi"], 2, ["unsupported output 'out.avi'", ".mp4"]),
    # /proc passes os.access for root and refuses only an actual write: caught before the generation, path named.
    "output-unwritable": (lambda t: ["-o", "/proc/a.mp4"], 2, ["output directory /proc is not writable", "choose another output path"]),
    "other-family": (_other_family, 2, ["holds a WanTransformer3DModel transformer", "names an LTX-Video pipeline", "LTX-Video 0.9.x (LTXVideoTransformer3DModel)"]),
    "max-sequence-length-too-long": (lambda t: ["--max-sequence-length", "100000"], 2, ["--max-sequence-length 100000 is longer than the tokenizer", "(128); use at most 128"]),
    **({} if torch.cuda.is_available() else {
        "device-cuda-without-cuda": (lambda t: ["--device", "cuda"], 2, ["--device cuda: this torch is a CPU-only build", "use --device cpu or auto"]),
    }),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_one_line_right_code_nothing_written(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make, code, needles = BAD_INPUTS[case]
    extra = make(tmp_path)
    before = snapshot(tmp_path)
    result = cli("generate", "--prompt", "a fox", *FAST, "-o", tmp_path / "out" / "video.mp4", *extra)
    assert result.exit_code == code, result.output
    line = error_line(result.stderr)
    for needle in needles:
        assert needle in line
    assert result.stdout == ""
    assert snapshot(tmp_path) == before  # no output, no sidecar, no temp file, no directory


@pytest.mark.parametrize("world, flags, needles", [
    # A degree flag opts out of --layout auto (which finds a layout for any world: tests/test_costmodel.py).
    (3, ["--cfg-parallel", "1"], ["3 processes leave Ulysses 3 by default, which does not divide 4 attention heads",
             "pass --ring-degree 3, or --cfg-degree 3"]),
    (6, ["--ring-degree", "2"], ["6 processes / (cfg 1 x ring 2) leave Ulysses 3 by default", "--ring-degree 3 --ulysses-degree 2"]),
])
def test_default_layout_that_does_not_fit_names_its_cause(world, flags, needles, tmp_path, monkeypatch):
    """`torchrun --nproc_per_node 3` with no flags: no "--ulysses-degree 3" the user never gave; what fits instead."""
    monkeypatch.setenv("WORLD_SIZE", str(world))  # the check runs before any process group: one process stands in
    result = cli("generate", "--prompt", "a fox", *FAST, "-o", tmp_path / "v.mp4", *flags)
    assert result.exit_code == 2
    line = error_line(result.stderr)
    assert "--ulysses-degree 3" not in line and all(n in line for n in needles), line
    assert list(tmp_path.iterdir()) == []


def test_usage_error_under_torchrun_is_each_ranks_exit_2_and_torchruns_root_cause(tmp_path, monkeypatch):
    """torchrun prints its own report and exits 1 when a worker fails (nothing a worker does silences that):
    every rank exits 2, rank 0 prints the one line and leaves it in torchrun's error file, so the report's
    root cause reads `traceback : error: ...`; the other ranks wait for rank 0, quietly."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    result = cli("generate", "--prompt", "a fox", *FAST, "--ulysses-degree", "4", "-o", tmp_path / "v.mp4")
    assert result.exit_code == 2
    assert json.loads((tmp_path / "error.json").read_text())["message"] == error_line(result.stderr)
    slept = []
    monkeypatch.setattr("time.sleep", slept.append)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error-1.json"))
    other = cli("generate", "--prompt", "a fox", *FAST, "--ulysses-degree", "4", "-o", tmp_path / "v.mp4")
    assert other.exit_code == 2 and other.stderr == "" and slept and not (tmp_path / "error-1.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error.json"]


def test_one_step_makes_a_video(tmp_path):
    """One step used to give NaN latents (the terminal stretch divides by zero); now it is the Euler step 1 -> 0."""
    from usp_infer.schedule import sigma_schedule

    config = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    timesteps, sigmas = sigma_schedule(config, 1, 6)
    assert timesteps.tolist() == [1000.0] and sigmas.tolist() == [1.0, 0.0]
    result = cli("generate", "--prompt", "a fox", *FAST, "--steps", "1", "-o", tmp_path / "one.npz")
    assert result.exit_code == 0, result.output
    frames = np.load(tmp_path / "one.npz")["frames"]
    assert np.isfinite(frames).all() and frames.std() > 0


@pytest.mark.parametrize("model", ["ltx-tiny", "ltx2-tiny"])
def test_pixel_outputs_get_uint8_frames_from_the_decode(model, tmp_path, monkeypatch):
    """An mp4 or png output has the decode convert to uint8 where the video is (a quarter of the bytes to the
    host), an npz keeps the floats; the writer gets exactly the pixels it would have made of the floats."""
    from usp_infer import media

    asked, written = [], {}
    real_frames, real_write = media.video_frames, media.write_video
    monkeypatch.setattr(media, "video_frames", lambda video, uint8=False: asked.append(uint8) or real_frames(video, uint8))
    monkeypatch.setattr(media, "write_video", lambda path, frames, **kw: written.setdefault(Path(path).name, frames)
                        is not None and real_write(path, frames, **kw))
    for name in ("v.mp4", "v.npz", "frames"):
        result = cli("generate", "--model", model, "--prompt", "a fox", *FAST, "--width", "64", "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
    assert asked == [True, False, True]
    pixels = np.stack(list(media._to_uint8(np.load(tmp_path / "v.npz")["frames"])))
    assert written["v.mp4"].dtype == written["frames"].dtype == np.uint8
    np.testing.assert_array_equal(written["v.mp4"], pixels)
    np.testing.assert_array_equal(written["frames"], pixels)


def test_make_tiny_into_a_used_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = cli("make-tiny", tmp_path)
    assert result.exit_code == 2
    assert f"{tmp_path} exists and is not an empty directory; remove it or pick another path" in error_line(result.stderr)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_bench_refuses_a_shape_the_cpu_cannot_hold(monkeypatch):
    from usp_infer import bench

    monkeypatch.setattr(bench, "_available_memory", lambda: 16 * 2**30)  # a 16 GiB machine, wherever this runs
    result = cli("bench", "--device", "cpu")
    assert result.exit_code == 2
    assert "--shape ltx-video-13b on the CPU needs 24.3 GiB of bfloat16 weights" in error_line(result.stderr)
    assert "use --shape ltx-tiny" in result.stderr


def test_empty_prompt_warns_and_tilde_expands(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = cli("generate", "--prompt", " ", *FAST, "-o", "~/a.mp4")
    assert result.exit_code == 0, result.output
    assert "warning: the prompt is empty; the video will follow no text" in result.stderr
    assert (tmp_path / "a.mp4").is_file() and not (tmp_path / "~").exists()
    quiet = cli("generate", "--prompt", "", *FAST, "-o", "~/b.mp4", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; the file-as-parent case covers root")
def test_output_dir_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    result = cli("generate", "--prompt", "a fox", *FAST, "-o", locked / "video.mp4")
    assert result.exit_code == 2
    assert f"output directory {locked} is not writable" in error_line(result.stderr)
    assert list(locked.iterdir()) == []


def test_framework_usage_error_for_unparsable_value(tmp_path):
    result = cli("generate", "--prompt", "a fox", "--height", "abc", "-o", tmp_path / "v.mp4")
    assert result.exit_code == 2
    assert "Invalid value for '--height'" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


BAD_BATCHES = {
    "invalid-json": ('{"prompt": "a"}\n{"prompt": "b",\n', "line 2 of prompts.jsonl is not valid JSON"),
    "not-an-object": ('["a fox"]\n', 'line 1 of prompts.jsonl needs a "prompt" string'),
    "unknown-key": ('{"prompt": "a"}\n\n{"prompt": "b", "stepz": 3}\n', "line 3 of prompts.jsonl has unknown keys ['stepz']"),
    "bad-value": ('{"prompt": "a"}\n{"prompt": "b", "num_frames": 10}\n', "line 2 of prompts.jsonl: --num-frames 10 is not of the form 8k+1"),
    "missing-image": ('{"prompt": "a"}\n{"prompt": "b", "image": "gone.png"}\n', "line 2 of prompts.jsonl: --image gone.png does not exist"),
    "same-output": ('{"prompt": "a", "output": "x.mp4"}\n{"prompt": "b", "output": "x.mp4"}\n', "two items write the same output"),
    "empty": ("\n\n", "batch file prompts.jsonl has no items"),
}


@pytest.mark.parametrize("case", BAD_BATCHES, ids=list(BAD_BATCHES))
def test_malformed_batch_names_the_line(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text, needle = BAD_BATCHES[case]
    Path("prompts.jsonl").write_text(text)
    before = snapshot(tmp_path)
    result = cli("batch", "prompts.jsonl", *FAST, "--output-dir", "out")
    assert result.exit_code == 2
    assert needle in error_line(result.stderr)
    assert snapshot(tmp_path) == before


def test_missing_batch_file(tmp_path):
    result = cli("batch", tmp_path / "nope.jsonl", *FAST)
    assert result.exit_code == 2
    assert "nope.jsonl cannot be read" in error_line(result.stderr)


def test_real_process_one_line_and_debug_traceback(tmp_path):
    """What a terminal shows: one line and the exit code; --debug adds the traceback."""
    model = _truncated(tmp_path)[1]

    def run(*extra):
        cmd = [sys.executable, "-m", "usp_infer", "generate", "--prompt", "a fox", *FAST, "-o", str(tmp_path / "v.mp4"), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    usage = run("--num-frames", "10")
    assert usage.returncode == 2 and usage.stdout == ""
    assert error_line(usage.stderr) == "error: --num-frames 10 is not of the form 8k+1; try 9"
    broken = run("--model", str(model))
    assert broken.returncode == 1 and "truncated or corrupted" in error_line(broken.stderr)
    debug = run("--model", str(model), "--debug")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert not (tmp_path / "v.mp4").exists() and not list(tmp_path.glob(".*"))


# --- batch -------------------------------------------------------------------------------------


@pytest.fixture
def count_loads(monkeypatch):
    loads = []
    real = pipeline.load_components

    def counting(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_components", counting)
    return loads


def test_batch_loads_once_names_overrides_resume(tmp_path, monkeypatch, count_loads):
    monkeypatch.chdir(tmp_path)
    Path("prompts.jsonl").write_text(
        '{"prompt": "A red Fox, in snow!", "seed": 5}\n'
        "\n"  # blank lines are allowed and still counted in line numbers
        '{"prompt": "waves", "steps": 3, "num_frames": 17, "guidance_scale": 4.5, "negative_prompt": "blurry"}\n'
        f'{{"prompt": "from an image", "image": "{IMAGE}", "output": "custom/one.npz"}}\n'
    )
    result = cli("batch", "prompts.jsonl", *FAST, "--output-dir", "out")
    assert result.exit_code == 0, result.output
    assert count_loads == [MODEL]  # three items, one load
    names = ["out/0000-a-red-fox-in-snow-s5.mp4", "out/0001-waves-s0.mp4", "custom/one.npz"]
    for name in names:
        assert Path(name).is_file() and Path(name + ".json").is_file()
    assert "line 3 of prompts.jsonl" in result.stderr
    # Progress a user can follow: what happens around each step bar, and which item of how many.
    for said in ("loading ", "item 1/3: line 1 of prompts.jsonl", "item 2/3: encoding text", "item 3/3: decoding", "item 3/3: writing custom/one.npz"):
        assert said in result.stderr, said
    assert result.stderr.strip().endswith("done: 3 ran, 0 skipped, 0 failed")
    first, second, third = (json.loads(Path(n + ".json").read_text())["request"] for n in names)
    assert (first["seed"], first["steps"], first["num_frames"], first["guidance"]["cfg"]) == (5, 2, 9, [3.0])
    assert (second["steps"], second["num_frames"], second["guidance"]["cfg"], second["negative_prompt"]) == (3, 17, [4.5], "blurry")
    assert third["image"] == str(IMAGE)
    assert np.load("custom/one.npz")["frames"].shape == (9, 64, 96, 3)

    before = snapshot(tmp_path)
    again = cli("batch", "prompts.jsonl", *FAST, "--output-dir", "out", "--resume")
    assert again.exit_code == 0 and again.stderr.strip() == "done: 0 ran, 3 skipped, 0 failed"
    assert count_loads == [MODEL]  # nothing to do: nothing loaded
    assert snapshot(tmp_path) == before

    # A sidecar whose output was deleted, or whose output is not the file it describes (a crash before the
    # data reached the disk leaves an empty file): ours and unfinished, so it is redone.
    Path(names[1]).unlink()
    Path(names[0]).write_bytes(b"")
    redo = cli("batch", "prompts.jsonl", *FAST, "--output-dir", "out", "--resume")
    assert redo.exit_code == 0 and redo.stderr.strip().endswith("done: 2 ran, 1 skipped, 0 failed")
    assert all(Path(n).stat().st_size > 0 and Path(n + ".json").is_file() for n in names)
    assert Path(names[2]).stat().st_mtime_ns == before[names[2]][1]
    side = json.loads(Path(names[0] + ".json").read_text())
    assert side["output_size"] == Path(names[0]).stat().st_size
    assert side["output_sha256"] == hashlib.sha256(Path(names[0]).read_bytes()).hexdigest()
    # One byte changed in place (same size, same sidecar): not the file the sidecar describes, so redone; and
    # --resume --overwrite still skips what is finished.
    data = bytearray(Path(names[0]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(names[0]).write_bytes(bytes(data))
    flipped = cli("batch", "prompts.jsonl", *FAST, "--output-dir", "out", "--resume", "--overwrite")
    assert flipped.exit_code == 0 and flipped.stderr.strip().endswith("done: 1 ran, 2 skipped, 0 failed")
    other_model = model_copy(tmp_path / "elsewhere")
    config = other_model / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"num_layers": 2', '"num_layers": 2, "_note": "retrained"'))
    before = snapshot(tmp_path)

    # A finished output made with other settings is not silently kept (nor replaced) by --resume:
    # another request, dtype or model (its configs) than the sidecar records.
    # The refusal names the setting and both values (line 1 sets its own seed, so line 3 is the one refused).
    for flags, what in ((["--seed", "9"], "(seed 0 -> 9)"), (["--steps", "3"], "(steps 2 -> 3)"),
                        (["--dtype", "bfloat16"], '(dtype "float32" -> "bfloat16")'),
                        (["--model", str(other_model)], "(model config ")):
        changed = cli("batch", "prompts.jsonl", *FAST, "--output-dir", "out", "--resume", *flags)
        assert changed.exit_code == 2 and f"was made with other settings than this line asks for {what}" in error_line(changed.stderr)
    without = cli("batch", "prompts.jsonl", *FAST, "--output-dir", "out")
    assert without.exit_code == 2 and "pass --overwrite to replace it, or --resume" in error_line(without.stderr)
    assert snapshot(tmp_path) == before
    # As the refusal says: --overwrite (with --resume) redoes the item made with other settings, and only it
    # (line 1 sets its own seed and stays; line 2's name holds the seed: a new file)
    redone = cli("batch", "prompts.jsonl", *FAST, "--output-dir", "out", "--resume", "--overwrite", "--seed", "9")
    assert redone.exit_code == 0 and redone.stderr.strip().endswith("done: 2 ran, 1 skipped, 0 failed")
    assert snapshot(tmp_path)[names[0]] == before[names[0]] and Path("out/0001-waves-s9.mp4").is_file()
    assert json.loads(Path(names[2] + ".json").read_text())["request"]["seed"] == 9
    before = snapshot(tmp_path)

    # A file at an item's path without our sidecar is the user's: --resume never replaces it.
    Path(names[2] + ".json").unlink()
    mine = cli("batch", "prompts.jsonl", *FAST, "--output-dir", "out", "--resume")
    assert mine.exit_code == 2
    assert error_line(mine.stderr) == (
        f"error: line 4 of prompts.jsonl: {names[2]} exists but has no usp-infer sidecar, so this run did not write it; "
        "pass --overwrite to replace it, or give the line another 'output'"
    )
    assert Path(names[2]).stat().st_mtime_ns == before[names[2]][1]


# A scale of 1e300 passes validation (finite, >= 0) but overflows float32 at the first step: the honest
# stand-in for an item that diverges at run time, which only shows once the item runs.
DIVERGING = '{"prompt": "too much", "guidance_scale": 1e300}'


@pytest.mark.parametrize("keep_going", [True, False])
def test_batch_failed_item(keep_going, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("prompts.jsonl").write_text(f'{{"prompt": "one"}}\n{DIVERGING}\n{{"prompt": "three"}}\n')
    flags = ["--keep-going"] if keep_going else []
    result = cli("batch", "prompts.jsonl", *FAST, "--output-dir", "out", *flags)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: line 2 of prompts.jsonl: non-finite values in the latents at step 1/2; try --dtype float32 or lower guidance scales"]
    made = sorted(p.name for p in Path("out").iterdir())
    if keep_going:
        assert made == ["0000-one-s0.mp4", "0000-one-s0.mp4.json", "0002-three-s0.mp4", "0002-three-s0.mp4.json"]
        assert result.stderr.strip().endswith("done: 2 ran, 0 skipped, 1 failed")
    else:
        assert made == ["0000-one-s0.mp4", "0000-one-s0.mp4.json"]


def test_json_summary_is_all_of_stdout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("prompts.jsonl").write_text(f'{{"prompt": "one"}}\n{DIVERGING}\n')
    result = cli("batch", "prompts.jsonl", *FAST, "--output-dir", "out", "--keep-going", "--json", "--quiet")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert (summary["ran"], summary["skipped"], summary["failed"]) == (1, 0, 1)
    assert summary["outputs"][0]["output"] == "out/0000-one-s0.mp4"
    assert summary["failures"][0]["item"] == "line 2 of prompts.jsonl"
    assert "non-finite" in summary["failures"][0]["error"]


def test_quiet_silences_progress(tmp_path):
    loud = cli("generate", "--prompt", "a fox", *FAST, "-o", tmp_path / "a.mp4")
    assert loud.exit_code == 0 and "step" in loud.stderr and "wrote" in loud.stderr
    # A fresh process (in this one an earlier test may have switched transformers' weight bar off already),
    # from a folder without models/: the bundled tiny model is named, not pathed.
    quiet = subprocess.run([sys.executable, "-m", "usp_infer", "generate", "--prompt", "a fox", *FAST, "--model", "ltx-tiny",
                            "-o", "b.mp4", "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})  # this checkout, wherever it is installed
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == "", quiet.stderr[-2000:]
    assert (tmp_path / "b.mp4").is_file()
    assert json.loads((tmp_path / "b.mp4.json").read_text())["model"]["path"] == str(MODEL)


# --- the sidecar --------------------------------------------------------------------------------


def test_sidecar_fields(tmp_path):
    out = tmp_path / "fox.mp4"
    result = cli("generate", "--prompt", "a fox", *FAST, "--seed", "11", "--stg-scale", "1", "--stg-blocks", "1",
                 "--guidance-rescale", "0.5", "--a2a-mode", "functional", "--dist-timeout", "77", "-o", out)
    assert result.exit_code == 0, result.output
    side = json.loads((tmp_path / "fox.mp4.json").read_text())
    req = side["request"]
    # Every resolved parameter, the ones given and the defaults alike.
    assert req["prompt"] == "a fox" and req["seed"] == side["seed"] == 11
    assert (req["height"], req["width"], req["num_frames"], req["steps"], req["max_sequence_length"]) == (64, 96, 9, 2, 16)
    assert (req["fps"], req["decode_timestep"], req["decode_noise_scale"], req["image"], req["branches"]) == (25.0, 0.05, 0.025, None, "batched")
    assert req["guidance"] == {"cfg": [3.0], "stg": [1.0], "rescale": [0.5], "stg_blocks": [[1]], "stg_mode": "values",
                               "cfg_star": False, "timesteps": []}
    assert side["model"]["path"] == str(MODEL) and len(side["model"]["config_sha256"]) == 16
    assert side["parallel"] == {"world_size": 1, "cfg": 1, "ring": 1, "ulysses": 1, "a2a_mode": "functional", "dist_timeout_s": 77.0,
                                "layout_choice": {"mode": "auto"}}  # no degree flag: --layout auto (one process: nothing to choose)
    assert (side["device"], side["dtype"], side["compiled"]) == ("cpu", "float32", False)
    t = side["timings"]
    assert len(t["step_s"]) == 2 and all(s > 0 for s in t["step_s"])
    assert t["total_s"] >= t["denoise_s"] + t["decode_s"] > 0 and t["model_load_s"] > 0
    assert abs(t["denoise_s"] - sum(t["step_s"])) <= 1e-3  # every step, not the longest
    assert side["peak_memory_gb"] > 0 and side["peak_memory_of"] == "process max RSS, whole run so far"
    assert side["versions"] == {"usp_infer": usp_infer.__version__, "torch": torch.__version__,
                                "diffusers": diffusers.__version__, "transformers": transformers.__version__}


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="Inductor's CPU code needs a C++ compiler")
def test_compile_gives_the_eager_result(tmp_path):
    """--compile runs torch.compile'd blocks (Inductor's C++ kernels on the CPU): same video, and the sidecar says so."""
    args = ["generate", "--prompt", "a fox", *FAST, "--stg-scale", "1", "--stg-blocks", "1", "--guidance-rescale", "0.5"]
    assert cli(*args, "-o", tmp_path / "eager.npz").exit_code == 0
    result = cli(*args, "--compile", "-o", tmp_path / "compiled.npz")
    assert result.exit_code == 0, result.output
    eager, compiled = np.load(tmp_path / "eager.npz"), np.load(tmp_path / "compiled.npz")
    # fp32: fused kernels round a few ulps apart (~1e-6); a wrong fusion or a skipped op moves the latents by >1e-2
    assert np.abs(compiled["latents"] - eager["latents"]).max() < 1e-4
    assert np.abs(compiled["frames"] - eager["frames"]).max() < 1e-4
    assert json.loads((tmp_path / "compiled.npz.json").read_text())["compiled"] is True


def test_cuda_graphs_on_the_cpu_says_it_does_nothing(tmp_path, monkeypatch):
    """--cuda-graphs where no graph can run: one note, the same output, and the sidecar says none ran. The flag
    does reach the loop: with the CPU stand-in of tests/test_graphs.py in place of real graphs, it is replayed."""
    from test_graphs import Replaying

    from usp_infer import graphs

    args = ["generate", "--prompt", "a fox", *FAST]
    assert cli(*args, "-o", tmp_path / "plain.npz").exit_code == 0
    result = cli(*args, "--cuda-graphs", "-o", tmp_path / "graphs.npz")
    assert result.exit_code == 0, result.output
    assert "note: --cuda-graphs does nothing on the CPU; the blocks run without graphs" in result.output
    assert np.array_equal(np.load(tmp_path / "plain.npz")["frames"], np.load(tmp_path / "graphs.npz")["frames"])
    assert json.loads((tmp_path / "graphs.npz.json").read_text())["cuda_graphs"] is False
    made = []
    monkeypatch.setattr(graphs, "for_stage", lambda run, plan, steps: made.append(graphs.GraphedCall(run, Replaying()))
                        or made[-1])
    assert cli(*args, "--cuda-graphs", "-o", tmp_path / "replayed.npz").exit_code == 0
    assert [c.captures for c in made] == [1]
    assert np.array_equal(np.load(tmp_path / "plain.npz")["frames"], np.load(tmp_path / "replayed.npz")["frames"])


def test_config_hash_follows_the_configs(tmp_path):
    model = model_copy(tmp_path)
    scheduler = model / "scheduler" / "scheduler_config.json"

    def run(name):
        assert cli("generate", "--prompt", "a", *FAST, "--model", model, "-o", tmp_path / name, "--quiet").exit_code == 0
        return json.loads((tmp_path / f"{name}.json").read_text())["model"]["config_sha256"]

    first, same = run("a.npz"), run("b.npz")
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "max_shift": 2.0}))
    second = run("c.npz")
    assert first == same != second
    index = model / "model_index.json"  # the folder's own top-level config counts too
    index.write_text(json.dumps({**json.loads(index.read_text()), "_note": "edited"}))
    assert run("d.npz") != second


# --- info and help ------------------------------------------------------------------------------


def test_info_text_and_json(tmp_path):
    text = cli("info", MODEL, "--gpus", "4")
    assert text.exit_code == 0
    assert "num_layers 2, num_attention_heads 4" in text.stdout and "8k+1" in text.stdout
    for flags in ("--ring-degree 1 --ulysses-degree 4", "--ring-degree 2 --ulysses-degree 2", "--ring-degree 4 --ulysses-degree 1"):
        assert f"--cfg-parallel 1 {flags}" in text.stdout
    data = json.loads(cli("info", "--gpus", "4", "--json").stdout)  # the default model
    assert data["model"] == str(MODEL) and data["transformer"]["num_attention_heads"] == 4
    layouts = lambda d: {(x["cfg"], x["ring"], x["ulysses"]) for x in d["layouts"]}  # noqa: E731  fastest first in the file
    assert layouts(data) == {(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1)}  # cfg up to the 3 branches
    assert all(n > 0 for n in data["parameters"].values())
    # 3 processes: Ulysses 3 does not divide 4 heads, so only ring 3 or cfg-parallel 3 (3 guidance branches) fit.
    assert layouts(json.loads(cli("info", "--gpus", "3", "--json").stdout)) == {(1, 3, 1), (3, 1, 1)}
    # Each layout says what one rank does (the default request: CFG's 2 branches); cfg-parallel 2 over 3 branches
    # is uneven and runs (one cfg group takes two), and says so.
    assert next(x for x in data["layouts"] if (x["cfg"], x["ring"], x["ulysses"]) == (2, 1, 2))["cost"].startswith(
        "~0.25 of one GPU's step per rank: 1 of 2 branches")
    from usp_infer.cli import layout_cost
    assert layout_cost(2, 1, 2, 3).startswith("~0.33 of one GPU's step per rank: 2 of 3 branches (uneven")
    assert cli("info", tmp_path / "nope").exit_code == 2
    assert cli("info", "--gpus", "0").exit_code == 2
    broken = cli("info", _truncated(tmp_path)[1])
    assert broken.exit_code == 1 and "truncated or corrupted" in error_line(broken.stderr)


@pytest.mark.parametrize("command", [[], ["generate"], ["batch"], ["info"], ["make-tiny"], ["bench"]])
def test_help_shows_examples_unwrapped(command):
    result = cli(*command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout
    examples = result.stdout.split("Examples:")[1].split("Options:")[0].split("Arguments:")[0]
    lines = [line.rstrip() for line in examples.splitlines() if line.strip()]
    assert any(line.strip().startswith(("usp-infer ", "torchrun ")) for line in lines)
    # Click rewraps plain paragraphs ("--num-" / "frames 9"); the examples must come through as written:
    # a flag starts a line only after a shell continuation, and no word is split at a hyphen.
    for previous, line in zip(lines, lines[1:]):
        assert not line.strip().startswith("--") or previous.endswith("\\"), line
    assert not any(line.endswith("-") for line in lines), lines


# What `--help` and a usage error import: torch alone takes 3-5 s to import, so neither may pull it in.
NO_TORCH = """
import atexit, sys
atexit.register(lambda: print(sorted({"torch", "diffusers", "transformers"} & set(sys.modules)), file=sys.stderr))
from usp_infer.cli import main
sys.argv = ["usp-infer", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["batch", "--help"], ["--version"],
                                  ["generate", "--prompt", "a", "--num-frames", "10"],
                                  ["generate", "--prompt", "a", "--model", "nope"], ["bench", "--help"],
                                  ["bench", "--bogus"], ["generate", "--steps", "many"]])
def test_help_and_usage_errors_do_not_import_torch(args):
    run = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode in (0, 2), run.stderr
    assert run.stderr.splitlines()[-1] == "[]", run.stderr  # the modules of the three that were imported
    if run.returncode == 2:  # click's own usage errors too: one line, `error: ...`, as every other error
        lines = run.stderr.splitlines()[:-1]
        assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr


def test_bench_shapes_listed_without_torch_are_bench_shapes():
    from usp_infer import bench, bench_cli

    assert bench_cli.SHAPES == tuple(bench.SHAPES)


# --- the example scripts -------------------------------------------------------------------------

EXAMPLES = {
    "generate_single.sh": ["fox.mp4", "fox.mp4.json", "fox.npz", "fox.summary.json"],
    "image_to_video.sh": ["i2v.mp4", "i2v.mp4.json"],
    "usp_4gpu.sh": ["fox_usp4.mp4", "fox_usp4.mp4.json"],
    "batch_resume.sh": ["0000-a-red-fox-running-through-fresh-snow-s1.mp4", "0003-the-scene-comes-alive-s4.mp4.json"],
    "a2a_compare.sh": ["a2a_direct.npz", "a2a_functional.npz"],
}


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs_as_is(script, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", f"examples/{script}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in EXAMPLES[script]:
        assert (tmp_path / name).is_file(), name
    if script == "batch_resume.sh":
        assert "done: 4 ran, 0 skipped, 0 failed" in run.stderr and "done: 0 ran, 4 skipped, 0 failed" in run.stderr
    if script == "a2a_compare.sh":
        assert "identical frames and latents" in run.stdout
    if script == "generate_single.sh":
        assert json.loads((tmp_path / "fox.summary.json").read_text())["ran"] == 1
