"""Write a tiny random-weight LTX-2 / LTX-2.3 pipeline in the diffusers folder layout.

The folder loads with diffusers' `LTX2Pipeline` / `LTX2ImageToVideoPipeline.from_pretrained` offline,
so tests exercise every real code path (Gemma-3 text encoder with all hidden states, text
connectors with learnable registers, the audio+video transformer, the 32x/8x video VAE, the audio
VAE, the vocoder, the dynamic-shift scheduler) in a few seconds on CPU. Shapes keep the real
ratios and couplings; only widths and depths are tiny:

- video VAE latent channels == transformer in/out channels; 32x spatial, 8x temporal compression
- audio tokens: latent_channels x (mel_bins / 4) == transformer audio_in_channels; the audio VAE's
  latent statistics have base_channels == that packed width
- connectors: caption_channels == Gemma hidden size, text_proj_in_factor == Gemma layers + 1
- version "2.3": gated attention, cross-attention modulation, prompt adaLN, STG processor,
  no caption projection (the connectors project per modality), vocoder with bandwidth extension
- version "2.0": caption projection in the transformer, no gates, plain vocoder
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..schedule import SCHEDULER_CONFIG

VERSIONS = ("2.0", "2.3")

LATENT_CHANNELS = 8  # video VAE latent channels == transformer in/out channels
TEXT_DIM = 24  # Gemma hidden size == connectors caption_channels (!= either inner dim)
TEXT_LAYERS = 2  # Gemma decoder layers; the connectors see TEXT_LAYERS + 1 hidden states
AUDIO_LATENT_CHANNELS = 2
MEL_BINS = 16  # audio VAE mel bins; 16 / 4 = 4 latent mel bins
AUDIO_TOKEN_DIM = AUDIO_LATENT_CHANNELS * MEL_BINS // 4  # 8: packed audio token width
REGISTERS = 8  # connector learnable registers; max_sequence_length must be a multiple
TOKENIZER_MAX_LENGTH = 1024  # what LTX2Pipeline pads prompts to by default

VIDEO_HEADS, VIDEO_HEAD_DIM = 4, 4  # video inner dim 16; 4 heads so Ulysses 4 runs on it
AUDIO_HEADS, AUDIO_HEAD_DIM = 4, 2  # audio inner dim 8




def transformer_config(version: str) -> dict:
    v23 = version == "2.3"
    return {
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "patch_size": 1,
        "patch_size_t": 1,
        "num_attention_heads": VIDEO_HEADS,
        "attention_head_dim": VIDEO_HEAD_DIM,
        "cross_attention_dim": VIDEO_HEADS * VIDEO_HEAD_DIM,
        "audio_in_channels": AUDIO_TOKEN_DIM,
        "audio_out_channels": AUDIO_TOKEN_DIM,
        "audio_num_attention_heads": AUDIO_HEADS,
        "audio_attention_head_dim": AUDIO_HEAD_DIM,
        "audio_cross_attention_dim": AUDIO_HEADS * AUDIO_HEAD_DIM,
        "audio_sampling_rate": 16000,
        "audio_hop_length": 160,
        "num_layers": 2,
        "qk_norm": "rms_norm_across_heads",
        "caption_channels": TEXT_DIM,
        "rope_type": "split",  # the real checkpoints; the class default "interleaved" is not
        "rope_double_precision": True,
        "causal_offset": 1,
        "gated_attn": v23,
        "cross_attn_mod": v23,
        "audio_gated_attn": v23,
        "audio_cross_attn_mod": v23,
        "perturbed_attn": v23,
        "use_prompt_embeddings": not v23,  # 2.0: caption projection here; 2.3: the connectors project
        "use_prompt_adaln_single": True,
    }


def connectors_config(version: str) -> dict:
    v23 = version == "2.3"
    video_dim = VIDEO_HEADS * VIDEO_HEAD_DIM if v23 else TEXT_DIM
    audio_dim = AUDIO_HEADS * AUDIO_HEAD_DIM if v23 else TEXT_DIM
    return {
        "caption_channels": TEXT_DIM,
        "text_proj_in_factor": TEXT_LAYERS + 1,
        "video_connector_num_attention_heads": 2,
        "video_connector_attention_head_dim": video_dim // 2,
        "video_connector_num_layers": 1,
        "video_connector_num_learnable_registers": REGISTERS,
        "video_gated_attn": v23,
        "audio_connector_num_attention_heads": 2,
        "audio_connector_attention_head_dim": audio_dim // 2,
        "audio_connector_num_layers": 1,
        "audio_connector_num_learnable_registers": REGISTERS,
        "audio_gated_attn": v23,
        "connector_rope_base_seq_len": 4096,
        "rope_theta": 10000.0,
        "rope_double_precision": True,
        "causal_temporal_positioning": False,
        "rope_type": "split",
        "per_modality_projections": v23,
        "video_hidden_dim": video_dim,
        "audio_hidden_dim": audio_dim,
        "proj_bias": False,
    }


# The LTX-2 VAE layout with 8 channels everywhere; compression 4 (patch) x 2 x 2 x 2 = 32 spatially
# and 2 x 2 x 2 = 8 temporally, as in the real model (the ratios are config values, not derived).
VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": LATENT_CHANNELS,
    "block_out_channels": (8, 8, 8, 8),
    "down_block_types": ("LTX2VideoDownBlock3D",) * 4,
    "decoder_block_out_channels": (8, 8, 8),
    "layers_per_block": (1, 1, 1, 1, 1),
    "decoder_layers_per_block": (1, 1, 1, 1),
    "spatio_temporal_scaling": (True, True, True, True),
    "decoder_spatio_temporal_scaling": (True, True, True),
    "decoder_inject_noise": (False, False, False, False),
    "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    "upsample_type": ("spatiotemporal", "spatiotemporal", "spatiotemporal"),
    "upsample_residual": (True, True, True),
    "upsample_factor": (1, 1, 1),  # the real 2 doubles channels per block; 1 keeps 8 throughout
    "timestep_conditioning": False,  # the real 2.x VAEs decode without a timestep
    "patch_size": 4,
    "patch_size_t": 1,
    "resnet_norm_eps": 1e-6,
    "scaling_factor": 1.0,
    "encoder_causal": True,
    "decoder_causal": False,
    "spatial_compression_ratio": 32,
    "temporal_compression_ratio": 8,
}

AUDIO_VAE_CONFIG: dict = {
    "base_channels": AUDIO_TOKEN_DIM,  # == latent_channels * mel_bins / 4: the latent stats' length
    "output_channels": 2,  # stereo mel
    "ch_mult": (1, 2, 4),  # three levels: 4x down in time and in mel, as the pipeline assumes
    "num_res_blocks": 1,
    "attn_resolutions": None,
    "in_channels": 2,
    "resolution": 32,
    "latent_channels": AUDIO_LATENT_CHANNELS,
    "norm_type": "pixel",
    "causality_axis": "height",
    "dropout": 0.0,
    "mid_block_add_attention": False,
    "sample_rate": 16000,
    "mel_hop_length": 160,
    "is_causal": True,
    "mel_bins": MEL_BINS,
}

# LTX-2.0 vocoder: stereo mel (2 x MEL_BINS) -> 24 kHz stereo; hop 160 at 16 kHz = 240 samples
# per mel frame at 24 kHz, so the upsampling product is 240 (real: 6*5*2*2*2). Kernel - factor is
# even everywhere so every transposed convolution multiplies the length exactly.
VOCODER_CONFIG: dict = {
    "in_channels": 2 * MEL_BINS,
    "hidden_channels": 16,
    "out_channels": 2,
    "upsample_kernel_sizes": [12, 11, 16],
    "upsample_factors": [6, 5, 8],
    "resnet_kernel_sizes": [3],
    "resnet_dilations": [[1, 3]],
    "leaky_relu_negative_slope": 0.1,
    "output_sampling_rate": 24000,
}

# LTX-2.3 vocoder with bandwidth extension: the base vocoder makes 16 kHz (160 samples per mel
# frame, real: 5*2*2*2*2*2), the BWE stage re-analyses that waveform (STFT hop 80, MEL_BINS bands)
# and generates a 48 kHz residual (240 samples per 80-sample frame, real: 6*5*2*2*2) on top of a
# 3x resampled skip.
VOCODER_BWE_CONFIG: dict = {
    "in_channels": 2 * MEL_BINS,
    "hidden_channels": 16,
    "out_channels": 2,
    "upsample_kernel_sizes": [11, 8, 16],
    "upsample_factors": [5, 4, 8],
    "resnet_kernel_sizes": [3],
    "resnet_dilations": [[1, 3]],
    "act_fn": "snakebeta",
    "antialias": True,
    "antialias_ratio": 2,
    "antialias_kernel_size": 12,
    "final_act_fn": None,
    "final_bias": False,
    "bwe_in_channels": 2 * MEL_BINS,
    "bwe_hidden_channels": 16,
    "bwe_out_channels": 2,
    "bwe_upsample_kernel_sizes": [12, 11, 16],
    "bwe_upsample_factors": [6, 5, 8],
    "bwe_resnet_kernel_sizes": [3],
    "bwe_resnet_dilations": [[1, 3]],
    "bwe_act_fn": "snakebeta",
    "bwe_antialias": True,
    "bwe_antialias_ratio": 2,
    "bwe_antialias_kernel_size": 12,
    "bwe_final_act_fn": None,
    "bwe_final_bias": False,
    "filter_length": 128,
    "hop_length": 80,
    "window_length": 128,
    "num_mel_channels": MEL_BINS,
    "input_sampling_rate": 16000,
    "output_sampling_rate": 48000,
}

GEMMA_TEXT_CONFIG: dict = {
    "hidden_size": TEXT_DIM,
    "intermediate_size": 48,
    "num_hidden_layers": TEXT_LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 12,
    "query_pre_attn_scalar": 12,
    "max_position_embeddings": 2048,
    "sliding_window": 8,  # below the prompt length, so the sliding-window layer differs from global
    "layer_types": ["sliding_attention", "full_attention"],
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}

SIGLIP_CONFIG: dict = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,  # 2 x 2 patches -> mm_tokens_per_image 4
}

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]

_WORDS = """
a an the and or of in on at to with from by for over under into near through while is are
cat dog bird fish horse person man woman child people car city street road river lake sea
ocean beach forest tree trees flower flowers mountain mountains sky cloud clouds sun moon
snow rain water fire light night day morning evening sunset sunrise field grass house room
window door table camera shot close up wide slow motion walking running flying swimming
sitting standing looking moving dancing playing red blue green yellow white black golden
bright dark soft warm cold small large big old young beautiful cinematic realistic video
scene background foreground view his her their its robot music sound voice talking singing
worst quality blurry jittery distorted inconsistent , . ! ?
""".split()


def _vocab() -> dict[str, int]:
    tokens = SPECIAL_TOKENS + list(dict.fromkeys(_WORDS))
    return {t: i for i, t in enumerate(tokens)}


def _build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # Gemma prepends <bos> and appends nothing.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=TOKENIZER_MAX_LENGTH,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )


@torch.no_grad()
def _perturb_constants(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Add noise to parameters that start constant (norm weights of ones, zero tables, zero gates).

    With ones/zeros a weight that our code forgets to apply, or applies to the wrong axis, changes
    nothing; perturbed, it changes the output.
    """
    for param in model.parameters():
        if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
            param.add_(torch.randn_like(param) * scale)


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    model = build()
    _perturb_constants(model)
    return model.eval()


