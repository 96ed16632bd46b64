"""A run's items: the batch file read into requests, every output checked, and the resume to-do list."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from .config import GenerateRequest, ParallelConfig, Session
from .errors import UsageError
from .families import Family, resolve
from .request import ITEM_KEYS


@dataclass(frozen=True)
class Item:
    index: int
    request: GenerateRequest
    output: Path
    where: str = ""  # for messages in a batch: "line 3 of prompts.jsonl"


def at(item: Item, message: str) -> str:
    return f"{item.where}: {message}" if item.where else message


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _finished(item: Item, s: Session) -> bool:
    """Whether --resume may skip `item`: its sidecar (written only after the output is in place) was made for
    the same request, model configs and dtype, and the output on disk is the one it describes (size and sha256).

    No readable sidecar: the file is not ours, and is never replaced without --overwrite. A sidecar whose
    output is missing or differs (a crash before the data reached the disk): ours, unfinished, redone. With
    --overwrite, what --resume alone refuses (no sidecar of ours, other settings) is redone instead.
    """
    from .media import fingerprint, sidecar_path
    from .sidecar import config_hash

    # A frames/%04d.png pattern names no file itself; its frames live in the directory.
    if not (item.output.exists() or "%" in item.output.name and item.output.parent.is_dir()):
        return False
    try:
        record = json.loads(sidecar_path(item.output).read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        if s.overwrite:
            return False
        raise UsageError(
            f"{at(item, str(item.output))} exists but has no usp-infer sidecar, so this run did not write it; "
            "pass --overwrite to replace it, or give the line another 'output'"
        )
    # The whole request as JSON, field by field: a field a family adds later (a recipe, a LoRA, a condition)
    # is compared, and named, without a change here.
    request = record.get("request")
    differ = changes(request, json.loads(json.dumps(asdict(item.request)))) if isinstance(request, dict) else ["request"]
    differ += changes({"model config": record.get("model", {}).get("config_sha256"), "dtype": record.get("dtype")},
                      {"model config": config_hash(s.model), "dtype": s.dtype})
    if differ:
        if s.overwrite:
            return False
        raise UsageError(
            f"{at(item, str(item.output))} was made with other settings than this line asks for ({'; '.join(differ)}); "
            "pass --overwrite to redo it, or give the line another 'output'"
        )
    try:
        on_disk = fingerprint(item.output)
    except OSError:
        return False
    return all(record.get(key) == value for key, value in on_disk.items())


def changes(made: object, wanted: object, name: str = "") -> list[str]:
    """What differs between two JSON values, each as 'dotted.name recorded -> asked' ('steps 30 -> 40')."""
    if isinstance(made, dict) and isinstance(wanted, dict):
        return [change for key in sorted(set(made) | set(wanted), key=str)
                for change in changes(made.get(key), wanted.get(key), f"{name}.{key}" if name else str(key))]
    return [] if made == wanted else [f"{name} {_short(made)} -> {_short(wanted)}"]


def _short(value: object, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_output(item: Item, s: Session) -> bool:
    """Validate an item's output path; False means 'finished already, skip it' (--resume)."""
    from .media import output_kind, sidecar_path

    try:
        kind = output_kind(item.output)
    except ValueError as e:
        raise UsageError(at(item, str(e))) from None
    # Where files will be created: a png directory output is filled itself, everything else lands beside.
    folder = item.output if kind == "png" and item.output.suffix.lower() != ".png" else item.output.parent
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UsageError(at(item, f"cannot create output directory {folder}: {existing} is a file; choose another output path"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(at(item, f"output directory {existing} is not writable; choose another output path"))
    present = [p for p in (item.output, sidecar_path(item.output)) if p.exists()]
    if present:
        if s.resume and _finished(item, s):
            return False
        if not s.overwrite and not s.resume:
            hint = "pass --overwrite to replace it" + (", or --resume to skip finished items" if s.batch else "")
            raise UsageError(at(item, f"{present[0]} exists; {hint}"))
    _probe_write(item, existing)
    return True


def _probe_write(item: Item, directory: Path) -> None:
    """Create and delete a file in `directory`: root passes os.access everywhere, and /proc or a read-only mount
    refuse only an actual write. The directory's times are put back, so a refused run has changed nothing."""
    times = directory.stat()
    try:
        fd, probe = tempfile.mkstemp(prefix=".usp-infer-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(at(item, f"output directory {directory} is not writable ({e.strerror}); choose another output path")) from None
    try:
        os.utime(directory, ns=(times.st_atime_ns, times.st_mtime_ns))
    except OSError:
        pass


def _check_image(item: Item) -> None:
    from PIL import Image, UnidentifiedImageError

    path = item.request.image
    try:
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        raise UsageError(at(item, f"--image {path} does not exist; pass an existing PNG or JPEG file")) from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise UsageError(at(item, f"--image {path} is not a readable PNG or JPEG image; pass a PNG or JPEG file")) from None


def text_length_limit(configs: dict, default: int) -> int:
    """The most tokens a prompt may be padded to: the tokenizer's model_max_length (LTXPipeline's bound), or the
    family's `default` where the tokenizer writes transformers' huge "no limit" sentinel."""
    limit = configs.get("tokenizer", {}).get("model_max_length")
    return int(limit) if isinstance(limit, (int, float)) and 0 < limit < 1e6 else default


def check_layout(s: Session, request=None) -> tuple[ParallelConfig, Family, dict]:
    """The model folder, the device and the layout against the world size: no process group needed, so
    every rank runs it before joining one (a wrong layout fails at once, not in a rendezvous). With
    --layout auto the cost model picks the layout for `request` (the run's first item); before the items
    are known there is nothing to check: some layout fits every world."""
    from .parallel.dist import (
        check_device,
        choose_parallel,
        env_world_size,
        resolve_parallel,
        validate_layout,
    )

    try:
        family, configs = resolve(s.model)
        world = env_world_size()
        heads = family.requests().attention_heads(configs)
        parallel = s.parallel
        if parallel.auto and world > 1 and request is not None:
            work = family.requests().workload(request, configs, parallel.a2a_mode, s.compile)
            parallel = choose_parallel(parallel, world, work)
        elif parallel.auto and world > 1:
            parallel = replace(parallel, cfg=1, ring=world, ulysses=1)  # a stand-in that fits (ring any degree)
        parallel = resolve_parallel(parallel, world, heads)
        validate_layout(parallel, world, heads)
        check_device(s.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return parallel, family, configs


def plan_items(items: list[Item], s: Session) -> tuple[ParallelConfig, list[Item], Family]:
    """Every check that needs no weights, for every item, before anything loads or is written."""
    parallel, family, configs = check_layout(s, items[0].request if items else None)
    front = family.requests()
    outputs = [i.output.resolve() for i in items]
    if len(set(outputs)) != len(outputs):
        dup = next(o for o in outputs if outputs.count(o) > 1)
        raise UsageError(f"two items write the same output {dup}; give each its own 'output'")
    todo = []
    for item in items:
        _check_audio_output(item, family)
        longest = text_length_limit(configs, front.MAX_TEXT_TOKENS)
        if item.request.max_sequence_length > longest:
            raise UsageError(at(item, f"--max-sequence-length {item.request.max_sequence_length} is longer than the "
                                      f"tokenizer of {s.model} takes ({longest}); use at most {longest}"))
        if item.request.image is not None:
            _check_image(item)
        check_files = getattr(front, "check_files", None)  # the family's input files, opened before weights load
        if check_files is not None:
            try:
                _warn(item, s, check_files(item.request))
            except ValueError as e:
                raise UsageError(at(item, str(e))) from None
        if _check_output(item, s):
            todo.append(item)
    return parallel, todo, family


def _warn(item: Item, s: Session, warnings: list[str]) -> None:
    """Things done to an input that the user may not expect (one line each, main rank, not under --quiet)."""
    import sys

    from .parallel.dist import env_rank

    for warning in warnings if not s.quiet and env_rank() == 0 else ():
        print(f"warning: {item.where + ': ' if item.where else ''}{warning}", file=sys.stderr)


def _check_audio_output(item: Item, family: Family) -> None:
    from .media import output_kind

    try:
        kind = output_kind(item.output)
    except ValueError:
        return  # _check_output names it
    if kind == "wav" and not family.audio:
        raise UsageError(at(item, f"--output {item.output}: {family.name} models make no audio; "
                                  "use .mp4, .npz or .png frames"))
    if kind == "wav" and not getattr(item.request, "audio", True):
        raise UsageError(at(item, f"--output {item.output} is audio only, but --no-audio skips the audio; "
                                  "drop one of them"))


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "video"


def read_batch(path: Path, flags: dict, output_dir: Path, build: Callable[[dict], object]) -> list[Item]:
    """JSON Lines -> items; each line's keys override the shared flags; `build` makes a line's request.
    Errors name the line.

    Under torchrun only rank 0 reads the file (the others return no items and run rank 0's, which the
    runner broadcasts): ranks whose disks differ cannot disagree about the work."""
    from .parallel.dist import env_rank

    if env_rank() != 0:
        return []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UsageError(f"batch file {path} cannot be read ({e.strerror})") from None
    items, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"line {number} of {path}"
        try:
            request, output = _read_line(where, line, flags, build)
        except UsageError as e:
            problems.append(str(e))  # every bad line is named, not just the first
            continue
        index = len(items)
        if output is None:
            output = output_dir / f"{index:04d}-{_slug(request.prompt)}-s{request.seed}.mp4"
        items.append(Item(index, request, Path(output).expanduser(), where))
    if problems:
        raise UsageError("; ".join(problems))
    if not items:
        raise UsageError(f"batch file {path} has no items")
    return items


def _read_line(where: str, line: str, flags: dict, build: Callable[[dict], object]) -> tuple[object, str | None]:
    """One line -> (its request, its "output" or None); UsageError naming the line and every bad key."""
    from .batch_keys import wrong_kinds

    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where} is not valid JSON ({e.msg}); each line must be one object like {{\"prompt\": \"...\"}}") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        raise UsageError(f"{where} needs a \"prompt\" string")
    unknown = set(entry) - ITEM_KEYS
    if unknown:
        raise UsageError(f"{where} has unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(ITEM_KEYS))}")
    wrong = wrong_kinds(entry)
    if wrong:
        raise UsageError(f"{where}: " + ", ".join(wrong))
    output = entry.pop("output", None)
    try:
        return build({**flags, **entry}), output
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
