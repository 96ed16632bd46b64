"""Audio-to-video input: a sound file -> the audio VAE's log-mel input -> normalised audio tokens.

The steps and numbers of Lightricks' `AudioProcessor` + `encode_audio` (ltx-core), which diffusers' Echo
encoder repeats for the same audio VAE: resample to the VAE's sample rate with a Hann-windowed sinc
(torchaudio.functional.resample's kernel: 6 zero crossings, roll-off 0.99), a magnitude STFT (n_fft = window
= 1024, hop = mel_hop_length, periodic Hann, centred with reflect padding), a Slaney mel filterbank with
Slaney area normalisation over 0..sr/2, log(max(., 1e-5)), (B, channels, time, mels). Plain torch, so
torchaudio is not needed; tests hold these functions to torchaudio's numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

N_FFT = 1024  # the LTX-2 audio VAE's STFT size (Lightricks' encoder default; not in diffusers' config)
SILENT = 1e-4  # peak amplitude below which an input counts as silence


def resample(waveform: Tensor, orig: int, new: int, zeros: int = 6, rolloff: float = 0.99) -> Tensor:
    """(..., samples) at `orig` Hz -> (..., ceil(samples * new / orig)) at `new` Hz, band-limited sinc
    interpolation with a Hann window (torchaudio.functional.resample's kernel and defaults)."""
    if orig == new:
        return waveform
    g = math.gcd(int(orig), int(new))
    orig, new = int(orig) // g, int(new) // g
    base = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / base)
    # One filter per output phase j: taps at input offsets i / orig - j / new, in units of the cutoff; in the
    # waveform's dtype, as torchaudio.functional.resample builds it.
    dtype = waveform.dtype
    taps = torch.arange(-width, width + orig, dtype=dtype)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=dtype)[:, None, None] / new + taps) * base
    t = t.clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), t.sin() / t) * (window * (base / orig))  # (new, 1, taps)
    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1])
    length = flat.shape[-1]
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    out = torch.nn.functional.conv1d(padded[:, None], kernel, stride=orig)  # (n, new, blocks)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[..., : math.ceil(new * length / orig)]
    return out.reshape(*shape[:-1], out.shape[-1])


def _hz_to_mel(hz: float) -> float:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    return hz / (200.0 / 3) if hz < 1000.0 else 15.0 + math.log(hz / 1000.0) / (math.log(6.4) / 27.0)


def _mel_to_hz(mel: Tensor) -> Tensor:
    linear = mel * (200.0 / 3)
    log = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (mel - 15.0))
    return torch.where(mel >= 15.0, log, linear)


def mel_filterbank(sample_rate: int, n_fft: int, mels: int) -> Tensor:
    """(n_fft // 2 + 1, mels) triangular Slaney filters over 0 .. sample_rate / 2, area-normalised."""
    freqs = torch.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    edges = _mel_to_hz(torch.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2.0), mels + 2))
    widths = edges[1:] - edges[:-1]
    slopes = edges[None] - freqs[:, None]  # (freqs, mels + 2)
    down, up = -slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]
    bank = torch.minimum(down, up).clamp(min=0)
    return bank * (2.0 / (edges[2:] - edges[:-2]))[None]


def log_mel(waveform: Tensor, sample_rate: int, hop: int, mels: int, n_fft: int = N_FFT) -> Tensor:
    """(B, channels, samples) at the VAE's rate -> (B, channels, frames, mels) log-magnitude mel spectrogram."""
    b, ch, n = waveform.shape
    spec = torch.stft(waveform.reshape(b * ch, n), n_fft, hop, n_fft, torch.hann_window(n_fft, device=waveform.device),
                      center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True).abs()
    mel = torch.matmul(spec.transpose(-1, -2), mel_filterbank(sample_rate, n_fft, mels).to(spec))  # (b*ch, T, mels)
    return torch.log(mel.clamp(min=1e-5)).reshape(b, ch, -1, mels)


def stereo(audio: np.ndarray) -> np.ndarray:
    """(channels, samples) -> (2, samples): mono doubled, beyond two channels the first two (as diffusers' Echo)."""
    return np.repeat(audio, 2, axis=0) if audio.shape[0] == 1 else audio[:2]


def load_input(path: str, seconds: float) -> tuple[np.ndarray, int]:
    """The first `seconds` of a sound (or a video's track) as float32 stereo (2, samples) and its rate.
    ValueError (one line) when it is unreadable, silent or shorter than `seconds`."""
    from ..media import read_audio

    try:
        audio, rate = read_audio(path)
    except ValueError as e:
        raise ValueError(f"--audio {e}") from None
    want = round(seconds * rate)
    if audio.shape[1] < want:
        raise ValueError(f"--audio {path} lasts {audio.shape[1] / rate:.3f} s but the video lasts {seconds:.3f} s; "
                         "pass a longer sound or fewer --num-frames (a longer one is cut to the video)")
    audio = stereo(audio[:, :want])
    if not np.abs(audio).max() >= SILENT:
        raise ValueError(f"--audio {path} is silent (peak below {SILENT:g}); pass a sound with something in it")
    return np.ascontiguousarray(audio, dtype=np.float32), rate


@torch.no_grad()
def encode_waveform(audio_vae, waveform: Tensor, rate: int, latent_frames: int) -> Tensor:
    """(2, samples) at `rate` -> packed normalised audio tokens (1, latent_frames, C_a * M), float32 CPU."""
    cfg = audio_vae.config
    wave = resample(waveform.float()[None], rate, int(cfg.sample_rate))
    mel = log_mel(wave, int(cfg.sample_rate), int(cfg.mel_hop_length), int(cfg.mel_bins))
    param = next(audio_vae.parameters())
    latents = audio_vae.encode(mel.to(param.device, param.dtype)).latent_dist.mode().float().cpu()
    if latents.shape[2] < latent_frames:
        raise ValueError(f"the audio encodes to {latents.shape[2]} latent frames, fewer than the video's {latent_frames}")
    latents = latents[:, :, :latent_frames]
    tokens = latents.transpose(1, 2).flatten(2, 3)  # (1, C, L, M) -> (1, L, C*M), as pipeline.pack_audio
    return (tokens - audio_vae.latents_mean.float().cpu()) / audio_vae.latents_std.float().cpu()
