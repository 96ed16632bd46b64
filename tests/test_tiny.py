"""The committed models/ltx-tiny is what make_tiny writes, and diffusers' LTX pipelines run on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LTXImageToVideoPipeline, LTXPipeline
from PIL import Image

from model_folders import differences, files

from usp_infer.ltx_video.tiny import make_tiny

COMMITTED = Path(__file__).resolve().parents[1] / "models" / "ltx-tiny"
H, W, FRAMES = 64, 96, 9
CALL = dict(
    negative_prompt="",
    height=H,
    width=W,
    num_frames=FRAMES,
    num_inference_steps=2,
    output_type="np",
    decode_timestep=0.05,
    decode_noise_scale=0.025,
)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "ltx-tiny"
    make_tiny(out)
    return out


@pytest.fixture(scope="module")
def pipe() -> LTXPipeline:
    return LTXPipeline.from_pretrained(COMMITTED)


def test_make_tiny_reproduces_the_committed_model(fresh):
    # Same seed, same CPU RNG stream: tensors equal to the bit, configs and tokenizer files equal as JSON (the
    # library versions that wrote them are not part of them). A failure means the committed model no longer
    # comes from make_tiny (or this torch draws random numbers differently).
    assert "tokenizer/tokenizer.json" in files(COMMITTED)
    assert differences(fresh, COMMITTED) == []


def test_make_tiny_other_seed_differs(tmp_path, fresh):
    make_tiny(tmp_path / "s1", seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "s1" / name).read_bytes() != (fresh / name).read_bytes()


def test_make_tiny_refuses_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        make_tiny(tmp_path)


def test_committed_folder_is_small():
    total = sum((COMMITTED / f).stat().st_size for f in files(COMMITTED))
    assert total < 1_500_000


def test_components_have_the_intended_shapes(pipe):
    transformer, vae, text_encoder = pipe.transformer.config, pipe.vae, pipe.text_encoder.config
    assert transformer.in_channels == transformer.out_channels == vae.config.latent_channels
    assert transformer.caption_channels == text_encoder.d_model
    assert transformer.cross_attention_dim == transformer.num_attention_heads * transformer.attention_head_dim
    assert (vae.spatial_compression_ratio, vae.temporal_compression_ratio) == (32, 8)
    assert vae.config.timestep_conditioning
    # Non-trivial statistics, so a skipped (de)normalisation changes the video.
    assert not torch.allclose(vae.latents_mean, torch.zeros_like(vae.latents_mean))
    assert not torch.allclose(vae.latents_std, torch.ones_like(vae.latents_std))
    # No parameter left at a constant init (norm weights of ones and the like), scalars aside.
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        for name, param in module.named_parameters():
            assert param.numel() == 1 or param.std() > 0, name


def test_scheduler_is_configured_as_ltx_video_ships_it(pipe):
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    expected = {
        "num_train_timesteps": 1000,
        "use_dynamic_shifting": True,
        "base_image_seq_len": 1024,
        "max_image_seq_len": 4096,
        "base_shift": 0.95,
        "max_shift": 2.05,
        "shift_terminal": 0.1,
        "time_shift_type": "exponential",
    }
    assert {k: config[k] for k in expected} == expected


def test_tokenizer_handles_any_english_prompt(pipe):
    tokenizer = pipe.tokenizer
    assert tokenizer.model_max_length == 128
    assert tokenizer.convert_ids_to_tokens(tokenizer("a cat").input_ids) == ["\u2581a", "\u2581cat", "</s>"]
    ids = tokenizer("Zebras gallop across the SAVANNA, 4K — très beau!").input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id in ids  # the accented letters and the dash
    assert all(0 <= i < pipe.text_encoder.config.vocab_size for i in ids)


def test_text_to_video_runs(pipe):
    frames = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **CALL).frames
    assert frames.shape == (1, FRAMES, H, W, 3)
    assert np.isfinite(frames).all()
    assert frames.std() > 0.05  # random weights still give a non-constant video
    again = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **CALL).frames
    np.testing.assert_array_equal(frames, again)
    # The decoder is timestep-conditioned: the decode timestep must change the video.
    other = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **{**CALL, "decode_timestep": 0.5})
    assert np.abs(other.frames - frames).max() > 1e-3


def test_image_to_video_runs(pipe):
    i2v = LTXImageToVideoPipeline.from_pipe(pipe)
    pixels = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    frames = i2v(image=Image.fromarray(pixels), prompt="a cat", generator=torch.Generator().manual_seed(0), **CALL)
    assert frames.frames.shape == (1, FRAMES, H, W, 3)
    assert np.isfinite(frames.frames).all()


def test_image_to_video_loads_from_the_folder():
    i2v = LTXImageToVideoPipeline.from_pretrained(COMMITTED)
    assert isinstance(i2v, LTXImageToVideoPipeline)
