"""Writes torchaudio_reference.npz: torchaudio's resample and MelSpectrogram outputs for a fixed input, the
numbers usp_infer.ltx2.audio_input is held to (torchaudio itself is not a dependency). Run where torchaudio
is installed: python tests/data/make_torchaudio_reference.py"""

from pathlib import Path

import numpy as np
import torch
import torchaudio


def signal(rate: int, seconds: float = 0.1) -> np.ndarray:
    """Stereo: a chirp on the left, seeded noise on the right (nothing periodic for an offset to hide in)."""
    t = np.arange(round(rate * seconds)) / rate
    left = 0.6 * np.sin(2 * np.pi * (200 * t + 4000 * t**2))
    right = 0.3 * np.random.default_rng(0).standard_normal(t.shape)
    return np.stack([left, right]).astype(np.float32)


def main() -> None:
    out = {}
    for orig, new in ((44100, 16000), (22050, 16000), (16000, 24000)):
        x = signal(orig)
        out[f"input_{orig}"] = x
        out[f"resample_{orig}_{new}"] = torchaudio.functional.resample(torch.from_numpy(x), orig, new).numpy()
    for mels in (16, 64):
        mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=16000, n_fft=1024, win_length=1024, hop_length=160, f_min=0.0, f_max=8000.0, n_mels=mels,
            window_fn=torch.hann_window, center=True, pad_mode="reflect", power=1.0, mel_scale="slaney",
            norm="slaney")
        wave = torch.from_numpy(out["resample_44100_16000"])[None]
        out[f"log_mel_{mels}"] = torch.log(torch.clamp(mel(wave), min=1e-5)).permute(0, 1, 3, 2).numpy()
    np.savez_compressed(Path(__file__).with_name("torchaudio_reference.npz"), **out)


if __name__ == "__main__":
    main()
