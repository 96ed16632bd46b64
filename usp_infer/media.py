"""Media in and out: the conditioning image, video outputs (mp4 / png frames / npz), audio (an AAC track
in the mp4, a .wav file, arrays in the npz) and the JSON sidecar.

Every output is written atomically: into a hidden temp file (or directory) beside the target,
then renamed into place, so an interrupted run never leaves a half-written video under the
name the user asked for.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_OUTPUTS = (
    "a .mp4 file, a .npz file, a .wav file (audio models), a .png name or %d pattern (frames/%04d.png), or a directory"
)
FRAME_NAME = "frame_%05d.png"  # frame names inside a png output directory
_FIELD = re.compile(r"%0?\d*d")  # the printf-style frame-number field of a png pattern


def output_kind(path: Path | str) -> str:
    """'mp4', 'npz', 'wav' or 'png' for an output path; ValueError for anything else."""
    text = str(path)
    path = Path(path)
    suffix = path.suffix.lower()
    if text.endswith(("/", os.sep)):  # Path() drops a trailing slash, so look at the text for it
        return "png"
    if suffix in (".mp4", ".npz", ".wav"):
        return suffix[1:]
    if suffix == ".png":
        if len(_FIELD.findall(path.name)) > 1:
            raise ValueError(f"png pattern {text!r} has more than one %d field; use one, as in frames/%04d.png")
        return "png"
    if suffix == "" and path.is_file():
        raise ValueError(f"output {text!r} is an existing file, not a directory: use {SUPPORTED_OUTPUTS}")
    if suffix == "" or path.is_dir():
        return "png"
    raise ValueError(f"unsupported output {text!r}: use {SUPPORTED_OUTPUTS}")


def uint8_frames_suffice(output: Path | str) -> bool:
    """Whether an output takes the frames as 8-bit pixels only (all but npz, which keeps the decoded floats)."""
    return output_kind(output) != "npz"


def sidecar_path(output: Path | str) -> Path:
    """Where the JSON metadata of an output goes.

    "x.mp4" -> "x.mp4.json" (likewise .npz and a plain "x.png"); a png directory "d" -> "d.json"
    beside it; a %d pattern "frames/%04d.png" -> "frames.json" beside the frames' directory.
    """
    kind = output_kind(output)
    output = Path(output)
    if kind != "png" or (output.suffix.lower() == ".png" and not _FIELD.search(output.name)):
        return output.with_name(output.name + ".json")
    directory = output if output.suffix.lower() != ".png" else output.parent
    directory = directory.absolute() if directory.name == "" else directory  # "%04d.png" in the cwd
    return directory.with_name(directory.name + ".json")


def write_video(
    path: Path | str,
    frames: np.ndarray,
    *,
    fps: float,
    latents: np.ndarray | None = None,
    overwrite: bool = False,
    audio: np.ndarray | None = None,
    audio_sample_rate: int | None = None,
    audio_latents: np.ndarray | None = None,
) -> list[Path]:
    """Write frames (F, H, W, 3) as mp4, png frames or npz; returns the paths written. Frames are float in
    [0, 1], or uint8 already converted as the mp4 and png writers would (`video_frames`); npz needs float ones.

    With `audio` (float (channels, samples) in [-1, 1], mono or stereo) and its sample rate, the mp4
    gets an AAC stereo track, the npz also stores `audio`, `audio_sample_rate` and `audio_latents` (the
    waveform as the vocoder made it), and a .wav path writes the audio alone, fitted to the frames' duration
    (the frames themselves are not written). png frames carry no audio.
    Refuses to replace existing outputs unless `overwrite` (FileExistsError).
    """
    kind = output_kind(path)  # before Path(): a trailing slash means a directory
    path = Path(path)
    if audio is not None:
        audio = _check_audio(audio, audio_sample_rate)
    elif kind == "wav":
        raise ValueError(f"output {path} is a .wav file but this model produced no audio; use {SUPPORTED_OUTPUTS}")
    if kind == "wav":
        if frames is not None:  # as long as the video it goes with, as the mp4's track is (see _fit_audio)
            audio = _fit_audio(audio, len(frames) / fps, audio_sample_rate)
        return [write_audio(path, audio, audio_sample_rate, overwrite=overwrite)]
    frames = _check_frames(frames)
    if kind == "mp4":
        return [_write_mp4(path, frames, fps, overwrite, audio, audio_sample_rate)]
    if kind == "npz":
        if frames.dtype == np.uint8:
            raise ValueError(f"output {path} stores the decoded frames as float32: got them as uint8")
        return [_write_npz(path, frames, latents, overwrite, audio, audio_sample_rate, audio_latents)]
    return _write_pngs(path, frames, overwrite)


def write_audio(path: Path | str, audio: np.ndarray, sample_rate: int, overwrite: bool = False) -> Path:
    """Write float audio (channels, samples) in [-1, 1] as 16-bit PCM .wav, atomically."""
    import wave

    path = Path(path)
    audio = _check_audio(audio, sample_rate)
    pcm = _to_int16(audio).T  # (channels, samples) -> (samples, channels): wav interleaves channels
    with _atomic_file(path, overwrite) as tmp:
        with wave.open(str(tmp), "wb") as f:
            f.setnchannels(pcm.shape[1])
            f.setsampwidth(2)
            f.setframerate(int(sample_rate))
            f.writeframes(np.ascontiguousarray(pcm).astype("<i2").tobytes())
    return path


def write_json_atomic(path: Path, data: dict, overwrite: bool = True) -> None:
    """Write `data` as indented JSON through a temp file and a rename."""
    text = json.dumps(data, indent=2) + "\n"
    with _atomic_file(Path(path), overwrite) as tmp:
        tmp.write_text(text)


def output_files(path: Path | str) -> list[Path]:
    """The files an output consists of: the file itself, or a png output's frames (sorted)."""
    path = Path(path)
    if output_kind(path) != "png":
        return [path]
    directory, pattern = _frame_layout(path)
    prefix, suffix = _FIELD.split(pattern)
    ours = re.compile(re.escape(prefix) + r"\d+" + re.escape(suffix))
    return sorted(p for p in directory.iterdir() if ours.fullmatch(p.name)) if directory.is_dir() else []


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file's bytes as they are now."""
    import hashlib

    with open(path, "rb") as opened:
        return hashlib.file_digest(opened, "sha256").hexdigest()


