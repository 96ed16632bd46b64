"""Write a tiny random-weight LTX-Video pipeline in the diffusers folder layout.

The folder loads with diffusers' `LTXPipeline` / `LTXImageToVideoPipeline.from_pretrained`
offline, so the tests and the CLI's default model exercise every real code path (text
encoder, transformer, timestep-conditioned VAE, dynamic-shift scheduler) in about a second
on CPU. Shapes keep the real ratios (32x spatial / 8x temporal VAE, T5 width == caption
channels); only the widths are tiny.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLLTXVideo,
    FlowMatchEulerDiscreteScheduler,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from ..schedule import SCHEDULER_CONFIG

LATENT_CHANNELS = 8  # VAE latent channels == transformer in/out channels
TEXT_DIM = 48  # T5 d_model == transformer caption_channels; != inner dim so a transposed projection fails
TOKENIZER_MAX_LENGTH = 128  # what the LTX-Video tokenizer ships; LTXPipeline pads prompts to it


TRANSFORMER_CONFIG: dict = {
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 4,  # divisible by 4: Ulysses degree 4 is testable
    "attention_head_dim": 8,
    "cross_attention_dim": 32,  # diffusers requires heads * head_dim
    "num_layers": 2,
    "caption_channels": TEXT_DIM,
    "qk_norm": "rms_norm_across_heads",
}

# The LTX-Video 0.9.5+ VAE layout (separate spatial / temporal / spatio-temporal downsamplers,
# residual upsamplers, timestep-conditioned decoder), 8 channels everywhere. Compression stays
# 4 (patch) x 2 x 2 x 2 = 32 spatially and 2 x 2 x 2 = 8 temporally, as in the real model.
# Decoder noise injection stays off, as in 0.9.5+: diffusers' decode draws it from the global RNG.
VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": LATENT_CHANNELS,
    "block_out_channels": (8, 8, 8, 8, 8),
    "down_block_types": ("LTXVideo095DownBlock3D",) * 4,
    "decoder_block_out_channels": (8, 8, 8),
    "layers_per_block": (1, 1, 1, 1, 1),
    "decoder_layers_per_block": (1, 1, 1, 1),
    "spatio_temporal_scaling": (True, True, True, True),
    "decoder_spatio_temporal_scaling": (True, True, True),
    "decoder_inject_noise": (False, False, False, False),
    "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    "upsample_residual": (True, True, True),
    "upsample_factor": (1, 1, 1),  # the real 2 needs channels doubling per block; 1 keeps 8 throughout
    "timestep_conditioning": True,  # 0.9.1+: decode_timestep / decode_noise_scale change the output
    "patch_size": 4,
    "patch_size_t": 1,
    "resnet_norm_eps": 1e-6,
    "scaling_factor": 1.0,
    "encoder_causal": True,
    "decoder_causal": False,
    "spatial_compression_ratio": 32,
    "temporal_compression_ratio": 8,
}

T5_CONFIG: dict = {
    "d_model": TEXT_DIM,
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 1,
    "num_heads": 2,
    "feed_forward_proj": "gated-gelu",  # T5 v1.1, the family of the T5-XXL LTX-Video uses
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

# Whole-word pieces for common prompt words; single characters (with and without the word-start
# marker) let any other ASCII word be spelled out, and anything else becomes <unk>.
_WORDS = """
a an the and or of in on at to with from by for over under into near through while is are
cat dog bird fish horse person man woman child people car city street road river lake sea
ocean beach forest tree trees flower flowers mountain mountains sky cloud clouds sun moon
snow rain water fire light night day morning evening sunset sunrise field grass house room
window door table camera shot close up wide slow motion walking running flying swimming
sitting standing looking moving dancing playing red blue green yellow white black golden
bright dark soft warm cold small large big old young beautiful cinematic realistic video
scene background foreground view his her their its
""".split()


def _vocab() -> list[tuple[str, float]]:
    """T5 Unigram vocab: <pad>=0, </s>=1, <unk>=2, then pieces with log-probabilities.

    Whole words score above any spelling of them in characters, so the Viterbi split picks them.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in dict.fromkeys(_WORDS)]
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab += [(c, -5.0) for c in chars]
    vocab += [("\u2581" + c, -5.5) for c in chars]
    return vocab


@torch.no_grad()
def _perturb_constants(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Add noise to parameters that start constant (norm weights of ones, zero tables).

    With ones/zeros a weight that our code forgets to apply, or applies to the wrong axis, changes
    nothing; perturbed, it changes the output. Scalars (the VAE's timestep multiplier) stay as built.
    """
    for param in model.parameters():
        if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
            param.add_(torch.randn_like(param) * scale)


def _build_transformer(seed: int) -> LTXVideoTransformer3DModel:
    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(**TRANSFORMER_CONFIG)
    _perturb_constants(model)
    return model


@torch.no_grad()
def _build_vae(seed: int) -> AutoencoderKLLTXVideo:
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(**VAE_CONFIG)
    _perturb_constants(vae)
    # Non-trivial per-channel statistics so a missing or inverted (de)normalisation shows.
    vae.latents_mean.copy_(torch.randn(LATENT_CHANNELS) * 0.5)
    vae.latents_std.copy_(torch.rand(LATENT_CHANNELS) + 0.5)
    return vae


def _build_text_encoder(seed: int, vocab_size: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=vocab_size, **T5_CONFIG))
    _perturb_constants(model)
    return model.eval()


def make_tiny(out_dir: Path, seed: int = 0) -> None:
    """Write the tiny pipeline to `out_dir` (absent or empty); deterministic for a given seed and torch."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; remove it or pick another path")

    tokenizer = T5Tokenizer(vocab=_vocab(), extra_ids=0, model_max_length=TOKENIZER_MAX_LENGTH)
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=_build_vae(seed),
        text_encoder=_build_text_encoder(seed, vocab_size=len(tokenizer)),
        tokenizer=tokenizer,
        transformer=_build_transformer(seed),
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
