"""Outputs round-trip, are atomic and refuse to overwrite; load_image matches diffusers' preprocessing."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers.video_processor import VideoProcessor
from PIL import Image

from usp_infer import media
from usp_infer.media import (
    load_image,
    output_kind,
    sidecar_path,
    write_json_atomic,
    write_video,
)

F, H, W = 9, 64, 96


def _frames() -> np.ndarray:
    """Smooth, per-frame distinct colours: survive H.264 closely, and a channel swap or a flip shows."""
    f, y, x = np.meshgrid(np.arange(F) / (F - 1), np.arange(H) / (H - 1), np.arange(W) / (W - 1), indexing="ij")
    return np.stack([x, y, 0.2 + 0.6 * f], axis=-1).astype(np.float32)


def _latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((8, 2, 2, 3)).astype(np.float32)


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("out.mp4", "mp4"),
        ("OUT.MP4", "mp4"),
        ("x/out.npz", "npz"),
        ("frames/%04d.png", "png"),
        ("out.png", "png"),
        ("frames", "png"),
        ("frames/", "png"),
        ("clip.mp4/", "png"),
    ],
)
def test_output_kind(path, kind):
    assert output_kind(Path(path) if not path.endswith("/") else path) == kind


def test_output_kind_existing_directory_with_a_dot(tmp_path):
    (tmp_path / "run.v1").mkdir()
    assert output_kind(tmp_path / "run.v1") == "png"


@pytest.mark.parametrize("path", ["out.avi", "out.gif", "frames/%d_%d.png"])
def test_output_kind_rejects(path):
    with pytest.raises(ValueError, match="out|frames") as err:
        output_kind(Path(path))
    assert path in str(err.value)


def test_output_kind_rejects_an_existing_file_without_suffix(tmp_path):
    (tmp_path / "notes").write_text("x")
    with pytest.raises(ValueError, match="notes"):
        output_kind(tmp_path / "notes")


@pytest.mark.parametrize(
    ("output", "sidecar"),
    [
        ("x.mp4", "x.mp4.json"),
        ("a/x.npz", "a/x.npz.json"),
        ("out/d", "out/d.json"),
        ("out/frames/%04d.png", "out/frames.json"),
        ("out/x.png", "out/x.png.json"),
    ],
)
def test_sidecar_path(output, sidecar):
    assert sidecar_path(Path(output)) == Path(sidecar)


@pytest.mark.parametrize("fps, rate", [(24000 / 1001, (24000, 1001)), (12.5, (25, 2))])
def test_mp4_keeps_a_fractional_frame_rate(tmp_path, fps, rate):
    out = tmp_path / "ntsc.mp4"
    write_video(out, _frames(), fps=fps)
    with av.open(str(out)) as container:
        assert container.streams.video[0].average_rate == Fraction(*rate)


def test_mp4_round_trip(tmp_path):
    frames = _frames()
    out = tmp_path / "clip.mp4"
    assert write_video(out, frames, fps=24) == [out]
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 24
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(decoded) == F
    assert decoded[0].shape == (H, W, 3)
    # Lossy H.264 plus 4:2:0 chroma subsampling and two colour conversions: a smooth gradient comes
    # back within a few levels on average; a channel swap or flipped axis would be off by ~80 levels.
    err = np.abs(np.stack(decoded).astype(np.float32) / 255 - frames)
    assert err.mean() < 0.02


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_frames_to_uint8_round_half_even_and_clip(dtype):
    """The frame-by-frame conversion equals round(clip(x, 0, 1) * 255) in the frames' own type: halves, values
    outside [0, 1] and every frame (the one buffer reused must not leak a frame into the next)."""
    rng = np.random.default_rng(0)
    frames = rng.uniform(-0.2, 1.2, (3, 4, 6, 3)).astype(dtype)
    frames[0, 0, :4, 0] = np.array([0.5, 1.5, 2.5, 254.5], dtype=dtype) / 255  # ties: even, as np.round
    got = np.stack(list(media._to_uint8(frames)))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8))
    assert not (got[1] == got[2]).all()


def test_mp4_frames_convert_in_order_into_the_encoders_buffers(tmp_path):
    """The threaded conversion hands libx264 every frame in order, in frames it owns (rows padded or not): the
    decoded clip equals the one-frame-at-a-time encode (from_ndarray of the same uint8 frames) bit for bit, and
    a clip longer than the look-ahead window with frames that differ a lot catches a reorder or a reused buffer."""
    rng = np.random.default_rng(1)
    frames = np.repeat(rng.random((40, 1, 1, 3), dtype=np.float32), 16, axis=1).repeat(18, axis=2)  # 16x18: padded rows
    write_video(tmp_path / "threaded.mp4", frames, fps=24)
    with av.open(str(tmp_path / "plain.mp4"), mode="w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 18, 16, "yuv420p"
        for frame in frames:
            rgb = np.rint(np.clip(frame, 0, 1) * 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    decode = lambda p: np.stack([f.to_ndarray(format="rgb24") for f in av.open(str(p)).decode(video=0)])  # noqa: E731
    np.testing.assert_array_equal(decode(tmp_path / "threaded.mp4"), decode(tmp_path / "plain.mp4"))


def test_uint8_frames_from_the_device_are_what_the_writers_make_of_float_ones(tmp_path):
    """video_frames(uint8=True) converts where the video is, to the pixels the writers make of the float frames
    (ties, clipping, every frame in place); the mp4 writer's frames and the png files are then the same, an npz
    refuses them (it keeps the floats) and a non-finite decode is refused before any conversion."""
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(3, 5, 16, 18, generator=gen) * 2.4 - 1.2  # a VAE's output in [-1, 1], and beyond
    video[0, 0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, 254.5]) / 255 * 2 - 1  # halves after /2 + 0.5, * 255
    floats, pixels = media.video_frames(video), media.video_frames(video, uint8=True)
    assert floats.dtype == np.float32 and pixels.dtype == np.uint8 and pixels.shape == (5, 16, 18, 3)
    np.testing.assert_array_equal(pixels, np.stack(list(media._to_uint8(floats))))
    assert pixels.flags.c_contiguous and not (pixels[1] == pixels[2]).all()
    def into():  # what the mp4 writer gives each frame: a buffer of its own
        out = np.full((16, 18, 3), 7, np.uint8)
        return out, out

    handed = [np.stack(list(media._to_uint8(f, into))) for f in (floats, pixels)]
    np.testing.assert_array_equal(handed[0], pixels)
    np.testing.assert_array_equal(handed[1], pixels)
    write_video(tmp_path / "f", floats, fps=24)
    write_video(tmp_path / "p", pixels, fps=24)
    assert [p.read_bytes() for p in sorted((tmp_path / "f").iterdir())] == \
        [p.read_bytes() for p in sorted((tmp_path / "p").iterdir())]
    with pytest.raises(ValueError, match="stores the decoded frames as float32"):
        write_video(tmp_path / "x.npz", pixels, fps=24, latents=_latents())
    video[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        media.video_frames(video, uint8=True)
    assert [media.uint8_frames_suffice(p) for p in ("a.mp4", "a.npz", "f/%04d.png", "d", "a.wav")] == \
        [True, False, True, True, True]


def test_mp4_odd_size_rejected(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", _frames()[:, :63], fps=24)
    assert _listing(tmp_path) == []


def test_png_directory_round_trip(tmp_path):
    frames = _frames()
    out = tmp_path / "frames"
    paths = write_video(out, frames, fps=24)
    assert paths == [out / f"frame_{i:05d}.png" for i in range(F)]
    assert _listing(tmp_path) == ["frames"] + [f"frames/frame_{i:05d}.png" for i in range(F)]
    with Image.open(paths[3]) as image:
        assert image.mode == "RGB"
        pixels = np.array(image)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.round(frames[3] * 255).astype(np.uint8))


def test_png_pattern_and_plain_name(tmp_path):
    frames = _frames()
    assert write_video(tmp_path / "a" / "%03d.png", frames, fps=24) == [tmp_path / "a" / f"{i:03d}.png" for i in range(F)]
    assert write_video(tmp_path / "b.png", frames, fps=24) == [tmp_path / f"b_{i:05d}.png" for i in range(F)]
    assert len(list(tmp_path.glob("b_*.png"))) == F


def test_npz_round_trip(tmp_path):
    frames, latents = _frames(), _latents()
    out = tmp_path / "x.npz"
    assert write_video(out, frames, fps=24, latents=latents) == [out]
    with np.load(out) as data:
        assert sorted(data.files) == ["frames", "latents"]
        assert data["frames"].dtype == np.float32 and data["latents"].dtype == np.float32
        np.testing.assert_array_equal(data["frames"], frames)
        np.testing.assert_array_equal(data["latents"], latents)


def test_npz_needs_latents(tmp_path):
    with pytest.raises(ValueError, match="latents"):
        write_video(tmp_path / "x.npz", _frames(), fps=24)


def test_non_finite_frames_rejected(tmp_path):
    frames = _frames()
    frames[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_video(tmp_path / "x.mp4", frames, fps=24)


@pytest.mark.parametrize("name", ["x.mp4", "x.npz", "frames", "frames/%04d.png"])
def test_refuses_to_overwrite(tmp_path, name):
    kwargs = {"fps": 24, "latents": _latents()}
    first = write_video(tmp_path / name, _frames(), **kwargs)
    before = {p: p.read_bytes() for p in first}
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_video(tmp_path / name, _frames()[::-1].copy(), **kwargs)
    assert {p: p.read_bytes() for p in first} == before
    second = write_video(tmp_path / name, _frames()[::-1].copy(), overwrite=True, **kwargs)
    assert second == first
    assert any(p.read_bytes() != before[p] for p in second)
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]


def test_overwrite_removes_stale_frames_of_a_longer_video(tmp_path):
    out = tmp_path / "frames"
    write_video(out, _frames(), fps=24)
    (out / "notes.txt").write_text("mine")
    write_video(out, _frames()[:3], fps=24, overwrite=True)
    assert _listing(out) == ["frame_00000.png", "frame_00001.png", "frame_00002.png", "notes.txt"]


def test_existing_directory_without_our_frames_is_used(tmp_path):
    out = tmp_path / "frames"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    write_video(out, _frames()[:2], fps=24)
    assert _listing(out) == ["frame_00000.png", "frame_00001.png", "notes.txt"]


class _Boom(RuntimeError):
    pass


def _fail_on_third_call(monkeypatch, owner, name):
    real = getattr(owner, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise _Boom("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize(("name", "rename"), [("x.mp4", "replace"), ("x.npz", "replace"), ("frames", "rename")])
def test_failed_final_rename_leaves_nothing(tmp_path, monkeypatch, name, rename):
    # Fails after the whole temp output is written (x264 buffers frames, so an earlier
    # failure in the mp4 writer would not even have created the file).
    def failing(*args):
        raise _Boom("rename failed")

    monkeypatch.setattr(media.os, rename, failing)
    with pytest.raises(_Boom):
        write_video(tmp_path / name, _frames(), fps=24, latents=_latents())
    assert _listing(tmp_path) == []


def test_failed_mp4_encode_leaves_nothing(tmp_path, monkeypatch):
    _fail_on_third_call(monkeypatch, media, "_rgb_frame")  # a frame's buffer, made in a converting thread
    with pytest.raises(_Boom):
        write_video(tmp_path / "x.mp4", _frames(), fps=24)
    assert _listing(tmp_path) == []


def test_failed_npz_leaves_nothing(tmp_path, monkeypatch):
    def failing(file, **arrays):
        file.write(b"partial")
        raise _Boom("disk full")

    monkeypatch.setattr(np, "savez", failing)
    with pytest.raises(_Boom):
        write_video(tmp_path / "x.npz", _frames(), fps=24, latents=_latents())
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("name", ["frames", "frames/%04d.png"])
def test_failed_png_leaves_nothing(tmp_path, monkeypatch, name):
    _fail_on_third_call(monkeypatch, Image.Image, "save")
    with pytest.raises(_Boom):
        write_video(tmp_path / name, _frames(), fps=24)
    assert _listing(tmp_path) == []


def test_failed_png_into_existing_directory_keeps_old_frames(tmp_path, monkeypatch):
    out = tmp_path / "frames"
    write_video(out, _frames(), fps=24)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_on_third_call(monkeypatch, Image.Image, "save")
    with pytest.raises(_Boom):
        write_video(out, _frames()[::-1].copy(), fps=24, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_write_json_atomic(tmp_path):
    out = tmp_path / "x.mp4.json"
    write_json_atomic(out, {"seed": 3, "prompt": "a cat"})
    assert json.loads(out.read_text()) == {"seed": 3, "prompt": "a cat"}
    write_json_atomic(out, {"seed": 4})
    assert json.loads(out.read_text()) == {"seed": 4}
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_json_atomic(out, {"seed": 5}, overwrite=False)
    assert _listing(tmp_path) == ["x.mp4.json"]


def _random_image(path: Path, size: tuple[int, int], fmt: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_equals_diffusers_at_target_size(tmp_path, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    _random_image(path, (W, H), fmt)
    with Image.open(path) as image:
        expected = VideoProcessor(vae_scale_factor=32).preprocess(image, H, W)[0]
    got = load_image(path, H, W)
    assert got.dtype == torch.float32 and got.shape == (3, H, W)
    assert torch.equal(got, expected)  # same ops in the same order: bit for bit


def test_load_image_covers_and_center_crops(tmp_path):
    # A wide image: blue sides, red middle exactly as wide as the target; covering needs no
    # scaling, so the center crop must be all red.
    pixels = np.zeros((H, 3 * W, 3), dtype=np.uint8)
    pixels[..., 2] = 255
    pixels[:, W : 2 * W] = (255, 0, 0)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    got = load_image(tmp_path / "wide.png", H, W)
    assert torch.equal(got, torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, H, W))


def test_load_image_upscales_small_tall_images(tmp_path):
    _random_image(tmp_path / "tall.png", (10, 20), "PNG")
    got = load_image(tmp_path / "tall.png", H, W)
    assert got.shape == (3, H, W)
    assert got.min() >= -1 and got.max() <= 1


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("RGBA", (W, H), (10, 20, 30, 40)).save(tmp_path / "rgba.png")
    got = load_image(tmp_path / "rgba.png", H, W)
    assert got.shape == (3, H, W)


def test_load_image_missing(tmp_path):
    with pytest.raises(ValueError, match="nope.png") as err:
        load_image(tmp_path / "nope.png", H, W)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"not an image at all", None])
def test_load_image_not_an_image(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:  # a PNG cut short: opens, fails on decode
        _random_image(path, (W, H), "PNG")
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.png") as err:
        load_image(path, H, W)
    assert "\n" not in str(err.value)


def test_module_imports_av_lazily():
    # PyAV is only needed for mp4; the GPU image lacks it unless carried.
    assert "av" not in vars(media)


@pytest.mark.parametrize("name", ["clip.mp4", "clip.npz", "frames", "frames/%04d.png", "existing/"])
def test_data_reaches_the_disk_before_the_rename_and_the_name_after(tmp_path, monkeypatch, name):
    """fsync of every written file before it is renamed into place, and of the directory after: otherwise a
    crash can leave an empty or partial file under the final name, which --resume would take as finished."""
    (tmp_path / "existing").mkdir()
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = media.os.fsync, media.os.replace, media.os.rename
    paths_of: dict[int, str] = {}
    real_open = media.os.open

    def opened(path, flags, *args):
        fd = real_open(path, flags, *args)
        paths_of[fd] = str(path)
        return fd

    monkeypatch.setattr(media.os, "open", opened)
    monkeypatch.setattr(media.os, "fsync", lambda fd: (events.append(("fsync", paths_of.get(fd, "?"))), real_fsync(fd))[1])
    monkeypatch.setattr(media.os, "replace", lambda a, b: (events.append(("rename", str(a))), real_replace(a, b))[1])
    monkeypatch.setattr(media.os, "rename", lambda a, b: (events.append(("rename", str(a))), real_rename(a, b))[1])
    write_video(str(tmp_path / name), np.full((2, 32, 32, 3), 0.5, np.float32), fps=8.0,
                latents=np.zeros((4, 1, 1, 1), np.float32))
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert renames, events
    for i in renames:
        moved = events[i][1]
        assert ("fsync", moved) in events[:i], f"{moved} renamed before it was fsync'ed: {events}"
        # the directory that now holds the new name is fsync'ed after the (last) rename into it
        holder = str(Path(moved).parent)
        assert ("fsync", holder) in events[i + 1:], f"{holder} not fsync'ed after the rename of {moved}: {events}"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
def test_the_finite_check_is_exact(tmp_path, bad):
    """The check sums first (a tenth of the time of isfinite over a 2.3 GB clip) and looks at every value only
    when the sum is not finite: one NaN or inf anywhere is refused; finite values whose sum overflows are not."""
    frames = _frames().astype(np.float32)
    if bad is None:
        frames[:, :2] = 3e38  # finite; float32 sum -> inf
    else:
        frames[-1, -1, -1, -1] = bad
    if bad is None:
        assert write_video(tmp_path / "x.npz", frames, fps=24, latents=_latents()) == [tmp_path / "x.npz"]
    else:
        with pytest.raises(ValueError, match="NaN or inf"):
            write_video(tmp_path / "x.npz", frames, fps=24, latents=_latents())
        assert _listing(tmp_path) == []


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: libx264 runs one thread either way")
@pytest.mark.parametrize("mode, sliced", [("SLICE", b"1"), ("FRAME", b"0")])
def test_mp4_encoder_threads_as_set(tmp_path, monkeypatch, mode, sliced):
    """media.X264_THREADS reaches libx264: the options string it writes into the stream says which threading ran
    (a writer that ignored the setting would leave bench/encode_threads.py timing the default twice)."""
    import re

    monkeypatch.setattr(media, "X264_THREADS", mode)
    frames = (np.random.default_rng(0).random((9, 128, 192, 3)) * 255).astype(np.uint8)
    (path,) = media.write_video(tmp_path / "a.mp4", frames, fps=24)
    assert re.findall(rb"sliced_threads=(\d)", path.read_bytes()) == [sliced]
