"""GPU memory of the parts of a 13B-shaped LTX-Video run that `usp-infer bench` leaves out (random bf16
weights, no checkpoint needed): the T5-XXL text encoder (weights, and its peak while encoding 128 tokens)
and the VAE (weights, and its peak while decoding 768x512x121 from a 16x16x24 latent). Prints GiB.

    python bench/component_memory.py
"""

import time

import torch
from diffusers import AutoencoderKLLTXVideo
from transformers import T5Config, T5EncoderModel

dev = torch.device("cuda")
GiB = 2**30
VAES = {  # diffusers' default = the 0.9.0 layout; 0.9.1+ decoders are timestep-conditioned and wider
    "vae-0.9.0": {},
    "vae-0.9.1": dict(decoder_block_out_channels=(256, 512, 1024), decoder_layers_per_block=(5, 6, 7, 8),
                      decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(True, True, True, False),
                      upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True,
                      decoder_causal=False),
}


def measure(name, build, run):
    torch.cuda.empty_cache()
    with torch.device(dev):
        model = build().to(torch.bfloat16).eval()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.no_grad():
        run(model)
    torch.cuda.synchronize()
    print(f"{name}: params {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B, weights {weights / GiB:.2f} GiB, "
          f"peak while running {torch.cuda.max_memory_allocated() / GiB:.2f} GiB, {time.perf_counter() - start:.1f} s")
    del model


measure("t5-xxl encoder", lambda: T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                                            num_heads=64, feed_forward_proj="gated-gelu")),
        lambda m: m(torch.randint(0, 32000, (2, 128), device=dev)))
for name, kw in VAES.items():
    t = torch.tensor([0.05], device=dev, dtype=torch.bfloat16) if kw.get("timestep_conditioning") else None
    try:
        measure(name, lambda: AutoencoderKLLTXVideo(**kw),
                lambda m: m.decode(torch.randn(1, 128, 16, 16, 24, device=dev, dtype=torch.bfloat16), t, return_dict=False))
    except (TypeError, ValueError, RuntimeError) as e:
        print(f"{name}: failed: {e}")
