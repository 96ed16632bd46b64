"""LoRA files for the LTX-2 transformer: read, name, check, and fuse into the weights.

Two key formats reach us. Lightricks ships `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` with its
own module names (`patchify_proj`, `adaln_single`, ...), some files `lora_down` / `lora_up` with an `.alpha`; the
diffusers/peft format is `transformer.<module>.lora_A.weight` / `.lora_B.weight` with diffusers' names, which
are our weights' names. A LoRA adds `strength * (alpha / rank) * B @ A` to `<module>.weight` (no alpha: 1), as
Lightricks' loader and peft's `set_adapters(name, strength)` do. The checks read only safetensors headers (no
torch), so a LoRA for another model is a usage error before any weights load; the fusing imports torch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

# Lightricks' module names -> diffusers' (and ours), as diffusers' _convert_non_diffusers_ltx2_lora_to_diffusers
# renames them: substring replacements in this order, then the adaLN tables by prefix.
_RENAMES = (
    ("patchify_proj", "proj_in"),
    ("audio_patchify_proj", "audio_proj_in"),
    ("av_ca_video_scale_shift_adaln_single", "av_cross_attn_video_scale_shift"),
    ("av_ca_a2v_gate_adaln_single", "av_cross_attn_video_a2v_gate"),
    ("av_ca_audio_scale_shift_adaln_single", "av_cross_attn_audio_scale_shift"),
    ("av_ca_v2a_gate_adaln_single", "av_cross_attn_audio_v2a_gate"),
    ("scale_shift_table_a2v_ca_video", "video_a2v_cross_attn_scale_shift_table"),
    ("scale_shift_table_a2v_ca_audio", "audio_a2v_cross_attn_scale_shift_table"),
    ("q_norm", "norm_q"),
    ("k_norm", "norm_k"),
    ("audio_prompt_adaln_single", "audio_prompt_adaln"),
    ("prompt_adaln_single", "prompt_adaln"),
)
_PREFIX_RENAMES = (("adaln_single.", "time_embed."), ("audio_adaln_single.", "audio_time_embed."))
# A factor's key suffix -> its role: A (rank, in), B (out, rank), or the scalar alpha.
_ROLES = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_down.weight", "A"), (".lora_up.weight", "B"),
          (".alpha", "alpha"))


def lightricks_to_diffusers(module: str) -> str:
    """A module path in Lightricks' names (prefix stripped) -> diffusers' names."""
    for old, new in _RENAMES:
        module = module.replace(old, new)
    for old, new in _PREFIX_RENAMES:
        if module.startswith(old):
            return new + module[len(old):]
    return module


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's tensor table {key: {"dtype", "shape", ...}} from its header alone."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if not 0 < size <= path.stat().st_size - 8:
                raise ValueError
            header = json.loads(f.read(size))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a safetensors file") from None
    header.pop("__metadata__", None)
    return header


@dataclass
class Factors:
    """One module's LoRA factors: the keys in the file (and, once loaded, the tensors)."""

    a: str | None = None
    b: str | None = None
    alpha: str | None = None


def modules(keys, where: str) -> dict[str, Factors]:
    """The file's keys -> {our weight name: its factor keys}. ValueError (one line) for keys we cannot place."""
    found: dict[str, Factors] = {}
    for key in sorted(keys):
        role = next(((suffix, r) for suffix, r in _ROLES if key.endswith(suffix)), None)
        if role is None:
            raise ValueError(f"{where} has a key {key!r} that is not a LoRA factor (lora_A/lora_B, lora_down/lora_up, "
                             "alpha); is it a LoRA file?")
        module = key[: -len(role[0])]
        if module.startswith("diffusion_model."):
            module = lightricks_to_diffusers(module[len("diffusion_model."):])
        elif module.startswith("transformer."):
            module = module[len("transformer."):]
        elif module.startswith(("text_embedding_projection.", "connectors.")):
            raise ValueError(f"{where} changes the text connectors ({key!r}); only transformer LoRAs are supported")
        else:
            raise ValueError(f"{where}: key {key!r} starts with neither 'diffusion_model.' (Lightricks) nor "
                             "'transformer.' (diffusers); is it an LTX-2 LoRA?")
        setattr(found.setdefault(module + ".weight", Factors()), role[1].lower(), key)
    return found


