"""A one-process stand-in for a world of W ranks: every collective is a copy of the same bytes on this device.

all_to_all_single: out <- in; all_gather: every slot <- in; send: remembered, recv: <- the oldest remembered send
(ring attention sends k, v and receives k, v: they arrive in that order); all_reduce, broadcast, barrier: nothing
moves. The process is rank 0 of every group: the cfg rank with the most branches and a full token shard. Used by
bench/rank_share.py to time one rank's share of a multi-GPU step on one GPU."""
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future


def _done(result=None):
    fut = Future()
    fut.set_result(result)
    return _create_work_from_future(fut)


class LoopbackGroup(dist.ProcessGroup):
    def __init__(self, rank: int, size: int) -> None:
        super().__init__(rank, size)
        self._rank, self._size, self._sent = rank, size, []

    def size(self): return self._size
    def rank(self): return self._rank
    def getBackendName(self): return "loopback"

    @property
    def group_name(self):
        return dist.distributed_c10d._world.pg_names[self]

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts):
        output.copy_(input)
        return _done(output)

    def allgather(self, output_tensors, input_tensor, opts):
        for outs, x in zip(output_tensors, input_tensor):
            for o in outs:
                o.copy_(x)
        return _done(output_tensors)

    def _allgather_base(self, output, input, opts):
        output.view(-1, *input.shape).copy_(input.expand(output.numel() // input.numel(), *input.shape))
        return _done(output)

    def allreduce(self, tensors, opts): return _done(tensors)
    def allreduce_coalesced(self, tensors, opts): return _done(tensors)
    def broadcast(self, tensors, opts): return _done(tensors)
    def barrier(self, opts): return _done()

    def send(self, tensors, dst, tag):
        self._sent.extend(tensors)
        return _done()

    def recv(self, tensors, src, tag):
        for t in tensors:
            t.copy_(self._sent.pop(0))
        return _done(tensors)


def _create(store, rank, size, timeout):
    return LoopbackGroup(rank, size)


dist.Backend.register_backend("loopback", _create, devices=["cpu", "cuda"])


def join(world_size: int) -> None:
    """Join a loopback default group of `world_size` ranks as rank 0. Every group made later is a loopback one
    too, whatever backend the code asks for (today's init_mesh asks for nccl/gloo per mesh dimension)."""
    import torch.distributed.distributed_c10d as c10d
    from torch.distributed import device_mesh

    dist.init_process_group("loopback", rank=0, world_size=world_size, store=dist.HashStore())
    for module, name in ((c10d, "new_group"),):
        real = getattr(module, name)

        def forced(*args, _real=real, **kwargs):
            kwargs.pop("pg_options", None)
            kwargs["backend"] = "loopback"
            return _real(*args, **kwargs)

        setattr(module, name, forced)
        if hasattr(device_mesh, name):
            setattr(device_mesh, name, forced)
    dist.new_group = c10d.new_group
