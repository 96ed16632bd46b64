"""The run loop shared by generate and batch: validate, load once, run each item, write, and turn every
failure into one line and an exit code (2 bad input, 1 runtime failure, 130 interrupted)."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import NoReturn

import typer

from .batch import Item, at, check_layout, plan_items
from .config import Session, pick_device
from .errors import UsageError, one_line


class ItemError(RuntimeError):
    """A failure of one item, already put in words for the user (which item, and why)."""




def close_progress() -> None:
    """End a progress bar that an exception left open, so the error starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def fail(code: int, message: str, prefix: bool = True) -> NoReturn:
    """Print one error line and exit. A usage error is every rank's (rank 0 planned and broadcast it): rank 0
    alone prints it. `prefix=False` for an error every rank agreed on, already naming its rank if not 0."""
    from .parallel.dist import env_rank, env_world_size, report_to_launcher, wait_for_main

    close_progress()
    rank = env_rank()
    if code == 2 and rank != 0:
        wait_for_main()  # rank 0 says it; this rank exits 2 too, not 130 by torchrun's signal
        raise typer.Exit(code)
    prefix = f"rank {rank}: " if env_world_size() > 1 and code != 2 and prefix else ""
    line = f"error: {prefix}{one_line(message)}"
    typer.echo(line, err=True)
    if code == 2:
        report_to_launcher(line)  # torchrun's closing report then names it as the root cause, last
    raise typer.Exit(code)