def fingerprint(path: Path | str) -> dict:
    """Size and sha256 of an output as it is on disk (a png output: over its frames, names included), which
    the sidecar records and --resume compares, so a truncated or replaced file is not taken as finished."""
    import hashlib

    files = output_files(path)
    size = sum(f.stat().st_size for f in files)
    if output_kind(path) != "png":
        return {"output_size": size, "output_sha256": file_sha256(files[0])}
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return {"output_size": size, "output_sha256": digest.hexdigest(), "output_frames": len(files)}


def load_image(path: Path, height: int, width: int, crf: int = 0) -> torch.Tensor:
    """Read a PNG/JPEG as float32 (3, height, width) in [-1, 1], resized to cover and center-cropped.

    `crf` > 0 first re-compresses the image as one H.264 frame at that CRF (before resizing), as
    LTX-2 was trained and as diffusers' LTX2ImageToVideoPipeline does (`image_crf`, default 33).

    An image already of the target size is not resampled, so the result then equals diffusers'
    `VideoProcessor.preprocess(img, height, width)[0]` (which stretches other sizes instead of cropping).
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")  # forces the full decode, so a truncated file fails here
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist; pass an existing PNG or JPEG file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read {path} as an image ({err}); pass a PNG or JPEG file") from None
    if crf:
        from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf

        image = Image.fromarray(apply_image_conditioning_crf(np.array(image), int(crf)))
    if image.size != (width, height):
        # Lanczos, as diffusers resamples; cover then crop keeps the aspect ratio.
        image = ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    # Same operations and order as diffusers (uint8 -> /255 in numpy -> 2x - 1 in torch), bit for bit.
    pixels = torch.from_numpy(np.array(image).astype(np.float32) / 255.0)
    return (2.0 * pixels - 1.0).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def video_frames(video: torch.Tensor, uint8: bool = False) -> np.ndarray:
    """A VAE's output (3, F, H, W) in [-1, 1] -> host frames (F, H, W, 3): float32 in [0, 1], or with `uint8`
    the pixels the mp4 and png writers would make of those (the same float32 ops, bit for bit), converted where
    the video is: a quarter of the bytes cross to the host and the writer has nothing left to convert."""
    frames = (video.float() / 2 + 0.5).clamp(0, 1)
    if not bool(torch.isfinite(frames).all()):
        raise ValueError("frames contain NaN or inf; the generation diverged, nothing was written")
    if uint8:
        frames = frames.mul_(255.0).round_().to(torch.uint8)  # round half to even, as np.rint
    # (3, F, H, W) -> (F, H, W, 3), made contiguous where the video is: one plain copy to the host, and frames
    # the writer reads row by row (a strided view costs it ~1.7x)
    return frames.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got shape {frames.shape}")
    if frames.dtype == np.uint8:  # video_frames made them, after its finite check
        return frames
    with np.errstate(invalid="ignore", over="ignore"):  # a sum is finite iff every value is (or it overflowed)
        finite = np.isfinite(frames.sum(dtype=np.float32)) or np.isfinite(frames).all()
    if not finite:
        raise ValueError("frames contain NaN or inf; the generation diverged, nothing was written")
    return frames.astype(np.float32, copy=False)


def _check_audio(audio, sample_rate) -> np.ndarray:
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().float().cpu().numpy()
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2 or audio.shape[0] not in (1, 2) or audio.shape[1] == 0:
        raise ValueError(f"audio must be (channels, samples) with 1 or 2 channels, got shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise ValueError("audio contains NaN or inf; the generation diverged, nothing was written")
    if sample_rate is None or not int(sample_rate) == sample_rate or sample_rate <= 0:
        raise ValueError(f"audio needs a positive integer sample rate, got {sample_rate}")
    return audio


def _to_int16(audio: np.ndarray) -> np.ndarray:
    # As diffusers' encode_video: clip to [-1, 1], scale by 32767, truncate toward zero.
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


def _stereo(audio: np.ndarray) -> np.ndarray:
    return np.repeat(audio, 2, axis=0) if audio.shape[0] == 1 else audio


def _to_uint8(frames: np.ndarray, into=None) -> Iterator:
    """Frame by frame, in order, uint8 (H, W, 3) = round(clip(x, 0, 1) * 255) in the frames' own float type
    (uint8 frames as they are).

    `into()`, if given, makes each frame's destination: (what to yield, its uint8 (H, W, 3) view), so the mp4
    writer gets frames converted straight into the encoder's buffers. The frames convert in worker threads (numpy
    lets go of the GIL), a few ahead of the consumer: on one thread, this and the copies cost more than libx264's
    own threads take to encode a 1536x1024 clip (bench/NOTES.md)."""

    def convert(frame):
        held, out = into() if into else (None, None)
        if frame.dtype == np.uint8:
            if out is None:
                return frame
            np.copyto(out, frame)
            return held
        if out is None:
            held = out = np.empty(frame.shape, np.uint8)
        work = np.clip(frame, 0.0, 1.0)
        work *= 255.0
        np.rint(work, out=work)
        np.copyto(out, work, casting="unsafe")  # exact: whole numbers in [0, 255]
        return held

    workers = max(1, min(8, (os.cpu_count() or 1) - 1))
    ahead: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="uint8") as pool:
        try:
            for frame in frames:
                ahead.append(pool.submit(convert, frame))
                if len(ahead) > 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for job in ahead:  # stopped early (an error, an interrupt): what is queued is not started
                job.cancel()


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


def _temp_name(path: Path) -> Path:
    # Hidden and tagged .tmp so a crash leaves something obviously disposable; random so
    # concurrent writers of the same name do not collide.
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _temps_of(path: Path) -> list[Path]:
    """Temp files (or directories) that _temp_name made for `path`."""
    if not path.parent.is_dir():
        return []
    mine = re.compile(re.escape(f".{path.name}.") + r"[0-9a-f]{8}\.tmp")
    return [p for p in path.parent.iterdir() if mine.fullmatch(p.name)]


def remove_stale_temps(output: Path | str) -> list[Path]:
    """Delete the temp files an earlier, killed write of `output` (or its sidecar) left; returns what went.

    A write cleans up after itself on any exception or Ctrl-C, but SIGKILL (or a power cut) gives it
    no chance; the CLI calls this before it writes an output, so a rerun (batch --resume) clears them.
    """
    output = Path(output)
    stale = _temps_of(output) + _temps_of(sidecar_path(output))
    if output_kind(output) == "png":
        directory, pattern = _frame_layout(output)
        if directory != output:  # a pattern's frames live in a directory of their own
            stale += _temps_of(directory)
        if directory.is_dir():
            prefix, suffix = _FIELD.split(pattern)
            frame = re.compile(re.escape("." + prefix) + r"\d+" + re.escape(suffix) + r"\.[0-9a-f]{8}\.tmp")
            stale += [p for p in directory.iterdir() if frame.fullmatch(p.name)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk, so a crash cannot leave it empty or
    half-written under its final name: data first, then the rename, then the directory holding the name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _atomic_file(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` on success, delete it on any error.
    The data is fsync'ed before the rename and the directory after it."""
    _refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# libx264's threading as PyAV sets it: "SLICE" (PyAV's default: every frame cut into one slice a thread) or "FRAME"
