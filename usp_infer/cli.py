"""The command line: generate, batch, info, make-tiny, bench.

Every flag is parsed into frozen config objects here, at the edge; the library below never reads argv
or the environment. Usage errors exit 2, runtime failures 1, Ctrl-C 130, each with one line on stderr
(a traceback only with --debug). Only the main rank prints progress and writes files.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NoReturn, Optional

import typer

from . import __version__
from .config import A2A_MODES, GenerateRequest, ParallelConfig
from .guidance import PRESETS, GuidanceConfig

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "ltx-tiny"


def _help(summary: str, *examples: str) -> str:
    """A command's help text. Click rewraps paragraphs; a paragraph opened by a \\b line stays as written."""
    return summary + "\n\nExamples:\n\n" + "\n\n".join("\b\n" + example for example in examples)


app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    help=_help(
        "Generate LTX-style videos on one or many GPUs, the sequence sharded with USP "
        "(Ulysses all-to-all + ring attention). Run a command with --help for its options.",
        "  # one small video on CPU with the embedded tiny model\n"
        "  usp-infer generate --prompt 'a red fox in snow' --height 64 --width 96 \\\n"
        "      --num-frames 9 --steps 4 --output fox.mp4",
        "  # the same on 4 GPUs (Ulysses 4)\n"
        "  torchrun --nproc_per_node 4 -m usp_infer generate --model models/ltx-video \\\n"
        "      --prompt 'a red fox in snow' --output fox.mp4",
        "  # many prompts, model loaded once; rerun with --resume after an interruption\n"
        "  usp-infer batch prompts.jsonl --output-dir outputs --resume",
        "  # what a checkpoint is, and the layouts that fit 4 GPUs\n"
        "  usp-infer info models/ltx-tiny --gpus 4",
    ),
)


class UsageError(Exception):
    """A bad flag or input: exit code 2, nothing written."""


class ItemError(RuntimeError):
    """A failure of one item, already put in words for the user (which item, and why)."""


# --- option parsing -----------------------------------------------------------------------------


def parse_floats(flag: str, text: str | float | int | list) -> tuple[float, ...]:
    """'3' or '1,1,6,8' (or a JSON number/list from a batch line) -> (floats)."""
    items = text if isinstance(text, list) else str(text).split(",")
    try:
        return tuple(float(x) for x in items)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a number or a comma-separated list of numbers") from None


def parse_blocks(text: str | int | list) -> tuple[tuple[int, ...], ...]:
    """'19' or '11,25,35' (one set) or '11,25;22,35;28' (one set per guidance interval)."""
    if isinstance(text, int):
        return ((text,),)
    if isinstance(text, list):
        return (tuple(int(b) for b in text),)
    try:
        sets = tuple(tuple(int(b) for b in part.split(",") if b.strip()) for part in str(text).split(";"))
    except ValueError:
        raise UsageError(f"--stg-blocks {text!r} must be block indices like 19 or 11,25 or 11,25;22,35") from None
    if any(b < 0 for blocks in sets for b in blocks):
        raise UsageError(f"--stg-blocks {text!r} has a negative block index")
    return sets


# Flag name (as snake case, also the key of a batch line) -> how it becomes a request field.
GUIDANCE_FLAGS = {
    "guidance_scale": ("cfg", lambda v: parse_floats("--guidance-scale", v)),
    "stg_scale": ("stg", lambda v: parse_floats("--stg-scale", v)),
    "guidance_rescale": ("rescale", lambda v: parse_floats("--guidance-rescale", v)),
    "stg_blocks": ("stg_blocks", parse_blocks),
    "stg_mode": ("stg_mode", str),
    "cfg_star": ("cfg_star", bool),
    "guidance_timesteps": ("timesteps", lambda v: parse_floats("--guidance-timesteps", v) if v != "" else ()),
}
REQUEST_FLAGS = {
    "prompt", "negative_prompt", "height", "width", "num_frames", "fps", "steps", "seed",
    "max_sequence_length", "decode_timestep", "decode_noise_scale", "image", "image_strength", "branches",
}
ITEM_KEYS = REQUEST_FLAGS | set(GUIDANCE_FLAGS) | {"preset", "output", "num_inference_steps"}
GUIDANCE_DEFAULTS = dict(cfg=(3.0,), stg=(0.0,), rescale=(0.0,), stg_blocks=((19,),), stg_mode="values", cfg_star=False, timesteps=())


