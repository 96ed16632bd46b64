"""Peak RSS of a real-width LTX-2.3 bf16 checkpoint on CPU: `usp-infer generate` vs diffusers' LTX2Pipeline.

Writes a diffusers-format LTX-2.3 folder in a temp directory: every component from `usp_infer.tiny_ltx2`
(tiny Gemma-3, video/audio VAEs, BWE vocoder, tokenizer, scheduler) except

- the transformer: diffusers' `LTX2VideoTransformer3DModel` with the real LTX-2.3 config
  (`ltx2.SHAPES["ltx-2.3-22b"]`: 32 x 128 video, 32 x 64 audio, gated attention, cross_attn_mod, prompt
  adaLN, STG) but `num_layers=2`, and in/out channels set to the tiny VAEs' latent widths (8 video
  channels, 8 packed audio channels; the real 128 would not match the tiny VAEs' latents, and they are
  two small Linear layers either way). Random weights, saved in bfloat16 with `max_shard_size="500MB"`,
  so `transformer/` holds several shards and `diffusion_pytorch_model.safetensors.index.json`;
- the connectors: the tiny connectors config (1 layer each, tiny Gemma input) but at the transformer's
  text widths, 32 x 128 = 4096 (video) and 32 x 64 = 2048 (audio) as in the real LTX-2.3 connectors,
  saved in bfloat16.

Then runs, each in its own fresh subprocess, (1) `python -m usp_infer generate ...` (the `usp-infer`
entry point) and (2) diffusers' `LTX2Pipeline.from_pretrained(DIR, torch_dtype=torch.bfloat16)(...)` at the
same size, steps and guidance, and reports each child's peak RSS (ru_maxrss from `os.wait4` of that child),
wall time and whether its outputs are finite.

    PYTHONPATH=$PWD python bench/rss_ltx2.py --json-out rss_ltx2.json [--keep] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red fox running through a snowy forest at sunrise, cinematic"
HEIGHT, WIDTH, FRAMES, STEPS, SEED = 64, 64, 9, 2, 0
NUM_LAYERS = 2
SHARD = "500MB"
# The real LTX-2.3 connectors' widths (each must equal the transformer's stream width it feeds).
VIDEO_CONNECTOR_HEADS, VIDEO_CONNECTOR_HEAD_DIM = 32, 128
AUDIO_CONNECTOR_HEADS, AUDIO_CONNECTOR_HEAD_DIM = 32, 64


def transformer_config() -> dict:
    from usp_infer.ltx2 import model as ltx2
    from usp_infer.ltx2 import tiny as tiny_ltx2

    cfg = dataclasses.asdict(ltx2.SHAPES["ltx-2.3-22b"])
    cfg["vae_scale_factors"] = list(cfg["vae_scale_factors"])
    cfg.update(num_layers=NUM_LAYERS,
               in_channels=tiny_ltx2.LATENT_CHANNELS, out_channels=tiny_ltx2.LATENT_CHANNELS,
               audio_in_channels=tiny_ltx2.AUDIO_TOKEN_DIM, audio_out_channels=tiny_ltx2.AUDIO_TOKEN_DIM)
    return cfg


def connectors_config(tcfg: dict) -> dict:
    from usp_infer.ltx2 import tiny as tiny_ltx2

    video_dim = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    audio_dim = tcfg["audio_num_attention_heads"] * tcfg["audio_attention_head_dim"]
    assert VIDEO_CONNECTOR_HEADS * VIDEO_CONNECTOR_HEAD_DIM == video_dim == tcfg["cross_attention_dim"]
    assert AUDIO_CONNECTOR_HEADS * AUDIO_CONNECTOR_HEAD_DIM == audio_dim == tcfg["audio_cross_attention_dim"]
    cfg = tiny_ltx2.connectors_config("2.3")
    cfg.update(video_connector_num_attention_heads=VIDEO_CONNECTOR_HEADS,
               video_connector_attention_head_dim=VIDEO_CONNECTOR_HEAD_DIM,
               audio_connector_num_attention_heads=AUDIO_CONNECTOR_HEADS,
               audio_connector_attention_head_dim=AUDIO_CONNECTOR_HEAD_DIM,
               video_hidden_dim=video_dim, audio_hidden_dim=audio_dim)
    return cfg


def write_folder(directory: Path, seed: int = SEED) -> dict:
    """Write the checkpoint; returns facts about it (shards, parameter counts, bytes)."""
    import torch
    from diffusers import LTX2Pipeline, LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    from usp_infer.ltx2 import tiny as tiny_ltx2

    components = tiny_ltx2.build_components(seed, "2.3")
    tcfg = transformer_config()
    # Build the two wide modules directly in bf16 (half the build memory of fp32 + cast).
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(seed + 4)
        components["transformer"] = LTX2VideoTransformer3DModel(**tcfg).eval()
        torch.manual_seed(seed + 3)
        components["connectors"] = LTX2TextConnectors(**connectors_config(tcfg)).eval()
    finally:
        torch.set_default_dtype(default)
    for name in ("transformer", "connectors"):
        tiny_ltx2._perturb_constants(components[name])
    params = {name: sum(p.numel() for p in components[name].parameters()) for name in ("transformer", "connectors")}
    pipe = LTX2Pipeline(**components, processor=None, prompt_enhancer=None, duration_head=None)
    pipe.save_pretrained(directory, safe_serialization=True, max_shard_size=SHARD)
    del pipe, components
    tdir = directory / "transformer"
    index = tdir / "diffusion_pytorch_model.safetensors.index.json"
    if not index.is_file():
        raise RuntimeError(f"{index} was not written: the transformer is not sharded")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    sizes = {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*.safetensors")}
    return {
        "transformer_config": {k: v for k, v in json.loads((tdir / "config.json").read_text()).items()
                               if not k.startswith("_")},
        "connectors_widths": {"video": VIDEO_CONNECTOR_HEADS * VIDEO_CONNECTOR_HEAD_DIM,
                              "audio": AUDIO_CONNECTOR_HEADS * AUDIO_CONNECTOR_HEAD_DIM},
        "parameters": params,
        "transformer_shards": len(shards),
        "transformer_index": index.name,
        "transformer_bytes": sum(v for k, v in sizes.items() if k.startswith("transformer/")),
        "folder_bytes": sum(sizes.values()),
    }


# --- the children -------------------------------------------------------------------------------------------


def ours_command(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "usp_infer", "generate", "--model", str(model), "--dtype", "bfloat16",
            "--device", "cpu", "--steps", str(STEPS), "--height", str(HEIGHT), "--width", str(WIDTH),
            "--num-frames", str(FRAMES), "--seed", str(SEED), "--prompt", PROMPT, "-o", str(out), "--quiet"]


def diffusers_child(model: str, out: str) -> None:
    """Run in the child: diffusers' pipeline, video frames and audio saved to `out` (.npz)."""
    import numpy as np
    import torch
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline.from_pretrained(model, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    layers = pipe.transformer.config.num_layers
    result = pipe(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS,
                  # the same STG block as ours: the recipe's block 28 clamped to the last one, as usp-infer does
                  spatio_temporal_guidance_blocks=[min(28, layers - 1)],
                  generator=torch.Generator().manual_seed(SEED), output_type="np", return_dict=False)
    video, audio = result[0], result[1]
    arrays = {"video": np.asarray(video, dtype=np.float32)}
    if audio is not None:
        arrays["audio"] = (audio.float() if torch.is_tensor(audio) else torch.as_tensor(audio).float()).numpy()
    np.savez(out, **arrays)


def measure(name: str, cmd: list[str], out: Path, env: dict) -> dict:
    """Run `cmd` as a fresh child; its own peak RSS from wait4 (not the max over every child so far)."""
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss_kib = usage.ru_maxrss if platform.system() == "Linux" else usage.ru_maxrss // 1024  # macOS: bytes
    row = {"name": name, "returncode": proc.returncode, "peak_rss_mib": round(rss_kib / 1024, 1),
           "wall_s": round(wall, 2), "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2)}
    if proc.returncode != 0:
        row["log_tail"] = out.with_suffix(".log").read_text()[-3000:]
        row["finite"] = False
        return row
    import numpy as np

    with np.load(out) as data:
        row["outputs"] = {k: list(data[k].shape) for k in data.files}
        row["finite"] = bool(data.files) and all(bool(np.isfinite(data[k]).all()) for k in data.files)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json-out", type=Path, required=True)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (checkpoint, outputs, logs)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp folder [default: $TMPDIR]")
    parser.add_argument("--only", choices=("ours", "diffusers"), default=None)
    parser.add_argument("--_diffusers-child", nargs=2, metavar=("MODEL", "OUT"), dest="child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        diffusers_child(*args.child)
        return

    root = Path(tempfile.mkdtemp(prefix="rss-ltx2-", dir=args.workdir))
    model = root / "ltx23-realwidth-2blocks"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    try:
        t0 = time.perf_counter()
        # The folder is written in its own child too, so this process stays small while the others run.
        build = subprocess.run([sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
                                "import rss_ltx2 as r; from pathlib import Path; "
                                "print(json.dumps(r.write_folder(Path(sys.argv[2]))))",
                                str(Path(__file__).resolve().parent), str(model)],
                               env=env, check=True, capture_output=True, text=True)
        checkpoint = json.loads(build.stdout.strip().splitlines()[-1])
        checkpoint["write_s"] = round(time.perf_counter() - t0, 1)
        print(f"checkpoint: {checkpoint['parameters']['transformer'] / 1e9:.3f} B transformer parameters in "
              f"{checkpoint['transformer_shards']} shards + {checkpoint['transformer_index']}, "
              f"{checkpoint['transformer_bytes'] / 2**20:.0f} MiB; connectors "
              f"{checkpoint['parameters']['connectors'] / 1e6:.0f} M parameters; written in {checkpoint['write_s']} s",
              flush=True)
        runs = {
            "ours": ours_command(model, root / "ours.npz"),
            "diffusers": [sys.executable, str(Path(__file__).resolve()), "--json-out", os.devnull,
                          "--_diffusers-child", str(model), str(root / "diffusers.npz")],
        }
        rows = []
        for name, cmd in runs.items():
            if args.only and name != args.only:
                continue
            row = measure(name, cmd, root / f"{name}.npz", env)
            row["command"] = " ".join(cmd).replace(str(root), "$TMP").replace(sys.executable, "python")
            rows.append(row)
            print(f"{name}: rc {row['returncode']}, peak RSS {row['peak_rss_mib']} MiB, {row['wall_s']} s, "
                  f"finite {row['finite']}", flush=True)
        print()
        print("| run | peak RSS (MiB) | wall (s) | user+sys CPU (s) | outputs finite |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['peak_rss_mib']:,.0f} | {r['wall_s']:.1f} | {r['user_s'] + r['sys_s']:.1f} | "
                  f"{r['finite']} |")
        result = {
            "what": "peak RSS of a real-width LTX-2.3 bf16 checkpoint (2 blocks, sharded) on CPU, 2 steps",
            "size": {"height": HEIGHT, "width": WIDTH, "num_frames": FRAMES, "steps": STEPS, "seed": SEED},
            "prompt": PROMPT,
            "checkpoint": checkpoint,
            "runs": rows,
            "environment": {"python": platform.python_version(), "torch": _version("torch"),
                            "diffusers": _version("diffusers"), "transformers": _version("transformers"),
                            "cpus": os.cpu_count(), "machine": platform.machine()},
        }
        repo = str(Path(__file__).resolve().parents[1])
        text = json.dumps(result, indent=2).replace(str(root), "$TMP").replace(repo, ".")
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
        if any(r["returncode"] != 0 or not r["finite"] for r in rows):
            for r in rows:
                if "log_tail" in r:
                    print(f"--- {r['name']} log tail ---\n{r['log_tail']}", file=sys.stderr)
            sys.exit(1)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _version(module: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(module)


if __name__ == "__main__":
    main()
