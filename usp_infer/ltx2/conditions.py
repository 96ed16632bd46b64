"""LTX-2 frame conditions: images and clips placed at any frame, as diffusers' LTX2ConditionPipeline does.

A condition is a file (an image, or a video's frames), the pixel frame where it applies and a strength in
[0, 1]. It conditions the latent frame holding that pixel frame: latent 0 for frame 0, else ceil(frame / 8)
(latent k >= 1 holds pixel frames 8k-7 .. 8k); that latent index is diffusers' `LTX2VideoCondition.index`.

- latent 0: the condition's tokens replace the first tokens of the video grid;
- latent k > 0: its tokens are appended after the grid, with RoPE positions of their own (the keyframe's
  latent grid at pixel frame 8k-7, no causal shift; a single frame spans one pixel frame);
- every conditioned token carries its strength m: per-token timestep t (1 - m), start x = noise (1 - m) + c m,
  and each step's x0 is blended x0 (1 - m) + c m before the Euler update (all tokens are stepped; a
  strength-1 token stays exactly c). The appended tokens are dropped after the loop.

The torch-free half (the `Condition` record, parsing, checks) serves the request builder; `prepare` runs on
the rank that holds the VAE, for any (height, width), so a second stage can re-apply the conditions at its
own size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Condition:
    path: str  # an image (PNG/JPEG) or a video PyAV decodes
    frame: int  # pixel frame where it applies; negative from the end (-1 = the last)
    strength: float = 1.0  # 1 = held clean, 0 = a starting point only

    def __post_init__(self) -> None:
        if not (0.0 <= self.strength <= 1.0):
            raise ValueError(f"--condition {self.path}@{self.frame}:{self.strength:g}: STRENGTH must be in [0, 1]")


def parse_condition(value: Any) -> Condition:
    """'PATH@FRAME[:STRENGTH]' (split at the last '@') or a batch line's {"path", "frame", "strength"}."""
    if isinstance(value, Condition):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"path", "frame", "strength"}
        if unknown or "path" not in value:
            raise ValueError(f"condition {value}: use {{\"path\": ..., \"frame\": ..., \"strength\": ...}}"
                             + (f" (unknown keys {sorted(unknown)})" if unknown else ""))
        path, frame, strength = value["path"], value.get("frame", 0), value.get("strength", 1.0)
        if not isinstance(frame, int) or isinstance(frame, bool) or not isinstance(strength, (int, float)):
            raise ValueError(f"condition {value}: frame must be an integer and strength a number")
        return Condition(os.path.expanduser(str(path)), frame, float(strength))
    text = str(value)
    path, at, spot = text.rpartition("@")
    frame_text, _, strength_text = spot.partition(":")
    try:
        if not at or not path:
            raise ValueError
        frame = int(frame_text)
        strength = float(strength_text) if strength_text else 1.0
    except ValueError:
        raise ValueError(f"--condition {text!r} is not PATH@FRAME[:STRENGTH] (e.g. end.png@-1 or clip.mp4@0:0.8)") from None
    return Condition(os.path.expanduser(path), frame, strength)


def latent_index(frame: int, num_frames: int, temporal: int = 8) -> int:
    """The latent frame a pixel frame falls in (frame already checked to lie in the video)."""
    frame = frame % num_frames
    return 0 if frame == 0 else math.ceil(frame / temporal)


def check_request(req) -> None:
    """The request's conditioning fields, checked without reading a file (LTX2Request.__post_init__)."""
    n = req.num_frames
    for c in req.conditions:
        if not isinstance(c, Condition):
            raise ValueError(f"condition {c!r} is not a Condition; build it with parse_condition")
        if not -n <= c.frame < n:
            raise ValueError(f"--condition {c.path}@{c.frame}: FRAME is outside the video's {n} frames; "
                             f"use 0..{n - 1}, or -1..-{n} from the end")
    if req.image is not None and (req.conditions or req.extend):
        raise ValueError("--image with --condition or --extend: pass the image as --condition PATH@0 instead")
    if req.audio_input is not None and not req.audio:
        raise ValueError(f"--audio {req.audio_input} with --no-audio: the output carries the given sound; drop one")
    if req.extend is not None:
        k = req.extend_frames
        if k < 1 or (k - 1) % 8 or k >= n:
            raise ValueError(f"--extend-frames {k} must be of the form 8k+1 and below --num-frames {n} "
                             f"(the new frames are the rest); e.g. {max(1, (n - 2) // 8 * 8 + 1)}")
        if req.audio_input is not None:
            raise ValueError("--extend with --audio: an extension continues the clip's own sound; drop --audio")