def check_weights(model: Path) -> None:
    """Open every safetensors header, so a truncated or corrupted file is named instead of failing deep in a loader."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(model.glob("*/*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise RuntimeError(f"{path} is truncated or corrupted ({one_line(e)}); copy or download it again") from None


def _may_continue(error: Exception, s: Session, world_size: int) -> bool:
    """--keep-going, except where the ranks could disagree about moving on (which would hang them)."""
    from .parallel.dist import AgreedError
    from .parallel.plan import NonFiniteError

    # Every rank sees the same non-finite check (it is all-reduced) and the same broadcast error (rank 0's
    # preparing or writing); any other error may be one rank's alone.
    return s.keep_going and (world_size == 1 or isinstance(error, (NonFiniteError, AgreedError)))


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
    from .parallel.dist import AgreedError

    if not isinstance(error, (ValueError, RuntimeError, OSError)):
        return f"{type(error).__name__}: {error}"
    if isinstance(error, AgreedError):
        return str(error)
    if world_size > 1 and _in_collective(error):
        first = one_line(error).split(". ")[0]  # gloo/NCCL append paragraphs of generic advice
        return (
            f"lost contact with another rank in a collective ({first}); that rank failed, was killed or hangs: "
            f"see its error. A rank that stops answering is given up on after --dist-timeout {timeout_s:g} s"
        )
    return str(error)


def _plan(items: list[Item], s: Session, control) -> tuple[list[Item], object, list[Item], object]:
    """Rank 0 plans (validation, output checks, the --resume to-do list) and every rank takes its plan,
    the items included: a rank that reads another batch file, or sees other files, cannot run other work.
    A usage error is raised on every rank (rank 0 alone prints it)."""
    from .parallel.dist import from_main

    def make():
        parallel, todo, family = plan_items(items, s)
        return items, parallel, todo, family

    return from_main(make, control)


def _run(items: list[Item], s: Session) -> None:
    """Validate everything, then load once and run the items in order. Raises typer.Exit."""
    import torch

    from .parallel.dist import AgreedError, env_rank, join_world, teardown

    device = pick_device(s.device)
    s = replace(s, dtype=s.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32"))
    records, failures, mesh = [], [], None
    try:
        try:
            check_layout(s)  # a wrong layout fails before any rendezvous, on every rank alike (rank 0 says it)
            _check_quantize(s, device)
            control = join_world(device, s.parallel.timeout_s)
            items, parallel, todo, family = _plan(items, s, control)
            s = replace(s, parallel=parallel)  # the layout --layout auto chose, for the run and its sidecars
        except UsageError as e:
            fail(2, str(e))
        if not todo:  # everything is finished (--resume): no weights
            teardown()
            return _summarize(items, todo, records, failures, s, env_rank() == 0)
        records, failures, mesh = _run_items(items, todo, s, device, parallel, control, family)
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - the edge: one line, the full traceback only with --debug
        if s.debug:
            raise
        from .parallel.plan import NonFiniteError

        # An error every rank has (broadcast, or the all-reduced finite check): rank 0 says it, once.
        agreed = isinstance(e, AgreedError) or isinstance(e, ItemError) and isinstance(e.__cause__, (AgreedError, NonFiniteError))
        if agreed and env_rank() != 0:
            raise typer.Exit(1) from None
        world = mesh.world_size if mesh is not None else 1
        message = str(e) if isinstance(e, (ItemError, AgreedError)) else _explain(e, world, s.parallel.timeout_s)
        fail(1, message, prefix=not agreed)
    finally:
        teardown()
    _summarize(items, todo, records, failures, s, mesh.is_main)


def _check_quantize(s: Session, device: str) -> None:
    """--quantize fp8 on a GPU that cannot multiply float8 (or in a dtype it cannot): one line, before any load."""
    if s.quantize == "none":
        return
    import torch

    from .quant import check_device

    if why := check_device(torch.device(device), getattr(torch, s.dtype)):
        raise UsageError(why)


def _quantize(transformer, method: str, device) -> dict:
    """Apply --quantize to the loaded transformer (each rank its own copy, by the same deterministic ops); what
    the sidecar records. A checkpoint written in fp8 runs in fp8 with or without the flag."""
    import torch

    from . import quant

    source = "checkpoint" if quant.is_quantized(transformer) else "on-the-fly" if method == "fp8" else None
    if source == "on-the-fly":
        quant.quantize_(transformer)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the bf16 weights' blocks
    return quant.describe(transformer, source)


def _run_items(items: list[Item], todo: list[Item], s: Session, device: str, parallel, control, family):
    """Load once (rank 0 everything, the others the transformer), then each item: denoise on every rank,
    decode and write on rank 0 while the others wait without a --dist-timeout deadline."""
    import torch

    from . import graphs
    from .errors import DecodeError
    from .latents import keep_latents
    from .media import (
        fingerprint,
        remove_stale_temps,
        sidecar_path,
        uint8_frames_suffice,
        write_json_atomic,
        write_video,
    )
    from .parallel.dist import agree, describe_choice
    from .parallel.plan import Plan
    from .sidecar import build_sidecar, peak_memory_gb

    pipe = family.pipeline()
    records, failures = [], []
    plan = Plan.build(parallel, device, control)
    mesh = plan.mesh
    talk = mesh.is_main and not s.quiet and not s.json_summary
    if talk and parallel.choice:
        typer.echo(describe_choice(parallel.choice), err=True)

    def say(message: str) -> None:  # what is happening around the step bar (rank 0, stderr)
        if talk:
            close_progress()
            typer.echo(message, err=True)

    if s.cuda_graphs and not graphs.possible(mesh):
        where = "on the CPU" if mesh.device.type != "cuda" else "where Ulysses or ring split the sequence"
        say(f"note: --cuda-graphs does nothing {where}; the blocks run without graphs")

    start = time.perf_counter()
    error = None
    try:
        check_weights(s.model)  # every rank: each loads its own copy of the transformer; before any progress line
        if mesh.device.type == "cpu":
            from .estimate import cpu_note

            front = family.requests()
            note = cpu_note(s.model, front.read_model_configs(s.model), [i.request for i in todo], front.MAX_BRANCHES)
            if note:
                say(note)
        say(f"loading {s.model} on {mesh.device} ({s.dtype})")
        dtype = getattr(torch, s.dtype)
        try:
            # Rank 0 alone encodes the text, once per prompt, before the transformer loads (the text encoder
            # is freed first); the VAE loads only there too. The other ranks hold the transformer alone.
            texts = pipe.encode_prompts(s.model, mesh.device, dtype, [item.request for item in todo]) if mesh.is_main else {}
            components = pipe.load_components(s.model, mesh.device, dtype, main=mesh.is_main, text_encoder=False)
        except (OSError, ValueError, RuntimeError) as e:
            raise RuntimeError(f"cannot load the model in {s.model}: {one_line(e)}") from e
        components.text_cache = texts
        quantization = _quantize(components.transformer, s.quantize, mesh.device)
    except Exception as e:  # noqa: BLE001 - whatever one rank's load raised ends every rank, said once
        error = e
    agree(error, mesh.control_group)  # a rank that failed to load ends every rank, with its message
    if s.compile:
        pipe.compile_blocks(components.transformer)  # compiles lazily, during the first item's first step
    components.cuda_graphs = s.cuda_graphs
    load_s = time.perf_counter() - start

    # A batch's rank 0 writes each item's files in a thread of its own while every rank goes on with the next
    # item (the mp4 encode overlaps the next denoising; the encoder holds the GIL little). Each write's outcome
    # reaches every rank through the control group once the next item is denoised, before anything else is
    # written, so the ranks still agree about every failure, one item later.
    behind = s.batch and len(todo) > 1
    writer = ThreadPoolExecutor(1, thread_name_prefix="writer") if behind and mesh.is_main else None
    pending: list = []  # [(item, its write's future on rank 0)] while a write runs behind

    def failed(item: Item, e: Exception) -> None:
        """An item that failed: the run ends (ItemError), or with --keep-going it is counted and said."""
        if not _may_continue(e, s, mesh.world_size):
            raise ItemError(at(item, _explain(e, mesh.world_size, s.parallel.timeout_s))) from e
        failures.append({"item": item.where, "error": one_line(_explain(e, mesh.world_size, s.parallel.timeout_s))})
        if mesh.is_main:
            close_progress()
            typer.echo(f"error: {failures[-1]['item']}: {failures[-1]['error']}", err=True)

    def settle(now: tuple | None = None) -> None:
        """The outcome of the write running behind (or of `now`, an (item, write) run here), on every rank."""
        item, job = pending.pop() if now is None else now
        try:
            record, shown = plan.from_main(job.result if isinstance(job, Future) else job)
        except (ValueError, RuntimeError, OSError) as e:
            return failed(item, e)
        if mesh.is_main:
            records.append(record)
            if not s.quiet and not s.json_summary:
                close_progress()
                typer.echo(f"wrote {shown}" + (f" ({item.where})" if item.where else ""), err=True)

    def write(item: Item, result, started: float, peaks: list[float]) -> tuple[dict, Path]:
        """Rank 0: the item's files, then its sidecar (so a sidecar always describes a whole output)."""
        write_start = time.perf_counter()
        remove_stale_temps(item.output)  # left by a run that was killed while writing this item
        written = write_video(
            item.output, result.frames, fps=item.request.fps,
            overwrite=s.overwrite or s.resume,  # plan_items refused every file that is not ours
            **result.outputs(),
        )
        record = build_sidecar(item, s, mesh, result, time.perf_counter() - started, load_s, peaks,
                               fingerprint(item.output), time.perf_counter() - write_start, quantization)
        write_json_atomic(sidecar_path(item.output), record)
        return record, written[0] if len(written) == 1 else item.output

    try:
        for number, item in enumerate(todo, 1):
            start = time.perf_counter()
            prefix = f"item {number}/{len(todo)}: " if s.batch else ""

            def said(message: str, prefix: str = prefix) -> None:
                say(prefix + message)

            if s.batch:
                said(item.where or str(item.output))
            if mesh.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(mesh.device)
            try:
                try:
                    result = pipe.generate(components, item.request, plan, progress=mesh.is_main and not s.quiet,
                                           vae_tiling=s.vae_tiling, say=said,
                                           uint8_frames=uint8_frames_suffice(item.output))
                except DecodeError as e:  # the loop's work is not thrown away: keep the latents, say how to decode them
                    kept = keep_latents(item, s, e.result)
                    raise RuntimeError(
                        f"{e}; the final latents are kept in {kept}: decode them with "
                        f"`usp-infer decode {kept} -o {item.output} --vae-tiling`"
                    ) from e
                peaks = plan.gather(peak_memory_gb(mesh.device))
            except (ValueError, RuntimeError, OSError) as e:
                if pending and _may_continue(e, s, mesh.world_size):  # every rank is here: the earlier item first
                    settle()
                failed(item, e)
                continue
            if pending:
                settle()
            said(f"writing {item.output}")
            job = partial(write, item, result, start, peaks)
            if behind:
                pending.append((item, writer.submit(job) if writer else None))
            else:  # rank 0 writes; the others wait for it in the control group, where no --dist-timeout applies
                settle((item, job))
        if pending:
            settle()
    finally:
        if writer is not None:  # a run that ends early still finishes (or cleans up) the write running behind
            writer.shutdown(wait=True)
    return records, failures, mesh


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
    from .parallel.dist import env_rank

    # SIGTERM would otherwise kill the process on the spot, skipping the cleanup of a half-written temp file.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main_thread else None
    try:
        _run(items, s)
    except KeyboardInterrupt:
        if s.debug:
            traceback.print_exc()
        close_progress()
        if env_rank() == 0:
            typer.echo("error: interrupted; finished outputs are kept, the one in progress was discarded", err=True)
        raise typer.Exit(130) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


# --- commands -----------------------------------------------------------------------------------

_opt = typer.Option
