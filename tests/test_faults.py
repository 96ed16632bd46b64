"""Faults: a killed or hung rank, Ctrl-C, non-finite latents, and a batch killed with SIGKILL then resumed.

The multi-process cases launch real `torchrun ... -m usp_infer` jobs on the CPU (gloo) and signal the
processes themselves, so what is tested is what a user's job does, start-up and all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from usp_infer import media
from usp_infer.cli import app
from usp_infer.ltx_video import pipeline

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--height", "64", "--width", "96", "--num-frames", "9", "--steps", "2", "--max-sequence-length", "16"]
# A run that would take minutes (3000 steps of 7 x 8 x 12 = 672 tokens) so that it is surely mid-loop when
# signalled; it never runs to the end.
LONG = ["--height", "256", "--width", "384", "--num-frames", "49", "--steps", "3000", "--max-sequence-length", "16"]
BOUND_S = 60  # the promise: every process gone within a minute of a rank's death
# Child processes import this checkout's usp_infer, wherever (or whether) the package is installed
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


class Job:
    """A process tree (torchrun or a single process) in its own session, stderr collected as it comes."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None):
        env = {**ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.err = b""
        self.workers: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self.err += chunk

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}):\n{self.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{self.stderr[-3000:]}"
            time.sleep(0.05)

    def _children(self) -> list[int]:
        pid = self.proc.pid
        return [int(c) for task in os.listdir(f"/proc/{pid}/task") for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]

    def ranks(self) -> dict[int, int]:
        """rank -> pid of torchrun's worker processes (read from their environment)."""
        found = {}
        for pid in self._children():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            found[int(next(e for e in env if e.startswith(b"RANK="))[5:])] = pid
        self.workers.update(found.values())
        return found

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def kill_all(self) -> None:
        """Leave nothing running, whatever the test did. torchrun starts each worker in a session of its own,
        so they are signalled one by one; a stopped one gets SIGCONT so that it can die of SIGKILL at once."""
        if self.proc.poll() is None:
            try:
                self.workers.update(self._children())
            except OSError:  # torchrun exited between the poll and the read
                pass
        for pid in self.workers:
            try:
                if b"usp_infer" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue  # gone, and the pid already reused by someone else's process
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it has exited and only waits for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "usp_infer", *args]


