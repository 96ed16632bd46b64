"""Is a freshly written tiny model the committed one? What matters, not the bytes a library release stamps.

- weights: every tensor of every safetensors file, bit for bit (names, dtypes, shapes, values);
- JSON (configs, tokenizer files): equal as JSON, without the writing library's version stamps; a key only
  the fresh file has is a newer library writing its own default out, which the committed file loads to anyway;
- anything else (a sentencepiece model): byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

VERSION_STAMPS = ("_diffusers_version", "transformers_version")


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def unstamped(value: object) -> object:
    if isinstance(value, dict):
        return {k: unstamped(v) for k, v in value.items() if k not in VERSION_STAMPS}
    return value


def _missing_or_changed(committed: object, fresh: object, where: str) -> list[str]:
    """Where `fresh` lacks or changes something `committed` holds (keys only `fresh` has are allowed)."""
    if isinstance(committed, dict) and isinstance(fresh, dict):
        return [d for k, v in committed.items()
                for d in (_missing_or_changed(v, fresh[k], f"{where}.{k}") if k in fresh else [f"{where}.{k} missing"])]
    return [] if committed == fresh else [f"{where}: {json.dumps(committed)[:60]} -> {json.dumps(fresh)[:60]}"]


def differences(fresh: Path, committed: Path) -> list[str]:
    """Every way `fresh` is not the committed model `committed`; [] when it is."""
    if files(fresh) != files(committed):
        return [f"files differ: {sorted(set(files(fresh)) ^ set(files(committed)))}"]
    out = []
    for name in files(committed):
        a, b = fresh / name, committed / name
        if name.endswith(".safetensors"):
            ours, theirs = load_file(a), load_file(b)
            if ours.keys() != theirs.keys():
                out.append(f"{name}: tensor names differ")
            out += [f"{name}:{key}" for key in theirs if key in ours and not (
                ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape
                and torch.equal(ours[key], theirs[key]))]
        elif name.endswith(".json"):
            out += _missing_or_changed(unstamped(json.loads(b.read_text())), unstamped(json.loads(a.read_text())), name)
        elif a.read_bytes() != b.read_bytes():
            out.append(f"{name}: bytes differ")
    return out
