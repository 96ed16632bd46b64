"""float8 (e4m3) linear layers for the transformer blocks: `--quantize fp8`, as an edit of a built model.

The model files know nothing of this (gpt-fast's shape): `quantize_` swaps each `nn.Linear` inside the
transformer blocks for an `FP8Linear` (every attention's q/k/v/out, the audio<->video ones included, and the
FFNs); embeddings, norms, modulation tables, proj_in/proj_out, the timestep and caption embedders and the
per-head gate logits stay in the model dtype, as Lightricks keeps them. About 80% of a step's FLOPs are these
linears, and an H200 multiplies e4m3 1.7-1.9x faster than bf16 (bench/NOTES.md).

An FP8Linear holds its weight in e4m3 with one fp32 scale per output channel, quantizes its input per call
(each row its own scale, from a fused Triton kernel in eager CUDA, from torch ops that Inductor fuses into the
producing op under torch.compile) or with a calibrated static scale, and multiplies with `torch._scaled_mm`
(row-wise scales on both sides, fp32 accumulation, bias in the epilogue).

Every scale is a power of two. e4m3 is a floating-point format, so a scale only moves the exponent and a power
of two costs no precision (at most one binade at the subnormal end), while every divide becomes exact: torch
ops, the Triton kernel and Triton's CPU interpreter produce the same e4m3 bits. Values are clamped to +-448
before the cast (torch's CUDA cast does not saturate: past 464 it gives NaN; its CPU cast saturates, so only the GPU
tests can see the clamp); an all-zero row keeps a finite scale.

Checkpoints: `weight` e4m3 (out, in), `weight_scale` fp32 (out,) [Lightricks: ()], `input_scale` fp32 () when
static, beside the usual `bias`: the key names of Lightricks' FP8 checkpoints, which diffusers' single-file
conversion renames around without touching, so those load too (`prepare_for_state`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import kernels

E4M3_MAX = 448.0
AMAX_FLOOR = 2.0**-100  # the amax an all-zero row takes: a normal fp32 scale, and its values stay 0
KEEP = ("to_gate_logits",)  # block linears that stay in the model dtype: `heads` outputs, driving the gates
# Under torch.compile: False quantizes with torch ops, which Inductor fuses into the op that produces the
# input (the AdaLN norm, the GELU); True calls the Triton kernel there too. For measurement (bench).
COMPILED_KERNEL = False
# Static input scales cover this many times the largest input calibration saw: two binades, for prompts and
# sizes that drive a layer harder than the calibration set did. e4m3 keeps 3 mantissa bits down to 2^-6, so
# the price is only for values ~7,000x below the largest (they go subnormal), which carry little of a product.
HEADROOM = 4.0


def pow2_scale(amax: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, 1 / scale), fp32 powers of two: the least 2^k with amax / 2^k <= 448, from amax's bits.

    amax = m 2^E with m in [1, 2) and 448 = 1.75 2^8, so k = E - 8, or E - 7 when m > 1.75 (mantissa bits
    above 0x600000). The Triton kernel computes the same from the same bits.
    """
    bits = amax.float().clamp(min=AMAX_FLOOR).view(torch.int32)
    k = (bits >> 23) - 127 - 8 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    return ((k + 127) << 23).view(torch.float32), ((127 - k) << 23).view(torch.float32)


def to_e4m3(x: Tensor, inverse: Tensor) -> Tensor:
    return (x.float() * inverse).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_rows_torch(x: Tensor, input_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """x (M, K) -> e4m3 (M, K), fp32 scales (M, 1): each row's own, or the static one on every row."""
    if input_scale is None:
        # NaN is left out of the scale (the row's other values quantize as usual) and stays NaN in the output.
        scale, inverse = pow2_scale(x.abs().nan_to_num(0.0, posinf=torch.inf).amax(-1, keepdim=True))
    else:
        scale, inverse = input_scale.reshape(1, 1).expand(x.shape[0], 1).contiguous(), 1.0 / input_scale
    return to_e4m3(x, inverse), scale


def quantize_rows(x: Tensor, input_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """quantize_rows_torch's result, from the fused kernel where it runs (one read of x, one write of each)."""
    if kernels.available(x) and (COMPILED_KERNEL or not torch.compiler.is_compiling()):
        return kernels.quantize_rows_fp8(x, input_scale)
    return quantize_rows_torch(x, input_scale)


class FP8Linear(nn.Module):
    """x W^T + b with W in e4m3, one fp32 scale per output channel; x quantized per call (see module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 static: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        frozen = lambda *shape, dtype: nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)  # noqa: E731
        self.weight = frozen(out_features, in_features, dtype=torch.float8_e4m3fn)
        self.weight_scale = frozen(out_features, dtype=torch.float32)
        self.bias = frozen(out_features, dtype=dtype) if bias else None
        self.input_scale = frozen(dtype=torch.float32) if static else None
        self.observed: Tensor | None = None  # the running amax of the inputs while calibrating

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """The linear's weight quantized per output channel (on its device, meta included)."""
        w = linear.weight.detach()
        with torch.device(w.device):
            q = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype)
        q.weight.data, q.weight_scale.data = quantize_tensor(w)
        if linear.bias is not None:
            q.bias.data = linear.bias.detach()
        return q

    def forward(self, x: Tensor) -> Tensor:
        if self.observed is not None:
            self.observed = torch.maximum(self.observed, x.detach().abs().amax().float())
        q, scale = quantize_rows(x.reshape(-1, self.in_features), self.input_scale)
        out = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale[None],
                               bias=self.bias, out_dtype=x.dtype)
        return out.unflatten(0, x.shape[:-1])

    def extra_repr(self) -> str:
        inputs = "static input scale" if self.input_scale is not None else "per-row input scales"
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, {inputs}"