def torchrun_test_cli(nproc: int, *args: str) -> list[str]:
    """torchrun of tests/torchrun_cli.py: the CLI with the test-only twists its environment variables ask for."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            str(ROOT / "tests" / "torchrun_cli.py"), *args]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_rank_stops_every_process(victim, tmp_path):
    job = Job(torchrun(2, "generate", "--prompt", "a fox", *LONG, "--dist-timeout", "30", "-o", "out/fox.mp4"), tmp_path)
    try:
        job.wait_for("ms/step]")  # rank 0's progress bar: both ranks are inside the denoising loop
        pids = job.ranks()
        start = time.monotonic()
        os.kill(pids[victim], signal.SIGKILL)
        rc = job.wait(timeout=BOUND_S)
        assert time.monotonic() - start < BOUND_S
    finally:
        job.kill_all()
    assert rc != 0
    assert not any(alive(pid) for pid in pids.values())
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []  # no output, sidecar or temp file
    if victim == 1:  # rank 0 lives long enough to say what happened (unless torchrun's SIGTERM comes first)
        said = [line for line in job.stderr.splitlines() if line.startswith("error: ")]
        assert len(said) == 1, job.stderr[-3000:]
        lost = (said[0].startswith("error: rank 0: lost contact with another rank in a collective (")
                and said[0].count("lost contact") == 1 and said[0].endswith("--dist-timeout 30 s"))
        assert lost or said[0] == "error: interrupted; finished outputs are kept, the one in progress was discarded", said


def test_hung_rank_times_out_after_dist_timeout(tmp_path):
    """A rank that stops answering (SIGSTOP) is given up on after --dist-timeout, not the 10-minute default."""
    job = Job(torchrun(2, "generate", "--prompt", "a fox", *LONG, "--dist-timeout", "5", "-o", "out/fox.mp4"), tmp_path)
    try:
        job.wait_for("ms/step]")
        pids = job.ranks()
        start = time.monotonic()
        os.kill(pids[1], signal.SIGSTOP)
        while alive(pids[0]):
            assert time.monotonic() - start < 5 + 25, "rank 0 still waits well past --dist-timeout 5"
            time.sleep(0.1)
        job.wait_for("--dist-timeout 5 s", timeout=10)
    finally:
        job.kill_all()  # torchrun would SIGKILL the stopped rank only after a 30 s grace period
    said = [line for line in job.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and said[0].startswith("error: rank 0: lost contact with another rank") and "Timed out" in said[0], said
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_exits_130_without_output(signum, tmp_path):
    job = Job([sys.executable, "-m", "usp_infer", "generate", "--prompt", "a fox", *LONG, "-o", "out/fox.mp4"], tmp_path)
    try:
        job.wait_for("ms/step]")
        os.kill(job.proc.pid, signum)
        rc = job.wait(timeout=30)
    finally:
        job.kill_all()
    assert rc == 130
    assert job.stderr.strip().splitlines()[-1] == "error: interrupted; finished outputs are kept, the one in progress was discarded"
    assert "Traceback" not in job.stderr and not (tmp_path / "out").exists()


def test_interrupt_while_writing_leaves_no_file(tmp_path, monkeypatch):
    """Ctrl-C in the middle of encoding: the temp file goes, nothing appears under the final name."""

    def interrupted(frames, into=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(media, "_to_uint8", interrupted)  # called while the mp4 is being written to its temp file
    result = CliRunner().invoke(app, ["generate", "--prompt", "a fox", *FAST, "-o", str(tmp_path / "fox.mp4")])
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert leftovers(tmp_path) == []


class NaNAtCall:
    """The transformer, except that its n-th call returns NaN: a model that diverges at a known step."""

    def __init__(self, inner, bad_call: int):
        self.inner, self.bad_call, self.calls = inner, bad_call, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        out = self.inner(*args, **kwargs)
        return out * float("nan") if self.calls == self.bad_call else out


def test_non_finite_latents_name_the_step(tmp_path, monkeypatch):
    real = pipeline.load_components

    def diverging(*args, **kwargs):
        components = real(*args, **kwargs)
        components.transformer = NaNAtCall(components.transformer, bad_call=2)  # CFG batched: one call per step
        return components

    monkeypatch.setattr(pipeline, "load_components", diverging)
    result = CliRunner().invoke(app, ["generate", "--prompt", "a fox", *FAST, "--steps", "4", "-o", str(tmp_path / "fox.mp4")])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: non-finite values in the latents at step 2/4; try --dtype float32 or lower guidance scales"]
    assert leftovers(tmp_path) == []


# --- batch: resume after SIGKILL, and batch under torchrun ---------------------------------------

# Each item takes ~1-2 s on 2 cores (denoise + decode + mp4), so a kill right after the first output lands
# while the second item runs.
SLOW_ITEM = ["--height", "256", "--width", "384", "--num-frames", "49", "--steps", "40", "--max-sequence-length", "16"]


def test_batch_resume_after_sigkill(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "seed": i}) + "\n" for i, p in enumerate(["fox", "owl", "elk"])))
    out = tmp_path / "out"
    names = [f"000{i}-{p}-s{i}.mp4" for i, p in enumerate(["fox", "owl", "elk"])]
    command = [sys.executable, "-m", "usp_infer", "batch", str(prompts), *SLOW_ITEM, "--output-dir", str(out)]

    job = Job(command, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (out / f"{names[0]}.json").exists():
            assert job.proc.poll() is None and time.monotonic() < deadline, job.stderr[-3000:]
            time.sleep(0.02)
        os.kill(job.proc.pid, signal.SIGKILL)
        job.wait(timeout=10)
    finally:
        job.kill_all()
    finished = {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns, (out / f"{n}.json").stat().st_mtime_ns)
                for n in names if (out / f"{n}.json").exists()}
    assert names[0] in finished and len(finished) < len(names), "the kill must land mid-batch for this test to mean anything"
    # What a SIGKILL during a write leaves: a temp file beside the output it was becoming.
    stale = out / f".{names[-1]}.0badf00d.tmp"
    stale.write_bytes(b"half a video")

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped = len(finished)
    assert resumed.stderr.strip().splitlines()[-1] == f"done: {len(names) - skipped} ran, {skipped} skipped, 0 failed"
    for name, (data, mtime, side_mtime) in finished.items():  # untouched: same bytes, same mtimes
        assert (out / name).read_bytes() == data and (out / name).stat().st_mtime_ns == mtime
        assert (out / f"{name}.json").stat().st_mtime_ns == side_mtime
    assert leftovers(out) == sorted(names + [f"{n}.json" for n in names])  # the rest done, no temp files
    assert json.loads((out / f"{names[-1]}.json").read_text())["request"]["prompt"] == "elk"


def test_remove_stale_temps_only_touches_its_output(tmp_path):
    ours = [tmp_path / ".a.mp4.0123abcd.tmp", tmp_path / ".a.mp4.json.89abcdef.tmp"]
    others = [tmp_path / ".b.mp4.0123abcd.tmp", tmp_path / ".a.mp4.notours.tmp", tmp_path / "a.mp4"]
    for path in ours + others:
        path.write_bytes(b"x")
    assert sorted(media.remove_stale_temps(tmp_path / "a.mp4")) == sorted(ours)
    assert leftovers(tmp_path) == sorted(p.name for p in others)
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / ".frame_00003.png.00000000.tmp").write_bytes(b"x")
    (tmp_path / ".frames.11111111.tmp").mkdir()
    assert len(media.remove_stale_temps(frames)) == 2 and list(frames.iterdir()) == []


def test_batch_under_torchrun_keep_going(tmp_path):
    """Batch runs under torchrun like generate; a diverging item (all ranks agree on it) is skipped by every rank,
    and so is one whose write fails on rank 0 while the next item denoises: said once, before the next item's
    own failure."""
    (tmp_path / "prompts.jsonl").write_text(
        '{"prompt": "one", "output": "one.npz"}\n{"prompt": "too much", "guidance_scale": 1e300}\n{"prompt": "three"}\n'
        '{"prompt": "four", "output": "four.npz"}\n'
    )
    args = torchrun_test_cli(2, "batch", "prompts.jsonl", *FAST, "--output-dir", "out", "--keep-going",
                             "--dist-timeout", "60")
    job = Job(args, tmp_path, env={"USP_TEST_FAIL_WRITE": "one.npz"})
    try:
        rc = job.wait(timeout=120)
    finally:
        job.kill_all()
    assert rc != 0  # an item failed
    assert job.stderr.count("done: 2 ran, 0 skipped, 2 failed") == 1, job.stderr[-3000:]  # rank 0 alone reports
    errors = [line for line in job.stderr.splitlines() if line.startswith("error: line")]
    assert errors == ["error: line 1 of prompts.jsonl: [Errno 28] No space left on device",
                      "error: line 2 of prompts.jsonl: non-finite values in the latents at step 1/2; try --dtype "
                      "float32 or lower guidance scales"], job.stderr[-3000:]
    assert leftovers(tmp_path / "out") == ["0002-three-s0.mp4", "0002-three-s0.mp4.json"]
    assert leftovers(tmp_path) == sorted(["four.npz", "four.npz.json", "out", "prompts.jsonl", "0002-three-s0.mp4",
                                          "0002-three-s0.mp4.json"])
    side = json.loads((tmp_path / "four.npz.json").read_text())
    layout = side["parallel"]
    assert layout["world_size"] == layout["cfg"] * layout["ring"] * layout["ulysses"] == 2  # --layout auto's choice
    assert layout["layout_choice"]["chosen"] == [layout["cfg"], layout["ring"], layout["ulysses"]]
    assert np.isfinite(np.load(tmp_path / "four.npz")["frames"]).all()


def test_batch_under_torchrun_slow_writer_and_ranks_that_disagree(tmp_path):
    """Rank 0 takes longer to write each video than --dist-timeout, and each rank runs from its own directory,
    so that its relative batch file and outputs are other files than rank 0's (nodes without a shared disk):
    rank 1's batch file has other prompts, and a file of the user's sits at one of its output paths.

    The other ranks must wait for the writes without a deadline, and run rank 0's plan: three whole videos,
    rank 0's prompts, each equal to the single-process result (mixed shards of two prompts would not be)."""
    for rank, prompts in ((0, ["fox", "owl", "elk"]), (1, ["moth", "bee"])):
        folder = tmp_path / f"rank{rank}"
        folder.mkdir()
        lines = [{"prompt": p, "seed": i, "output": f"out/{p}.npz"} for i, p in enumerate(prompts)]
        (folder / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "rank1" / "out").mkdir()
    (tmp_path / "rank1" / "out" / "fox.npz").write_bytes(b"the user's")  # rank 1 alone would refuse this
    args = torchrun_test_cli(2, "batch", "prompts.jsonl", *FAST, "--resume", "--dist-timeout", "2")
    job = Job(args, tmp_path, env={"USP_TEST_SLOW_WRITE_S": "3", "USP_TEST_RANK_CWD": str(tmp_path / "rank{rank}")})
    try:
        rc = job.wait(timeout=180)
    finally:
        job.kill_all()
    assert rc == 0, job.stderr[-3000:]
    assert job.stderr.count("done: 3 ran, 0 skipped, 0 failed") == 1
    names = ["elk.npz", "fox.npz", "owl.npz"]
    assert leftovers(tmp_path / "rank0" / "out") == sorted(names + [f"{n}.json" for n in names])
    assert leftovers(tmp_path / "rank1") == ["fox.npz", "out", "prompts.jsonl"]  # rank 1 wrote nothing
    assert (tmp_path / "rank1" / "out" / "fox.npz").read_bytes() == b"the user's"
    side = json.loads((tmp_path / "rank0" / "out" / "owl.npz.json").read_text())
    assert side["request"]["prompt"] == "owl" and len(side["peak_memory_gb_per_rank"]) == 2
    # The single-process owl: fp32, the layouts differ only in the order of additions (~1e-6, test_parallel).
    single = CliRunner().invoke(app, ["generate", "--prompt", "owl", "--seed", "1", *FAST, "-o", str(tmp_path / "owl.npz")])
    assert single.exit_code == 0, single.output
    got, want = (np.load(p)["latents"] for p in (tmp_path / "rank0" / "out" / "owl.npz", tmp_path / "owl.npz"))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_load_failure_on_one_rank_is_said_once(tmp_path):
    """Only rank 1's copy of the weights is truncated (per-rank directories, relative --model): every rank
    stops, and rank 0 prints rank 1's message once."""
    import shutil

    for rank in (0, 1):
        shutil.copytree(ROOT / "models" / "ltx-tiny", tmp_path / f"rank{rank}" / "model")
    weights = tmp_path / "rank1" / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    args = torchrun_test_cli(2, "generate", "--model", "model", "--prompt", "a fox", *FAST, "--dist-timeout", "10",
                             "-o", "fox.mp4")
    job = Job(args, tmp_path, env={"USP_TEST_RANK_CWD": str(tmp_path / "rank{rank}")})
    try:
        rc = job.wait(timeout=120)
    finally:
        job.kill_all()
    assert rc != 0
    said = [line for line in job.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and said[0].startswith(
        "error: rank 1: model/transformer/diffusion_pytorch_model.safetensors is truncated or corrupted (") and said[0].endswith(
        "); copy or download it again"), said
    assert not (tmp_path / "rank0" / "fox.mp4").exists()


def test_layout_error_under_torchrun(tmp_path):
    """Degrees whose product is not the world size: a usage error before anything loads, said once."""
    job = Job(torchrun(2, "generate", "--prompt", "a fox", *FAST, "--ulysses-degree", "4", "-o", "fox.mp4"), tmp_path)
    try:
        rc = job.wait(timeout=120)
    finally:
        job.kill_all()
    assert rc != 0
    expected = ("error: cfg 1 x ring 1 x ulysses 4 = 4 but the world size is 2; "
                "for 2 processes try --ulysses-degree 2, or --ring-degree 2")
    # said once by rank 0; torchrun's report quotes it again as the root cause's `traceback : error: ...`
    assert job.stderr.splitlines().count(expected) == 1, job.stderr[-3000:]
    assert f"traceback : {expected}" in job.stderr
    assert leftovers(tmp_path) == []



# --- a decode that fails after the loop: the latents are kept, `usp-infer decode` finishes the job ------------


def test_failed_decode_keeps_latents_and_decode_reproduces_the_frames(tmp_path, monkeypatch):
    runner = CliRunner()
    args = ["generate", "--prompt", "a fox", *FAST, "--seed", "3"]
    reference = runner.invoke(app, [*args, "-o", str(tmp_path / "ref.npz"), "--quiet"])
    assert reference.exit_code == 0, reference.output

    real = pipeline.decode_latents

    def out_of_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(pipeline, "decode_latents", out_of_memory)
    out = tmp_path / "fox.npz"
    failed = runner.invoke(app, [*args, "-o", str(out)])
    assert failed.exit_code == 1
    line = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    kept = tmp_path / "fox.npz.latents.npz"
    assert len(line) == 1 and "the VAE decode failed" in line[0] and "not enough memory" in line[0]
    assert f"the final latents are kept in {kept}: decode them with `usp-infer decode {kept} -o {out}" in line[0]
    assert "decoding" in failed.stderr  # the phase it failed in was announced
    assert kept.is_file() and not out.exists() and not (tmp_path / "fox.npz.json").exists()

    monkeypatch.setattr(pipeline, "decode_latents", real)
    decoded = runner.invoke(app, ["decode", str(kept), "--quiet"])  # -o defaults to the run's own output
    assert decoded.exit_code == 0, decoded.output
    ref, again = np.load(tmp_path / "ref.npz"), np.load(out)
    # Same latents, same VAE, same device and dtype: the frames are the run's, bit for bit.
    assert np.array_equal(again["frames"], ref["frames"]) and np.array_equal(again["latents"], ref["latents"])
    side = json.loads((tmp_path / "fox.npz.json").read_text())
    assert side["decoded_from"] == str(kept) and side["request"]["seed"] == side["seed"] == 3
    # A second decode refuses to replace the output; tiling on request still gives a video.
    assert runner.invoke(app, ["decode", str(kept)]).exit_code == 2
    tiled = runner.invoke(app, ["decode", str(kept), "-o", str(tmp_path / "tiled.mp4"), "--vae-tiling", "--quiet"])
    assert tiled.exit_code == 0 and (tmp_path / "tiled.mp4").is_file()
    import av

    with av.open(str(tmp_path / "tiled.mp4")) as container:  # at the run's frame rate (LTX-Video's 25), kept
        assert container.streams.video[0].average_rate == 25


def test_decode_of_a_bad_file_is_one_line(tmp_path):
    (tmp_path / "x.latents.npz").write_bytes(b"not numpy")
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "x.latents.npz")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert "is not a .latents.npz that usp-infer kept" in result.stderr
    with open(tmp_path / "y.latents.npz", "wb") as f:  # a numpy file of the right shape, another format
        np.savez(f, latents=np.zeros((8, 2, 2, 3), np.float32), meta=np.array(json.dumps({"format": 99})))
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "y.latents.npz")])
    assert result.exit_code == 2 and "is not a .latents.npz of this usp-infer (format 99)" in result.stderr