def build_request(options: dict) -> GenerateRequest:
    """Flags (None = not given) -> one validated request: explicit flags > preset > defaults."""
    options = {k: v for k, v in options.items() if v is not None}
    if "num_inference_steps" in options:
        options.setdefault("steps", options.pop("num_inference_steps"))
    preset_name = options.pop("preset", None)
    if preset_name is not None and preset_name not in PRESETS:
        raise UsageError(f"--preset {preset_name!r} is unknown; use one of {', '.join(PRESETS)}")
    preset = PRESETS.get(preset_name, {})
    guidance = {k: preset.get(k, v) for k, v in GUIDANCE_DEFAULTS.items()}
    for flag, (field_name, parse) in GUIDANCE_FLAGS.items():
        if flag in options:
            guidance[field_name] = parse(options.pop(flag))
    if "steps" not in options and "steps" in preset:
        options["steps"] = preset["steps"]
    try:
        return GenerateRequest(guidance=GuidanceConfig(**guidance), **options)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except TypeError as e:
        raise UsageError(f"bad option: {e}") from None


# --- the shared run: generate is a batch of one -------------------------------------------------


@dataclass(frozen=True)
class Item:
    index: int
    request: GenerateRequest
    output: Path
    where: str = ""  # for messages in a batch: "line 3 of prompts.jsonl"


@dataclass(frozen=True)
class Session:
    model: Path
    device: str
    dtype: str | None
    parallel: ParallelConfig
    overwrite: bool = False
    resume: bool = False
    keep_going: bool = False
    quiet: bool = False
    json_summary: bool = False
    debug: bool = False
    compile: bool = False
    batch: bool = False  # print the "done: ..." line


def _one_line(message: object) -> str:
    """Library messages can span lines (PyAV, safetensors); the CLI promises one line per error."""
    return "; ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())


def _at(item: Item, message: str) -> str:
    return f"{item.where}: {message}" if item.where else message