def conditioning_options(o: dict) -> dict:
    """Flags / batch keys -> request fields: --condition (repeatable) or "conditions" [...] -> conditions;
    --audio PATH (or a batch line's "audio": "path") -> audio_input; --no-audio -> audio False; --extend takes
    its clip's size and frame rate unless they are given (and must then match)."""
    o = dict(o)
    given = list(o.pop("condition", None) or []) + list(o.pop("conditions", None) or [])
    if given:
        o["conditions"] = tuple(parse_condition(v) for v in given)
    if isinstance(o.get("audio"), str):
        o["audio_input"] = o.pop("audio")
    if o.pop("no_audio", False):
        o["audio"] = False
    for key in ("audio_input", "extend"):
        if o.get(key) is not None:
            o[key] = os.path.expanduser(str(o[key]))
    if o.get("extend") is not None:
        from .extend import clip_info

        clip = clip_info(o["extend"])
        for name in ("height", "width"):
            o.setdefault(name, clip[name])
            if o[name] != clip[name]:
                raise ValueError(f"--{name} {o[name]} differs from the --extend clip's {clip[name]}; the output "
                                 f"joins the clip, so leave --{name} out or resize the clip")
        o.setdefault("fps", clip["fps"])
        k = o.get("extend_frames", EXTEND_FRAMES)
        if clip["frames"] < k:
            raise ValueError(f"--extend {o['extend']} has {clip['frames']} frames, fewer than --extend-frames {k}; "
                             "use a longer clip or fewer --extend-frames")
    return o


EXTEND_FRAMES = 17  # frames of the clip that open an extension: 3 latent frames, ~0.7 s at 24 fps


def input_files(req) -> list[dict]:
    """{"role", "path"} (+ the latent frame a condition conditions) of every file the request reads."""
    out = [{"role": "image", "path": req.image}] if req.image is not None else []
    if req.extend is not None:
        out.append({"role": "extend", "path": req.extend})
    out += [{"role": "condition", "path": c.path, "latent_frame": latent_index(c.frame, req.num_frames)}
            for c in req.conditions]
    if req.audio_input is not None:
        out.append({"role": "audio", "path": req.audio_input})
    return out


def check_files(req) -> list[str]:
    """Every input file the request reads, opened before any weights load: ValueError (one line) for a bad one;
    returns warnings (a condition of another aspect ratio is cover-resized and center-cropped)."""
    from ..media import read_frames

    warnings = []
    for c in req.conditions:
        try:
            frames = read_frames(c.path)
        except ValueError as e:
            raise ValueError(f"--condition {e}") from None
        h, w = frames.shape[1:3]
        if abs(h / w - req.height / req.width) > 0.01:
            warnings.append(f"--condition {c.path} is {w}x{h}; it is resized to cover {req.width}x{req.height} and "
                            "center-cropped, as --image")
    if req.audio_input is not None:
        from .audio_input import load_input

        load_input(req.audio_input, req.num_frames / req.fps)
    return warnings


# --- the torch half -------------------------------------------------------------------------------


@dataclass
class ConditionedVideo:
    """The video sequence of a conditioned generation: the grid's tokens, then the appended keyframes'."""

    latents: Tensor  # (1, T, C) float32 starting tokens (noise mixed in)
    strength: Tensor  # (1, T, 1) m per token, 0 on free tokens
    clean: Tensor  # (1, T, C) the conditions' latents on conditioned tokens, 0 elsewhere
    coords: Tensor  # (1, 3, T, 2) RoPE [start, end) per token: pixel units, time in seconds
    grid_tokens: int  # the first grid_tokens tokens are the video's; the rest are dropped after the loop
    latent_indices: tuple[int, ...]  # per condition, the latent frame it conditions (for the sidecar)


