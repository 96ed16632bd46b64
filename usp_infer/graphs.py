"""`--cuda-graphs`: a transformer's block loop replayed as a CUDA graph, so a step costs the host one launch.

A compiled LTX-2 block is seven graphs around six attention calls, each with its guard checks and kernel
launches. At 4 x 1,536 tokens (the dev recipe's stage 1) a profiled step held 242 ms of kernels in 305 ms, and
on an H100 steps ran 275-450 ms as the host's pace moved (bench/NOTES.md, 2026-12-07); replayed as one graph,
every step ran 265-285 ms.

`GraphedCall(fn)` stands in for `fn(*args)`, where args are tensors and host values in tuples, lists, dicts
and dataclasses (the block loop's hidden states, conditioning, RoPE tables and attention functions). Per
distinct call signature (every host value and every tensor's shape, stride, dtype and device; tensors off
the graph's device by value) it keeps static copies of the tensors:

- first call: copies the tensors and runs fn on the copies (plain launches: compiles, autotunes, warms);
- second call: copies the new tensors in, captures fn on the copies, replays;
- later calls: copy in, replay.

The outputs of a replay are the graph's own tensors, overwritten by the next replay of that signature: the
caller consumes them first (the transformer's output head does). One memory pool serves all of a GraphedCall's
graphs; dropping the GraphedCall (at the end of a stage) frees them. Only for work with no collectives and no
host reads of device values inside fn: the block loop of a layout without sequence parallelism. A capture that
fails (something in fn a graph cannot hold) is said in a warning, and fn runs plain from then on.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# A stage of fewer steps runs plain: the capture (in its second step) cost 250-440 ms on an H100, and a replay
# saves only what the host lags behind the GPU: nothing in GPU-bound steps (the distilled recipe's 8 one-branch
# steps at 6,144 tokens ran 0.5 s slower with graphs), 70 ms a step at 4 x 1,536 tokens (bench/NOTES.md).
MIN_STEPS = 10
# A stage's loop takes a few signatures (one per guidance set of branches). Past this many something in the
# arguments changes every step (a Python float, say): each would keep its own static copies, never replayed.
MAX_SIGNATURES = 8


def tree_map(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """obj with every tensor t in its tuples, lists, dicts and dataclasses replaced by fn(t)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        return type(obj)(*(tree_map(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_map(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: tree_map(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: tree_map(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **fields)
    return obj


def tensors(obj: Any) -> list[Tensor]:
    """The tensors of obj, in tree_map's order."""
    found: list[Tensor] = []
    tree_map(obj, found.append)
    return found


def on(t: Tensor, device: torch.device) -> bool:
    """Whether t is on `device` ("cuda" without an index: any CUDA device)."""
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def signature(obj: Any, device: torch.device) -> tuple:
    """What a graph on `device` of fn(*obj) depends on besides its tensors' values: the structure, every host
    value (objects without a value of their own, such as functions, by identity) and each tensor's layout (the
    values too of a tensor elsewhere than `device`: only the host can read it)."""
    if isinstance(obj, Tensor):
        meta = (tuple(obj.shape), obj.stride(), obj.dtype, str(obj.device))
        return ("tensor", *meta, None if on(obj, device) else tuple(obj.flatten().tolist()))
    if isinstance(obj, (tuple, list)):
        return (type(obj), *(signature(v, device) for v in obj))
    if isinstance(obj, dict):
        return (dict, *((k, signature(v, device)) for k, v in obj.items()))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj), *(signature(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init))
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
        return (type(obj), obj)
    if isinstance(obj, (set, frozenset)):
        return (type(obj), tuple(sorted(obj)))
    return ("object", id(obj))


class CudaGraph:
    """torch.cuda.CUDAGraph behind the two calls GraphedCall makes (tests put a stand-in here)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)  # warm-up and capture, off the default stream
        self.pool = torch.cuda.graph_pool_handle()

    def run(self, fn: Callable[[], Any]) -> Any:
        """fn() on the capture stream, uncaptured."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """(replay, the outputs replays write) of fn()."""
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        return graph.replay, out


@dataclasses.dataclass
class _Entry:
    static: tuple  # the arguments the graph reads: copies of the first call's
    replay: Callable[[], None] | None = None
    out: Any = None


class GraphedCall:
    """fn(*args) replayed as a CUDA graph per call signature (see the module's docstring)."""

    def __init__(self, fn: Callable[..., Any], backend: Any) -> None:
        self.fn, self.backend = fn, backend
        self.entries: dict[tuple, _Entry] = {}
        self.captures = 0  # graphs captured (what tests count)
        self.failed: str | None = None  # why a capture failed: from then on fn runs plain

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return self.fn(*args)
        key = signature(args, self.backend.device)
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) == MAX_SIGNATURES:
                return self._give_up(f"more than {MAX_SIGNATURES} call signatures", args)
            static = tree_map(args, lambda t: t.clone(memory_format=torch.preserve_format))
            self.entries[key] = _Entry(static)
            return self.backend.run(lambda: self.fn(*static))
        for mine, new in zip(tensors(entry.static), tensors(args)):
            if on(mine, self.backend.device):  # the others' values are in the signature
                mine.copy_(new)
        if entry.replay is None:
            try:
                entry.replay, entry.out = self.backend.capture(lambda: self.fn(*entry.static))
            except Exception as e:  # noqa: BLE001 - whatever the loop did that a graph cannot hold: run it plain
                return self._give_up(" ".join(str(e).split())[:200], args)
            self.captures += 1
        entry.replay()
        return entry.out

    def _give_up(self, why: str, args: tuple) -> Any:
        """Say why, drop every graph, and run fn plain from now on (this call included)."""
        self.failed = why
        self.entries.clear()
        warnings.warn(f"--cuda-graphs: the block loop could not be captured ({why}); it runs without graphs",
                      RuntimeWarning, stacklevel=3)
        return self.fn(*args)


def possible(mesh: Any) -> bool:
    """Whether graphs can hold the block loop on this mesh: on CUDA, with the sequence whole on every rank (where
    Ulysses or ring split it, the loop's attentions exchange with other ranks)."""
    return mesh.device.type == "cuda" and mesh.seq_degree == 1


def for_stage(run_blocks: Callable[..., Any], plan: Any, steps: int) -> GraphedCall | None:
    """A transformer's block loop behind CUDA graphs for one stage of `steps` steps under `plan`, or None where
    graphs cannot hold it (`possible`) or would not pay (a stage too short to win back the capture)."""
    if not possible(plan.mesh) or steps < MIN_STEPS:
        return None
    return GraphedCall(run_blocks, CudaGraph(plan.mesh.device))