def block_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(full name, parent, attribute, linear) of every nn.Linear in model.transformer_blocks to quantize."""
    for name, module in model.named_modules():
        if not name.startswith("transformer_blocks."):
            continue
        for attr, child in module.named_children():
            if type(child) is nn.Linear and attr not in KEEP:
                yield f"{name}.{attr}", module, attr, child


def quantize_(model: nn.Module) -> nn.Module:
    """Swap the block linears for FP8Linears in place, quantizing their weights where they are; returns model."""
    targets = [(parent, attr) for _, parent, attr, _ in block_linears(model)]
    for parent, attr in targets:  # fetched here, not held in the list: each bf16 weight goes as it is replaced
        setattr(parent, attr, FP8Linear.from_linear(getattr(parent, attr)))
    return model


def prepare_for_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Before loading `state` into a meta-built model: make FP8Linears of the block linears whose weight in the
    checkpoint is e4m3, and bring Lightricks' per-tensor scales to the per-channel layout, in place."""
    for name, parent, attr, linear in list(block_linears(model)):
        if state.get(f"{name}.weight", torch.empty(0)).dtype != torch.float8_e4m3fn:
            continue  # left in high precision by the checkpoint (Lightricks keeps some blocks so)
        with torch.device("meta"):
            setattr(parent, attr, FP8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                            linear.weight.dtype, static=f"{name}.input_scale" in state))
        scale = state.get(f"{name}.weight_scale", torch.ones((), device=state[f"{name}.weight"].device))
        state[f"{name}.weight_scale"] = scale.float().reshape(-1).expand(linear.out_features).contiguous()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, FP8Linear) for m in model.modules())


