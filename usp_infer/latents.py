"""The final latents a run keeps when its VAE decode fails (`OUTPUT.latents.npz`), and `usp-infer decode`.

The file holds exactly what the VAE was decoding (denormalised, decode noise already mixed in) plus the
decode timestep, fps, model path and config hash, dtype and the resolved request: decoding it again
gives the frames the run would have written, bit for bit on the same device and dtype.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import typer

from .batch import Item, _check_output
from .config import GenerateRequest, ParallelConfig, Session, pick_device
from .errors import UsageError, one_line
from .guidance import GuidanceConfig

FORMAT = 1


def latents_path(output: Path) -> Path:
    """Where a failed decode of `output` keeps its latents: beside it, "x.mp4" -> "x.mp4.latents.npz"."""
    output = Path(output)
    return output.with_name((output.name or output.absolute().name) + ".latents.npz")


def keep_latents(item: Item, s: Session, result) -> Path:
    """Write the latents (and what decoding them needs) beside the item's output; returns the path."""
    from .media import _atomic_file
    from .sidecar import config_hash

    path = latents_path(item.output)
    meta = {
        "format": FORMAT, "output": str(item.output), "request": asdict(item.request), "seed": item.request.seed,
        "model": {"path": str(s.model.resolve()), "config_sha256": config_hash(s.model)},
        "fps": item.request.fps, "decode_timestep": result.decode_timestep,
        "decode_noise_scale": item.request.decode_noise_scale, "dtype": s.dtype,
    }
    with _atomic_file(path, overwrite=True) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, latents=result.latents.astype(np.float32, copy=False), meta=np.array(json.dumps(meta)))
    return path


def read_latents(path: Path) -> tuple[np.ndarray, dict]:
    try:
        with np.load(path, allow_pickle=False) as data:
            latents, meta = data["latents"], json.loads(str(data["meta"]))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; pass the .latents.npz a failed decode kept") from None
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{path} is not a .latents.npz that usp-infer kept ({one_line(e)})") from None
    if meta.get("format") != FORMAT or latents.ndim != 4:
        raise UsageError(f"{path} is not a .latents.npz of this usp-infer (format {meta.get('format')})")
    return latents, meta


def _request(d: dict) -> GenerateRequest:
    g = d["guidance"]
    guidance = GuidanceConfig(**{**g, **{k: tuple(g[k]) for k in ("cfg", "stg", "rescale", "timesteps")},
                                 "stg_blocks": tuple(tuple(b) for b in g["stg_blocks"])})
    return GenerateRequest(**{**d, "guidance": guidance})


def run_decode(path: Path, output: Path | None, model: Path | None, vae_tiling: bool, device: str,
               dtype: str | None, overwrite: bool, quiet: bool, debug: bool) -> None:
    """Decode a kept .latents.npz. Bad input raises UsageError before anything loads; a failure of the
    decode itself raises as it is (the CLI puts it in one line)."""
    from .ltx_video.request import read_model_configs
    from .sidecar import config_hash

    latents, meta = read_latents(path)
    model = model or Path(meta["model"]["path"])
    try:
        read_model_configs(model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if config_hash(model) != meta["model"]["config_sha256"]:
        raise UsageError(f"{path} was made with other model configs than {model} holds; pass --model with the run's model")
    output = output or Path(meta["output"])
    request = _request(meta["request"])
    s = Session(model=model, device=device, dtype=dtype or meta["dtype"], parallel=ParallelConfig(),
                overwrite=overwrite, quiet=quiet, debug=debug, vae_tiling=vae_tiling)
    _check_output(Item(0, request, output), s)
    _decode(latents, meta, output, request, s, path)


def _decode(latents: np.ndarray, meta: dict, output: Path, request: GenerateRequest, s: Session, path: Path) -> None:
    import torch
    from diffusers import AutoencoderKLLTXVideo

    from .ltx_video.pipeline import decode_latents, needs_tiling
    from .media import sidecar_path, uint8_frames_suffice, write_json_atomic, write_video
    from .sidecar import config_hash, versions

    def say(message: str) -> None:
        if not s.quiet:
            typer.echo(message, err=True)

    place = torch.device(pick_device(s.device))
    say(f"loading the VAE of {s.model} on {place} ({s.dtype})")
    start = time.perf_counter()
    vae = AutoencoderKLLTXVideo.from_pretrained(s.model / "vae", torch_dtype=getattr(torch, s.dtype)).to(place).eval()
    load_s, start = time.perf_counter() - start, time.perf_counter()
    x = torch.from_numpy(latents)[None].to(place, getattr(torch, s.dtype))
    decode_t = None if meta["decode_timestep"] is None else torch.tensor([meta["decode_timestep"]], device=place, dtype=x.dtype)
    tiling = needs_tiling(vae, tuple(x.shape), place, s.vae_tiling)
    say("decoding" + (" in tiles" if tiling else ""))
    with torch.no_grad():
        frames = decode_latents(vae, x, decode_t, tiling, uint8_frames_suffice(output))
    decode_s, start = time.perf_counter() - start, time.perf_counter()
    say(f"writing {output}")
    written = write_video(output, frames, fps=meta["fps"], latents=latents, overwrite=s.overwrite)
    write_s = time.perf_counter() - start
    write_json_atomic(sidecar_path(output), {
        "output": str(output), "request": asdict(request), "seed": request.seed, "decoded_from": str(path),
        "model": {"path": str(s.model.resolve()), "config_sha256": config_hash(s.model)},
        "device": str(place), "dtype": s.dtype, "vae_tiling": tiling,
        "timings": {"model_load_s": round(load_s, 4), "decode_s": round(decode_s, 4), "write_s": round(write_s, 4)},
        "versions": versions(),
    })
    say(f"wrote {written[0] if len(written) == 1 else output}")
