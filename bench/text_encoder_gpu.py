"""LTX-2's text phase on one GPU, the part `bench --recipe` leaves out: Gemma-3 12B (random weights at the
released size, bf16) and the connectors, through the pipeline's own encode_text; and the two host copies of
Gemma that encode_prompts used to make (loaded on the host, copied over, copied back before it was freed).

    python3 bench/text_encoder_gpu.py --json-out text.json

Times (median of --repeat after one untimed call): one prompt of 1,024 tokens (a distilled recipe: no negative
prompt), two prompts (the dev recipe: prompt and negative), Gemma's forward alone for one prompt; then Gemma's
weights from pageable host memory to the GPU and back, once each. Needs transformers and diffusers.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

# google/gemma-3-12b: the text model LTX-2 reads every hidden state of, and the SigLIP tower it carries along
GEMMA3_12B_TEXT = {"hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 1024,
                   "vocab_size": 262208, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                 "image_size": 896, "patch_size": 14, "vision_use_head": False}
# the connectors at diffusers' class defaults with LTX-2.3's switches (per-modality projections, gated attention,
# the transformer's inner widths 4096 / 2048)
CONNECTORS_23 = {"video_connector_num_attention_heads": 32, "video_connector_attention_head_dim": 128,
                 "audio_connector_num_attention_heads": 32, "audio_connector_attention_head_dim": 64,
                 "video_gated_attn": True, "audio_gated_attn": True, "per_modality_projections": True,
                 "rope_type": "split"}


def _time(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json-out", required=True)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (with smaller configs)")
    args = ap.parse_args()
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from usp_infer.ltx2 import pipeline, tiny

    device, dtype, length = torch.device(args.device), torch.bfloat16, 1024
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):  # built where it runs: 24 GB of random weights made on the GPU
        gemma = Gemma3ForConditionalGeneration(Gemma3Config(text_config=GEMMA3_12B_TEXT, vision_config=SIGLIP_SO400M,
                                                            mm_tokens_per_image=256)).eval().requires_grad_(False)
        connectors = LTX2TextConnectors(**CONNECTORS_23).eval().requires_grad_(False)
    torch.set_default_dtype(default)
    params = sum(p.numel() for p in gemma.parameters())
    c = pipeline.Components(Path("random"), None, None, None, None, None, connectors, gemma, tiny._build_tokenizer(),
                            {}, device, dtype)
    prompts = {"cond": "a red fox runs through fresh snow at dawn", "uncond": "blurry, low quality"}

    def encode(names):
        c.text_cache.clear()
        pipeline.encode_text(c, {n: prompts[n] for n in names}, length)

    def forward():
        pipeline.gemma_hidden_states(c, [prompts["cond"]], length)

    record = {"gemma_params": params, "gemma_gib": params * 2 / 2**30, "tokens": length,
              "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    for name, fn in (("encode_1_prompt_s", lambda: encode(["cond"])), ("encode_2_prompts_s", lambda: encode(list(prompts))),
                     ("gemma_forward_s", forward)):
        with torch.no_grad():
            _time(fn)
            record[name] = statistics.median(_time(fn) for _ in range(args.repeat))
        print(f"{name}: {record[name]:.4f}", flush=True)
    record["to_host_s"] = _time(lambda: gemma.to("cpu"))  # what the old encode_prompts paid before freeing it
    record["to_gpu_s"] = _time(lambda: gemma.to(device))  # and the copy over from a host-loaded model
    for key in ("to_host_s", "to_gpu_s"):
        print(f"{key}: {record[key]:.3f} ({record['gemma_gib'] / record[key]:.1f} GiB/s)", flush=True)
    Path(args.json_out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
