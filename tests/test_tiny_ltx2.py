"""The committed models/ltx2-tiny is what make_tiny_ltx2 writes, and diffusers' LTX-2 pipelines run on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline
from PIL import Image
from safetensors.torch import load_file

from usp_infer.ltx2.tiny import MEL_BINS, make_tiny_ltx2

COMMITTED = Path(__file__).resolve().parents[1] / "models" / "ltx2-tiny"
H, W, FRAMES, FPS = 64, 96, 9, 24.0
CALL = dict(
    negative_prompt="blurry",
    height=H,
    width=W,
    num_frames=FRAMES,
    frame_rate=FPS,
    num_inference_steps=2,
    max_sequence_length=16,
    output_type="np",
    return_dict=False,
)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _unversioned(path: Path):
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        for key in ("_diffusers_version", "transformers_version"):
            data.pop(key, None)
    return data


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    return make_tiny_ltx2(tmp_path_factory.mktemp("tiny") / "ltx2-tiny")


@pytest.fixture(scope="module")
def pipe() -> LTX2Pipeline:
    p = LTX2Pipeline.from_pretrained(COMMITTED)
    p.set_progress_bar_config(disable=True)
    return p


def test_make_tiny_ltx2_reproduces_the_committed_folder(fresh):
    assert _files(fresh) == _files(COMMITTED)
    for name in _files(COMMITTED):
        if name.endswith(".json"):
            # The library versions that wrote a config are not part of it.
            assert _unversioned(fresh / name) == _unversioned(COMMITTED / name), name
        elif name.endswith(".safetensors"):
            # Same seed, same CPU RNG stream: equal to the bit.
            ours, committed = load_file(fresh / name), load_file(COMMITTED / name)
            assert ours.keys() == committed.keys(), name
            for key in committed:
                assert torch.equal(ours[key], committed[key]), f"{name}:{key}"


def test_same_seed_same_bytes_other_seed_differs(tmp_path, fresh):
    make_tiny_ltx2(tmp_path / "s0")
    make_tiny_ltx2(tmp_path / "s1", seed=1)
    for name in _files(fresh):
        assert (tmp_path / "s0" / name).read_bytes() == (fresh / name).read_bytes(), name
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "s1" / name).read_bytes() != (fresh / name).read_bytes()


def test_refuses_non_empty_directory_and_unknown_version(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        make_tiny_ltx2(tmp_path)
    with pytest.raises(ValueError, match="2.3"):
        make_tiny_ltx2(tmp_path / "new", version="2.1")


def test_committed_folder_is_small():
    total = sum((COMMITTED / f).stat().st_size for f in _files(COMMITTED))
    # 1.7 MB of pipeline + 0.65 MB of latent upsampler (its GroupNorm(32) keeps mid_channels at 32 or more)
    assert total < 2_500_000


def test_components_have_the_intended_shapes(pipe):
    t, vae, audio_vae = pipe.transformer.config, pipe.vae, pipe.audio_vae
    assert t.in_channels == t.out_channels == vae.config.latent_channels
    assert (vae.spatial_compression_ratio, vae.temporal_compression_ratio) == (32, 8)
    packed_audio = audio_vae.config.latent_channels * audio_vae.config.mel_bins // audio_vae.mel_compression_ratio
    assert t.audio_in_channels == packed_audio == audio_vae.config.base_channels == audio_vae.latents_mean.numel()
    assert audio_vae.config.mel_bins == MEL_BINS
    # The 2.3 flags.
    assert t.gated_attn and t.cross_attn_mod and t.perturbed_attn and not t.use_prompt_embeddings
    assert t.rope_type == "split"
    assert pipe.connectors.config.per_modality_projections
    assert pipe.connectors.config.caption_channels == pipe.text_encoder.config.text_config.hidden_size
    assert pipe.connectors.config.text_proj_in_factor == pipe.text_encoder.config.text_config.num_hidden_layers + 1
    assert type(pipe.vocoder).__name__ == "LTX2VocoderWithBWE"
    assert pipe.vocoder.config.output_sampling_rate == 48000
    for stats in (vae.latents_mean, audio_vae.latents_mean):
        assert not torch.allclose(stats, torch.zeros_like(stats))
    for module in (pipe.transformer, pipe.vae, pipe.audio_vae, pipe.connectors, pipe.text_encoder, pipe.vocoder):
        for name, param in module.named_parameters():
            assert param.numel() == 1 or param.std() > 0, name


def test_tokenizer_pads_left_with_gemma_specials(pipe):
    tok = pipe.tokenizer
    out = tok(["a cat"], padding="max_length", max_length=6, truncation=True, return_tensors="pt")
    assert out.input_ids[0, :3].tolist() == [tok.pad_token_id] * 3
    assert out.input_ids[0, 3].item() == tok.bos_token_id
    assert out.attention_mask[0].tolist() == [0, 0, 0, 1, 1, 1]
    assert tok.unk_token_id in tok("zebra").input_ids


def test_text_to_video_runs(pipe):
    video, audio = pipe(prompt="a cat walking", generator=torch.Generator().manual_seed(0), **CALL)
    assert video.shape == (1, FRAMES, H, W, 3)
    assert np.isfinite(video).all() and video.std() > 0.05
    assert audio.shape[:2] == (1, 2) and audio.shape[2] > 0.8 * FRAMES / FPS * 48000
    assert torch.isfinite(audio).all() and audio.std() > 1e-3


def test_other_version_and_image_to_video_run(tmp_path):
    folder = make_tiny_ltx2(tmp_path / "v20", version="2.0")
    p = LTX2Pipeline.from_pretrained(folder)
    assert p.transformer.config.use_prompt_embeddings and not p.transformer.config.gated_attn
    assert type(p.vocoder).__name__ == "LTX2Vocoder"
    i2v = LTX2ImageToVideoPipeline.from_pretrained(COMMITTED)
    i2v.set_progress_bar_config(disable=True)
    pixels = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    video, audio = i2v(
        image=Image.fromarray(pixels), prompt="a cat", image_crf=0, generator=torch.Generator().manual_seed(0), **CALL
    )
    assert video.shape == (1, FRAMES, H, W, 3) and np.isfinite(video).all()
