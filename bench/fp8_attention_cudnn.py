"""cuDNN's own FP8 flash attention against its bf16 SDPA on one Hopper GPU: time and error, as JSON (issue 25).

  python3 bench/fp8_attention_cudnn.py --out OUT.json            # one H100/H200, ~2 minutes
  python3 bench/fp8_attention_cudnn.py --cpu-smoke --out OUT.json  # tiny shapes, the torch emulation only

Our own 8-bit Triton attention ran 1.01x cuDNN's bf16 SDPA at best (bench/NOTES.md, 2026-12-07): the attention
of the 24,576-token step (~45% of it) stays bf16, which holds that step at ~1.2x under `--quantize fp8`. This
measures the other candidate before any model code is written for it: cuDNN's `sdpa_fp8` graph (through the
cuDNN frontend's Python package, `nvidia-cudnn-frontend`, carried as a wheel), with one scale per tensor for Q,
K and V (the power of two at or below 448 / amax), P cast with the fixed scale 448, and O in e4m3 (Hopper's
only output type) with V's scale (|O| <= max |V|: O is a convex combination of V's rows).

For each shape (LTX-2.3's video self-attention at 24,576 and 6,144 tokens, four branches batched and one, video
-> text cross-attention) it records, as median ms over CUDA events:
  - torch SDPA in bf16 with the cuDNN backend (what the model runs) and the flash backend;
  - cuDNN fp8, the kernel alone, for every execution plan the heuristics offer (the best one is the figure);
  - the whole call: Q, K, V's amax and cast, the kernel, O back to bf16 ("dynamic"), and with the scales known
    beforehand ("static": a cast each, as a calibrated model would fuse into the producer);
and the relative L2 error of each output against fp32 SDPA (math backend) on N(0, 1) inputs, then on harder
ones (peaky logits, a key offset shared by all tokens, per-channel magnitudes exp(N(0, 1))), beside a torch
emulation of the same per-tensor quantization (the prediction the CPU can make). Anything that fails is
recorded under "failures" and the rest goes on; the JSON is written after every shape.

Then, the model (`--model`, on by default on a GPU): LTX-2.3 22B with random weights at the released size, one
branch, eager, at 768x512x121 (6,144 tokens) and 1536x1024x121 (24,576, stage 2 of the two-stage recipes), four
ways: bf16, bf16 linears with cuDNN fp8 video self-attention, `--quantize fp8` (per-row scales), and fp8 with the
fp8 attention. For each, the median ms of one forward and the relative L2 error of its video and audio outputs
against the bf16 forward, at sigma 0.9 and 0.42 (the first and last stage-2 sigmas of the distilled recipe).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # usp_infer imports with torch alone

from usp_infer.quant import E4M3_MAX, pow2_scale, to_e4m3  # noqa: E402 - the package's own power-of-two scales

SMOKE = "--cpu-smoke" in sys.argv
E4M3 = torch.float8_e4m3fn
P_SCALE = E4M3_MAX  # P <= 1 (exp of the logit minus the running max): 448 is e4m3's largest value
# name: (B, Sq, Sk, H, D)
SHAPES = {
    "self-24576": (1, 24576, 24576, 32, 128),
    "self-6144-b4": (4, 6144, 6144, 32, 128),
    "self-6144": (1, 6144, 6144, 32, 128),
    "video-text-24576": (1, 24576, 1024, 32, 128),
    "video-text-6144": (1, 6144, 1024, 32, 128),
}
SMOKE_SHAPES = {"self": (1, 130, 130, 2, 128), "self-b2": (2, 64, 64, 2, 128), "video-text": (1, 70, 40, 2, 128)}
HARD_INPUTS = ("peaky", "k-offset", "channels")
DEADLINE_S = 150  # the hard-input errors (last) are skipped past this


def log(*parts) -> None:
    print(*parts, flush=True)


class Run:
    def __init__(self, out: Path) -> None:
        self.out, self.start = out, time.perf_counter()
        self.device = torch.device("cpu" if SMOKE else "cuda")
        self.results = {
            "command": " ".join(["python3", "bench/fp8_attention_cudnn.py", *sys.argv[1:]]),
            "torch": torch.__version__, "python": platform.python_version(), "smoke": SMOKE,
            "gpu": None if SMOKE else torch.cuda.get_device_name(),
            "gpu_count": 0 if SMOKE else torch.cuda.device_count(),
            "capability": None if SMOKE else list(torch.cuda.get_device_capability()),
            "cuda": torch.version.cuda, "torch_cudnn": None if SMOKE else torch.backends.cudnn.version(),
            "scales": {"q_k_v": "per tensor, power of two <= 448 / amax", "p": P_SCALE, "o": "V's scale"},
            "timing": "cpu perf_counter, 1 call (smoke)" if SMOKE else "CUDA events, median of 20 after 3 warm-ups",
            "shapes": {}, "model": {}, "failures": [],
        }
        self.graphs: dict[str, CudnnFp8] = {}  # each shape's built graph, for the hard inputs

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.results["wall_s"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1))

    def attempt(self, label: str, fn):
        """fn() or None; a failure is recorded (one broken variant must not end the run)."""
        try:
            result = fn()
            if not SMOKE:
                torch.cuda.synchronize()  # an asynchronous fault is charged to this label, not the next
            return result
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"[:2000]
            self.results["failures"].append({"label": label, "error": error, "trace": traceback.format_exc()[-3000:]})
            log(f"FAILED {label}: {error[:300]}")
            return None

    def time_ms(self, fn, reps: int = 20) -> float:
        """Median ms of fn() (CUDA events; the CPU smoke: one perf_counter call)."""
        if SMOKE:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def sdpa(q, k, v, backend=SDPBackend.CUDNN_ATTENTION):
    """As the model calls it: (B, S, H, D) tensors as (B, H, S, D) views."""
    if SMOKE:  # no cuDNN or flash kernels on the CPU: the math one stands in, so the code path runs
        backend = SDPBackend.MATH
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def reference(q, k, v):
    """fp32 SDPA (math backend, no TF32), a few heads at a time so that the S x S scores fit."""
    B, Sq, H, D = q.shape
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    heads = max(1, min(H, int(4e9 // (B * Sq * k.shape[1] * 4 * 3))))
    for h in range(0, H, heads):
        hs = slice(h, h + heads)
        out[:, :, hs] = sdpa(q[:, :, hs].float(), k[:, :, hs].float(), v[:, :, hs].float(), SDPBackend.MATH)
    return out


def rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def make_inputs(kind, B, Sq, Sk, H, D, device, seed):
    gen = torch.Generator(device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, device=device, generator=gen)  # noqa: E731
    q, k, v = randn(B, Sq, H, D), randn(B, Sk, H, D), randn(B, Sk, H, D)
    if kind == "peaky":  # logits of spread 3: a few keys carry each query
        q = 3 * q
    elif kind == "k-offset":  # one vector added to every key of a head (a norm weight's bias can do this)
        k = k + 5 * randn(1, 1, H, D)
    elif kind == "channels":  # per-channel magnitudes spread over ~e^+-2, as learned norm weights can make
        q, k, v = (t * torch.exp(randn(1, 1, H, D)) for t in (q, k, v))
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def tensor_scale(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1 / scale) of t as one tensor, () fp32 on t's device (no host sync): quant.pow2_scale of its amax,
    the least power of two with amax / scale <= 448."""
    return pow2_scale(t.abs().amax())