def condition_pixels(frames, height: int, width: int, crf: int) -> Tensor:
    """uint8 (F, h, w, 3) -> float (1, 3, F, height, width) in [-1, 1], as LTX2ConditionPipeline: one frame
    re-compressed at `crf` first (0 = off), then cover-resized bilinearly (no antialias) and center-cropped."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    if frames.shape[0] == 1 and crf:
        from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf

        frames = apply_image_conditioning_crf(frames[0], int(crf))[None]
    count, src_h, src_w = frames.shape[:3]
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float32).permute(0, 3, 1, 2)  # (F, 3, h, w)
    scale = max(height / src_h, width / src_w)
    new_h, new_w = math.ceil(src_h * scale), math.ceil(src_w * scale)
    pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    pixels = pixels[:, :, top:top + height, left:left + width]
    return (pixels.permute(1, 0, 2, 3)[None] / 127.5 - 1.0)  # (F, 3, H, W) -> (1, 3, F, H, W)


def keyframe_coords(cfg, frames: int, height: int, width: int, pixel_frame: int, pixel_frames: int,
                    fps: float) -> Tensor:
    """RoPE coords (1, 3, S, 2) of appended keyframe tokens: their own latent grid in pixel units, no causal
    shift, time offset by `pixel_frame`; a single pixel frame spans [idx, idx + 1); time in seconds."""
    import torch

    axes = [torch.arange(0, n, step, dtype=torch.float32)
            for n, step in ((frames, cfg.patch_size_t), (height, cfg.patch_size), (width, cfg.patch_size))]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # (3, F, H, W)
    patch = torch.tensor((cfg.patch_size_t, cfg.patch_size, cfg.patch_size), dtype=torch.float32)
    coords = torch.stack([grid, grid + patch.view(3, 1, 1, 1)], dim=-1).flatten(1, 3)[None]  # (1, 3, S, 2)
    coords = coords * torch.tensor(cfg.vae_scale_factors, dtype=torch.float32).view(1, 3, 1, 1)
    coords[:, 0] = coords[:, 0] + pixel_frame
    if pixel_frames == 1:
        coords[:, 0, :, 1:] = coords[:, 0, :, :1] + 1
    coords[:, 0] = coords[:, 0] / fps
    return coords


def sources(req) -> list[tuple]:
    """(uint8 frames (F, H, W, 3), pixel frame, strength) per condition: an --extend clip's last frames first
    (at frame 0, held clean), then the --condition files in the order given."""
    from ..media import read_frames, read_video

    out = []
    if getattr(req, "extend", None):
        out.append((read_video(req.extend)[0][-req.extend_frames:], 0, 1.0))
    return out + [(read_frames(c.path), c.frame, c.strength) for c in req.conditions]


def prepare(c, req, lay, generator, height: int, width: int, noise_scale: float = 1.0,
            start: Tensor | None = None) -> ConditionedVideo:
    """Encode the request's conditions at (height, width) (lay: that size's latent layout) and draw the video
    noise: one packed draw over every token, appended ones included (LTX2ConditionPipeline.prepare_latents).
    `start` (1, grid tokens, C): latents to re-noise at `noise_scale` instead of zeros (a second stage)."""
    import torch

    vae, cfg = c.vae, c.transformer.cfg
    temporal = vae.temporal_compression_ratio
    mean = vae.latents_mean.view(1, -1, 1, 1, 1).float().cpu()
    std = vae.latents_std.view(1, -1, 1, 1, 1).float().cpu()
    grid = lay.video_tokens
    base = torch.zeros(1, grid, lay.channels) if start is None else start.float().cpu().clone()
    base_m, base_clean = torch.zeros(1, grid, 1), torch.zeros(1, grid, lay.channels)
    extra, extra_m, extra_coords, indices = [], [], [], []
    for frames, frame, strength in sources(req):
        k = latent_index(frame, req.num_frames, temporal)
        first = max((k - 1) * temporal + 1, 0)  # the pixel frame its latent frame starts at
        # Fit a clip into what is left of the video, in whole latent frames (8j + 1 pixel frames).
        keep = (min(frames.shape[0], req.num_frames - first) - 1) // temporal * temporal + 1
        # An image is re-compressed at --image-crf; a clip is not, even one cut down to a single frame here
        crf = req.image_crf if frames.shape[0] == 1 else 0
        pixels = condition_pixels(frames[:keep], height, width, crf)
        latent = vae.encode(pixels.to(c.device, vae.dtype)).latent_dist.mode().float().cpu()
        # (1, C, F, H, W) -> (1, F*H*W, C), as pipeline.pack_video; diffusers leaves out the scaling factor here
        tokens = ((latent - mean) / std).flatten(2).transpose(1, 2)
        indices.append(k)
        if k == 0:
            n = tokens.shape[1]
            base[:, :n], base_clean[:, :n], base_m[:, :n] = tokens, tokens, strength
        else:
            extra.append(tokens)
            extra_m.append(torch.full((1, tokens.shape[1], 1), float(strength)))
            extra_coords.append(keyframe_coords(cfg, *latent.shape[2:], first, keep, req.fps))
    coords = c.arch.video_coords(cfg, lay.frames, lay.height, lay.width, req.fps, None).float().cpu()
    latents = torch.cat([base, *extra], dim=1)
    strength = torch.cat([base_m, *extra_m], dim=1)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    scaled = (1.0 - strength) * noise_scale
    latents = noise * scaled + latents * (1 - scaled)
    return ConditionedVideo(latents, strength, torch.cat([base_clean, *extra], dim=1),
                            torch.cat([coords, *extra_coords], dim=2), grid, tuple(indices))