# (several frames in flight; smaller files, other bytes). On a 2-core box the two were within noise (bench/NOTES.md);
# bench/encode_threads.py compares them on a machine's own cores.
X264_THREADS = "SLICE"


def _write_mp4(
    path: Path, frames: np.ndarray, fps: float, overwrite: bool, audio: np.ndarray | None = None, sample_rate: int | None = None
) -> Path:
    import av  # only the mp4 writer needs PyAV

    count, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even height and width, got {width}x{height} (width x height)")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    with _atomic_file(path, overwrite) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:  # format: the temp name ends .tmp
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_type = X264_THREADS
            if audio is not None:
                audio_stream = container.add_stream("aac", rate=int(sample_rate))
                audio_stream.codec_context.layout = "stereo"
                audio_stream.codec_context.time_base = Fraction(1, int(sample_rate))
            for frame in _to_uint8(frames, lambda: _rgb_frame(av, width, height)):
                container.mux(stream.encode(frame))
            container.mux(stream.encode())  # flush the encoder's delayed frames
            if audio is not None:
                _mux_audio(av, container, audio_stream, _fit_audio(audio, count / fps, sample_rate), sample_rate)
    return path


def _rgb_frame(av, width: int, height: int):
    """An empty rgb24 VideoFrame and a uint8 (H, W, 3) view of its pixels (rows may be padded)."""
    frame = av.VideoFrame(width, height, "rgb24")
    plane = frame.planes[0]
    pixels = np.frombuffer(plane, np.uint8).reshape(height, plane.line_size)[:, : 3 * width]
    return frame, pixels.reshape(height, width, 3)