@contextmanager
def calibrate(model: nn.Module, headroom: float = HEADROOM) -> Iterator[dict[str, Tensor]]:
    """Static input scales: run forwards inside; at the exit each FP8Linear that saw a nonzero input takes the
    power-of-two scale of `headroom` times the largest |input| it saw (inputs headroom to 2 x headroom times
    larger than any calibration saw still fit below 448); one that saw no nonzero input keeps per-row scales.
    Yields a dict filled at the exit: layer name -> its scale. Eager only (the recording mutates the module)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}
    for m in layers.values():
        m.observed = torch.zeros((), device=m.weight.device)
    scales: dict[str, Tensor] = {}
    try:
        yield scales
    finally:
        for name, m in layers.items():
            if m.observed > 0:  # an input no calibration reached (or all zero) would make the scale 2^-108
                m.input_scale = nn.Parameter(pow2_scale(m.observed * headroom)[0], requires_grad=False)
                scales[name] = m.input_scale.detach()
            m.observed = None


def describe(model: nn.Module, source: str | None) -> dict:
    """What a sidecar records: the method, where the e4m3 weights came from, the layers, their input scales and
    the transformer's weight memory on one rank."""
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    if not layers:
        return {"method": "none", "weight_gib_per_rank": round(weight_bytes(model) / 2**30, 4)}
    static = sum(m.input_scale is not None for m in layers)
    return {"method": "fp8", "format": "e4m3, one scale per output channel", "source": source,
            "layers": len(layers), "activations": "static" if static == len(layers) else "per row" if not static
            else f"static in {static}, per row in {len(layers) - static}",
            "weight_gib_per_rank": round(weight_bytes(model) / 2**30, 4)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, as held on one rank."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def check_device(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why --quantize fp8 cannot run here (one line), or None."""
    if device.type != "cuda":
        return None  # torch's CPU _scaled_mm takes float8 (slow; for tests and checks)
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"--quantize fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                f"{device} is {major}.{minor} ({torch.cuda.get_device_name(device)}): drop --quantize")
    if dtype != torch.bfloat16:
        return f"--quantize fp8 on CUDA computes in bfloat16 (row-wise _scaled_mm); drop --dtype {str(dtype)[6:]}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def quantized_key(key: str, shape: tuple[int, ...]) -> bool:
    """Whether a transformer checkpoint tensor is a block linear's weight that quantize_ would turn e4m3: the
    same choice as block_linears makes on a built model, read from the names (tests check they agree)."""
    parts = key.split(".")
    return parts[0] == "transformer_blocks" and parts[-1] == "weight" and len(shape) == 2 and parts[-2] not in KEEP


def quantize_tensor(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A weight (out, in) -> e4m3 (out, in) and fp32 (out,) scales: one power of two per output channel."""
    scale, inverse = pow2_scale(weight.abs().amax(1))
    return to_e4m3(weight, inverse[:, None]), scale


def weight_memory(tensors: dict[str, tuple[str, tuple[int, ...]]], itemsize: int = 2) -> tuple[int, int]:
    """(bytes without quantization, bytes with --quantize fp8) of a transformer's weights held on one rank, from
    its checkpoint's (dtype name, shape) per key: every tensor at `itemsize` bytes (bf16), or the block linears'
    weights at one byte plus a 4-byte scale per output channel."""
    plain = fp8 = 0
    for key, (dtype, shape) in tensors.items():
        n = math.prod(shape)
        if key.endswith(("weight_scale", "input_scale")):
            fp8 += 4 * n
            continue
        plain += n * itemsize
        if dtype.startswith("F8"):  # already e4m3: its scale is a key of its own
            fp8 += n
        else:
            fp8 += n + 4 * shape[0] if quantized_key(key, shape) else n * itemsize
    return plain, fp8


def write_quantized(src: Path, dst: Path, dtype: torch.dtype, device: torch.device,
                    input_scales: dict[str, Tensor] | None = None, calibration: dict | None = None) -> int:
    """Write `dst`: the pipeline folder `src` with its transformer's block linear weights in e4m3 (+ scales),
    and `input_scales` (layer name -> static scale, from `calibrate`) as those layers' `input_scale`;
    `calibration` describes how they were made, for the config's record.

    Each transformer safetensors file is read, converted and written in turn (the transformer is never whole in
    memory); weights are first rounded to `dtype`, what `generate` would load them as, so loading `dst` equals
    `--quantize fp8` on `src`. Every other file is hard-linked (copied across filesystems). Written under a
    temporary name and renamed at the end: an interrupted run leaves no half folder. Returns the layer count.
    """
    config = json.loads((src / "transformer" / "config.json").read_text())
    if "_quantization" in config:
        raise ValueError(f"{src} is already quantized ({config['_quantization']['method']})")
    scales = dict(input_scales or {})
    static = len(scales)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, copy_function=_link_or_copy,
                        ignore=lambda folder, names: names if Path(folder) == src / "transformer" else ())
        index_path = src / "transformer" / INDEX
        files = sorted((src / "transformer").glob("*.safetensors"))
        weight_map, layers = {}, 0
        for path in files:
            out = {}
            for key, tensor in load_file(path, device=str(device)).items():
                if quantized_key(key, tuple(tensor.shape)):
                    out[key], out[key.removesuffix("weight") + "weight_scale"] = quantize_tensor(tensor.to(dtype))
                    layers += 1
                    if (scale := scales.pop(key.removesuffix(".weight"), None)) is not None:
                        out[key.removesuffix("weight") + "input_scale"] = scale.float().reshape(())
                else:
                    out[key] = tensor
            save_file({k: v.contiguous().cpu() for k, v in out.items()}, tmp / "transformer" / path.name,
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(out, path.name))
        if scales:  # a calibration of another model: nothing may be dropped silently
            raise ValueError(f"{src} has no layers {', '.join(sorted(scales)[:3])}: its input scales were "
                             "calibrated on another model")
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            (tmp / "transformer" / INDEX).write_text(json.dumps(dict(index, weight_map=weight_map), indent=2))
        config["_quantization"] = {"method": "fp8-e4m3", "weights": "per output channel, power-of-two scales",
                                   "activations": _activations(static, layers, calibration),
                                   "rounded_to": str(dtype).removeprefix("torch."), "layers": layers}
        (tmp / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
        if dst.is_dir():  # an empty folder (the caller checked): replaced
            dst.rmdir()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return layers


INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _activations(static: int, layers: int, calibration: dict | None) -> str | dict:
    if not static:
        return "per row, dynamic"
    where = "every layer" if static == layers else f"{static} of {layers} layers (the rest per row, dynamic)"
    return {"scales": f"static in {where}", **(calibration or {})}


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
