"""The one plan a layout decides, built once per run; the identity for one process.

A family's pipeline is written as a single-process loop and asks this object for everything that
depends on the layout:

- `shard(total)`: how the long (video) token sequence is split; its `split` / `gather` / `sum` serve
  every per-token tensor (latents, noise levels, RoPE tables, per-token timesteps, masks) and every
  global statistic (pads excluded);
- `self_attention(shard)`: the attention function for self-attention over that sequence (USP, or
  local SDPA);
- `kv_sharded_attention(shard)`: attention of whole (replicated) queries over the sharded sequence;
- `run_branches(names, forward)`: guidance branches placed on cfg ranks and gathered;
- `any_nonfinite(...)`: the finite check, reduced so that every rank stops at the same step;
- `broadcast(obj)` / `from_main(make)`: rank 0's object (a batch plan, text embeddings, a write's outcome,
  an error) made every rank's; `gather(obj)`: every rank's object (peak memory) on every rank. These go
  through the control group, which has no --dist-timeout deadline: the others wait there while rank 0
  alone encodes, decodes or writes.

Nothing outside this module, `dist`, `sharding` and `usp` touches process groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import ParallelConfig
from ..layers import AttnFn, sdpa_attention
from .dist import Mesh, from_main, gather_objects, init_mesh
from .sharding import SeqShard

Prediction = Tensor | tuple[Tensor, ...]  # one branch's output(s), batch dim 1 each (video, or video + audio)


def stg_shares_forward(names: Sequence[str], cfg_degree: int, branch_mode: str = "batched") -> bool:
    """Whether the perturbed branch runs in one forward with the cond branch (and so starts from its hidden
    states at the first STG block): batched branches, both on one cfg rank (run_branches' placement below)."""
    if branch_mode != "batched" or "perturbed" not in names or "cond" not in names:
        return False
    return names.index("perturbed") % cfg_degree == names.index("cond") % cfg_degree


class NonFiniteError(RuntimeError):
    """The latents went NaN/inf: raised on every rank at the same step (the check is all-reduced)."""


@dataclass(frozen=True)
class Plan:
    mesh: Mesh

    @classmethod
    def build(cls, parallel: ParallelConfig, device: str, control: dist.ProcessGroup | None = None) -> Plan:
        """Join the process group (torchrun's environment) and build the mesh; one process needs none.
        `control`: the control group dist.join_world opened (for the batch plan), else a new one."""
        return cls(init_mesh(parallel, device, control))

    @property
    def device(self) -> torch.device:
        return self.mesh.device

    @property
    def is_main(self) -> bool:
        """The rank that encodes text, decodes and writes."""
        return self.mesh.is_main

    @property
    def world_size(self) -> int:
        return self.mesh.world_size

    def shard(self, total: int) -> SeqShard:
        return SeqShard.for_mesh(total, self.mesh)

    def self_attention(self, shard: SeqShard) -> AttnFn:
        if self.mesh.seq_degree == 1:
            return sdpa_attention
        from .usp import USPAttention

        return USPAttention(self.mesh, shard, self.mesh.a2a_mode)

    def kv_sharded_attention(self, shard: SeqShard) -> AttnFn:
        """Queries whole on every rank, keys/values this rank's shard of the sequence (pads cut)."""
        if self.mesh.seq_degree == 1:
            return sdpa_attention
        from .usp import KVShardedAttention

        return KVShardedAttention(shard)

    def run_branches(self, names: Sequence[str], forward: Callable[[tuple[str, ...]], list[Prediction]],
                     like: Prediction) -> dict[str, Prediction]:
        """Every branch's prediction on every rank. `forward(subset)` runs some branches (batched or not) and
        returns one prediction per name, shaped like `like` (the latents: a prediction is a velocity).

        With cfg-parallel, branch j runs on cfg rank j % cfg_degree and the predictions are all-gathered.
        """
        names = tuple(names)
        m = self.mesh
        if m.cfg_degree == 1:
            return dict(zip(names, forward(names)))
        subset = names[m.cfg_rank :: m.cfg_degree]
        mine = [p if isinstance(p, tuple) else (p,) for p in (forward(subset) if subset else [])]
        parts = like if isinstance(like, tuple) else (like,)
        slots = -(-len(names) // m.cfg_degree)  # a rank with fewer branches sends zeros in its last slot
        gathered = []
        for k, part in enumerate(parts):
            local = torch.zeros(slots, *part.shape[1:], dtype=torch.float32, device=part.device)
            for i, pred in enumerate(mine):
                local[i] = pred[k][0]
            every = [torch.empty_like(local) for _ in range(m.cfg_degree)]
            dist.all_gather(every, local, group=m.cfg_group)
            gathered.append(every)
        out: dict[str, Prediction] = {}
        for j, name in enumerate(names):
            values = tuple(every[j % m.cfg_degree][j // m.cfg_degree].unsqueeze(0) for every in gathered)
            out[name] = values if isinstance(like, tuple) else values[0]
        return out

    def any_nonfinite(self, *tensors: Tensor) -> bool:
        """True on every rank if any rank holds a NaN/inf in any of `tensors` (one host sync)."""
        bad = torch.stack([(~torch.isfinite(t)).any() for t in tensors]).any().float().reshape(1)
        if self.mesh.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item())

    def check_finite(self, step: int, steps: int, *tensors: Tensor) -> None:
        """NonFiniteError, on every rank alike, if any rank's latents went NaN/inf at 0-based `step`."""
        if self.any_nonfinite(*tensors):
            raise NonFiniteError(f"non-finite values in the latents at step {step + 1}/{steps}; "
                                 "try --dtype float32 or lower guidance scales")

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank (pickled: CPU objects, small tensors included), no --dist-timeout deadline."""
        return self.from_main(lambda: obj)

    def from_main(self, make: Callable[[], object]) -> object:
        """make() run on rank 0 alone, its result on every rank; its error raised on every rank (dist.from_main)."""
        return from_main(make, self.mesh.control_group)

    def gather(self, obj: object) -> list:
        """Every rank's `obj` in rank order, on every rank, no --dist-timeout deadline."""
        return gather_objects(obj, self.mesh.control_group)
