"""USP attention: Ulysses all-to-all over heads, then local or ring attention over the sequence.

The transformer calls `USPAttention` as its attention function with q, k, v of layout
(B, s_local, H, D): RMS-norm and RoPE are already applied on the sequence shard.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed import ProcessGroup

from ..layers import sdpa
from .dist import Mesh
from .sharding import SeqShard

Pending = Callable[[], Tensor]  # waits for an exchange started earlier and returns what arrived


def start_all_to_all(x: Tensor, group: ProcessGroup, mode: str) -> Pending:
    """Start exchanging equal chunks of dim 0 (chunk i goes to group rank i, and arrives as chunk `rank`).

    Returns a function that waits for the exchange and gives the result: until it is called the
    caller's stream runs on, so computation issued in between overlaps the transfer. `direct`
    writes into a preallocated output; `functional` goes through the functional collective
    (allocation, group lookup, AsyncCollectiveTensor): same bytes, more overhead per call, which
    is why the mode is a choice (README: --a2a-mode).
    """
    assert x.shape[0] % dist.get_world_size(group) == 0, f"dim 0 of {tuple(x.shape)} does not split evenly"
    x = x.contiguous()  # the direct call rejects strided input
    if mode == "direct":
        out = torch.empty_like(x)
        work = dist.all_to_all_single(out, x, group=group, async_op=True)

        def wait_direct() -> Tensor:
            work.wait()  # the caller's stream waits for the transfer; the host does not
            return out

        return wait_direct
    assert mode == "functional", f"a2a mode {mode!r} (ParallelConfig validates it)"
    pending = funcol.all_to_all_single(x, None, None, group)
    return lambda: funcol.wait_tensor(pending)


def _as_words(x: Tensor) -> Tensor | None:
    """The same memory as 16-byte words along the last dim, or None where the layout does not allow it."""
    ratio = 16 // x.element_size()
    if x.stride(-1) != 1 or x.shape[-1] % ratio or x.storage_offset() % ratio:
        return None
    if any(stride % ratio for stride in x.stride()[:-1]):
        return None
    return x.view(torch.complex128)  # the one 16-byte dtype; only its bytes matter here


def _copy(dst: Tensor, src: Tensor) -> None:
    """dst.copy_(src) for the permuted layout copies around an exchange, moved as 16-byte words if it can.

    PyTorch's strided copy kernel computes an index per element, so on bf16 (2 bytes) it is index-bound:
    ~1 TB/s on an H200 at these shapes. Per 16-byte word the same bytes move several times faster
    (bench/NOTES.md); the rows being moved (heads x head_dim) are contiguous either way.
    """
    dst_words, src_words = _as_words(dst), _as_words(src)
    if dst_words is None or src_words is None:
        dst.copy_(src)
    else:
        dst_words.copy_(src_words)


def _attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention and its logsumexp: (B, H, Sq, D) -> (B, H, Sq, D), (B, H, Sq) fp32.

    The logsumexp is what lets partial results over key chunks merge exactly (ring attention).
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16):
            # cuDNN first, as ltx.sdpa orders the backends: on an H200 it ran faster than the flash
            # kernel (bf16, 128-dim heads; bench/NOTES.md); flash where cuDNN cannot take the shape.
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
    One packed q/k/v exchange goes out and one comes back per call: pipelining it over head groups
    was measured and hid no more than splitting the attention cost (bench/NOTES.md).
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

    # Dynamo would rewrite the direct collective into the functional one: under torch.compile this stays eager.
    @torch.compiler.disable
    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, s_local, H, D) x3 -> (B, s_local, H, D); rows at pad positions hold junk, cut by the gather."""
        assert q.shape[1] == self.shard.local, f"q has {q.shape[1]} tokens, the shard {self.shard.local}"
        group = self.mesh.ulysses_group
        if group is None:
            return self._attend(q, k, v)
        p = self.mesh.ulysses_degree
        b, s_local, h, d = q.shape
        assert h % p == 0, f"{h} heads do not split over {p} ranks (validate_layout should have said so)"
        hp = h // p  # heads per rank; head index = rank * hp + i
        send = q.new_empty(p, s_local, 3, b, hp, d)  # dim 0 = destination rank
        for i, x in enumerate((q, k, v)):  # (B, s/P, H, D) -> (B, s/P, P, hp, D) -> (P, s/P, B, hp, D)
            _copy(send[:, :, i], x.reshape(b, s_local, p, hp, d).permute(2, 1, 0, 3, 4))
        qkv = self._start(send, group)()  # (P, s/P, 3, B, hp, D): dim 0 = source rank = its sequence chunk
        qkv = qkv.permute(2, 3, 0, 1, 4, 5).reshape(3, b, p * s_local, hp, d)  # (3, B, s, hp, D), a view
        out = self._attend(*qkv.unbind(0))  # (B, s, hp, D)
        back = out.new_empty(p, s_local, b, hp, d)  # dim 0 = destination rank
        _copy(back, out.unflatten(1, (p, s_local)).permute(1, 2, 0, 3, 4))  # (B, P, s/P, hp, D) -> (P, s/P, B, hp, D)
        arrived = self._start(back, group)()  # (P, s/P, B, hp, D): dim 0 = source rank = its heads
        result = q.new_empty(b, s_local, h, d)
        _copy(result.view(b, s_local, p, hp, d), arrived.permute(2, 1, 0, 3, 4))  # -> (B, s/P, P, hp, D)
        return result

    def _start(self, x: Tensor, group: ProcessGroup) -> Pending:
        """One Ulysses exchange; bench overrides it with a local copy to estimate the exchanges' time share."""
        return start_all_to_all(x, group, self.a2a_mode)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of this rank's queries over the whole sequence's keys: (B, s, h, D) -> (B, s, h, D)."""
        if self.mesh.ring_group is not None:
            return self._ring(q, k, v)
        n = self._kv_valid[0]
        out = sdpa(q.transpose(1, 2), k[:, :n].transpose(1, 2), v[:, :n].transpose(1, 2))  # (B, h, s, D)
        return out.transpose(1, 2)

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


class KVShardedAttention:
    """Attention of queries held whole on every rank over keys/values sharded along the sequence.

    Used where a short stream attends to the long one (LTX-2's video->audio: audio queries, video keys).
    Each rank attends to its own real keys; the partial results merge exactly through their
    log-sum-exp over the sequence group: out = sum_r e^(lse_r - lse) out_r, lse = log sum_r e^lse_r.
    The exchange is query-sized (one max and one sum all-reduce of (B, H, Sq, D + 1) fp32), not
    key-sized as an all-gather of the sharded keys and values would be.
    """

    def __init__(self, shard: SeqShard) -> None:
        self.shard = shard

    @torch.compiler.disable
    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, Sq, H, D), (B, s_local, H, D) x2 -> (B, Sq, H, D)."""
        assert k.shape[1] == self.shard.local, f"k has {k.shape[1]} tokens, the shard {self.shard.local}"
        group, n = self.shard.group, self.shard.valid
        b, sq, h, d = q.shape
        if n > 0:
            out, lse = _attention_with_lse(q.transpose(1, 2), k[:, :n].transpose(1, 2), v[:, :n].transpose(1, 2))
            out, lse = out.float(), lse.float()  # (B, H, Sq, D), (B, H, Sq)
        else:  # a rank holding only pads contributes nothing: weight e^-inf = 0
            out = q.new_zeros(b, h, sq, d, dtype=torch.float32)
            lse = torch.full((b, h, sq), float("-inf"), device=q.device)
        top = lse.clone()
        if group is not None:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)  # rank 0 always holds real keys: finite
        weight = (lse - top).exp()  # (B, H, Sq)
        packed = torch.cat([out * weight.unsqueeze(-1), weight.unsqueeze(-1)], dim=-1)  # (B, H, Sq, D + 1)
        if group is not None:
            dist.all_reduce(packed, group=group)
        merged = packed[..., :d] / packed[..., d:]
        return merged.to(q.dtype).transpose(1, 2)  # (B, Sq, H, D)
