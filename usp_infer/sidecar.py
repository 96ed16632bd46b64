"""The JSON sidecar written beside every output: what made it, how long it took, what it used."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config import Session
from .families import family_of

if TYPE_CHECKING:  # batch.py reads sidecars (config_hash) for --resume: a type-only import keeps it one way
    from .batch import Item


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"usp_infer": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def config_hash(model: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(model.glob("*/*.json")) + sorted(model.glob("*.json")):
        digest.update(path.relative_to(model).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def peak_memory_gb(device) -> float:
    """This rank's peak memory: on CUDA since the last reset_peak_memory_stats (the runner resets it before
    each item); on CPU the process's high-water mark, the only honest number there (ru_maxrss is in KiB)."""
    import resource

    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def peak_memory_of(device) -> str:
    return "cuda max_memory_allocated, this item" if device.type == "cuda" else "process max RSS, whole run so far"


def input_records(request) -> list[dict]:
    """The request's input files (conditions, clips, sounds), each with the sha256 of its bytes as read now."""
    from .media import file_sha256

    return [{**record, "sha256": file_sha256(record["path"])} for record in request.inputs()]


def build_sidecar(item: Item, s: Session, mesh, result, seconds: float, load_s: float,
                  peaks: list[float], written: dict, write_s: float = 0.0, quantization: dict | None = None) -> dict:
    """`peaks`: each rank's peak_memory_gb, in rank order; `written`: media.fingerprint of the output;
    `quantization`: quant.describe of the transformer."""
    from . import graphs

    return {
        "output": str(item.output),
        **written,
        "request": asdict(item.request),
        **({"inputs": input_records(item.request)} if hasattr(item.request, "inputs") else {}),
        "seed": item.request.seed,
        "model": {"path": str(s.model.resolve()), "family": family_of(s.model).name, "config_sha256": config_hash(s.model)},
        "parallel": {
            "world_size": mesh.world_size, "cfg": mesh.cfg_degree, "ring": mesh.ring_degree,
            "ulysses": mesh.ulysses_degree, "a2a_mode": mesh.a2a_mode, "dist_timeout_s": s.parallel.timeout_s,
            "layout_choice": s.parallel.choice or {"mode": "auto" if s.parallel.auto else "explicit"},
        },
        "device": str(mesh.device),
        "dtype": s.dtype,
        "compiled": s.compile,
        # asked for and possible on this layout (stages of fewer than graphs.MIN_STEPS steps run plain regardless)
        "cuda_graphs": s.cuda_graphs and graphs.possible(mesh),
        "quantization": quantization or {"method": "none"},
        "vae_tiling": result.vae_tiling,
        "timings": {
            "total_s": round(seconds, 4),
            "encode_text_s": round(result.encode_text_time, 4),
            "denoise_s": round(sum(result.step_times), 4),
            "decode_s": round(result.decode_time, 4),
            "write_s": round(write_s, 4),
            "step_s": [round(t, 4) for t in result.step_times],
            "model_load_s": round(load_s, 4),  # once per run, shared by its items
            **{k: round(v, 4) for k, v in getattr(result, "phases", {}).items()},  # LTX-2: stage 1, upsample, ...
        },
        "peak_memory_gb": max(peaks),
        "peak_memory_gb_per_rank": peaks,
        "peak_memory_of": peak_memory_of(mesh.device),
        **({"recipe": result.recipe} if getattr(result, "recipe", None) else {}),  # LTX-2: sigmas, LoRAs, stages
        "versions": versions(),
    }


