"""`usp-infer bench --recipe ...`: one whole LTX-2 generation, timed by phase, on random components.

What `generate` runs, end to end, on one process: stage 1, the stage-2 LoRA fuse, the upsample, stage 2, the
video decode, the audio decode (audio VAE + vocoder) and the mp4 write. The components are random where they
cost time, at the shape's size: the transformer of `--shape`, diffusers' video VAE at the released LTX-2 config
(`RELEASED_VIDEO_VAE`: 32x spatial, 8x temporal; the class's own defaults compress 64x/16x and would time a
stage 2 with an eighth of the tokens), audio VAE, vocoder (`LTX2VocoderWithBWE` for LTX-2.3 shapes) and
latent upsampler at their defaults (the released sizes), or the tiny model's configs for `ltx2-tiny` (how a
CPU test runs it); the "two-stage" recipe's stage-2 LoRA is a random
rank-384 one on every block projection, like the distilled LoRA. The text is a random connector output
(1,024 tokens): Gemma-3 12B is not timed here. Needs diffusers (and PyAV for the mp4), imported on use.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import bench as step_bench
from . import model as arch
from .lora import Fuser, Loaded
from .pipeline import PRESETS, Components, LTX2Guidance, LTX2Request, ModalityGuidance
from .recipes import DISTILLED_SIGMAS, STAGE2_SIGMAS, LoraSpec, Recipe
from .stages import generate

RECIPES = ("one-stage", "distilled", "two-stage", "two-stage-distilled")
LORA_RANK = 384  # Lightricks' distilled LoRA for the dev model (ltx-2-19b-distilled-lora-384)
PHASES = (("text (Gemma, not timed here)", None), ("stage 1", "stage1_s"), ("stage-2 LoRA fuse", "stage2_lora_fuse_s"),
          ("upsample", "upsample_s"), ("stage 2", "stage2_s"), ("video decode", "video_decode_s"),
          ("audio decode", "audio_decode_s"), ("mp4 write", "write_s"), ("total", "total_s"),
          ("mp4 write, smooth clip", "write_smooth_s"), ("total with that write", "total_smooth_s"))


def request(recipe: str, cfg, height: int, width: int, num_frames: int) -> LTX2Request:
    """The recipe as people run it: the dev one (the weights' four-branch guidance and steps: 30 for LTX-2.3,
    40 for LTX-2.0) or the
    distilled one (8 sigmas, one branch); two stages add the upsampler and, for the dev model, its LoRA."""
    distilled = recipe in ("distilled", "two-stage-distilled")
    two = recipe.startswith("two-stage")
    guidance = (LTX2Guidance(ModalityGuidance(), ModalityGuidance(), ()) if distilled
                else step_bench.guidance(cfg, 4))
    return LTX2Request(
        prompt="bench", height=height, width=width, num_frames=num_frames, fps=step_bench.FPS,
        steps=len(DISTILLED_SIGMAS) if distilled else PRESETS["ltx-2.3" if cfg.cross_attn_mod else "ltx-2"]["steps"], max_sequence_length=step_bench.TEXT_TOKENS,
        guidance=guidance,
        recipe=Recipe(sigmas=DISTILLED_SIGMAS if distilled else None, two_stage=two,
                      upsampler="random" if two else None, stage2_sigmas=STAGE2_SIGMAS if two else None,
                      stage2_loras=(LoraSpec("random-distilled-lora", 1.0),) if two and not distilled else ()),
    )


# diffusers' scripts/convert_ltx2_to_diffusers.py, version "2.0": the released video VAE (the class defaults differ
# in decoder_causal and leave the compression ratios to a formula that counts every stage in both axes)
RELEASED_VIDEO_VAE: dict = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 128,
    "block_out_channels": (256, 512, 1024, 2048), "down_block_types": ("LTX2VideoDownBlock3D",) * 4,
    "decoder_block_out_channels": (256, 512, 1024), "layers_per_block": (4, 6, 6, 2, 2),
    "decoder_layers_per_block": (5, 5, 5, 5), "spatio_temporal_scaling": (True, True, True, True),
    "decoder_spatio_temporal_scaling": (True, True, True), "decoder_inject_noise": (False, False, False, False),
    "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    "upsample_residual": (True, True, True), "upsample_factor": (2, 2, 2), "timestep_conditioning": False,
    "patch_size": 4, "patch_size_t": 1, "resnet_norm_eps": 1e-6, "encoder_causal": True, "decoder_causal": False,
    "encoder_spatial_padding_mode": "zeros", "decoder_spatial_padding_mode": "reflect",
    "spatial_compression_ratio": 32, "temporal_compression_ratio": 8,
}


def _modules(shape: str, cfg):
    """(video VAE, audio VAE, vocoder, upsampler), random, at the shape's sizes."""
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE

    if shape == "ltx2-tiny":
        from . import tiny

        return (AutoencoderKLLTX2Video(**tiny.VAE_CONFIG), AutoencoderKLLTX2Audio(**tiny.AUDIO_VAE_CONFIG),
                LTX2VocoderWithBWE(**tiny.VOCODER_BWE_CONFIG), LTX2LatentUpsamplerModel(**tiny.UPSAMPLER_CONFIG))
    vocoder = LTX2VocoderWithBWE() if cfg.cross_attn_mod else LTX2Vocoder()
    return (AutoencoderKLLTX2Video(**RELEASED_VIDEO_VAE), AutoencoderKLLTX2Audio(), vocoder,
            LTX2LatentUpsamplerModel())


