"""--audio (audio-to-video): the sound -> mel -> audio VAE path, and the loop's handling of the given audio.

- resample and log-mel equal torchaudio's (the functions Lightricks' AudioProcessor calls), from numbers
  torchaudio computed once (tests/data/torchaudio_reference.npz, written by make_torchaudio_reference.py);
- the encode path equals diffusers' classes called directly on torchaudio's mel;
- in the loop the audio tokens never change and the transformer sees them at timestep 0; the uncond branch
  keeps the positive prompt for the audio and STG perturbs the video alone (Lightricks' A2V pipeline);
- the output carries the given sound (a .wav output within one 16-bit step; the mp4's AAC within codec
  error); a different sound changes the video.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLLTX2Audio, LTX2ConditionPipeline

from usp_infer.ltx2 import pipeline, stages
from usp_infer.ltx2.audio_input import encode_waveform, load_input, log_mel, resample
from usp_infer.ltx2.pipeline import LTX2Guidance, LTX2Request, ModalityGuidance, generate, load_components
from usp_infer.ltx2.recipes import STAGE2_SIGMAS, Recipe
from usp_infer.media import read_audio, write_audio, write_video

DATA = Path(__file__).resolve().parent / "data"
MODEL = Path(__file__).resolve().parents[1] / "models" / "ltx2-tiny"
REF = np.load(DATA / "torchaudio_reference.npz")
GUIDED = LTX2Guidance(ModalityGuidance(3.0, 1.0, 3.0, 0.7), ModalityGuidance(7.0, 1.0, 3.0, 0.7), stg_blocks=(1,))


def chirp(rate: int, seconds: float, f0: float) -> np.ndarray:
    """Stereo tones AAC keeps well (noise it does not): a rising chirp left, a steady tone right."""
    t = np.arange(round(rate * seconds)) / rate
    return np.stack([0.6 * np.sin(2 * np.pi * (f0 * t + 600 * t**2)), 0.4 * np.sin(2 * np.pi * 1.5 * f0 * t)]
                    ).astype(np.float32)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (22050, 16000), (16000, 24000)])
def test_resample_equals_torchaudio(orig, new):
    ours = resample(torch.from_numpy(REF[f"input_{orig}"]), orig, new).numpy()
    np.testing.assert_allclose(ours, REF[f"resample_{orig}_{new}"], rtol=0, atol=1e-6)  # bitwise here


@pytest.mark.parametrize("mels", [16, 64])
def test_log_mel_equals_torchaudio(mels):
    """fp32 STFT sums round to ~1e-7 of the peak power, and CPUs round them differently; near the log's 1e-5
    clamp that is ~1e-3 in log units. So: the mel power against the peak everywhere, the log where the power
    stands clear of that rounding (observed 4e-6 there), and the clamp itself."""
    wave = torch.from_numpy(REF["resample_44100_16000"])[None]
    ours, ref = log_mel(wave, 16000, 160, mels).numpy(), REF[f"log_mel_{mels}"]
    peak = np.exp(ref).max()
    np.testing.assert_allclose(np.exp(ours), np.exp(ref), rtol=0, atol=1e-6 * peak)
    clear = np.exp(ref) > 1e-3 * peak
    assert clear.mean() > 0.7
    np.testing.assert_allclose(ours[clear], ref[clear], rtol=0, atol=1e-4)
    assert ours.min() == pytest.approx(np.log(1e-5)) == ref.min()


def test_encode_path_equals_diffusers_classes():
    """Waveform -> our tokens, against torchaudio's mel -> diffusers' audio VAE -> its pack + normalise."""
    vae = AutoencoderKLLTX2Audio.from_pretrained(MODEL / "audio_vae").eval()
    mel = torch.from_numpy(REF[f"log_mel_{vae.config.mel_bins}"])
    with torch.no_grad():
        latents = vae.encode(mel).latent_dist.mode()
    packed = LTX2ConditionPipeline._pack_audio_latents(latents)
    want = LTX2ConditionPipeline._normalize_audio_latents(packed, vae.latents_mean, vae.latents_std)[:, :2]
    ours = encode_waveform(vae, torch.from_numpy(REF["input_44100"]), 44100, latent_frames=2)
    np.testing.assert_allclose(ours.numpy(), want.numpy(), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def a2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("a2v")
    sounds = []
    for i, f0 in enumerate((220.0, 330.0)):
        sounds.append(root / f"s{i}.wav")
        write_audio(sounds[-1], chirp(44100, 1.0, f0), 44100)  # longer than the video: cut to it
    c = load_components(MODEL, "cpu", torch.float32)
    base = LTX2Request(prompt="a man talking", negative_prompt="blurry", height=64, width=64, num_frames=17,
                       fps=24.0, steps=3, seed=7, max_sequence_length=16, guidance=GUIDED)
    return dict(root=root, sounds=sounds, c=c, base=base)


@pytest.mark.parametrize("two_stage", [False, True], ids=["one-stage", "two-stage"])
def test_audio_latents_never_move_and_sit_at_timestep_zero(a2v, monkeypatch, two_stage):
    """In every step of every stage (two stages: stage 2 starts from the given tokens, not re-noised ones, as
    Lightricks' two-stage audio-to-video)."""
    steps, calls = [], []
    step, forward = pipeline.Denoiser.step, a2v["c"].transformer.forward

    def spy_step(self, video, audio, *args):
        out = step(self, video, audio, *args)
        steps.append((audio.clone(), out[1].clone()))
        return out

    def spy_forward(*args, **kwargs):
        calls.append((args, kwargs))
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipeline.Denoiser, "step", spy_step)
    monkeypatch.setattr(a2v["c"].transformer, "forward", spy_forward)
    req = replace(a2v["base"], audio_input=str(a2v["sounds"][0]))
    if two_stage:
        recipe = Recipe(two_stage=True, upsampler=str(MODEL / "latent_upsampler"), stage2_sigmas=STAGE2_SIGMAS)
        req = replace(req, height=128, width=128, recipe=recipe)
    result = stages.generate(a2v["c"], req, progress=False)
    assert len(steps) == 3 + 3 * two_stage and all(torch.equal(before, after) for before, after in steps)
    assert all(torch.equal(steps[0][0], after) for _, after in steps)
    waveform, rate = load_input(str(a2v["sounds"][0]), 17 / 24)  # the file cut to the video
    given = encode_waveform(a2v["c"].audio_vae, torch.from_numpy(waveform), rate, steps[0][0].shape[1])
    assert torch.equal(steps[0][0].cpu(), given) and result.audio.shape[1] == round(17 / 24 * 44100)
    for args, kwargs in calls:
        video, audio, text, audio_text, text_mask, audio_text_mask, timestep, audio_timestep, sigma, audio_sigma = args[:10]
        assert torch.all(audio_timestep == 0) and torch.all(audio_sigma == sigma) and torch.all(sigma > 0)
        assert kwargs["stg_audio"] is False
        rows = kwargs["text_rows"] or tuple(range(len(text)))
        # every branch, uncond included, reads the positive prompt's audio text (one audio text row value)
        assert all(torch.equal(audio_text[rows[0]], audio_text[r]) for r in rows)