def test_decode_takes_its_model_and_dtype_and_refuses_other_configs(tmp_path, monkeypatch):
    """A rerun that fails alike keeps its latents again; `decode --model M --dtype D` decodes with M and D (the
    sidecar says so); a model whose configs differ from the run's is refused before anything is written."""
    import shutil

    def out_of_memory(*a, **k):
        raise RuntimeError("not enough memory")

    runner = CliRunner()
    monkeypatch.setattr(pipeline, "decode_latents", out_of_memory)
    kept = tmp_path / "fox.npz.latents.npz"
    for _ in range(2):
        failed = runner.invoke(app, ["generate", "--prompt", "a fox", *FAST, "-o", str(tmp_path / "fox.npz")])
        assert failed.exit_code == 1 and f"the final latents are kept in {kept}" in failed.stderr, failed.stderr
    monkeypatch.undo()

    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "models" / "ltx-tiny", copy)
    out = tmp_path / "a.npz"
    decoded = runner.invoke(app, ["decode", str(kept), "--model", str(copy), "--dtype", "bfloat16", "-o", str(out),
                                  "--quiet"])
    assert decoded.exit_code == 0, decoded.output
    side = json.loads((tmp_path / "a.npz.json").read_text())
    assert side["model"]["path"] == str(copy.resolve()) and side["dtype"] == "bfloat16"

    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "shift": 3.0}))
    refused = runner.invoke(app, ["decode", str(kept), "--model", str(copy), "-o", str(tmp_path / "b.npz")])
    assert refused.exit_code == 2 and "was made with other model configs than" in refused.stderr
    assert not (tmp_path / "b.npz").exists()


