"""The README's two set-up commands, copy-pasted into a fresh virtual environment, and a non-editable install.

The venv reuses this interpreter's installed packages (--system-site-packages): a venv of its own measured
~100 s of installs on an idle 2-core box (torch 51 s, the rest 50 s), several minutes on a loaded one, too
much for CI's budget. The commands still run exactly as the README writes them: pip finds torch and the other
dependencies satisfied and builds and installs only usp-infer, from a copy of the checkout (as a fresh clone).
The second command's `python -m pytest -q` would run this suite inside itself; it runs as `--collect-only`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.setup  # runs in CI with the rest (see pyproject.toml); -m "not setup" to skip locally


def readme_setup_commands() -> list[str]:
    """The command lines of the first bash block under '## Set up'."""
    section = ROOT.joinpath("README.md").read_text().split("## Set up", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def clean_copy(dest: Path) -> Path:
    """What a fresh clone holds: the files git tracks (sources, tiny models, test data), nothing else."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout:
        for name in listed.stdout.split("\0"):
            if name and (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
        return dest
    skip = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", ".pytest_cache", "*.mp4", "*.json.tmp")
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in skip(d, names)] +
                    ([n for n in names if not n.endswith("-tiny") and n != "README.md"] if Path(d).name == "models" else []))
    return dest


def test_readme_setup_commands_in_a_fresh_venv(tmp_path):
    commands = readme_setup_commands()
    assert len(commands) == 2, commands
    assert all("pip install torch==2.13.0" in c for c in commands), "the CPU torch pin belongs inside each command"
    env_dir, repo = tmp_path / "venv", clean_copy(tmp_path / "repo")
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    bin_dir = env_dir / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(env_dir), PIP_DISABLE_PIP_VERSION_CHECK="1")

    def sh(command: str) -> subprocess.CompletedProcess:
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"{command}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
        return run

    # 1: install (not editable) and generate with the default model, which must come with the package.
    sh(commands[0])
    site = Path(sh("python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])'").stdout.strip())
    assert (site / "usp_infer" / "models" / "ltx-tiny" / "transformer" / "config.json").is_file()
    side = json.loads((repo / "demo.mp4.json").read_text())
    assert (repo / "demo.mp4").stat().st_size > 0
    assert side["model"]["path"] == str(site / "usp_infer" / "models" / "ltx-tiny")  # the installed copy, not the checkout's
    assert sh("usp-infer --version").stdout.strip() == "usp-infer 0.1.0"
    # A demo leaves nothing git would list: its video and sidecar are ignored.
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        untracked = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True, text=True).stdout
        assert "demo.mp4" not in untracked, untracked

    # 2: the test extras (editable) and the suite, collected only.
    assert commands[1].endswith("python -m pytest -q")
    collected = sh(commands[1] + " --collect-only -p no:cacheprovider").stdout
    assert re.search(r"\d+ tests collected", collected), collected[-2000:]