def smoothed(k: torch.Tensor) -> torch.Tensor:
    """K less its mean over the tokens (per batch row, head and channel): each query's logits move by one
    constant, which the softmax cancels, and K's scale then covers its spread, not a shared offset."""
    return (k.float() - k.float().mean(1, keepdim=True)).to(k.dtype)


def emulate(q, k, v, smooth: bool = False):
    """What per-tensor fp8 attention computes, in fp32 torch: Q, K, V rounded through e4m3 at their scales, P
    (exp of the logit minus the row max) rounded at scale 448, O rounded at V's scale. The flash kernel rounds P
    against a running max per key block; this rounds it against the final one (the best case)."""
    k = smoothed(k) if smooth else k
    (sq, iq), (sk, ik), (sv, iv) = tensor_scale(q), tensor_scale(k), tensor_scale(v)
    qd, kd, vd = (to_e4m3(t, i).float() * s for t, s, i in ((q, sq, iq), (k, sk, ik), (v, sv, iv)))
    B, Sq, H, D = q.shape
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    heads = max(1, min(H, int(4e9 // (B * Sq * k.shape[1] * 4 * 3))))
    for h in range(0, H, heads):
        hs = slice(h, h + heads)
        logits = torch.einsum("bqhd,bkhd->bhqk", qd[:, :, hs], kd[:, :, hs]) / math.sqrt(D)
        p = torch.exp(logits - logits.amax(-1, keepdim=True))
        denominator = p.sum(-1, keepdim=True)
        p = (p * P_SCALE).to(E4M3).float() / P_SCALE
        out[:, :, hs] = (torch.einsum("bhqk,bkhd->bqhd", p / denominator, vd[:, :, hs]))
    return to_e4m3(out, iv).float() * sv


class CudnnFp8:
    """cuDNN's sdpa_fp8 for one shape: (B, S, H, D) e4m3 tensors read in place as (B, H, S, D), O in e4m3."""

    def __init__(self, B, Sq, Sk, H, D, device) -> None:
        import cudnn

        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(device).cuda_stream)
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self.handle)

        def seq(name, S):
            return graph.tensor(name=name, dim=[B, H, S, D], stride=[S * H * D, D, H * D, 1], data_type=e4m3)

        self.q, self.k, self.v = seq("q", Sq), seq("k", Sk), seq("v", Sk)
        scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        self.scalars = [graph.tensor(name=n, **scalar) for n in ("dq", "dk", "dv", "ds", "ss", "so")]
        o, _, amax_s, amax_o = graph.sdpa_fp8(self.q, self.k, self.v, *self.scalars, is_inference=True,
                                              attn_scale=1.0 / math.sqrt(D), use_causal_mask=False, name="sdpa_fp8")
        o.set_output(True).set_dim([B, H, Sq, D]).set_stride([Sq * H * D, D, H * D, 1]).set_data_type(e4m3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        self.o, self.amax = o, (amax_s, amax_o)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        try:  # every plan, to time each; where one of them cannot be built, the heuristics' first alone
            graph.build_plans(cudnn.build_plan_policy.ALL)
        except Exception as e:  # noqa: BLE001
            log(f"build_plans(ALL) failed ({type(e).__name__}: {str(e)[:200]}); building the heuristics' choice")
            graph.build_plans()
        self.graph, self.plans = graph, graph.get_execution_plan_count()
        self.names = [self._name(i) for i in range(self.plans)]
        size = max([self._workspace(i) for i in range(self.plans)] + [graph.get_workspace_size()])
        self.workspace = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
        self.out = torch.empty(B, Sq, H, D, dtype=E4M3, device=device)
        self.amax_out = [torch.empty(1, 1, 1, 1, dtype=torch.float32, device=device) for _ in range(2)]
        self.p_scales = [torch.full((1, 1, 1, 1), x, device=device) for x in (1 / P_SCALE, P_SCALE)]
        self.best = 0

    def _workspace(self, i: int) -> int:
        try:
            return self.graph.get_workspace_size_plan_at_index(i)
        except Exception:  # noqa: BLE001 - a plan that did not build: its run fails and is recorded
            return 0

    def _name(self, i: int) -> str:
        try:
            return self.graph.get_plan_name_at_index(i)
        except Exception:  # noqa: BLE001
            return f"plan {i}"

    def scales(self, q: tuple, k: tuple, v: tuple) -> list[torch.Tensor]:
        """The graph's six scalars for Q, K, V quantized at their (scale, 1 / scale) pairs (O at V's)."""
        one = lambda x: x.reshape(1, 1, 1, 1).float()  # noqa: E731
        # descale x: a code times it is the value (the scale); scale o: O times it is its code (V's inverse)
        return [one(q[0]), one(k[0]), one(v[0]), *self.p_scales, one(v[1])]

    def kernel(self, q8, k8, v8, scales, plan: int | None = None) -> torch.Tensor:
        """O (B, Sq, H, D) in e4m3 at scale_o; scales: `scales()`."""
        pack = {self.q: q8, self.k: k8, self.v: v8, self.o: self.out,
                self.amax[0]: self.amax_out[0], self.amax[1]: self.amax_out[1]}
        pack.update(zip(self.scalars, scales))
        pack = {t: buffer.data_ptr() for t, buffer in pack.items()}  # device pointers: no dlpack of float8 needed
        self.graph.execute_plan_at_index(pack, self.workspace.data_ptr(), self.best if plan is None else plan,
                                         handle=self.handle)
        return self.out

    def call(self, q, k, v, static: tuple | None = None, smooth: bool = False) -> torch.Tensor:
        """The whole bf16 -> bf16 call: scales from amax (or the given ones), casts, the kernel, O dequantized;
        `smooth`: K less its mean first (`smoothed`)."""
        k = smoothed(k) if smooth else k
        sq, sk, sv = static or (tensor_scale(q), tensor_scale(k), tensor_scale(v))
        q8, k8, v8 = to_e4m3(q, sq[1]), to_e4m3(k, sk[1]), to_e4m3(v, sv[1])
        return (self.kernel(q8, k8, v8, self.scales(sq, sk, sv)).float() * sv[0]).to(q.dtype)


class Fp8Attention:
    """An attention function for the model ((B, S, H, D) bf16 in and out): cuDNN's fp8 graph, one per shape,
    with K smoothed (`smoothed`) and dynamic per-tensor scales."""

    def __init__(self, smooth: bool = True) -> None:
        self.smooth, self.graphs = smooth, {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        (B, Sq, H, D), Sk = q.shape, k.shape[1]
        graph = self.graphs.get((B, Sq, Sk, H, D))
        if graph is None:
            graph = self.graphs[B, Sq, Sk, H, D] = CudnnFp8(B, Sq, Sk, H, D, q.device)
        return graph.call(q.contiguous(), k.contiguous(), v.contiguous(), smooth=self.smooth)


MODEL_SIZES = {"768x512x121": (512, 768, 121), "1536x1024x121": (1024, 1536, 121)}
MODEL_SIGMAS = (0.9, 0.421875)


def model_level(run: Run, reps: int) -> None:
    """LTX-2.3 22B, one branch, eager: bf16 / fp8 linears, each with bf16 and with cuDNN fp8 video
    self-attention (see the module's docstring)."""
    from dataclasses import replace

    from usp_infer import quant
    from usp_infer.bench import latent_grid, randomize
    from usp_infer.ltx2 import bench as ltx2_bench
    from usp_infer.ltx2.model import LOCAL_ATTENTION, SHAPES, rope_tables

    device, dtype = run.device, torch.bfloat16
    cfg = SHAPES["ltx2-tiny" if SMOKE else "ltx-2.3-22b"]
    sizes = {"64x64x9": (64, 64, 9)} if SMOKE else MODEL_SIZES
    model = ltx2_bench.random_model(cfg, device, dtype, 0, randomize)
    fp8_attention = replace(LOCAL_ATTENTION, video_self=Fp8Attention())
    if SMOKE:  # no cuDNN: the emulation stands in, so the code path runs
        fp8_attention = replace(LOCAL_ATTENTION, video_self=lambda q, k, v: emulate(q, k, v, True).to(q.dtype))
    forwards = {}
    for name, (height, width, frames) in sizes.items():
        grid = latent_grid(height, width, frames)
        gen = torch.Generator(device).manual_seed(1)
        video, audio, text = ltx2_bench._inputs(cfg, grid, frames, device, dtype, gen)
        rope = rope_tables(cfg, *grid, ltx2_bench.FPS, audio.shape[1], device)
        t_text, a_text, _ = text["cond"]

        def forward(attn, sigma, video=video, audio=audio, t_text=t_text, a_text=a_text, rope=rope):
            s = torch.full((1,), sigma, device=device)
            return model(video.to(dtype), audio.to(dtype), t_text, a_text, None, None, s * 1000, s * 1000, s, s, rope,
                         attn=attn)

        forwards[name] = forward
        run.results["model"][name] = {"video_tokens": video.shape[1], "ms": {}, "rel_err": {}}
    refs = {}
    with torch.no_grad():
        for linears in ("bf16", "fp8"):
            if linears == "fp8":
                quant.quantize_(model)
            for name, forward in forwards.items():
                row = run.results["model"][name]
                for attention, attn in (("bf16", LOCAL_ATTENTION), ("fp8", fp8_attention)):
                    label = f"{linears} linears, {attention} attention"
                    outs = run.attempt(f"model/{name}/{label}", lambda: {s: forward(attn, s) for s in MODEL_SIGMAS})
                    if outs is None:
                        continue
                    if label == "bf16 linears, bf16 attention":
                        refs[name] = outs
                    elif name in refs:
                        row["rel_err"][label] = {f"sigma {s}": {"video": rel_err(o[0], refs[name][s][0].float()),
                                                                "audio": rel_err(o[1], refs[name][s][1].float())}
                                                 for s, o in outs.items()}
                    row["ms"][label] = run.attempt(f"model/{name}/{label}/time", lambda: run.time_ms(
                        lambda: forward(attn, MODEL_SIGMAS[0]), reps))
                    run.save()
                    log(json.dumps({name: {label: {"ms": row["ms"][label], "rel_err": row["rel_err"].get(label)}}}))
            for row in run.results["model"].values():
                base = row["ms"].get("bf16 linears, bf16 attention")
                if base:
                    row["speedup"] = {label: base / t for label, t in row["ms"].items() if t}


def bench_shape(run: Run, name: str, B: int, Sq: int, Sk: int, H: int, D: int) -> None:
    flop = 4 * B * H * Sq * Sk * D
    entry = {"B": B, "Sq": Sq, "Sk": Sk, "H": H, "D": D, "tflop": flop / 1e12, "ms": {}, "plans_ms": {},
             "rel_err": {"randn": {}}}
    run.results["shapes"][name] = entry
    q, k, v = make_inputs("randn", B, Sq, Sk, H, D, run.device, 0)
    ref = reference(q, k, v)
    errors = entry["rel_err"]["randn"]
    errors["emulated-fp8"] = run.attempt(f"{name}/emulate", lambda: rel_err(emulate(q, k, v), ref))
    errors["emulated-fp8-smooth"] = run.attempt(f"{name}/emulate", lambda: rel_err(emulate(q, k, v, True), ref))
    for method, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        out = run.attempt(f"{name}/{method}", lambda: sdpa(q, k, v, backend))
        if out is not None:
            errors[method] = rel_err(out, ref)
            entry["ms"][method] = run.attempt(f"{name}/{method}/time", lambda: run.time_ms(lambda: sdpa(q, k, v, backend)))
    if not SMOKE:
        fp8 = run.attempt(f"{name}/cudnn-fp8/build", lambda: CudnnFp8(B, Sq, Sk, H, D, run.device))
        if fp8 is not None:
            entry["plans"] = fp8.names
            scales = (tensor_scale(q), tensor_scale(k), tensor_scale(v))
            q8, k8, v8 = (to_e4m3(t, pair[1]) for t, pair in zip((q, k, v), scales))
            packed = fp8.scales(*scales)
            for i, plan in enumerate(fp8.names):
                entry["plans_ms"][f"{i}: {plan}"] = run.attempt(f"{name}/cudnn-fp8/plan {i}", lambda: run.time_ms(
                    lambda: fp8.kernel(q8, k8, v8, packed, i)))
            timed = [(t, i) for i, t in enumerate(entry["plans_ms"].values()) if t]
            if timed:
                entry["ms"]["cudnn-fp8-kernel"], fp8.best = min(timed)
                entry["best_plan"] = fp8.names[fp8.best]
                out = run.attempt(f"{name}/cudnn-fp8", lambda: fp8.call(q, k, v))
                if out is not None:
                    errors["cudnn-fp8"] = rel_err(out, ref)
                    entry["ms"]["cudnn-fp8-dynamic"] = run.attempt(f"{name}/cudnn-fp8/dynamic", lambda: run.time_ms(
                        lambda: fp8.call(q, k, v)))
                    entry["ms"]["cudnn-fp8-static"] = run.attempt(f"{name}/cudnn-fp8/static", lambda: run.time_ms(
                        lambda: fp8.call(q, k, v, scales)))
                out = run.attempt(f"{name}/cudnn-fp8-smooth", lambda: fp8.call(q, k, v, smooth=True))
                if out is not None:
                    errors["cudnn-fp8-smooth"] = rel_err(out, ref)
                    entry["ms"]["cudnn-fp8-smooth"] = run.attempt(f"{name}/cudnn-fp8-smooth/time", lambda: run.time_ms(
                        lambda: fp8.call(q, k, v, smooth=True)))
                run.graphs[name] = fp8  # kept for the hard inputs
    base = entry["ms"].get("sdpa-cudnn")
    entry["tflops"] = {m: flop / t / 1e9 for m, t in entry["ms"].items() if t}
    if base:
        entry["speedup_vs_cudnn_bf16"] = {m: base / t for m, t in entry["ms"].items() if t}
    log(json.dumps({name: {key: entry[key] for key in ("ms", "plans_ms", "rel_err")}}))


def hard_input_errors(run: Run, name: str, B: int, Sq: int, Sk: int, H: int, D: int) -> None:
    """Errors only (the times do not depend on the values)."""
    entry = run.results["shapes"][name]
    fp8 = run.graphs.get(name)
    for i, kind in enumerate(HARD_INPUTS):
        if not SMOKE and run.elapsed() > DEADLINE_S:
            entry["rel_err"][kind] = "skipped: time"
            continue
        q, k, v = make_inputs(kind, B, Sq, Sk, H, D, run.device, i + 1)
        ref = reference(q, k, v)
        errors = entry["rel_err"][kind] = {}
        candidates = {"sdpa-cudnn": lambda: sdpa(q, k, v), "emulated-fp8": lambda: emulate(q, k, v),
                      "emulated-fp8-smooth": lambda: emulate(q, k, v, True)}
        if fp8 is not None:
            candidates["cudnn-fp8"] = lambda: fp8.call(q, k, v)
            candidates["cudnn-fp8-smooth"] = lambda: fp8.call(q, k, v, smooth=True)
        for method, fn in candidates.items():
            out = run.attempt(f"{name}/{kind}/{method}", fn)
            if out is not None:
                errors[method] = rel_err(out, ref)
        log(json.dumps({name: {kind: errors}}))


def table(results: dict) -> str:
    def cell(x, spec: str) -> str:
        width = int(spec.split(".")[0])
        return format(x, spec) if isinstance(x, (int, float)) else "-".rjust(width)

    rows = [f"{'shape':<17} {'method':<20} {'ms':>9} {'TFLOP/s':>8} {'x bf16':>7} "
            + " ".join(f"{'err ' + kind:>14}" for kind in ("randn",) + HARD_INPUTS)]
    for name, e in results["shapes"].items():
        methods = list(e["ms"]) + [m for m in e["rel_err"].get("randn", {}) if m not in e["ms"]]
        for i, m in enumerate(methods):
            errors = [e["rel_err"].get(kind, {}) for kind in ("randn",) + HARD_INPUTS]
            rows.append(" ".join([f"{name if i == 0 else '':<17} {m:<20}", cell(e["ms"].get(m), "9.3f"),
                                  cell(e.get("tflops", {}).get(m), "8.0f"),
                                  cell(e.get("speedup_vs_cudnn_bf16", {}).get(m), "7.2f")]
                                 + [cell(x.get(m) if isinstance(x, dict) else None, "14.4f") for x in errors]))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: the emulation and SDPA only")
    parser.add_argument("--no-model", action="store_true", help="the attention shapes alone, not the model level")
    parser.add_argument("--model-reps", type=int, default=5, help="timed forwards per model-level variant")
    args = parser.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: use --cpu-smoke")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    run = Run(args.out)
    if not SMOKE:
        try:
            import cudnn

            run.results["cudnn_frontend"] = getattr(cudnn, "__version__", None)
            run.results["cudnn_backend"] = cudnn.backend_version()
        except Exception as e:  # noqa: BLE001 - the bf16 rows and the emulation still mean something
            run.results["failures"].append({"label": "import cudnn", "error": f"{type(e).__name__}: {e}"[:2000]})
            log(f"FAILED import cudnn: {e}")
    shapes = SMOKE_SHAPES if SMOKE else SHAPES
    log(f"torch {torch.__version__}, {run.results['gpu'] or 'CPU (smoke)'}, cuDNN frontend "
        f"{run.results.get('cudnn_frontend')} backend {run.results.get('cudnn_backend')}")
    for name, shape in shapes.items():
        run.attempt(f"{name}/shape", lambda: bench_shape(run, name, *shape))
        run.save()
        log(f"{name}: done at {run.elapsed():.0f} s")
    for name, shape in shapes.items():
        if name in run.results["shapes"]:
            run.attempt(f"{name}/hard-inputs", lambda: hard_input_errors(run, name, *shape))
            run.save()
    run.graphs.clear()
    if not args.no_model:
        if not SMOKE:
            torch.cuda.empty_cache()
        run.attempt("model", lambda: model_level(run, args.model_reps))
    log(f"done in {run.elapsed():.0f} s, {len(run.results['failures'])} failures")
    for failure in run.results["failures"]:
        log(f"  failed: {failure['label']}: {failure['error'][:200]}")
    log(table(run.results))
    for name, row in run.results["model"].items():
        log(f"model {name} ({row['video_tokens']} video tokens): " + "; ".join(
            f"{label} {ms:.1f} ms ({row.get('speedup', {}).get(label, float('nan')):.2f}x)"
            for label, ms in row["ms"].items() if ms))
    run.save()


if __name__ == "__main__":
    main()