def test_decode_of_a_numpy_file_without_its_meta_is_one_line(tmp_path):
    with open(tmp_path / "z.latents.npz", "wb") as f:
        np.savez(f, latents=np.zeros((8, 2, 2, 3), np.float32))
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "z.latents.npz")])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "is not a .latents.npz that usp-infer kept" in result.stderr


def test_decode_memory_estimate_picks_tiles(monkeypatch):
    """1024x1024x257 on a CPU with little free memory decodes in tiles instead of running out of memory."""
    import torch

    vae = type("VAE", (), {"spatial_compression_ratio": 32, "temporal_compression_ratio": 8, "dtype": torch.float32,
                           "config": type("C", (), {"patch_size": 4, "decoder_block_out_channels": (128, 256, 512, 512)})})()
    shape = (1, 128, 33, 32, 32)  # the latents of 257 frames at 1024x1024
    assert pipeline.decode_memory(vae, shape, torch.float32) > 30 * 2**30
    monkeypatch.setattr(pipeline, "_free_memory", lambda device: 16 * 2**30)
    assert pipeline.needs_tiling(vae, shape, torch.device("cpu"), asked=False)
    assert not pipeline.needs_tiling(vae, (1, 128, 2, 2, 3), torch.device("cpu"), asked=False)


# --- a batch writes behind: item i's files are written while item i+1 is denoised --------------------------------

