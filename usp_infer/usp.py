"""USP attention: Ulysses all-to-all over heads, then local or ring attention over the sequence.

The transformer calls `USPAttention` as its attention function with q, k, v of layout
(B, s_local, H, D): RMS-norm and RoPE are already applied on the sequence shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from usp_infer.config import A2A_MODES
from usp_infer.dist import Mesh
from usp_infer.sharding import SeqShard


def all_to_all(x: Tensor, group: ProcessGroup, mode: str) -> Tensor:
    """Exchange equal chunks of dim 0: chunk i goes to group rank i, and arrives as chunk `rank`.

    `direct` writes into a preallocated output; `functional` goes through the functional
    collective (allocation, group lookup, AsyncCollectiveTensor): same bytes, more overhead
    per call, which is why the mode is a choice (see REFERENCE.md).
    """
    assert x.shape[0] % dist.get_world_size(group) == 0, f"dim 0 of {tuple(x.shape)} does not split evenly"
    x = x.contiguous()  # the direct call rejects strided input
    if mode == "direct":
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out
    if mode == "functional":
        return funcol.wait_tensor(funcol.all_to_all_single(x, None, None, group))
    raise ValueError(f"a2a mode {mode!r} is unknown; use one of {', '.join(A2A_MODES)}")


def seq_to_head(x: Tensor, group: ProcessGroup, mode: str) -> Tensor:
    """(B, s/P, H, D) -> (B, s, H/P, D): trade a sequence shard for a head shard."""
    return seq_to_head_many([x], group, mode)[0]


def seq_to_head_many(xs: list[Tensor], group: ProcessGroup, mode: str) -> list[Tensor]:
    """seq_to_head of n same-shaped tensors (q, k, v) in one exchange: one message instead of n.

    The layout copy before the exchange is the only copy: the results are views of what arrived.
    """
    p = dist.get_world_size(group)
    b, s_local, h, d = xs[0].shape
    assert h % p == 0, f"{h} heads do not split over {p} ranks (validate_layout should have said so)"
    send = torch.stack(  # (B, s/P, H, D) -> (B, s/P, P, H/P, D) -> (P, s/P, B, H/P, D), stacked at dim 2
        [x.reshape(b, s_local, p, h // p, d).permute(2, 1, 0, 3, 4) for x in xs], dim=2
    )  # (P, s/P, n, B, H/P, D): dim 0 = destination rank (its head group)
    recv = all_to_all(send, group, mode)  # (P, s/P, n, B, H/P, D): dim 0 = source rank (its sequence chunk)
    recv = recv.permute(2, 3, 0, 1, 4, 5)  # (n, B, P, s/P, H/P, D)
    return list(recv.reshape(len(xs), b, p * s_local, h // p, d).unbind(0))  # n x (B, s, H/P, D), views


def head_to_seq(x: Tensor, group: ProcessGroup, mode: str) -> Tensor:
    """(B, s, H/P, D) -> (B, s/P, H, D): the inverse of seq_to_head."""
    p = dist.get_world_size(group)
    b, s, h_local, d = x.shape
    assert s % p == 0, f"sequence {s} does not split over {p} ranks"
    x = x.reshape(b, p, s // p, h_local, d)  # (B, P, s/P, H/P, D)
    x = x.permute(1, 2, 0, 3, 4)  # (P, s/P, B, H/P, D): dim 0 = destination rank (its sequence chunk)
    x = all_to_all(x, group, mode)  # (P, s/P, B, H/P, D): dim 0 = source rank (its head group)
    x = x.permute(2, 1, 0, 3, 4)  # (B, s/P, P, H/P, D)
    return x.reshape(b, s // p, p * h_local, d)  # (B, s/P, H, D)


def _attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention and its logsumexp: (B, H, Sq, D) -> (B, H, Sq, D), (B, H, Sq) fp32.

    The logsumexp is what lets partial results over key chunks merge exactly (ring attention).
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16):
            # cuDNN first, as F.scaled_dot_product_attention chooses: on an H200 it ran 1.6x faster
            # than the flash kernel (bf16, 128-dim heads); flash where cuDNN cannot take the shape.
            params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
            if torch.backends.cuda.can_use_cudnn_attention(params):
                out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
                return out, lse.squeeze(-1)  # its logsumexp is (B, H, Sq, 1)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
            return out, lse
        # The flash kernel takes half precision only; the memory-efficient one takes fp32 too.
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse[..., : q.shape[2]]  # its logsumexp may be padded along Sq
    raise ValueError(f"ring attention runs on cpu or cuda tensors, not {q.device.type}")


class USPAttention:
    """Attention over a sequence sharded on mesh.seq_group, as the transformer's AttnFn.

    Ulysses (mesh.ulysses_group) turns the sequence shard into a head shard of a longer
    sequence; ring attention (mesh.ring_group) then visits the other rings' keys and values.
    Pads sit at the tail of the global sequence and are cut from the keys, never masked.
    """

    def __init__(self, mesh: Mesh, shard: SeqShard, a2a_mode: str) -> None:
        assert (shard.degree, shard.rank) == (mesh.seq_degree, mesh.seq_rank), "shard and mesh disagree"
        self.mesh = mesh
        self.shard = shard
        self.a2a_mode = a2a_mode
        # After Ulysses each ring rank holds `chunk` consecutive tokens; the real keys among them:
        chunk = shard.local * mesh.ulysses_degree
        self._kv_valid = [min(max(shard.total - j * chunk, 0), chunk) for j in range(mesh.ring_degree)]
        if mesh.ring_group is not None:
            ring = mesh.ring_degree
            self._next = dist.get_global_rank(mesh.ring_group, (mesh.ring_rank + 1) % ring)
            self._prev = dist.get_global_rank(mesh.ring_group, (mesh.ring_rank - 1) % ring)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, s_local, H, D) x3 -> (B, s_local, H, D); rows at pad positions hold junk, cut by the gather."""
        assert q.shape[1] == self.shard.local, f"q has {q.shape[1]} tokens, the shard {self.shard.local}"
        group = self.mesh.ulysses_group
        if group is not None:
            q, k, v = seq_to_head_many([q, k, v], group, self.a2a_mode)  # (B, s, H/U, D) each
        if self.mesh.ring_group is None:
            n = self._kv_valid[0]
            out = F.scaled_dot_product_attention(  # (B, H, s, D) views in, (B, H, s, D) out
                q.transpose(1, 2), k[:, :n].transpose(1, 2), v[:, :n].transpose(1, 2)
            ).transpose(1, 2)  # (B, s, H, D)
        else:
            out = self._ring(q, k, v)
        if group is not None:
            out = head_to_seq(out, group, self.a2a_mode)  # (B, s/U, H, D)
        return out

    def _ring(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Exact attention over every ring rank's keys: (B, s, H, D) -> (B, s, H, D).

        At step i this rank holds the keys of ring rank (ring_rank - i): it sends them on to the
        next rank while it attends to them, and merges the partial results through logsumexp.
        """
        ring, group = self.mesh.ring_degree, self.mesh.ring_group
        k, v = k.contiguous(), v.contiguous()  # point-to-point sends need dense buffers
        q = q.transpose(1, 2)  # (B, H, s, D)
        out = lse = None
        for step in range(ring):
            last = step == ring - 1
            if not last:  # start passing the current chunk before computing on it
                k_next, v_next = torch.empty_like(k), torch.empty_like(v)
                requests = dist.batch_isend_irecv([
                    dist.P2POp(dist.isend, k, self._next, group),
                    dist.P2POp(dist.isend, v, self._next, group),
                    dist.P2POp(dist.irecv, k_next, self._prev, group),
                    dist.P2POp(dist.irecv, v_next, self._prev, group),
                ])
            n = self._kv_valid[(self.mesh.ring_rank - step) % ring]
            if n > 0:  # a chunk of pads only adds nothing
                part, part_lse = _attention_with_lse(q, k[:, :n].transpose(1, 2), v[:, :n].transpose(1, 2))
                if out is None:
                    out, lse = part.float(), part_lse
                else:  # out = (e^lse * out + e^part_lse * part) / (e^lse + e^part_lse), stably
                    merged = torch.logaddexp(lse, part_lse)
                    out = (out * (lse - merged).exp().unsqueeze(-1)
                           + part.float() * (part_lse - merged).exp().unsqueeze(-1))
                    lse = merged
            if not last:
                for request in requests:
                    request.wait()
                k, v = k_next, v_next
        assert out is not None, "ring rank 0's chunk always holds real keys"
        return out.to(q.dtype).transpose(1, 2)  # (B, s, H, D)
