"""The whole pipeline equals diffusers' LTX pipelines on the embedded tiny checkpoint."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LTXImageToVideoPipeline, LTXPipeline
from PIL import Image
from typer.testing import CliRunner

from usp_infer.cli import app

MODEL = Path(__file__).resolve().parents[1] / "models" / "ltx-tiny"
# 64x96 pixels, 17 frames -> 3 latent frames of 2x3 tokens: 18 tokens, which 4 ranks do not divide.
SIZE = dict(height=64, width=96, num_frames=17)
SETTINGS = dict(
    prompt="a red fox running through fresh snow", negative_prompt="blurry, low quality",
    num_inference_steps=3, guidance_scale=3.0, max_sequence_length=24,
    decode_timestep=0.05, decode_noise_scale=0.025, frame_rate=25,
)
# Frames are in [0, 1]; the two sides run the same fp32 math with the same random draws, so they differ
# only by op-order rounding (~1e-7) amplified through 3 steps and the decoder: 1e-4 is far above that and far
# below any real difference (a wrong seed, shift or mask moves frames by > 1e-2).
ATOL = 1e-4


def run_cli(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out.npz"
    args = [
        "generate", "--model", str(MODEL), "--prompt", SETTINGS["prompt"], "--negative-prompt", SETTINGS["negative_prompt"],
        "--height", "64", "--width", "96", "--num-frames", "17", "--steps", "3", "--guidance-scale", "3",
        "--max-sequence-length", "24", "--decode-timestep", "0.05", "--decode-noise-scale", "0.025", "--fps", "25",
        "--seed", "42", "--output", str(out), "--quiet", *extra,
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return dict(np.load(out))


def test_text_to_video_equals_diffusers(tmp_path):
    pipe = LTXPipeline.from_pretrained(MODEL)
    ref = pipe(**SETTINGS, **SIZE, generator=torch.Generator().manual_seed(42), output_type="np").frames[0]
    ours = run_cli(tmp_path)
    assert ours["frames"].shape == ref.shape == (17, 64, 96, 3)
    assert ours["latents"].shape == (8, 3, 2, 3) and ours["latents"].dtype == np.float32
    np.testing.assert_allclose(ours["frames"], ref, rtol=0, atol=ATOL)
    # A different seed must change the video: the comparison above is not vacuous.
    other = run_cli(tmp_path, "--seed", "43", "--overwrite")
    assert np.abs(other["frames"] - ref).max() > 1e-2


def test_image_to_video_equals_diffusers(tmp_path):
    rng = np.random.default_rng(0)
    image_path = tmp_path / "first.png"
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(image_path)
    pipe = LTXImageToVideoPipeline.from_pretrained(MODEL)
    ref = pipe(
        image=Image.open(image_path), **SETTINGS, **SIZE, generator=torch.Generator().manual_seed(42), output_type="np"
    ).frames[0]
    ours = run_cli(tmp_path, "--image", str(image_path))
    np.testing.assert_allclose(ours["frames"], ref, rtol=0, atol=ATOL)
    plain = run_cli(tmp_path, "--overwrite")
    assert np.abs(plain["frames"] - ref).max() > 1e-2  # the image really conditions the video
