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

    Switching sets subtracts the deltas of the LoRAs that leave and adds those that come, each recomputed the
    same way (so a LoRA taken out leaves fp32 weights as they were, to rounding, and bf16 ones within an ulp),
    on every rank alike. No second copy of the weights is kept: only the factors, on the CPU.
    """

    def __init__(self, model) -> None:
        self.params = dict(model.named_parameters())
        self.active: list[tuple[str, float]] = []  # (path, strength) fused now, in fusing order
        self.files: dict[str, Loaded] = {}

    def use(self, specs) -> list[dict]:
        """Fuse exactly `specs` (LoraSpec-likes with .path, .strength); returns what the sidecar records."""
        import torch

        wanted = [(str(s.path), float(s.strength)) for s in specs]
        if wanted and any(p.dtype == torch.float8_e4m3fn for p in self.params.values()):
            raise ValueError("a LoRA cannot be fused into float8 weights (an fp8 checkpoint or --quantize fp8): "
                             "use the model-dtype weights with LoRAs")
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
        return [{"path": path, "strength": strength, "sha256": self._file(path).sha256} for path, strength in wanted]

    def _file(self, path: str) -> Loaded:
        if path not in self.files:
            self.files[path] = load(path)
        return self.files[path]

    def _add(self, path: str, strength: float) -> None:
        import torch

        with torch.no_grad():
            for name, (b, a, scale) in self._file(path).deltas.items():
                w = self.params[name]
                # The product in the weights' dtype (as Lightricks fuses), the sum in fp32 then rounded once.
                delta = (b.to(w.device, w.dtype) * (strength * scale)) @ a.to(w.device, w.dtype)
                w.copy_((w.float() + delta.float()).to(w.dtype))