def check(path: Path, weights: dict[str, dict], flag: str = "--lora") -> dict[str, Factors]:
    """Every usage error of one LoRA file against the transformer's weight table (safetensors headers)."""
    where = f"{flag} {path}"
    if not path.is_file():
        raise ValueError(f"{where} does not exist; pass a .safetensors LoRA file")
    header = read_header(path)
    if not header:
        raise ValueError(f"{where} holds no tensors")
    found = modules(header, where)
    unmatched = [name for name in found if name not in weights]
    if unmatched:
        shown = ", ".join(unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
        raise ValueError(f"{where}: {len(unmatched)} of its {len(found)} modules match no weight of this transformer "
                         f"({shown}); is it a LoRA for another model?")
    for name, f in found.items():
        if f.a is None or f.b is None:
            raise ValueError(f"{where}: {name} has {'no A (lora_A/lora_down)' if f.a is None else 'no B (lora_B/lora_up)'} factor")
        out_in, a, b = weights[name]["shape"], header[f.a]["shape"], header[f.b]["shape"]
        if len(out_in) != 2 or len(a) != 2 or len(b) != 2 or a[0] != b[1] or (b[0], a[1]) != tuple(out_in):
            raise ValueError(f"{where}: {name} is {list(out_in)} but its LoRA factors are B {b} x A {a}; "
                             "is it a LoRA for another model?")
    return found


def weight_table(transformer_dir: Path) -> dict[str, dict]:
    """{weight name: header entry} over every safetensors file of a transformer folder."""
    table = {}
    for path in sorted(transformer_dir.glob("*.safetensors")):
        table.update(read_header(path))
    return table


# --- fusing (torch) -------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A LoRA file read once: its sha256 and, per weight, (B, A, alpha / rank) on the CPU."""

    path: str
    sha256: str
    deltas: dict = field(default_factory=dict)


def load(path: str | Path) -> Loaded:
    """Read a LoRA file once: the bytes are hashed and parsed from the same read."""
    from safetensors.torch import load as parse

    data = Path(path).read_bytes()
    tensors = parse(data)
    loaded = Loaded(str(path), hashlib.sha256(data).hexdigest())
    for name, f in modules(tensors, str(path)).items():
        a, b = tensors[f.a], tensors[f.b]
        alpha = float(tensors[f.alpha]) if f.alpha is not None else float(a.shape[0])
        loaded.deltas[name] = (b, a, alpha / a.shape[0])
    return loaded


class Fuser:
    """Keeps a transformer's weights at `base + sum of its LoRAs' deltas` for the LoRA set asked for.

    Model-dtype weights: switching sets subtracts the deltas of the LoRAs that leave and adds those that come,
    each recomputed the same way (so a LoRA taken out leaves the weights as they were, to the rounding of the
    two sums: an ulp of the weight and of the delta), on every rank alike; no second copy of the weights is kept, only the factors (on the
    CPU; pinned where the weights are on a GPU, so each fuse copies them at full speed).

    float8 weights (`--quantize fp8`, an fp8 checkpoint) are codes with a scale per output channel: a delta cannot
    be added to them, nor taken out again. As Lightricks fuses into its fp8 checkpoints, a weight becomes
    `quantize(dequantize(base) + sum of the deltas)`, the product in the model dtype and the sum in fp32, recomputed
    from the untouched base codes at every switch: the result depends on the set alone, and taking every LoRA out
    gives the base bits back. The base codes and scales of the layers a LoRA touches are kept beside the fused
    ones, on the same device, while any LoRA is fused there (1 byte per weight: fp8 with LoRAs holds what the bf16
    weights would) and dropped when the last LoRA leaves.
    """

    def __init__(self, model) -> None:
        import torch

        self.params = dict(model.named_parameters())
        # The model dtype, which float8 weights' deltas are made in: that of every weight not float8 or a scale.
        self.dtype = next(p.dtype for n, p in self.params.items()
                          if p.dtype != torch.float8_e4m3fn and not n.endswith(("weight_scale", "input_scale")))
        self.active: list[tuple[str, float]] = []  # (path, strength) fused now, in fusing order
        self.files: dict[str, Loaded] = {}
        self.base: dict = {}  # float8 weight name -> (codes, scales) before any LoRA, while one is fused

    def use(self, specs) -> list[dict]:
        """Fuse exactly `specs` (LoraSpec-likes with .path, .strength); returns what the sidecar records."""
        wanted = [(str(s.path), float(s.strength)) for s in specs]
        leaving = list(self.active)
        for spec in wanted:
            if spec in leaving:
                leaving.remove(spec)
        coming = list(wanted)
        for spec in self.active:
            if spec in coming:
                coming.remove(spec)
        for path, strength in leaving:
            self._add(path, -strength)
            self.active.remove((path, strength))
        for path, strength in coming:
            self._add(path, strength)
            self.active.append((path, strength))
        self._requantize({name for path, _ in leaving + coming for name in self._file(path).deltas})
        return [{"path": path, "strength": strength, "sha256": self._file(path).sha256} for path, strength in wanted]

    def add(self, loaded: Loaded) -> None:
        """Hold a read LoRA under its path; its factors page-locked where the weights are on a GPU (every fuse copies
        them there again: from pageable memory at a fraction of the speed)."""
        if next(iter(self.params.values())).device.type == "cuda":
            loaded.deltas = {k: (b.pin_memory(), a.pin_memory(), s) for k, (b, a, s) in loaded.deltas.items()}
        self.files[loaded.path] = loaded

    def _file(self, path: str) -> Loaded:
        if path not in self.files:
            self.add(load(path))
        return self.files[path]

    def _delta(self, b, a, scale: float, strength: float, w):
        """strength * scale * B @ A on w's device, the product in the model dtype (as Lightricks fuses)."""
        import torch

        dtype = self.dtype if w.dtype == torch.float8_e4m3fn else w.dtype
        return (b.to(w.device, dtype, non_blocking=True) * (strength * scale)) @ a.to(w.device, dtype, non_blocking=True)

    def _add(self, path: str, strength: float) -> None:
        """Add one LoRA's deltas to the model-dtype weights (float8 ones: _requantize)."""
        import torch

        with torch.no_grad():
            for name, (b, a, scale) in self._file(path).deltas.items():
                w = self.params[name]
                if w.dtype != torch.float8_e4m3fn:
                    # w + s B A in one GEMM: the product accumulated and added in fp32, rounded once, in place
                    # (no fp32 copies of the weight: ~4 bytes moved per weight instead of ~36)
                    b, a = (t.to(w.device, w.dtype, non_blocking=True) for t in (b, a))
                    w.addmm_(b, a, alpha=strength * scale)

    def _requantize(self, names) -> None:
        """Each float8 weight among `names` := quantize(dequantize(its base) + the active LoRAs' deltas)."""
        import torch

        from ..quant import quantize_tensor

        with torch.no_grad():
            for name in sorted(names):
                w = self.params[name]
                if w.dtype != torch.float8_e4m3fn:
                    continue
                scale = self.params[name.removesuffix("weight") + "weight_scale"]
                if name not in self.base:  # before its first LoRA: the codes every later set starts from
                    self.base[name] = (w.detach().clone(), scale.detach().clone())
                codes, scales = self.base[name]
                deltas = [(self._file(path).deltas[name], strength) for path, strength in self.active
                          if name in self._file(path).deltas]
                if not deltas:  # the last LoRA on it left: the base bits, and no copy held any more
                    w.copy_(codes)
                    scale.copy_(scales)
                    del self.base[name]
                    continue
                total = codes.float() * scales[:, None]
                for (b, a, s), strength in deltas:
                    total += self._delta(b, a, s, strength, w).float()
                fused, fused_scale = quantize_tensor(total)
                w.copy_(fused)
                scale.copy_(fused_scale)