def _close_progress() -> None:
    """End a progress bar that an exception left open, so the error starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _fail(code: int, message: str) -> NoReturn:
    from .dist import env_rank, env_world_size

    _close_progress()
    rank = env_rank()
    if code == 2 and rank != 0:
        raise typer.Exit(code)  # every rank finds the same usage error; one line is enough
    prefix = f"rank {rank}: " if env_world_size() > 1 and code != 2 else ""
    typer.echo(f"error: {prefix}{_one_line(message)}", err=True)
    raise typer.Exit(code)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _finished(item: Item) -> bool:
    """A sidecar is written only after its output is in place, so a readable one marks a finished item."""
    from .media import sidecar_path

    # A frames/%04d.png pattern names no file itself; its frames live in the directory.
    if not (item.output.exists() or "%" in item.output.name and item.output.parent.is_dir()):
        return False
    try:
        record = json.loads(sidecar_path(item.output).read_text())
    except (OSError, ValueError):
        return False
    if record.get("request") != json.loads(json.dumps(asdict(item.request))):
        raise UsageError(
            f"{_at(item, str(item.output))} was made with other settings than this line asks for; "
            "pass --overwrite to redo it, or give the line another 'output'"
        )
    return True


def _check_output(item: Item, s: Session) -> bool:
    """Validate an item's output path; False means 'finished already, skip it' (--resume)."""
    from .media import output_kind, sidecar_path

    try:
        kind = output_kind(item.output)
    except ValueError as e:
        raise UsageError(_at(item, str(e))) from None
    # Where files will be created: a png directory output is filled itself, everything else lands beside.
    folder = item.output if kind == "png" and item.output.suffix.lower() != ".png" else item.output.parent
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UsageError(_at(item, f"cannot create output directory {folder}: {existing} is a file; choose another output path"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(_at(item, f"output directory {existing} is not writable; choose another output path"))
    present = [p for p in (item.output, sidecar_path(item.output)) if p.exists()]
    if present:
        if s.resume and not s.overwrite and _finished(item):
            return False
        if not s.overwrite and not s.resume:
            hint = "pass --overwrite to replace it" + (", or --resume to skip finished items" if s.batch else "")
            raise UsageError(_at(item, f"{present[0]} exists; {hint}"))
    return True


def _check_image(item: Item) -> None:
    from PIL import Image, UnidentifiedImageError

    path = item.request.image
    try:
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        raise UsageError(_at(item, f"--image {path} does not exist; pass an existing PNG or JPEG file")) from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise UsageError(_at(item, f"--image {path} is not a readable PNG or JPEG image; pass a PNG or JPEG file")) from None


def _validate(items: list[Item], s: Session) -> tuple[ParallelConfig, list[Item]]:
    """Every check that needs no weights, for every item, before anything loads or is written."""
    from .dist import env_world_size, resolve_parallel, validate_layout
    from .pipeline import read_model_configs

    try:
        configs = read_model_configs(s.model)
        world = env_world_size()
        parallel = resolve_parallel(s.parallel, world)
        validate_layout(parallel, world, configs["transformer"].get("num_attention_heads"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    layers = configs["transformer"].get("num_layers", 0)
    outputs = [i.output.resolve() for i in items]
    if len(set(outputs)) != len(outputs):
        dup = next(o for o in outputs if outputs.count(o) > 1)
        raise UsageError(f"two items write the same output {dup}; give each its own 'output'")
    todo = []
    for item in items:
        blocks = item.request.guidance.max_block()
        if blocks >= layers:
            raise UsageError(_at(item, f"--stg-blocks {blocks} is out of range: the model has {layers} blocks (0..{layers - 1})"))
        if item.request.image is not None:
            _check_image(item)
        if _check_output(item, s):
            todo.append(item)
    return parallel, todo


def _check_weights(model: Path) -> None:
    """Open every safetensors header, so a truncated or corrupted file is named instead of failing deep in a loader."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(model.glob("*/*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise RuntimeError(f"{path} is truncated or corrupted ({_one_line(e)}); copy or download it again") from None


def _versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"usp_infer": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def _config_hash(model: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(model.glob("*/*.json")) + sorted(model.glob("*.json")):
        digest.update(path.relative_to(model).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _peak_memory(device) -> dict:
    import resource

    import torch

    if device.type == "cuda":
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3), "peak_memory_of": "cuda max_memory_allocated, this item"}
    # On CPU the only honest number is the process's high-water mark (ru_maxrss is in KiB on Linux).
    return {"peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), "peak_memory_of": "process max RSS, whole run so far"}


def _sidecar(item: Item, s: Session, mesh, result, seconds: float, load_s: float) -> dict:
    return {
        "output": str(item.output),
        "request": asdict(item.request),
        "seed": item.request.seed,
        "model": {"path": str(s.model.resolve()), "config_sha256": _config_hash(s.model)},
        "parallel": {
            "world_size": mesh.world_size, "cfg": mesh.cfg_degree, "ring": mesh.ring_degree,
            "ulysses": mesh.ulysses_degree, "a2a_mode": mesh.a2a_mode, "dist_timeout_s": s.parallel.timeout_s,
        },
        "device": str(mesh.device),
        "dtype": s.dtype,
        "compiled": s.compile,
        "timings": {
            "total_s": round(seconds, 4),
            "denoise_s": round(sum(result.step_times), 4),
            "decode_s": round(result.decode_time, 4),
            "step_s": [round(t, 4) for t in result.step_times],
            "model_load_s": round(load_s, 4),  # once per run, shared by its items
        },
        **_peak_memory(mesh.device),
        "versions": _versions(),
    }


def _may_continue(error: Exception, s: Session, world_size: int) -> bool:
    """--keep-going, except where the ranks could disagree about moving on (which would hang them)."""
    from .pipeline import NonFiniteError

    # Every rank sees the same non-finite check (it is all-reduced); any other error may be one rank's alone.
    return s.keep_going and (world_size == 1 or isinstance(error, NonFiniteError))


def _in_collective(error: Exception) -> bool:
    """Whether `error` is a communication failure. gloo raises plain RuntimeErrors when a peer dies, and an
    async collective raises from the `.wait()` in our own code, so the backend's name in the message counts too."""
    import torch.distributed as dist

    frames = traceback.extract_tb(error.__traceback__)
    return (
        isinstance(error, dist.DistError)
        or any("torch/distributed/" in frame.filename.replace(os.sep, "/") for frame in frames)
        or re.search(r"\bgloo\b|\bNCCL\b", str(error), re.IGNORECASE) is not None
    )


def _explain(error: Exception, world_size: int, timeout_s: float) -> str:
    """One line for an error that ends a run (or, with --keep-going, an item)."""
    if not isinstance(error, (ValueError, RuntimeError, OSError)):
        return f"{type(error).__name__}: {error}"
    if world_size > 1 and _in_collective(error):
        first = _one_line(error).split(". ")[0]  # gloo/NCCL append paragraphs of generic advice
        return (
            f"lost contact with another rank in a collective ({first}); that rank failed, was killed or hangs: "
            f"see its error. A rank that stops answering is given up on after --dist-timeout {timeout_s:g} s"
        )
    return str(error)


def _run(items: list[Item], s: Session) -> None:
    """Validate everything, then load once and run the items in order. Raises typer.Exit."""
    try:
        parallel, todo = _validate(items, s)
    except UsageError as e:
        _fail(2, str(e))

    import torch

    from .dist import env_rank, init_mesh, teardown
    from .ltx import compile_blocks
    from .media import remove_stale_temps, sidecar_path, write_json_atomic, write_video
    from .pipeline import generate, load_components

    records, failures = [], []
    if not todo:  # everything is finished (--resume): no process group, no weights
        return _summarize(items, todo, records, failures, s, env_rank() == 0)
    mesh = None
    try:
        device = s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        mesh = init_mesh(parallel, device)
        dtype_name = s.dtype or ("bfloat16" if mesh.device.type == "cuda" else "float32")
        s = replace(s, dtype=dtype_name)
        start = time.perf_counter()
        _check_weights(s.model)
        try:
            components = load_components(s.model, mesh.device, getattr(torch, dtype_name))
        except (OSError, ValueError, RuntimeError) as e:
            raise RuntimeError(f"cannot load the model in {s.model}: {_one_line(e)}") from e
        if s.compile:
            compile_blocks(components.transformer)  # compiles lazily, during the first item's first step
        load_s = time.perf_counter() - start
        for item in todo:
            start = time.perf_counter()
            if mesh.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(mesh.device)
            try:
                result = generate(components, item.request, mesh, progress=mesh.is_main and not s.quiet)
                if mesh.is_main:
                    remove_stale_temps(item.output)  # left by a run that was killed while writing this item
                    written = write_video(
                        item.output, result.frames, fps=item.request.fps, latents=result.latents,
                        overwrite=s.overwrite or s.resume,
                    )
                    record = _sidecar(item, s, mesh, result, time.perf_counter() - start, load_s)
                    write_json_atomic(sidecar_path(item.output), record)
                    records.append(record)
                    if not s.quiet and not s.json_summary:
                        shown = written[0] if len(written) == 1 else item.output
                        typer.echo(f"wrote {shown}" + (f" ({item.where})" if item.where else ""), err=True)
            except (ValueError, RuntimeError, OSError) as e:
                if not _may_continue(e, s, mesh.world_size):
                    raise ItemError(_at(item, _explain(e, mesh.world_size, s.parallel.timeout_s))) from e
                failures.append({"item": item.where, "error": _one_line(_explain(e, mesh.world_size, s.parallel.timeout_s))})
                if mesh.is_main:
                    _close_progress()
                    typer.echo(f"error: {failures[-1]['item']}: {failures[-1]['error']}", err=True)
    except Exception as e:  # noqa: BLE001 - the edge: one line, the full traceback only with --debug
        if s.debug:
            raise
        _fail(1, str(e) if isinstance(e, ItemError) else _explain(e, mesh.world_size if mesh is not None else 1, s.parallel.timeout_s))
    finally:
        teardown()
    _summarize(items, todo, records, failures, s, mesh.is_main)


def _summarize(items: list[Item], todo: list[Item], records: list[dict], failures: list[dict], s: Session, is_main: bool) -> None:
    """The closing line (or JSON on stdout); exit 1 if any item failed (--keep-going)."""
    if is_main:
        summary = {"ran": len(records), "skipped": len(items) - len(todo), "failed": len(failures), "outputs": records, "failures": failures}
        if s.json_summary:
            typer.echo(json.dumps(summary, indent=2))
        elif s.batch and not s.quiet:
            typer.echo(f"done: {summary['ran']} ran, {summary['skipped']} skipped, {summary['failed']} failed", err=True)
    if failures:
        raise typer.Exit(1)


def run_session(items: list[Item], s: Session) -> None:
    """Run the items; Ctrl-C (or the SIGTERM torchrun sends when a peer dies) exits 130, writes discarded."""
    from .dist import env_rank

    # SIGTERM would otherwise kill the process on the spot, skipping the cleanup of a half-written temp file.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main_thread else None
    try:
        _run(items, s)
    except KeyboardInterrupt:
        if s.debug:
            traceback.print_exc()
        _close_progress()
        if env_rank() == 0:
            typer.echo("error: interrupted; finished outputs are kept, the one in progress was discarded", err=True)
        raise typer.Exit(130) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


# --- commands -----------------------------------------------------------------------------------

_opt = typer.Option

# Options generate and batch share, declared once. Request options default to None = "not given",
# so a preset (and, in batch, a line's own value) can fill them.
REQUEST_OPTIONS = {
    "negative_prompt": (Optional[str], _opt(None, help="What to steer away from (CFG's unconditional branch).")),
    "height": (Optional[int], _opt(None, help="Pixels, a multiple of 32 [default: 480].")),
    "width": (Optional[int], _opt(None, help="Pixels, a multiple of 32 [default: 704].")),
    "num_frames": (Optional[int], _opt(None, help="Frames, of the form 8k+1 [default: 121].")),
    "fps": (Optional[float], _opt(None, help="Frame rate of the mp4 and of the RoPE time scale [default: 25].")),
    "steps": (Optional[int], _opt(None, "--steps", "--num-inference-steps", help="Denoising steps [default: 40, or the preset's].")),
    "seed": (Optional[int], _opt(None, help="Random seed; the same seed gives the same video on any layout [default: 0].")),
    "guidance_scale": (Optional[str], _opt(None, help="CFG scale, or a per-interval list '1,1,6,8' [default: 3].")),
    "stg_scale": (Optional[str], _opt(None, help="Spatio-temporal guidance scale (or list) [default: 0 = off].")),
    "stg_blocks": (Optional[str], _opt(None, help="Blocks STG perturbs: '19', '11,25', or per interval '11,25;22;28'.")),
    "stg_mode": (Optional[str], _opt(None, help="values | skip | residual | block [default: values].")),
    "guidance_rescale": (Optional[str], _opt(None, help="Rescale r in [0,1] (or list) [default: 0 = off].")),
    "cfg_star": (Optional[bool], _opt(None, "--cfg-star/--no-cfg-star", help="CFG-star: rescale the uncond prediction.")),
    "guidance_timesteps": (Optional[str], _opt(None, help="Descending sigma thresholds for per-interval scale lists.")),
    "preset": (Optional[str], _opt(None, help=f"Named defaults: {', '.join(PRESETS)}.")),
    "image": (Optional[str], _opt(None, help="PNG/JPEG conditioning the first frame (image-to-video).")),
    "image_strength": (Optional[float], _opt(None, help="How firmly the image holds, in [0,1] [default: 1].")),
    "max_sequence_length": (Optional[int], _opt(None, help="T5 tokens [default: 128].")),
    "decode_timestep": (Optional[float], _opt(None, help="VAE decode timestep [default: 0.05].")),
    "decode_noise_scale": (Optional[float], _opt(None, help="VAE decode noise scale [default: 0.025].")),
    "branches": (Optional[str], _opt(None, help="batched (one forward) | sequential (less memory) [default: batched].")),
}
SESSION_OPTIONS = {
    "model": (Path, _opt(DEFAULT_MODEL, help="Diffusers-format LTX folder; default: the embedded tiny model.")),
    "ulysses_degree": (Optional[int], _opt(None, help="Ulysses (all-to-all) degree [default: world / (cfg x ring)].")),
    "ring_degree": (Optional[int], _opt(None, help="Ring-attention degree [default: 1].")),
    "cfg_parallel": (Optional[int], _opt(None, "--cfg-parallel", "--cfg-degree", help="Spread guidance branches over this many rank groups [default: 1].")),
    "a2a_mode": (str, _opt("direct", help="direct (all_to_all_single into a preallocated buffer) | functional.")),
    "dist_timeout": (float, _opt(600.0, help="Seconds a collective may wait before the run fails.")),
    "compile": (bool, _opt(False, "--compile", help="torch.compile the transformer blocks: faster steps after a "
                           "one-time compilation in the first step (worth it for long runs and batches).")),
    "device": (str, _opt("auto", help="auto | cpu | cuda.")),
    "dtype": (Optional[str], _opt(None, help="float32 | bfloat16 | float16 [default: bfloat16 on CUDA, float32 on CPU].")),
    "overwrite": (bool, _opt(False, help="Replace existing outputs.")),
    "quiet": (bool, _opt(False, help="No progress bar or messages (errors still go to stderr).")),
    "json_summary": (bool, _opt(False, "--json", help="Print a JSON summary (outputs, sidecars, failures) to stdout; nothing else goes there.")),
    "debug": (bool, _opt(False, help="Show full tracebacks.")),
}


def _with_options(fn):
    """Give a command the shared options; they arrive in **kwargs."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in {**REQUEST_OPTIONS, **SESSION_OPTIONS}.items()
    ]
    fn.__signature__ = sig.replace(parameters=own + shared)
    return fn


def _session_from(flags: dict, **extra) -> Session:
    """Pop the session flags out of `flags` and validate them."""
    f = {name: flags.pop(name) for name in SESSION_OPTIONS}
    if f["device"] not in ("auto", "cpu", "cuda"):
        _fail(2, f"--device {f['device']!r} is unknown; use auto, cpu or cuda")
    if f["dtype"] is not None and f["dtype"] not in ("float32", "bfloat16", "float16"):
        _fail(2, f"--dtype {f['dtype']!r} is unknown; use float32, bfloat16 or float16")
    if f["a2a_mode"] not in A2A_MODES:
        _fail(2, f"--a2a-mode {f['a2a_mode']!r} is unknown; use direct or functional")
    for flag in ("ulysses_degree", "ring_degree", "cfg_parallel"):
        if f[flag] is not None and f[flag] < 1:
            _fail(2, f"--{flag.replace('_', '-')} {f[flag]} must be at least 1")
    if f["dist_timeout"] <= 0:
        _fail(2, f"--dist-timeout {f['dist_timeout']} must be positive (seconds)")
    parallel = ParallelConfig(
        cfg=f["cfg_parallel"] or 1, ring=f["ring_degree"] or 1, ulysses=f["ulysses_degree"] or 1,
        a2a_mode=f["a2a_mode"], timeout_s=f["dist_timeout"],
    )
    return Session(
        model=Path(f["model"]), device=f["device"], dtype=f["dtype"], parallel=parallel, overwrite=f["overwrite"],
        quiet=f["quiet"], json_summary=f["json_summary"], debug=f["debug"], compile=f["compile"], **extra,
    )


@app.command(
    help=_help(
        "Generate one video. Exit codes: 0 done, 1 runtime failure, 2 bad input (nothing written), 130 interrupted.",
        "  # text to video, tiny model on CPU\n"
        "  usp-infer generate --prompt 'a red fox' --height 64 --width 96 --num-frames 9 \\\n"
        "      --steps 4 --output fox.mp4",
        "  # image to video with LTX-Video 2B's guidance preset\n"
        "  usp-infer generate --prompt 'waves' --image beach.png --preset ltx-video-2b \\\n"
        "      --model models/ltx-video -o waves.mp4",
        "  # 4 processes, Ulysses 2 x ring 2, frames and latents as .npz\n"
        "  torchrun --nproc_per_node 4 -m usp_infer generate --prompt 'a red fox' \\\n"
        "      --ulysses-degree 2 --ring-degree 2 --a2a-mode functional -o fox.npz",
    ),
)
@_with_options
def generate(
    prompt: str = _opt(..., help="What the video shows."),
    output: Path = _opt(Path("output.mp4"), "--output", "-o", help=".mp4, .npz, a .png pattern, or a directory of PNG frames."),
    **flags,
) -> None:
    s = _session_from(flags)
    try:
        request = build_request({"prompt": prompt, **flags})
    except UsageError as e:
        _fail(2, str(e))
    run_session([Item(0, request, output)], s)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "video"


def read_batch(path: Path, flags: dict, output_dir: Path) -> list[Item]:
    """JSON Lines -> items; each line's keys override the shared flags. Errors name the line."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UsageError(f"batch file {path} cannot be read ({e.strerror})") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"line {number} of {path}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where} is not valid JSON ({e.msg}); each line must be one object like {{\"prompt\": \"...\"}}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise UsageError(f"{where} needs a \"prompt\" string")
        unknown = set(entry) - ITEM_KEYS
        if unknown:
            raise UsageError(f"{where} has unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(ITEM_KEYS))}")
        output = entry.pop("output", None)
        try:
            request = build_request({**flags, **entry})
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
        index = len(items)
        if output is None:
            output = output_dir / f"{index:04d}-{_slug(request.prompt)}-s{request.seed}.mp4"
        items.append(Item(index, request, Path(output), where))
    if not items:
        raise UsageError(f"batch file {path} has no items")
    return items


@app.command(
    help=_help(
        "Generate many videos from a JSON Lines file, loading the model once.\n\n"
        "Each line is an object with \"prompt\" and optionally \"negative_prompt\", \"image\", \"seed\", \"output\" "
        "and any generate option (snake_case, e.g. \"guidance_scale\", \"steps\"); flags give the shared values. "
        "An item without \"output\" goes to OUTPUT_DIR/<index>-<prompt slug>-s<seed>.mp4; relative paths "
        "(\"image\", \"output\") are taken from the current directory. "
        "At the end a line says how many items ran, were skipped and failed.",
        "  # prompts.jsonl:\n"
        '  {"prompt": "a red fox in snow", "seed": 1}\n'
        '  {"prompt": "waves at dusk", "image": "beach.png", "steps": 8, "output": "waves.mp4"}',
        "  usp-infer batch prompts.jsonl --output-dir outputs --height 64 --width 96 \\\n"
        "      --num-frames 9 --steps 4",
        "  # after an interruption (even kill -9): finish the rest, keep what is done\n"
        "  usp-infer batch prompts.jsonl --output-dir outputs --height 64 --width 96 \\\n"
        "      --num-frames 9 --steps 4 --resume --keep-going",
    ),
)
@_with_options
def batch(
    file: Path = typer.Argument(..., help="JSON Lines file, one generation per line."),
    output_dir: Path = _opt(Path("outputs"), help="Where items without an 'output' go."),
    resume: bool = _opt(False, help="Skip items whose output and sidecar already exist (made with the same settings)."),
    keep_going: bool = _opt(False, help="Continue past a failed item; exit 1 at the end if any failed."),
    **flags,
) -> None:
    s = _session_from(flags, resume=resume, keep_going=keep_going, batch=True)
    try:
        items = read_batch(file, flags, output_dir)
    except UsageError as e:
        _fail(2, str(e))
    run_session(items, s)


@app.command("make-tiny", help=_help("Write a deterministic tiny random-weight LTX pipeline (diffusers layout).", "  usp-infer make-tiny /tmp/ltx-tiny --seed 1"))
def make_tiny(directory: Path = typer.Argument(..., help="Folder to create."), seed: int = _opt(0, help="Weight seed.")) -> None:
    from .tiny import make_tiny as _make

    _make(directory, seed=seed)
    typer.echo(f"wrote {directory}", err=True)


def _count_parameters(folder: Path) -> int:
    """Parameters from the safetensors headers alone: nothing is loaded."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


@app.command(help=_help(
    "Describe a checkpoint: configs, parameter counts, valid sizes, and the layouts that fit N GPUs.",
    "  usp-infer info",
    "  usp-infer info models/ltx-video --gpus 8 --json",
))
def info(
    model: Path = typer.Argument(DEFAULT_MODEL, help="Diffusers-format LTX folder [default: the embedded tiny model]."),
    gpus: int = _opt(1, help="Number of processes to list (cfg, ring, ulysses) layouts for."),
    json_summary: bool = _opt(False, "--json", help="Print JSON instead of text."),
) -> None:
    from .dist import layouts
    from .pipeline import read_model_configs

    if gpus < 1:
        _fail(2, f"--gpus {gpus} must be at least 1")
    try:
        configs = read_model_configs(model)
    except ValueError as e:
        _fail(2, str(e))
    t = configs["transformer"]
    heads = t["num_attention_heads"]
    try:
        _check_weights(model)
    except RuntimeError as e:
        _fail(1, str(e))
    params = {name: _count_parameters(model / name) for name in ("transformer", "vae", "text_encoder")}
    summary = {
        "model": str(model),
        "transformer": {k: t[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "caption_channels")},
        "parameters": params,
        "frames": "8k+1 (e.g. 9, 17, 25, 49, 97, 121, 161, 257)",
        "height_width": "multiples of 32 (e.g. 480x704, 512x768, 704x1216)",
        "tokens": "((frames-1)/8+1) * (height/32) * (width/32)",
        "layouts": [{"cfg": c, "ring": r, "ulysses": u} for c, r, u in layouts(gpus, heads, 3)],
        "configs": configs,
    }
    if json_summary:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"model        {model}")
    typer.echo("transformer  " + ", ".join(f"{k} {v}" for k, v in summary["transformer"].items()))
    typer.echo("parameters   " + ", ".join(f"{k} {n / 1e6:.2f}M" for k, n in params.items()))
    typer.echo(f"frames       {summary['frames']}")
    typer.echo(f"height/width {summary['height_width']}")
    typer.echo(f"tokens       {summary['tokens']}")
    typer.echo(f"layouts for {gpus} process(es) (cfg x ring x ulysses; cfg needs guidance branches):")
    for layout in summary["layouts"]:
        typer.echo(f"  --cfg-parallel {layout['cfg']} --ring-degree {layout['ring']} --ulysses-degree {layout['ulysses']}")


def _register_bench() -> None:
    from .bench import bench_command  # torch + typer only: runs where diffusers is not installed

    app.command(
        "bench",
        help="Time denoising steps of a full-size LTX transformer (random bf16 weights) on 1..N GPUs.\n\n"
        "\b\nExamples:\n"
        "  usp-infer bench --shape ltx-video-13b --height 512 --width 768 --num-frames 121\n"
        "  torchrun --nproc_per_node 4 -m usp_infer bench --layouts all --a2a-mode both --json-out r.json",
    )(bench_command)


_register_bench()


def main() -> None:
    app()