@torch.no_grad()
def _build_vae(seed: int):
    from diffusers import AutoencoderKLLTX2Video

    vae = _seeded(seed, lambda: AutoencoderKLLTX2Video(**VAE_CONFIG))
    # Non-trivial statistics so a missing or inverted (de)normalisation shows.
    vae.latents_mean.copy_(torch.randn(LATENT_CHANNELS) * 0.5)
    vae.latents_std.copy_(torch.rand(LATENT_CHANNELS) + 0.5)
    return vae


@torch.no_grad()
def _build_audio_vae(seed: int):
    from diffusers import AutoencoderKLLTX2Audio

    vae = _seeded(seed + 1, lambda: AutoencoderKLLTX2Audio(**AUDIO_VAE_CONFIG))
    vae.latents_mean.copy_(torch.randn(AUDIO_TOKEN_DIM) * 0.5)
    vae.latents_std.copy_(torch.rand(AUDIO_TOKEN_DIM) + 0.5)
    return vae


def _build_text_encoder(seed: int, vocab: dict[str, int]):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config={**GEMMA_TEXT_CONFIG, "vocab_size": len(vocab)},
        vision_config=SIGLIP_CONFIG,
        mm_tokens_per_image=4,
        boi_token_index=vocab["<start_of_image>"],
        eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"],
    )
    return _seeded(seed + 2, lambda: Gemma3ForConditionalGeneration(config))


