"""The one split plan for the token sequence and its per-token companions.

Tokens are cut into `degree` contiguous chunks of equal length `local`; when `total` does
not divide, zero pads fill the tail of the global sequence (so only the last ranks hold
pads, and a rank may hold nothing but pads). Pads are kept out of attention keys, out of
reductions (`sum`) and out of the final `gather`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .dist import Mesh


@dataclass(frozen=True)
class SeqShard:
    """How a sequence of `total` tokens is split over `degree` ranks, seen from `rank`."""

    total: int
    degree: int
    rank: int
    group: ProcessGroup | None  # None when degree == 1

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError(f"cannot shard a sequence of {self.total} tokens; it needs at least one")
        assert 0 <= self.rank < self.degree, f"rank {self.rank} outside degree {self.degree}"
        assert (self.group is None) == (self.degree == 1), "a group exactly when there is more than one rank"

    @classmethod
    def for_mesh(cls, total: int, mesh: Mesh) -> SeqShard:
        return cls(total=total, degree=mesh.seq_degree, rank=mesh.seq_rank, group=mesh.seq_group)

    @property
    def local(self) -> int:
        """Tokens per rank, pads included."""
        return -(-self.total // self.degree)

    @property
    def padded(self) -> int:
        return self.local * self.degree

    @property
    def start(self) -> int:
        return self.rank * self.local

    @property
    def valid(self) -> int:
        """Real tokens on this rank: `local`, fewer on the rank where the pads begin, 0 after it."""
        return min(max(self.total - self.start, 0), self.local)

    def _check_len(self, x: Tensor, dim: int, want: int, what: str) -> None:
        if x.shape[dim] != want:
            raise ValueError(f"{what} has {x.shape[dim]} tokens along dim {dim} (shape {tuple(x.shape)}); "
                             f"this shard expects {want}")

    def split(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's chunk of the full `x`, zero-padded to `local` along `dim` (a fresh tensor)."""
        self._check_len(x, dim, self.total, "the full tensor")
        shape = list(x.shape)
        shape[dim] = self.local
        out = x.new_zeros(shape)
        out.narrow(dim, 0, self.valid).copy_(x.narrow(dim, min(self.start, self.total), self.valid))
        return out

    def gather(self, x_local: Tensor, dim: int = 1) -> Tensor:
        """The full tensor (pads removed, length `total` along `dim`) on every rank of the group."""
        self._check_len(x_local, dim, self.local, "the local tensor")
        if self.group is None:
            return x_local.narrow(dim, 0, self.total)
        chunks = [torch.empty_like(x_local, memory_format=torch.contiguous_format) for _ in range(self.degree)]
        dist.all_gather(chunks, x_local.contiguous(), group=self.group)
        return torch.cat(chunks, dim=dim).narrow(dim, 0, self.total)

    def valid_mask(self, device: torch.device | str) -> Tensor:
        """(local,) bool: True on real tokens, False on pads."""
        return torch.arange(self.local, device=device) < self.valid

    def sum(self, x_local: Tensor, dim: int = 1) -> Tensor:
        """Sum over the token dim of the whole sequence, pads excluded, on every rank of the group.

        The building block of global statistics (std, dot products, norms): a rank-local one
        would change the result with the number of ranks.
        """
        self._check_len(x_local, dim, self.local, "the local tensor")
        total = x_local.narrow(dim, 0, self.valid).sum(dim)
        if self.group is not None:
            dist.all_reduce(total, group=self.group)
        return total
