"""AdaLN modulation for per-token timesteps, without per-token tensors.

Image-to-video gives the conditioned frame's tokens another timestep than the rest. Tokens are frame-major,
so a token's timestep is constant over a few long runs: the first frame and the rest, plus the pads at the end
of a shard. Gathering each token's modulation vectors would make a (B, S, n, D) tensor per block and read it
in every modulation op; here the vectors stay one per run, and each op runs once per run over a slice of the
activations with broadcast parameters, as the text-to-video step does over all of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from . import kernels


@dataclass(frozen=True, eq=False)  # eq=False: comparing Tensor fields would raise, identity is what is meant
class Runs:
    """A per-token vector that is constant over runs of tokens: run i is tokens [bounds[i], bounds[i + 1])
    and holds values[:, i] (values (B, R, ...))."""

    values: Tensor
    bounds: tuple[int, ...]

    def map(self, fn: Callable[[Tensor], Tensor]) -> Runs:
        return dataclasses.replace(self, values=fn(self.values))


@dataclass(frozen=True, eq=False)
class TokenRuns:
    """Which of K per-token rows each run of tokens takes: first (B, R) long, the row at each run's start."""

    first: Tensor
    bounds: tuple[int, ...]

    def gather(self, rows: Tensor) -> Runs:
        """rows (K, ...) -> Runs with values (B, R, ...)."""
        return Runs(rows[self.first], self.bounds)


def token_runs(index: Tensor) -> TokenRuns:
    """index (B, S) long, each token's row (torch.unique's inverse) -> the runs over which no row changes.

    One host sync (the run starts are Python ints: the slices of every op are known before it runs).
    """
    changes = (index[:, 1:] != index[:, :-1]).any(0)
    starts = (torch.nonzero(changes).flatten() + 1).tolist()
    bounds = (0, *starts, index.shape[1])
    return TokenRuns(index[:, list(bounds[:-1])], bounds)


def unbind(v: Tensor | Runs, dim: int) -> tuple[Tensor | Runs, ...]:
    """Tensor.unbind for either kind; dim counts from the end (the run axis is dim 1 of a Runs' values)."""
    assert dim < 0
    if isinstance(v, Runs):
        return tuple(Runs(t, v.bounds) for t in v.values.unbind(dim))
    return v.unbind(dim)


def apply(v: Tensor | Runs, fn: Callable[[Tensor], Tensor]) -> Tensor | Runs:
    """fn of a per-row tensor, or of each run's values."""
    return v.map(fn) if isinstance(v, Runs) else fn(v)


def addcmul(a: Tensor | Runs, b: Tensor, c: Tensor | Runs) -> Tensor:
    """a + b * c over the tokens of b (B, S, D); a and c are tensors that broadcast against b, or Runs."""
    runs = a if isinstance(a, Runs) else c if isinstance(c, Runs) else None
    if runs is None:
        return torch.addcmul(a, b, c)
    spans = list(zip(runs.bounds[:-1], runs.bounds[1:]))

    def part(t: Tensor | Runs, i: int, start: int, stop: int) -> Tensor:
        if isinstance(t, Runs):
            return t.values[:, i : i + 1]  # (B, 1, D): broadcast over the run's tokens
        return t if t.shape[1] == 1 else t[:, start:stop]

    if torch.compiler.is_compiling():  # Inductor writes the pieces of one cat straight into its buffer
        return torch.cat([torch.addcmul(part(a, i, s, e), b[:, s:e], part(c, i, s, e))
                          for i, (s, e) in enumerate(spans)], dim=1)
    dtype = torch.promote_types(torch.promote_types(_dtype(a), b.dtype), _dtype(c))
    out = torch.empty(b.shape, dtype=dtype, device=b.device)
    for i, (s, e) in enumerate(spans):
        torch.addcmul(part(a, i, s, e), b[:, s:e], part(c, i, s, e), out=out[:, s:e])
    return out


def _dtype(t: Tensor | Runs) -> torch.dtype:
    return t.values.dtype if isinstance(t, Runs) else t.dtype


def norm_modulate(x: Tensor, norm: nn.RMSNorm, shift: Tensor | Runs, scale: Tensor | Runs) -> Tensor:
    """addcmul(shift, norm(x), scale), the AdaLN input of an attention or FFN; run eagerly on CUDA, one fused
    kernel per run of tokens (kernels.py) instead of a norm and an addcmul."""
    fused = (kernels.available(x) and not torch.compiler.is_compiling() and norm.weight is None
             and norm.eps is not None and _dtype(shift) == _dtype(scale) == x.dtype)
    if not fused:
        return addcmul(shift, norm(x), scale)
    runs = shift if isinstance(shift, Runs) else scale if isinstance(scale, Runs) else None
    bounds = (0, x.shape[1]) if runs is None else runs.bounds
    B, C = x.shape[0], x.shape[2]

    def per_row(t: Tensor | Runs, i: int) -> Tensor:  # a (B, 1, C) view: the kernel takes its row stride
        return (t.values[:, i : i + 1] if isinstance(t, Runs) else t).expand(B, 1, C)

    out = torch.empty_like(x)
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        kernels.rms_norm_modulate_(x[:, start:stop], per_row(shift, i), per_row(scale, i), norm.eps,
                                   out[:, start:stop])
    return out
