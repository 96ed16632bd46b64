"""Single-GPU timings of the levers inside one block, each against what it replaced (one JSON file out).

    python bench/microbench.py --out micro.json

SDPA backends (flash / cuDNN / memory-efficient) at the attention shapes of the benchmark, checked
against each other; cuDNN on the strided views USPAttention passes vs contiguous inputs, and the
layout copies around the exchange; nn.Linear rates at the token counts of 1, 2 and 4 GPUs (and at
the width one fused q/k/v projection would have); RoPE as diffusers writes it vs the forms ltx.py
runs (eager and compiled, full vs half-size tables); GELU as a separate pass vs in the GEMM epilogue,
alone and through 16 FFN layers with the two forms alternating; cuDNN attention under load;
modulation and gates as two passes vs one addcmul; RMS-norm against its bandwidth floor. Unless a
function says otherwise, each is the median of 20 CUDA-event timings after 3 warm-ups, on random data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from usp_infer.layers import apply_rope
from usp_infer.ltx_video.model import rope_pairs
from usp_infer.parallel.usp import _copy


def timed_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    marks[0].record()
    for mark in marks[1:]:
        fn()
        mark.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(marks, marks[1:]))


def rope_diffusers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The RoPE ltx.py ran eagerly before (diffusers' formula), kept here to time the lever against."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def sdpa_backends(results: dict) -> None:
    shapes = {  # (B, H, S, D): what one rank's SDPA sees
        "13b-6144-1gpu": (3, 32, 6144, 128), "13b-6144-u4": (3, 8, 6144, 128),
        "13b-6144-u4-chunk2": (3, 4, 6144, 128), "13b-27588-u4": (3, 8, 27588, 128),
        "2b-640-seq": (1, 32, 640, 64),
    }
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for name, (b, h, s, d) in shapes.items():
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * b * h * s * s * d
        row, ref = {}, None
        for label, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v)
                    ms = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            except RuntimeError as e:
                row[label] = {"error": str(e).splitlines()[0][:200]}
                continue
            ref = out if ref is None else ref
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            row[label] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err_vs_flash": err}
        results[f"sdpa/{name}"] = row


def usp_layouts(results: dict, tokens: int = 6144, batch: int = 3, heads: int = 32, d: int = 128) -> None:
    """cuDNN attention on the views USPAttention hands it (q, k, v interleaved in the received buffer) vs
    contiguous inputs, and the layout copies around the exchange, at the per-rank sizes of 2 and 4 GPUs."""
    for p in (2, 4):
        hp, s_local = heads // p, tokens // p
        recv = torch.randn(p, s_local, 3, batch, hp, d, device="cuda", dtype=torch.bfloat16)
        q, k, v = recv.permute(2, 3, 0, 1, 4, 5).reshape(3, batch, tokens, hp, d).unbind(0)  # (B, s, h, D) views
        strided = [t.transpose(1, 2) for t in (q, k, v)]  # (B, h, s, D) as USPAttention passes them
        dense = [t.contiguous() for t in strided]
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            row = {"strided_ms": timed_ms(lambda: F.scaled_dot_product_attention(*strided)),
                   "contiguous_ms": timed_ms(lambda: F.scaled_dot_product_attention(*dense))}
        x = torch.randn(batch, s_local, heads, d, device="cuda", dtype=torch.bfloat16)
        view = x.reshape(batch, s_local, p, 1, hp, d).permute(3, 2, 1, 0, 4, 5)  # (1, P, s/P, B, hp, D)
        send = x.new_empty(1, p, s_local, 3, batch, hp, d)
        row["pack_qkv_stack_ms"] = timed_ms(lambda: torch.stack([view, view, view], dim=3))  # the first version
        row["pack_qkv_copy_ms"] = timed_ms(lambda: [send[:, :, :, i].copy_(view) for i in range(3)])
        row["pack_qkv_words_ms"] = timed_ms(lambda: [_copy(send[:, :, :, i], view) for i in range(3)])  # usp.py now
        back = torch.randn(p, s_local, batch, hp, d, device="cuda", dtype=torch.bfloat16)
        into = x.new_empty(batch, s_local, heads, d).view(batch, s_local, p, 1, hp, d)[:, :, :, 0]
        row["unpack_copy_ms"] = timed_ms(lambda: into.copy_(back.permute(2, 1, 0, 3, 4)))
        row["unpack_words_ms"] = timed_ms(lambda: _copy(into, back.permute(2, 1, 0, 3, 4)))
        row["floor_ms_per_copy_of_q"] = 2 * x.numel() * 2 / 4.3e12 * 1e3
        results[f"usp_layout/p{p}"] = row


def gemms(results: dict, d: int = 4096) -> None:
    """nn.Linear (bias) TFLOP/s at the token counts one rank sees with 1, 2 and 4 GPUs (3 x 6,144 tokens)."""
    for m in (18432, 9216, 4608):
        x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(m, 4 * d, device="cuda", dtype=torch.bfloat16)
        row = {}
        shapes = {"d_to_d": (x, d, d), "d_to_3d": (x, d, 3 * d), "d_to_4d": (x, d, 4 * d), "4d_to_d": (h, 4 * d, d)}
        for name, (inp, k, n) in shapes.items():  # d_to_3d: what one fused q/k/v projection would run
            layer = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
            row[name] = 2 * m * k * n / timed_ms(lambda: layer(inp)) / 1e9
        results[f"gemm_tflops/m{m}"] = row


def elementwise(results: dict, tokens: int = 3 * 6144, d: int = 4096) -> None:
    x = torch.randn(1, tokens, d, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(1, tokens, d // 2, device="cuda") * 6.28
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    floor_ms = 2 * x.numel() * 2 / 4.3e12 * 1e3  # read and write bf16 once at ~4.3 TB/s
    pairs = rope_pairs((cos, sin))
    compiled = torch.compile(apply_rope)

    def rope_complex_per_call() -> torch.Tensor:  # the eager form before: the complex table built in each call
        turn = torch.complex(cos[..., ::2], sin[..., ::2])
        return torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * turn).flatten(-2).to(x.dtype)

    compiled_full_tables = torch.compile(rope_diffusers)  # the compiled form before: diffusers' formula, full tables

    ref = rope_diffusers(x, cos, sin).float()
    results["rope"] = {
        "diffusers_ms": timed_ms(lambda: rope_diffusers(x, cos, sin)),
        "complex_per_call_ms": timed_ms(rope_complex_per_call),
        "complex_pairs_ms": timed_ms(lambda: apply_rope(x, pairs)),
        "compiled_full_tables_ms": timed_ms(lambda: compiled_full_tables(x, cos, sin)),
        "compiled_pairs_ms": timed_ms(lambda: compiled(x, pairs)),
        "floor_ms": floor_ms,
        "rel_diff_eager": ((apply_rope(x, pairs).float() - ref).norm() / ref.norm()).item(),
        "rel_diff_compiled": ((compiled(x, pairs).float() - ref).norm() / ref.norm()).item(),
    }
    shift, scale = (torch.randn(1, 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    results["modulation"] = {
        "two_pass_ms": timed_ms(lambda: x * (1 + scale) + shift),
        "addcmul_ms": timed_ms(lambda: torch.addcmul(shift, x, 1 + scale)),
        "floor_ms": floor_ms,
    }
    norm = torch.nn.RMSNorm(d, eps=1e-6, elementwise_affine=False, device="cuda", dtype=torch.bfloat16)
    results["rms_norm"] = {"ms": timed_ms(lambda: norm(x)), "floor_ms": floor_ms}
    # What Inductor makes of q = rope(rms_norm(to_q(x))) in the block, for the RoPE forms: ltx.py's now, and
    # the stack form (a cos - b sin, b cos + a sin) it replaced.
    qnorm = torch.nn.RMSNorm(d, eps=1e-5, device="cuda", dtype=torch.bfloat16)

    def stack_form(t: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        c, s_ = pairs.unbind(-1)
        a, b = t.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((a * c - b * s_, b * c + a * s_), dim=-1).flatten(-2).to(t.dtype)

    now, before = (torch.compile(lambda t, f=f: f(qnorm(t), pairs)) for f in (apply_rope, stack_form))
    results["norm_rope_compiled"] = {"ltx_ms": timed_ms(lambda: now(x)), "stack_form_ms": timed_ms(lambda: before(x)),
                                     "norm_only_compiled_ms": timed_ms(torch.compile(lambda: qnorm(x))),
                                     "floor_ms": floor_ms + pairs.numel() * 4 / 4.3e12 * 1e3,  # + the table once
                                     "rel_diff": ((now(x).float() - before(x).float()).norm()
                                                  / before(x).float().norm()).item()}


def gelu_epilogue(results: dict, d: int = 4096) -> None:
    """The FFN's up-projection + tanh GELU: nn.Linear then F.gelu vs GELU in the cuBLASLt epilogue (ltx.py now),
    at the rows one rank sees with 1, 2 and 4 GPUs; errors against an fp32 computation from the same bf16 inputs."""
    for m in (18432, 9216, 4608):
        x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
        up = torch.nn.Linear(d, 4 * d, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(up.weight, std=d**-0.5)
        ref = F.gelu(F.linear(x.float(), up.weight.float(), up.bias.float()), approximate="tanh")
        two_pass = F.gelu(up(x), approximate="tanh")
        fused = torch._addmm_activation(up.bias, x, up.weight.t(), use_gelu=True)
        flops = 2 * m * d * 4 * d
        row = {"two_pass_ms": timed_ms(lambda: F.gelu(up(x), approximate="tanh")),
               "linear_only_ms": timed_ms(lambda: up(x)),
               "epilogue_ms": timed_ms(lambda: torch._addmm_activation(up.bias, x, up.weight.t(), use_gelu=True))}
        row["epilogue_tflops"] = flops / row["epilogue_ms"] / 1e9
        row["rel_err_two_pass"] = ((two_pass.float() - ref).norm() / ref.norm()).item()
        row["rel_err_epilogue"] = ((fused.float() - ref).norm() / ref.norm()).item()
        results[f"gelu_epilogue/m{m}"] = row


def ffn_in_sequence(results: dict, d: int = 4096, layers: int = 16, reps: int = 8) -> None:
    """The FFN (up, tanh GELU, down) through `layers` layers of distinct weights, as inside a step (a steady
    load, weights not in cache), GELU as a separate pass vs in the GEMM epilogue. The two forms alternate,
    rep by rep, so a clock that drifts over the run weighs on both alike; medians of `reps` each."""
    for m in (18432, 9216, 4608):
        x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
        ups = [torch.nn.Linear(d, 4 * d, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
        downs = [torch.nn.Linear(4 * d, d, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]

        def two_pass() -> None:
            for up, down in zip(ups, downs):
                down(F.gelu(up(x), approximate="tanh"))

        def epilogue() -> None:
            for up, down in zip(ups, downs):
                down(torch._addmm_activation(up.bias, x, up.weight.t(), use_gelu=True))

        times: dict[str, list[float]] = {"two_pass": [], "epilogue": []}
        for _ in range(reps + 1):  # the first round warms up
            for name, fn in (("two_pass", two_pass), ("epilogue", epilogue)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / layers)
        row = {f"{name}_ms_per_layer": statistics.median(ts[1:]) for name, ts in times.items()}
        row["epilogue_over_two_pass"] = row["epilogue_ms_per_layer"] / row["two_pass_ms_per_layer"]
        results[f"ffn_in_sequence/m{m}"] = row


def sdpa_sustained(results: dict) -> None:
    """cuDNN attention at the 1-GPU shape: on the (B, S, H, D) views ltx.py passes vs contiguous (B, H, S, D), then
    again after two seconds of back-to-back calls (clock under load, as inside a step)."""
    b, h, s, d = 3, 32, 6144, 128
    bshd = [torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    views = [t.transpose(1, 2) for t in bshd]
    dense = [t.contiguous() for t in views]
    flops = 4 * b * h * s * s * d
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        row = {"views_ms": timed_ms(lambda: F.scaled_dot_product_attention(*views)),
               "contiguous_ms": timed_ms(lambda: F.scaled_dot_product_attention(*dense))}
        until = time.perf_counter() + 2.0
        while time.perf_counter() < until:
            timed_ms(lambda: F.scaled_dot_product_attention(*views), reps=10)
        row["views_after_2s_ms"] = timed_ms(lambda: F.scaled_dot_product_attention(*views))
    row.update({f"{k.removesuffix('_ms')}_tflops": flops / v / 1e9 for k, v in list(row.items())})
    results["sdpa_1gpu_layout_and_load"] = row


def cross_attention(results: dict, text: int = 24) -> None:
    """Text cross-attention at the 1-GPU shape (queries 3 x 32 heads x 6,144, 24 text keys): each backend with
    the additive mask ltx.py builds from the text mask, and without one (a mask that keeps every key adds 0)."""
    b, h, s, d = 3, 32, 6144, 128
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(b, text, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    bias = torch.zeros(b, 1, 1, text, device="cuda", dtype=torch.bfloat16)
    row = {"floor_ms": 2 * q.numel() * 2 / 4.3e12 * 1e3}
    for label, backend in {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                           "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}.items():
        for masked in (True, False):
            mask = bias if masked else None
            try:
                with sdpa_kernel([backend]):
                    row[f"{label}{'_mask' if masked else ''}_ms"] = timed_ms(
                        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
            except RuntimeError as e:
                row[f"{label}{'_mask' if masked else ''}_ms"] = str(e).splitlines()[0][:120]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH], set_priority=True):
        row["ltx_order_mask_ms"] = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    results["cross_attention_1gpu"] = row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version(), "sdp_priority_default": torch._C._get_sdp_priority_order()}
    with torch.no_grad():
        elementwise(results)
        gelu_epilogue(results)
        ffn_in_sequence(results)
        sdpa_sustained(results)
        cross_attention(results)
        gemms(results)
        usp_layouts(results)
        sdpa_backends(results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