def _batch(tmp_path: Path, n: int) -> Path:
    lines = [{"prompt": f"p{i}", "output": str(tmp_path / f"{i}.mp4")} for i in range(n)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tmp_path / "prompts.jsonl"


def test_batch_writes_while_the_next_item_denoises(tmp_path, monkeypatch):
    """Item 1's write waits for item 2's denoising to begin: it can only finish if the two overlap. Every output
    and sidecar is whole, and each 'wrote' line comes once."""
    second = threading.Event()
    real_generate, real_write, calls = pipeline.generate, media.write_video, []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            second.set()
        return real_generate(*args, **kwargs)

    def write(path, *args, **kwargs):
        if Path(path).name == "0.mp4":
            assert second.wait(timeout=30), "item 1 was written before item 2 began"
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", generate)
    monkeypatch.setattr(media, "write_video", write)
    result = CliRunner().invoke(app, ["batch", str(_batch(tmp_path, 3)), *FAST])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.mp4*")) == ["0.mp4", "0.mp4.json", "1.mp4", "1.mp4.json", "2.mp4",
                                                                "2.mp4.json"]
    assert result.stderr.count("wrote ") == 3 and "done: 3 ran, 0 skipped, 0 failed" in result.stderr
    for i in range(3):
        side = json.loads((tmp_path / f"{i}.mp4.json").read_text())
        assert side["request"]["prompt"] == f"p{i}"
        assert media.fingerprint(tmp_path / f"{i}.mp4") == {k: side[k] for k in ("output_size", "output_sha256")}
        t = side["timings"]  # each item timed from its own start, not the next one's (its write runs late)
        assert t["total_s"] >= t["denoise_s"] + t["decode_s"] + t["write_s"]


