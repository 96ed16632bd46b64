"""FP8 attention (usp_infer/fp8_attention.py) against bf16 SDPA on one GPU: time and error, as JSON (issue 25).

  python3 bench/fp8_attention_gpu.py --out OUT.json               # one H200, < 3 minutes with the compiles
  python3 bench/fp8_attention_gpu.py --cpu-smoke --out OUT.json   # tiny shapes through Triton's interpreter:
                                                                  # this script's code runs; its numbers mean nothing

For each shape (LTX-2.3's video self-attention at 24,576 and 6,144 tokens, four branches batched and one,
video -> text cross-attention, the audio stream's self-attention):
  - torch SDPA in bf16 with the cuDNN backend (the one the model uses) and with the flash backend;
  - the K/V pre-pass alone (quantize_kv), for both Q K^T formats, with and without smoothing K;
  - ours for every tile config and both Q K^T formats (e4m3, int8): the kernel alone on quantized K/V, and
    the whole call (pre-pass + kernel), each as median ms (triton.testing.do_bench), TFLOP/s as
    4 B H Sq Sk D / t, and speedup over cuDNN;
  - the relative L2 error of each output against fp32 SDPA (math backend, fp32 throughout), on N(0, 1)
    inputs; then, for the default config and cuDNN, on harder inputs: peaky logits (q x 3), a key offset
    shared by all tokens, per-channel magnitudes exp(N(0, 1)).
A config that fails (compile or run) is recorded under "failures" and the rest goes on. The JSON is written
after every shape; the compact table comes last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from usp_infer import fp8_attention as fa  # noqa: E402

# name: (B, Sq, Sk, H, D)
SHAPES = {
    "self-24576": (1, 24576, 24576, 32, 128),
    "self-6144-b4": (4, 6144, 6144, 32, 128),
    "self-6144": (1, 6144, 6144, 32, 128),
    "video-text": (1, 6144, 1024, 32, 128),
    "audio": (1, 126, 126, 32, 64),
}
SMOKE_SHAPES = {"self": (1, 130, 130, 1, 128), "self-b2": (2, 64, 64, 1, 128), "video-text": (1, 70, 40, 1, 128),
                "audio": (1, 126, 126, 1, 64)}
HARD_INPUTS = ("peaky", "k-offset", "channels")
DEADLINE_S = 165  # the hard-input errors (last) are skipped past this, to stay under 3 minutes


def log(*parts) -> None:
    print(*parts, flush=True)


class Run:
    def __init__(self, out: Path) -> None:
        self.out, self.start = out, time.perf_counter()
        self.device = torch.device("cpu" if SMOKE else "cuda")
        gpu = None if SMOKE else torch.cuda.get_device_name()
        self.results = {
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "gpu": gpu, "capability": None if SMOKE else list(torch.cuda.get_device_capability()),
            "cuda": torch.version.cuda, "cudnn": None if SMOKE else torch.backends.cudnn.version(),
            "smoke": SMOKE, "default_config": fa.DEFAULT_CONFIG, "kv_block": fa.KV_BLOCK,
            "configs": {name: c._asdict() for name, c in fa.CONFIGS.items()},
            "timing": "cpu perf_counter, 1 call (smoke)" if SMOKE else "triton.testing.do_bench median, warmup 25 ms, rep 100 ms",
            "shapes": {}, "failures": [],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.results["wall_s"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1))

    def attempt(self, label: str, fn):
        """fn() or None; a failure is recorded (a broken config must not end the run)."""
        try:
            result = fn()
            if not SMOKE:
                torch.cuda.synchronize()  # an asynchronous fault is charged to this label, not the next
            return result
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"[:2000]
            self.results["failures"].append({"label": label, "error": error,
                                             "trace": traceback.format_exc()[-3000:]})
            log(f"FAILED {label}: {error[:300]}")
            return None

    def time_ms(self, fn) -> float:
        fn()  # the compile, outside the timing
        if SMOKE:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sdpa(q, k, v, backend):
    """As the model calls it: (B, S, H, D) tensors as (B, H, S, D) views."""
    if SMOKE:  # no cuDNN or flash kernels on the CPU: the math one stands in, so the code path runs
        backend = SDPBackend.MATH
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def reference(q, k, v):
    """fp32 SDPA (math backend, no TF32), a few heads at a time so that the S x S scores fit."""
    B, Sq, H, D = q.shape
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    heads = max(1, min(H, int(4e9 // (B * Sq * k.shape[1] * 4 * 3))))  # ~4 GB of scores and softmax temporaries
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


def bench_shape(run: Run, name: str, B: int, Sq: int, Sk: int, H: int, D: int) -> None:
    flop = 4 * B * H * Sq * Sk * D
    entry = {"B": B, "Sq": Sq, "Sk": Sk, "H": H, "D": D, "tflop": flop / 1e12, "ms": {}, "kernel_ms": {},
             "rel_err": {"randn": {}}}
    run.results["shapes"][name] = entry
    q, k, v = make_inputs("randn", B, Sq, Sk, H, D, run.device, 0)
    ref = reference(q, k, v)
    errors = entry["rel_err"]["randn"]

    for method, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        out = run.attempt(f"{name}/{method}", lambda: sdpa(q, k, v, backend))
        if out is not None:
            errors[method] = rel_err(out, ref)
            del out
            entry["ms"][method] = run.attempt(f"{name}/{method}/time",
                                              lambda: run.time_ms(lambda: sdpa(q, k, v, backend)))
    for qk in fa.QK_FORMATS:
        for smooth in (True, False):
            method = f"prepass-{qk}" + ("" if smooth else "-nosmooth")
            entry["ms"][method] = run.attempt(f"{name}/{method}", lambda: run.time_ms(
                lambda: fa.quantize_kv(k, v, qk, smooth)))
    for qk in fa.QK_FORMATS:
        kv = run.attempt(f"{name}/prepass-{qk}/run", lambda: fa.quantize_kv(k, v, qk))
        for config in fa.CONFIGS:
            method = f"fp8-{qk}-{config}"
            out = run.attempt(f"{name}/{method}", lambda: fa.fp8_attention(q, k, v, config, qk))
            if out is None:
                continue
            errors[method] = rel_err(out, ref)
            del out
            entry["ms"][method] = run.attempt(f"{name}/{method}/time", lambda: run.time_ms(
                lambda: fa.fp8_attention(q, k, v, config, qk)))
            if kv is not None:
                entry["kernel_ms"][method] = run.attempt(f"{name}/{method}/kernel", lambda: run.time_ms(
                    lambda: fa.attention_quantized(q, kv, config)))
        del kv
    cudnn = entry["ms"].get("sdpa-cudnn")
    entry["tflops"] = {m: flop / t / 1e9 for m, t in entry["ms"].items() if t and not m.startswith("prepass")}
    entry["kernel_tflops"] = {m: flop / t / 1e9 for m, t in entry["kernel_ms"].items() if t}
    if cudnn:
        entry["speedup_vs_cudnn"] = {m: cudnn / t for m, t in entry["ms"].items() if t and not m.startswith("prepass")}
        entry["kernel_speedup_vs_cudnn"] = {m: cudnn / t for m, t in entry["kernel_ms"].items() if t}
    del q, k, v, ref
    log(json.dumps({name: {key: entry[key] for key in ("ms", "kernel_ms", "rel_err")}}))


def hard_input_errors(run: Run, name: str, B: int, Sq: int, Sk: int, H: int, D: int) -> None:
    """Errors only (the times do not depend on the values): cuDNN, flash and ours at the default config."""
    entry = run.results["shapes"][name]
    for i, kind in enumerate(HARD_INPUTS):
        if not SMOKE and run.elapsed() > DEADLINE_S:
            entry["rel_err"][kind] = "skipped: time"
            continue
        q, k, v = make_inputs(kind, B, Sq, Sk, H, D, run.device, i + 1)
        ref = reference(q, k, v)
        errors = entry["rel_err"][kind] = {}
        candidates = {"sdpa-cudnn": lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION),
                      "sdpa-flash": lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)}
        for qk in fa.QK_FORMATS:
            for smooth in (True, False):
                method = f"fp8-{qk}-{fa.DEFAULT_CONFIG}" + ("" if smooth else "-nosmooth")
                candidates[method] = lambda qk=qk, smooth=smooth: fa.fp8_attention(q, k, v, qk=qk, smooth_k=smooth)
        for method, fn in candidates.items():
            out = run.attempt(f"{name}/{kind}/{method}", fn)
            if out is not None:
                errors[method] = rel_err(out, ref)
        del q, k, v, ref
        log(json.dumps({name: {kind: errors}}))


def compiled_kernels() -> list:
    """Registers and spills of every compiled variant (best effort: Triton's caches are not public API)."""
    rows = []
    for fn in (fa._attention_kernel, fa._quantize_kv_kernel):
        name = getattr(fn, "__name__", str(fn))
        try:
            kernels = [kernel for caches in fn.device_caches.values() for kernel in caches[0].values()]
        except Exception as e:  # noqa: BLE001
            kernels = [e]
        for kernel in kernels:
            try:
                md = kernel.metadata
                rows.append({"kernel": name, "num_warps": md.num_warps, "num_stages": md.num_stages,
                             "shared": md.shared, "n_regs": kernel.n_regs, "n_spills": kernel.n_spills})
            except Exception as e:  # noqa: BLE001
                rows.append({"kernel": name, "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


def table(results: dict) -> str:
    """One row per (shape, method): whole-call ms, TFLOP/s and speedup over cuDNN; the kernel alone; errors."""
    def cell(x, spec: str) -> str:
        width = int(spec.split(".")[0])
        return format(x, spec) if isinstance(x, (int, float)) else "-".rjust(width)

    rows = [f"{'shape':<13} {'method':<31} {'ms':>9} {'TFLOP/s':>8} {'x cuDNN':>8} {'kernel ms':>10} {'x cuDNN':>8} "
            f"{'err randn':>10} {'err peaky':>10} {'err k-off':>10} {'err chan':>10}"]
    for name, e in results["shapes"].items():
        methods = list(e["ms"])  # then those with errors only (the hard inputs' -nosmooth runs)
        for errors in e["rel_err"].values():
            methods += [m for m in (errors if isinstance(errors, dict) else ()) if m not in methods]
        for i, m in enumerate(methods):
            errors = [e["rel_err"].get(kind, {}) for kind in ("randn",) + HARD_INPUTS]
            rows.append(" ".join([f"{name if i == 0 else '':<13} {m:<31}", cell(e["ms"].get(m), "9.3f"),
                                  cell(e.get("tflops", {}).get(m), "8.0f"),
                                  cell(e.get("speedup_vs_cudnn", {}).get(m), "8.2f"),
                                  cell(e["kernel_ms"].get(m), "10.3f"),
                                  cell(e.get("kernel_speedup_vs_cudnn", {}).get(m), "8.2f")]
                                 + [cell(x.get(m) if isinstance(x, dict) else None, "10.4f") for x in errors]))
        best = max(((s, m) for m, s in e.get("speedup_vs_cudnn", {}).items() if m.startswith("fp8")), default=None)
        if best:
            rows.append(f"{'':<13} best fp8 (whole call): {best[1]} {best[0]:.2f}x cuDNN "
                        f"({'meets' if best[0] >= 1.25 else 'misses'} 1.25x)")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (Triton's interpreter)")
    args = parser.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: use --cpu-smoke")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    run = Run(args.out)
    shapes = SMOKE_SHAPES if SMOKE else SHAPES
    log(f"torch {torch.__version__}, triton {triton.__version__}, {run.results['gpu'] or 'CPU (smoke)'}")
    for name, shape in shapes.items():
        run.attempt(f"{name}/shape", lambda: bench_shape(run, name, *shape))
        run.save()
        log(f"{name}: done at {run.elapsed():.0f} s")
    for name, shape in shapes.items():
        if name in run.results["shapes"]:
            run.attempt(f"{name}/hard-inputs", lambda: hard_input_errors(run, name, *shape))
            run.save()
    run.results["compiled"] = compiled_kernels()
    log(f"done in {run.elapsed():.0f} s, {len(run.results['failures'])} failures")
    for failure in run.results["failures"]:
        log(f"  failed: {failure['label']}: {failure['error'][:200]}")
    log(table(run.results))
    run.save()


if __name__ == "__main__":
    main()
