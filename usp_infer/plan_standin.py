"""TEMPORARY single-process stand-in for `usp_infer/parallel.py`'s `Plan` (notes/plan_interface.md).

Exactly the interface the LTX-2 pipeline uses, for one process only. Delete this file once
`parallel.py` lands on main and is merged; `pipeline_ltx2` then imports the real `Plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .ltx import sdpa_attention
from .sharding import SeqShard


@dataclass(frozen=True)
class Plan:
    device: torch.device
    mesh: object = None
    is_main: bool = True

    @classmethod
    def single(cls, device: torch.device | str) -> Plan:
        return cls(torch.device(device))

    def shard(self, total_tokens: int) -> SeqShard:
        return SeqShard(total=total_tokens, degree=1, rank=0, group=None)

    def self_attention(self, shard: SeqShard) -> Callable:
        return sdpa_attention

    def kv_sharded_attention(self, shard: SeqShard) -> Callable:
        return sdpa_attention

    def run_branches(self, names: tuple[str, ...], forward: Callable) -> dict:
        return dict(zip(names, forward(tuple(names))))

    def any_nonfinite(self, *tensors: torch.Tensor) -> bool:
        return any(bool((~torch.isfinite(t)).any()) for t in tensors)