def components(shape: str, device: torch.device, dtype: torch.dtype, seed: int, randomize) -> Components:
    import diffusers

    from ..schedule import SCHEDULER_CONFIG

    diffusers.utils.logging.set_verbosity_error()  # random modules cast whole: its float32-modules notice is noise
    cfg = arch.SHAPES[shape]
    transformer = step_bench.random_model(cfg, device, dtype, seed, randomize)
    # built on the CPU (some of their init math has no CUDA kernel for integers), then moved
    vae, audio_vae, vocoder, upsampler = (m.to(device, dtype).eval().requires_grad_(False)
                                          for m in _modules(shape, cfg))
    gen = torch.Generator(device).manual_seed(seed + 1)
    width, audio_width = step_bench._text_widths(cfg)
    text = (torch.randn(1, step_bench.TEXT_TOKENS, width, generator=gen, device=device).to(dtype).cpu(),
            torch.randn(1, step_bench.TEXT_TOKENS, audio_width, generator=gen, device=device).to(dtype).cpu(),
            torch.ones(1, step_bench.TEXT_TOKENS, dtype=torch.long))
    c = Components(Path("random"), transformer, arch, vae, audio_vae, vocoder, None, None, None,
                   dict(SCHEDULER_CONFIG), device, dtype,
                   text_cache={(p, step_bench.TEXT_TOKENS): text for p in ("bench", "")})
    c.upsamplers["random"] = upsampler
    c.fuser = Fuser(transformer)
    c.fuser.add(_random_lora(transformer, min(LORA_RANK, cfg.inner_dim // 2), gen))
    return c


def _random_lora(transformer, rank: int, gen: torch.Generator) -> Loaded:
    """A LoRA on every 2-D weight of the blocks, its factors on the CPU (as a loaded file's are)."""
    lora = Loaded("random-distilled-lora", "random")
    for name, w in transformer.named_parameters():
        if name.startswith("transformer_blocks.") and w.ndim == 2 and min(w.shape) > rank:
            a = torch.randn(rank, w.shape[1], generator=gen, device=w.device, dtype=w.dtype) * w.shape[1] ** -0.5
            b = torch.randn(w.shape[0], rank, generator=gen, device=w.device, dtype=w.dtype) * 1e-3
            lora.deltas[name] = (b.cpu(), a.cpu(), 1.0)
    return lora


def tokens(vae, req: LTX2Request) -> dict:
    """Video tokens per stage (the transformer's patch is 1x1x1): what a record's seconds were spent on."""
    s, t = vae.spatial_compression_ratio, vae.temporal_compression_ratio
    frames = (req.num_frames - 1) // t + 1
    full = (req.height // s) * (req.width // s) * frames
    if not req.recipe.two_stage:
        return {"stage1": full}
    return {"stage1": (req.height // 2 // s) * (req.width // 2 // s) * frames, "stage2": full}


def smooth_clip(shape: tuple) -> np.ndarray:
    """Frames (F, H, W, 3) in [0, 1] that encode like footage, not like the random VAE's noise (which costs
    libx264 several times longer per frame): a slow pan over colour gradients and a fine texture."""
    count, height, width, _ = shape
    pan = 2  # pixels per frame
    y, x = np.mgrid[0:height, 0:width + pan * count].astype(np.float32)
    phase = np.array([0.0, 2.1, 4.2], dtype=np.float32)
    scene = 0.5 + 0.4 * np.sin((x / width * 3 + y / height * 2)[..., None] * np.pi + phase)
    scene += np.random.default_rng(0).random(scene.shape[:2] + (1,), dtype=np.float32) * 0.04
    return np.stack([scene[:, pan * t:pan * t + width] for t in range(count)])


def run(c: Components, req: LTX2Request, out_dir: Path) -> dict:
    """One generation and its mp4 (and, to set the encoder's share apart from the random frames' worst case, the
    mp4 of a smooth clip of the same size and audio): seconds per phase."""
    from ..media import write_video

    sync = torch.cuda.synchronize if c.device.type == "cuda" else (lambda: None)
    c.fuser.use(())  # every item starts from the base weights, as generate's first stage makes sure
    sync()
    start = time.perf_counter()
    result = generate(c, req, progress=False, uint8_frames=True)  # as generate runs for an mp4
    sync()
    write = time.perf_counter()
    write_video(out_dir / "bench.mp4", result.frames, fps=req.fps, overwrite=True, audio=result.audio,
                audio_sample_rate=result.sample_rate)
    end = time.perf_counter()
    smooth = np.rint(smooth_clip(result.frames.shape) * 255).astype(np.uint8)  # pixels, as the decode hands them
    again = time.perf_counter()
    write_video(out_dir / "smooth.mp4", smooth, fps=req.fps, overwrite=True, audio=result.audio,
                audio_sample_rate=result.sample_rate)
    smooth_s = time.perf_counter() - again
    return {**result.phases, "write_s": end - write, "total_s": end - start, "write_smooth_s": smooth_s,
            "total_smooth_s": end - start - (end - write) + smooth_s,
            "stage1_steps": result.recipe["stage1"]["steps"], "step_s": result.step_times}


def bench_recipes(shape: str, recipes: list[str], height: int, width: int, num_frames: int,
                  device: torch.device, dtype: torch.dtype, seed: int, repeat: int, randomize,
                  compile: bool = False, quantize: tuple[str, ...] = (), cuda_graphs: bool = False,
                  done: Callable[[list[dict]], None] = lambda records: None) -> list[dict]:
    """Each recipe once untimed (kernels, cuDNN's choices, allocations, compilation), then `repeat` timed runs;
    one record each. quantize ("fp8", "fp8-static"): then the same again with the blocks' linears in float8 (as
    generate --quantize fp8), then with static input scales calibrated on one eager run of each recipe (as a
    folder from `quantize --calibrate`), in the same launch (a stage-2 LoRA fused into the float8 weights as
    generate does). cuda_graphs: each recipe with plain block loops, then with CUDA graphs (--cuda-graphs).
    done(records so far) after each record, so a run cut short keeps what it measured."""
    from .. import quant

    cfg = arch.SHAPES[shape]
    c = components(shape, device, dtype, seed, randomize)
    if compile:
        arch.compile_blocks(c.transformer)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("none", *quantize):
            if method != "none" and not quant.is_quantized(c.transformer):
                c.fuser.use(())
                quant.quantize_(c.transformer)
                files, c.fuser = c.fuser.files, Fuser(c.transformer)
                c.fuser.files = files
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if method == "fp8-static":
                c.cuda_graphs = False
                with torch.compiler.set_stance("force_eager"), quant.calibrate(c.transformer):
                    for name in recipes:
                        run(c, request(name, cfg, height, width, num_frames), Path(tmp))
            for name, graphs in ((n, g) for n in recipes for g in ((False, True) if cuda_graphs else (False,))):
                req = request(name, cfg, height, width, num_frames)
                c.cuda_graphs = graphs
                run(c, req, Path(tmp))
                for _ in range(repeat):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    phases = run(c, req, Path(tmp))
                    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                    records.append({"recipe": name, "shape": shape, "height": height, "width": width,
                                    "num_frames": num_frames, "dtype": str(dtype).removeprefix("torch."),
                                    "device": str(device), "compiled": compile, "cuda_graphs": graphs,
                                    "quantize": method, "quantization": quant.describe(c.transformer, None),
                                    "phases_s": phases, "peak_memory_gib": peak, "tokens": tokens(c.vae, req),
                                    "request": {"steps": req.steps, "two_stage": req.recipe.two_stage,
                                                "branches": list(req.guidance.branches()),
                                                "stage2_loras": len(req.recipe.stage2_loras)}})
                    done(records)
    return records


def print_table(records: list[dict], echo) -> None:
    """Seconds per phase, one column per record."""
    head = [f"{r['recipe']}{'' if r.get('quantize', 'none') == 'none' else ' ' + r['quantize']}"
            f"{' graphs' if r.get('cuda_graphs') else ''} {r['width']}x{r['height']}x{r['num_frames']}"
            for r in records]
    echo("phase".ljust(30) + "".join(h.rjust(max(14, len(h) + 2)) for h in head))
    for label, key in PHASES:
        cells = []
        for r, h in zip(records, head):
            value = r["phases_s"].get(key) if key else None
            cells.append(("-" if value is None else f"{value:.3f}").rjust(max(14, len(h) + 2)))
        echo(label.ljust(30) + "".join(cells))
    tokens = ["/".join(f"{n:,}" for n in r["tokens"].values()) for r in records]
    echo("video tokens (stage 1/2)".ljust(30) + "".join(t.rjust(max(14, len(h) + 2)) for t, h in zip(tokens, head)))
