"""Audio outputs: AAC in the mp4 (in sync with the video), .wav alone, arrays in the npz; all atomic."""

from __future__ import annotations

import wave

import av
import numpy as np
import pytest

from usp_infer.media import output_kind, sidecar_path, write_audio, write_video

RATE = 48000
FPS = 24.0


def _frames(count=25, h=64, w=96):
    rng = np.random.default_rng(0)
    return rng.random((count, h, w, 3), dtype=np.float32)


def _tone(seconds: float, rate: int = RATE, channels: int = 2) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.5 * np.sin(2 * np.pi * 660 * t)
    return np.stack([left, right][:channels]).astype(np.float32)


def _read_mp4(path):
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0]
        info = dict(
            width=video.codec_context.width,
            height=video.codec_context.height,
            rate=audio.codec_context.sample_rate,
            channels=audio.codec_context.channels,
            codec=audio.codec_context.name,
            video_seconds=float(video.duration * video.time_base),
            audio_seconds=float(audio.duration * audio.time_base),
        )
        frames = sum(1 for _ in container.decode(video=0))
        container.seek(0)
        samples = [f.to_ndarray() for f in container.decode(audio=0)]
    pcm = np.concatenate(samples, axis=1)  # fltp: (channels, samples) planes
    return frames, info, pcm


@pytest.mark.parametrize("audio_seconds", [25 / FPS - 0.03, 25 / FPS, 25 / FPS + 0.1])
def test_mp4_has_an_aac_stereo_track_in_sync(tmp_path, audio_seconds):
    out = tmp_path / "clip.mp4"
    frames = _frames()
    assert write_video(out, frames, fps=FPS, audio=_tone(audio_seconds), audio_sample_rate=RATE) == [out]
    count, info, pcm = _read_mp4(out)
    assert count == 25
    assert (info["width"], info["height"]) == (96, 64)
    assert info["codec"] == "aac" and info["rate"] == RATE and info["channels"] == 2
    # Same duration within one video frame, whatever the audio length was (it is fitted to the video).
    assert abs(info["audio_seconds"] - info["video_seconds"]) <= 1 / FPS
    assert abs(info["audio_seconds"] - 25 / FPS) <= 1 / FPS
    # The tone survives the encode: both channels carry signal at the written level.
    body = pcm[:, RATE // 10 : RATE // 2]
    assert 0.3 < np.abs(body).max() < 0.6
    assert not np.allclose(body[0], body[1], atol=0.05)  # left and right stay distinct
    peaks = np.abs(np.fft.rfft(body, axis=1)).argmax(1) * RATE / body.shape[1]
    assert list(peaks) == [440, 660]  # and in their order: left carries 440 Hz, right 660 Hz


def test_mp4_mono_is_written_as_stereo_and_loud_audio_is_clipped(tmp_path):
    out = tmp_path / "mono.mp4"
    write_video(out, _frames(9), fps=FPS, audio=3.0 * _tone(9 / FPS, channels=1), audio_sample_rate=24000)
    _, info, pcm = _read_mp4(out)
    assert info["channels"] == 2 and info["rate"] == 24000
    assert np.abs(pcm).max() < 1.2  # clipped to [-1, 1] before encoding (AAC may overshoot slightly)


def test_wav_output_writes_the_audio_alone(tmp_path):
    out = tmp_path / "sound.wav"
    assert output_kind(out) == "wav"
    assert sidecar_path(out) == tmp_path / "sound.wav.json"
    audio = _tone(0.25)
    assert write_video(out, None, fps=FPS, audio=audio, audio_sample_rate=RATE) == [out]
    with wave.open(str(out)) as f:
        assert (f.getnchannels(), f.getframerate(), f.getsampwidth(), f.getnframes()) == (2, RATE, 2, audio.shape[1])
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").reshape(-1, 2).T
    np.testing.assert_allclose(pcm / 32767.0, audio, atol=1 / 32767 + 1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sound.wav"]  # no temp file left behind
    with pytest.raises(FileExistsError):
        write_audio(out, audio, RATE)
    write_audio(out, audio[:, :100], RATE, overwrite=True)
    with wave.open(str(out)) as f:
        assert f.getnframes() == 100


def test_wav_is_as_long_as_its_video(tmp_path):
    """The causal audio VAE decodes a few mel frames short (17 frames at 24 fps: 0.690 s for 0.708 s); the .wav,
    like the mp4's track, is zero-padded (or trimmed) to the video's duration. The npz keeps the raw waveform."""
    frames = _frames(17)
    for seconds in (0.690, 0.75):
        out = tmp_path / f"{seconds}.wav"
        write_video(out, frames, fps=FPS, audio=_tone(seconds), audio_sample_rate=RATE)
        with wave.open(str(out)) as f:
            assert f.getnframes() == round(17 / FPS * RATE)
    one = tmp_path / "one.wav"  # 1/24 s at 44.1 kHz is 1,837.5 samples: rounded, not cut
    write_video(one, frames[:1], fps=FPS, audio=_tone(0.1, rate=44100), audio_sample_rate=44100)
    with wave.open(str(one)) as f:
        assert f.getnframes() == 1838
    write_video(tmp_path / "raw.npz", frames, fps=FPS, audio=_tone(0.690), audio_sample_rate=RATE,
                latents=np.zeros((8, 3, 2, 3), np.float32))
    assert np.load(tmp_path / "raw.npz")["audio"].shape[1] == round(0.690 * RATE)


def test_wav_without_audio_or_rate_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no audio"):
        write_video(tmp_path / "x.wav", _frames(1), fps=FPS)
    with pytest.raises(ValueError, match="sample rate"):
        write_video(tmp_path / "x.wav", None, fps=FPS, audio=_tone(0.1), audio_sample_rate=None)
    with pytest.raises(ValueError, match="NaN"):
        write_audio(tmp_path / "x.wav", np.full((2, 10), np.nan, np.float32), RATE)
    assert list(tmp_path.iterdir()) == []


def test_npz_holds_audio_rate_and_audio_latents(tmp_path):
    out = tmp_path / "run.npz"
    latents = np.zeros((8, 2, 2, 3), np.float32)
    audio_latents = np.ones((2, 9, 4), np.float32)
    audio = _tone(0.1)
    write_video(
        out, _frames(9), fps=FPS, latents=latents, audio=audio, audio_sample_rate=RATE, audio_latents=audio_latents
    )
    with np.load(out) as data:
        assert set(data.files) == {"frames", "latents", "audio", "audio_sample_rate", "audio_latents"}
        assert data["audio"].dtype == np.float32 and data["audio"].shape == audio.shape
        np.testing.assert_array_equal(data["audio"], audio)
        assert int(data["audio_sample_rate"]) == RATE
        np.testing.assert_array_equal(data["audio_latents"], audio_latents)


def test_video_only_outputs_are_unchanged(tmp_path):
    out = tmp_path / "v.npz"
    write_video(out, _frames(9), fps=FPS, latents=np.zeros((8, 2, 2, 3), np.float32))
    with np.load(out) as data:
        assert set(data.files) == {"frames", "latents"}
    write_video(tmp_path / "v.mp4", _frames(9), fps=FPS)
    with av.open(str(tmp_path / "v.mp4")) as container:
        assert len(container.streams.audio) == 0