def _fit_audio(audio: np.ndarray, seconds: float, sample_rate: int) -> np.ndarray:
    """Trim or zero-pad the audio to the video's duration, so the two tracks end together.

    The causal audio VAE decodes a few mel frames fewer than num_frames / fps asks for
    (round(s * 25) latents -> 4 * latents - 3 mel frames): up to ~30 ms at 121 frames, more
    than a frame on very short clips.
    """
    want = round(seconds * sample_rate)
    if audio.shape[1] >= want:
        return audio[:, :want]
    return np.pad(audio, ((0, 0), (0, want - audio.shape[1])))


def _mux_audio(av, container, stream, audio: np.ndarray, sample_rate: int) -> None:
    """Encode (channels, samples) float audio as the AAC stream, as diffusers' encode_video does:
    s16 interleaved stereo in, resampled to the encoder's format (fltp), then the encoder flushed."""
    pcm = _to_int16(_stereo(audio)).T.reshape(1, -1)  # (2, n) -> (n, 2) -> packed (1, 2n)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm), format="s16", layout="stereo")
    frame.sample_rate = int(sample_rate)
    cc = stream.codec_context
    resampler = av.audio.resampler.AudioResampler(format=cc.format or "fltp", layout="stereo", rate=int(sample_rate))
    pts = 0
    for chunk in list(resampler.resample(frame)) + list(resampler.resample(None)):
        chunk.pts = pts
        pts += chunk.samples
        container.mux(stream.encode(chunk))
    container.mux(stream.encode())  # flush the encoder's delayed packets


def _write_npz(
    path: Path,
    frames: np.ndarray,
    latents: np.ndarray | None,
    overwrite: bool,
    audio: np.ndarray | None = None,
    sample_rate: int | None = None,
    audio_latents: np.ndarray | None = None,
) -> Path:
    if latents is None or latents.ndim != 4:
        got = None if latents is None else latents.shape
        raise ValueError(f"npz output stores latents (C, F', H', W') with the frames; got {got}")
    arrays = dict(frames=frames, latents=latents.astype(np.float32, copy=False))
    if audio is not None:
        arrays.update(audio=audio.astype(np.float32, copy=False), audio_sample_rate=np.int64(sample_rate))
        if audio_latents is not None:
            arrays["audio_latents"] = np.asarray(audio_latents, dtype=np.float32)
    with _atomic_file(path, overwrite) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
    return path


def _frame_layout(path: Path) -> tuple[Path, str]:
    """(directory, printf name pattern) of a png output."""
    if path.suffix.lower() != ".png":
        return path, FRAME_NAME
    if _FIELD.search(path.name):
        return path.parent, path.name
    return path.parent, f"{path.stem}_%05d{path.suffix}"  # "out.png" -> out_00000.png, out_00001.png, ...