def test_output_carries_the_given_sound(a2v):
    req = replace(a2v["base"], audio_input=str(a2v["sounds"][0]))
    result = generate(a2v["c"], req, progress=False)
    given = read_audio(a2v["sounds"][0])[0][:, :round(17 / 24 * 44100)]  # the file's samples, cut to the video
    assert result.sample_rate == 44100 and result.audio.shape == given.shape
    wav = a2v["root"] / "out.wav"
    write_video(wav, result.frames, fps=24.0, **result.outputs())
    back, rate = read_audio(wav)
    assert rate == 44100
    np.testing.assert_allclose(back, given, rtol=0, atol=1.0 / 32767)  # 16-bit PCM again: at most one step
    mp4 = a2v["root"] / "out.mp4"
    write_video(mp4, result.frames, fps=24.0, **result.outputs())
    back, rate = read_audio(mp4)
    n = given.shape[1] - 2048  # the AAC tail is padded; its start is aligned by the container
    error = np.sqrt(np.mean((back[:, :n] - given[:, :n]) ** 2, axis=1) / np.mean(given[:, :n] ** 2, axis=1))
    assert rate == 44100 and np.all(error < 0.1), error  # AAC at its default rate: ~5% on these tones


def test_a_different_sound_changes_the_video(a2v):
    one, two = (generate(a2v["c"], replace(a2v["base"], audio_input=str(s)), progress=False).frames
                for s in a2v["sounds"])
    assert np.abs(one - two).max() > 1e-3