def build_components(seed: int = 0, version: str = "2.3") -> dict:
    """The pipeline's components, in memory (what `make_tiny_ltx2` saves)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE

    if version not in VERSIONS:
        raise ValueError(f"version {version!r} is unknown; use one of {', '.join(VERSIONS)}")
    tokenizer = _build_tokenizer()
    if version == "2.3":
        vocoder = _seeded(seed + 5, lambda: LTX2VocoderWithBWE(**VOCODER_BWE_CONFIG))
    else:
        vocoder = _seeded(seed + 5, lambda: LTX2Vocoder(**VOCODER_CONFIG))
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=_build_vae(seed),
        audio_vae=_build_audio_vae(seed),
        text_encoder=_build_text_encoder(seed, tokenizer.get_vocab()),
        tokenizer=tokenizer,
        connectors=_seeded(seed + 3, lambda: LTX2TextConnectors(**connectors_config(version))),
        transformer=_seeded(seed + 4, lambda: LTX2VideoTransformer3DModel(**transformer_config(version))),
        vocoder=vocoder,
    )


def make_tiny_ltx2(directory: Path | str, seed: int = 0, version: str = "2.3") -> Path:
    """Write the tiny LTX-2 pipeline to `directory` (absent or empty); deterministic for a seed and torch."""
    from diffusers import LTX2Pipeline

    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and is not an empty directory; remove it or pick another path")
    pipe = LTX2Pipeline(**build_components(seed, version), processor=None, prompt_enhancer=None, duration_head=None)
    pipe.save_pretrained(directory, safe_serialization=True)
    # Where diffusers' LTX-2 folders keep it (LTX2Pipeline itself does not load it): what --two-stage uses.
    build_upsampler(seed).save_pretrained(directory / "latent_upsampler", safe_serialization=True)
    return directory


# --- the latent upsampler and LoRA files of the tests -----------------------------------------------

# diffusers' LTX2LatentUpsamplerModel at tiny width: GroupNorm(32, ·) needs mid_channels a multiple of 32.
UPSAMPLER_CONFIG = {"in_channels": LATENT_CHANNELS, "mid_channels": 32, "num_blocks_per_stage": 1, "dims": 3,
                    "spatial_upsample": True, "temporal_upsample": False, "rational_spatial_scale": 2.0}


def build_upsampler(seed: int = 0):
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    return _seeded(seed + 6, lambda: LTX2LatentUpsamplerModel(**UPSAMPLER_CONFIG))


# Lightricks' names of the modules whose diffusers names differ (the inverse of diffusers' conversion).
_LIGHTRICKS_NAMES = (
    ("audio_proj_in", "audio_patchify_proj"), ("proj_in", "patchify_proj"),
    ("audio_time_embed.", "audio_adaln_single."), ("time_embed.", "adaln_single."),
    ("audio_prompt_adaln.", "audio_prompt_adaln_single."), ("prompt_adaln.", "prompt_adaln_single."),
    ("av_cross_attn_video_scale_shift.", "av_ca_video_scale_shift_adaln_single."),
    ("av_cross_attn_video_a2v_gate.", "av_ca_a2v_gate_adaln_single."),
    ("av_cross_attn_audio_scale_shift.", "av_ca_audio_scale_shift_adaln_single."),
    ("av_cross_attn_audio_v2a_gate.", "av_ca_v2a_gate_adaln_single."),
)


def lora_targets(weights: dict) -> list[str]:
    """The transformer's 2-D Linear weights a LoRA may touch: every projection (attention, FFN, in/out, adaLN)."""
    return sorted(name for name, entry in weights.items() if name.endswith(".weight") and len(entry["shape"]) == 2)