def _write_pngs(path: Path, frames: np.ndarray, overwrite: bool) -> list[Path]:
    directory, pattern = _frame_layout(path)
    # Substitute only the field, so other "%" characters in a name stay literal.
    names = [_FIELD.sub(lambda field: field.group(0) % i, pattern) for i in range(len(frames))]
    images = [Image.fromarray(rgb) for rgb in _to_uint8(frames)]  # uint8 (H, W, 3) -> RGB
    if not directory.exists():
        # A new directory appears whole or not at all: fill a hidden sibling, then rename it.
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = _temp_name(directory)
        try:
            tmp_dir.mkdir()
            for name, image in zip(names, images):
                image.save(tmp_dir / name, format="PNG")
                _fsync(tmp_dir / name)
            _fsync(tmp_dir)
            os.rename(tmp_dir, directory)
            _fsync(directory.parent)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        return [directory / name for name in names]
    return _replace_frames(directory, pattern, names, images, overwrite)


def _replace_frames(
    directory: Path, pattern: str, names: list[str], images: list[Image.Image], overwrite: bool
) -> list[Path]:
    """Write frames into an existing directory: all to temp files first, then rename them in.

    A failure while encoding leaves the directory as it was; only a failing rename (rare) could
    leave a mix of old and new frames, since a directory of many files cannot be swapped in one step.

    Frames of an earlier, longer video under the same naming scheme count as existing output:
    refused without `overwrite`, removed with it, so the directory holds exactly one video.
    """
    prefix, suffix = _FIELD.split(pattern)
    ours = re.compile(re.escape(prefix) + r"\d+" + re.escape(suffix))
    existing = sorted(p for p in directory.iterdir() if ours.fullmatch(p.name))
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass --overwrite to replace it")
    targets = [directory / name for name in names]
    temps: list[Path] = []
    try:
        for target, image in zip(targets, images):
            temps.append(_temp_name(target))
            image.save(temps[-1], format="PNG")
            _fsync(temps[-1])
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
        _fsync(directory)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for stale in set(existing) - set(targets):
        stale.unlink()
    return targets


# --- inputs: condition frames, clips, audio -------------------------------------------------------


def read_video(path: Path | str) -> tuple[np.ndarray, float]:
    """Every frame of the first video stream as uint8 (F, H, W, 3) RGB, and the stream's frame rate."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None:
                raise ValueError(f"{path} has no video stream; pass an image or a video file")
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; pass an existing image or video file") from None
    except av.FFmpegError as err:
        raise ValueError(f"{path} cannot be read as an image or a video ({err}); pass a PNG/JPEG or an mp4") from None
    if not frames:
        raise ValueError(f"{path} holds no video frames; pass a video with at least one frame")
    return np.stack(frames), fps


def read_frames(path: Path | str) -> np.ndarray:
    """An image as one frame, or a video's frames: uint8 (F, H, W, 3) RGB, unresized."""
    path = Path(path)
    try:
        with Image.open(path) as opened:
            return np.array(opened.convert("RGB"))[None]
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; pass an existing image or video file") from None
    except (UnidentifiedImageError, OSError):
        pass  # not an image: try it as a video
    return read_video(path)[0]


_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0}


def read_audio(path: Path | str) -> tuple[np.ndarray, int]:
    """The first audio stream of a file (wav, mp3, flac, an mp4's track, ...) as float32 (channels, samples)
    in [-1, 1] at its own sample rate; ValueError for a file without one."""
    import av

    path = Path(path)
    chunks = []
    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise ValueError(f"{path} has no audio stream; pass a sound file or a video with sound")
            rate = int(stream.rate)
            for frame in container.decode(stream):
                data = frame.to_ndarray().astype(np.float32)
                fmt = frame.format.name.rstrip("p")
                if fmt in _INT_SCALE:
                    data = data / _INT_SCALE[fmt] - (1.0 if fmt == "u8" else 0.0)
                if not frame.format.is_planar:  # interleaved (1, samples * channels) -> (channels, samples)
                    data = data.reshape(-1, len(frame.layout.channels)).T
                chunks.append(data)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; pass an existing sound or video file") from None
    except av.FFmpegError as err:
        raise ValueError(f"{path} cannot be read as audio ({err}); pass a wav/mp3/flac file or an mp4 with sound") from None
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise ValueError(f"{path} holds no audio samples; pass a sound file that is not empty")
    return np.concatenate(chunks, axis=1), rate