@pytest.mark.parametrize("keep_going", [True, False])
def test_a_write_that_fails_behind_is_its_own_items_failure(keep_going, tmp_path, monkeypatch):
    """Item 1's write fails while item 2 denoises: item 1 is the failure, named once; with --keep-going the
    rest are written, without it the run ends there, and nothing half-written is left either way."""
    real_write = media.write_video

    def write(path, *args, **kwargs):
        if Path(path).name == "0.mp4":
            raise OSError(28, "No space left on device")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(media, "write_video", write)
    flags = ["--keep-going"] if keep_going else []
    result = CliRunner().invoke(app, ["batch", str(_batch(tmp_path, 3)), *FAST, *flags])
    assert result.exit_code == 1
    said = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "line 1 of" in said[0] and "No space left on device" in said[0], result.stderr
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != "prompts.jsonl")
    assert names == (["1.mp4", "1.mp4.json", "2.mp4", "2.mp4.json"] if keep_going else [])
    if keep_going:
        assert "done: 2 ran, 0 skipped, 1 failed" in result.stderr


def test_interrupt_while_a_write_runs_behind_keeps_that_output(tmp_path, monkeypatch):
    """Ctrl-C during item 2 while item 1's (slow) write runs: that write finishes, with its sidecar; item 2
    leaves nothing."""
    real_generate, real_write, calls = pipeline.generate, media.write_video, []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    def write(*args, **kwargs):
        time.sleep(1.0)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", generate)
    monkeypatch.setattr(media, "write_video", write)
    result = CliRunner().invoke(app, ["batch", str(_batch(tmp_path, 2)), *FAST])
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert leftovers(tmp_path) == ["0.mp4", "0.mp4.json", "prompts.jsonl"]
    side = json.loads((tmp_path / "0.mp4.json").read_text())
    assert media.fingerprint(tmp_path / "0.mp4")["output_sha256"] == side["output_sha256"]