@torch.no_grad()
def write_lora(path: Path | str, transformer_dir: Path | str, fmt: str = "lightricks", rank: int = 2,
               seed: int = 0, targets: list[str] | None = None, alpha: float | None = None) -> Path:
    """A random LoRA for a transformer folder, in `fmt`: "lightricks" (diffusion_model. + Lightricks' module
    names, lora_A/lora_B), "diffusers" (transformer. + diffusers' names), "kohya" (diffusion_model. names,
    lora_down/lora_up + alpha). Large enough factors that a LoRA left out or mis-scaled changes the video."""
    from safetensors.torch import save_file

    from .lora import weight_table

    weights = weight_table(Path(transformer_dir))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in targets or lora_targets(weights):
        out_dim, in_dim = weights[name]["shape"]
        module = name[: -len(".weight")]
        if fmt == "diffusers":
            key = "transformer." + module
        else:
            for ours, theirs in _LIGHTRICKS_NAMES:
                if module.startswith(ours):
                    module = theirs + module[len(ours):]
                    break
            key = "diffusion_model." + module
        a = torch.randn(rank, in_dim, generator=gen) * 0.3
        b = torch.randn(out_dim, rank, generator=gen) * 0.3
        if fmt == "kohya":
            tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"] = a, b
            tensors[key + ".alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        else:
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a, b
    path = Path(path)
    save_file(tensors, str(path))
    return path
