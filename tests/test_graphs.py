"""--cuda-graphs (usp_infer/graphs.py): what a replay reads and when a call needs a graph of its own.

A CUDA graph replays the kernels it captured on the addresses it captured: a replay computes with whatever the
static inputs hold, and host values (row lists, block indices, flags) are frozen into it. `Replaying` gives a
graph those semantics on the CPU (capture runs fn on the static inputs; a replay runs it again and writes into
the captured outputs), so a missed input copy or a host value left out of the signature shows up as a wrong
result here. tests/test_gpu.py runs the real graphs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from usp_infer import graphs
from usp_infer.graphs import GraphedCall, signature
from usp_infer.ltx2.pipeline import LTX2Guidance, LTX2Request, ModalityGuidance, generate, load_components
from usp_infer.ltx2.tiny import make_tiny_ltx2


class NoHostData(TorchFunctionMode):
    """What cannot be captured on a GPU, caught on the CPU: indexing with a host list and tensors built from host
    values (on the GPU both copy pageable host memory to the device, which a capture refuses), and reading a
    tensor's values on the host (a synchronisation, which a capture refuses too)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.tensor, torch.as_tensor, Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.nonzero):
            raise RuntimeError(f"{func.__name__}() inside a captured region")
        if func is Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, list) for i in index):
                raise RuntimeError("indexing with a host list inside a captured region")
        return func(*args, **(kwargs or {}))


class Replaying:
    """A CUDA graph's semantics, run on the CPU."""

    device = torch.device("cpu")
    captured = 0

    def run(self, fn):
        return fn()

    def capture(self, fn):
        self.captured += 1
        with NoHostData():
            out = fn()

        def replay():
            for mine, new in zip(graphs.tensors(out), graphs.tensors(fn())):
                mine.copy_(new)

        return replay, out


@dataclasses.dataclass(frozen=True, eq=False)
class Cond:
    scale: torch.Tensor
    rows: tuple[int, ...]


def _fn(x, cond, flip):
    y = torch.cat([x[i:i + 1] for i in cond.rows]) * cond.scale
    return (y.flip(0) if flip else y), y.sum()


def test_signature_keeps_host_values_and_layouts_not_device_values():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    x = torch.randn(3, 4)
    same = signature((x, Cond(torch.ones(2), (0, 2)), False), cpu)
    assert signature((torch.randn(3, 4), Cond(torch.zeros(2), (0, 2)), False), cpu) == same  # values: copied in
    for other in ((x, Cond(torch.ones(2), (0, 1)), False), (x, Cond(torch.ones(2), (0, 2)), True),
                  (x.t().contiguous().t(), Cond(torch.ones(2), (0, 2)), False),  # the same shape, other strides
                  (x.double(), Cond(torch.ones(2), (0, 2)), False), (x[:2], Cond(torch.ones(2), (0, 2)), False)):
        assert signature(other, cpu) != same
    # A tensor off the graph's device can only be read on the host: its values count. Functions: by identity.
    flags = lambda *v: signature(([1, 2], torch.tensor(v)), meta)  # noqa: E731
    assert flags(True, False) == flags(True, False) != flags(False, True)
    assert graphs.on(x, torch.device("cpu")) and not graphs.on(x, meta)
    assert signature((_fn,), cpu) == signature((_fn,), cpu) != signature((lambda: 0,), cpu)


def test_signature_tells_apart_every_host_value_and_container():
    """Floats by value (CPython reuses a freed float's memory, so an id would hand a new scale a stale graph),
    dict keys, the dataclass's type; a device without an index holds every tensor of its type."""
    from types import SimpleNamespace

    @dataclasses.dataclass(frozen=True)
    class A:
        v: int

    @dataclasses.dataclass(frozen=True)
    class B:
        v: int

    cpu, held = torch.device("cpu"), [0.5]
    assert signature((held[0] + 1.0,), cpu) != signature((held[0] + 2.0,), cpu)
    one, same = held[0] + 1.0, 3.0 / 2.0 * len(held)
    assert one is not same and signature((one,), cpu) == signature((same,), cpu)
    assert signature(({"a": 1, "b": 2},), cpu) != signature(({"b": 1, "a": 2},), cpu)
    assert signature((A(1),), cpu) != signature((B(1),), cpu)
    dev = lambda d: SimpleNamespace(device=torch.device(d))  # noqa: E731  on() reads .device alone
    assert graphs.on(dev("cuda:0"), torch.device("cuda")) and graphs.on(dev("cuda:1"), torch.device("cuda", 1))
    assert not graphs.on(dev("cuda:1"), torch.device("cuda", 0)) and not graphs.on(dev("cpu"), torch.device("cuda"))


def test_replays_compute_with_the_new_inputs_and_host_values_get_their_own_graph():
    call = GraphedCall(_fn, Replaying())
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(3, 4, generator=gen)
        cond = Cond(torch.randn(4, generator=gen), (2, 0))
        expected = _fn(x, cond, False)
        got = call(x, cond, False)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), step
    assert call.captures == 1  # first call plain, second captured, then replays
    for rows, flip in (((0, 1), False), ((2, 0), True), ((0, 1), False)):  # new host values: new graphs
        x, cond = torch.randn(3, 4, generator=gen), Cond(torch.randn(4, generator=gen), rows)
        assert all(torch.equal(a, b) for a, b in zip(call(x, cond, flip), _fn(x, cond, flip)))
    assert len(call.entries) == 3 and call.captures == 2


def test_a_capture_that_fails_says_so_and_the_loop_runs_plain():
    class Refusing(Replaying):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    call = GraphedCall(_fn, Refusing())
    x, cond = torch.randn(3, 4), Cond(torch.randn(4), (2, 0))
    call(x, cond, False)
    with pytest.warns(RuntimeWarning, match="could not be captured .*operation not permitted.*runs without graphs"):
        got = call(x * 2, cond, False)
    assert all(torch.equal(a, b) for a, b in zip(got, _fn(x * 2, cond, False)))
    x = torch.randn(3, 4)  # from then on plain, without trying again (no second warning)
    assert all(torch.equal(a, b) for a, b in zip(call(x, cond, True), _fn(x, cond, True)))
    assert call.captures == 0 and not call.entries


def test_arguments_that_change_every_call_end_the_graphs():
    """A host value that changes every step (a float, say) would make a graph per step, none ever replayed: past
    MAX_SIGNATURES the call gives up, frees its copies and runs plain."""
    call = GraphedCall(lambda x, scale: (x * scale,), Replaying())
    x = torch.randn(3)
    for step in range(graphs.MAX_SIGNATURES):
        assert torch.equal(call(x, 1.0 + step)[0], x * (1.0 + step))
    with pytest.warns(RuntimeWarning, match=f"more than {graphs.MAX_SIGNATURES} call signatures"):
        assert torch.equal(call(x, 0.5)[0], x * 0.5)
    assert not call.entries and torch.equal(call(x, 1.0)[0], x)


@pytest.fixture
def made(monkeypatch) -> list[GraphedCall]:
    """The GraphedCalls the pipelines make from now on: every stage's, each on the CPU stand-in, whatever the
    stage's length (which each records as `.steps`)."""
    calls: list[GraphedCall] = []

    def for_stage(run_blocks, plan, steps):
        calls.append(GraphedCall(run_blocks, Replaying()))
        calls[-1].steps = steps
        return calls[-1]

    monkeypatch.setattr(graphs, "for_stage", for_stage)
    return calls


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_ltx2(tmp_path_factory.mktemp("ltx2-graphs") / "m", version="2.3")


@pytest.mark.parametrize("image, fp8", [(False, False), (True, False), (False, True)], ids=["t2v", "i2v", "fp8"])
def test_generation_with_graphed_blocks_equals_the_plain_one(folder, made, tmp_path, image, fp8):
    """Four branches with the STG prefix (rows picked inside the loop) and, with an image, per-token timesteps
    (host-side runs of tokens), or float8 blocks: each stage's block loop as one graph, the frames and sound bit
    for bit."""
    from PIL import Image

    from usp_infer.quant import quantize_

    tiny = load_components(folder, "cpu", torch.float32)
    if fp8:
        quantize_(tiny.transformer)
    kw = {}
    if image:
        path = tmp_path / "first.png"
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 160, 3), dtype=np.uint8)).save(path)
        kw = dict(image=str(path), image_crf=0, height=96, width=160, num_frames=17)
    g = LTX2Guidance(ModalityGuidance(cfg=3.0, stg=1.0, modality=3.0, rescale=0.7),
                     ModalityGuidance(cfg=7.0, stg=0.5, modality=2.0, rescale=0.5), stg_blocks=(1,))
    req = LTX2Request(**(dict(prompt="a cat", negative_prompt="blurry", height=64, width=64, num_frames=9,
                              fps=24.0, steps=graphs.MIN_STEPS + 1, seed=7, max_sequence_length=16, guidance=g) | kw))
    plain = generate(tiny, req, progress=False)
    tiny.cuda_graphs = True
    replayed = generate(tiny, req, progress=False)
    assert [(c.captures, len(c.entries)) for c in made] == [(1, 1)]
    assert np.array_equal(replayed.frames, plain.frames) and np.array_equal(replayed.audio, plain.audio)
    assert plain.frames.std() > 0.01  # not trivially equal


def test_graphs_only_where_a_graph_can_hold_the_loop():
    """None on the CPU, with the sequence split over ranks, and for a stage too short to win back the capture."""
    from types import SimpleNamespace

    def plan(device, seq):
        return SimpleNamespace(mesh=SimpleNamespace(device=torch.device(device), seq_degree=seq))

    assert graphs.for_stage(_fn, plan("cpu", 1), 30) is None
    assert graphs.for_stage(_fn, plan("cuda", 2), 30) is None
    assert graphs.for_stage(_fn, plan("cuda", 1), graphs.MIN_STEPS - 1) is None


def test_graphs_where_the_loop_is_whole_and_long_enough(monkeypatch):
    """One GPU or cfg-parallel (the sequence whole on each rank), MIN_STEPS steps or more: a GraphedCall."""
    from types import SimpleNamespace

    monkeypatch.setattr(graphs, "CudaGraph", lambda device: SimpleNamespace(device=device))
    plan = SimpleNamespace(mesh=SimpleNamespace(device=torch.device("cuda", 0), seq_degree=1))
    call = graphs.for_stage(_fn, plan, graphs.MIN_STEPS)
    assert isinstance(call, GraphedCall) and call.fn is _fn and call.backend.device == torch.device("cuda", 0)


def test_ltx_video_generation_with_graphed_blocks_equals_the_plain_one(made):
    """LTX-Video: cfg + STG, the perturbed block changing after two steps, then no guidance: three signatures,
    a graph each; the video bit for bit."""
    from pathlib import Path

    from usp_infer.config import GenerateRequest, ParallelConfig
    from usp_infer.guidance import GuidanceConfig
    from usp_infer.ltx_video import pipeline as ltxv
    from usp_infer.parallel.plan import Plan

    c = ltxv.load_components(Path(__file__).resolve().parents[1] / "models" / "ltx-tiny", torch.device("cpu"),
                             torch.float32)
    # 10 sigmas 1.0 ... 0.1: two steps with STG in block 1, five in block 0, three with no guidance
    g = GuidanceConfig(cfg=(3.0, 3.0, 1.0), stg=(1.0, 1.0, 0.0), rescale=(0.7,), stg_blocks=((1,), (0,), (0,)),
                       timesteps=(0.9, 0.5, 0.2))
    req = GenerateRequest(prompt="a fox", negative_prompt="blurry", height=64, width=96, num_frames=17,
                          steps=graphs.MIN_STEPS, seed=5, max_sequence_length=8, guidance=g)
    plan = Plan.build(ParallelConfig(), "cpu")
    plain = ltxv.generate(c, req, plan, progress=False)
    c.cuda_graphs = True
    replayed = ltxv.generate(c, req, plan, progress=False)
    assert len(made) == 1 and len(made[0].entries) == 3 and made[0].captures == 3 and made[0].steps == req.steps
    assert np.array_equal(replayed.frames, plain.frames) and plain.frames.std() > 0.01



def bench_steps(shape: str, device: str, monkeypatch) -> tuple[list[GraphedCall], list[torch.Tensor]]:
    """Four bench steps of the shape (both families' make_step) plain, then four with graphs, from the same
    inputs: (the GraphedCalls made, [plain latents, graphed latents]). tests/test_gpu.py runs it on CUDA."""
    from usp_infer import bench
    from usp_infer.config import ParallelConfig
    from usp_infer.ltx2 import bench as ltx2_bench
    from usp_infer.ltx_video import bench as ltxv_bench
    from usp_infer.parallel.plan import Plan

    workload = ltx2_bench if shape == "ltx2-tiny" else ltxv_bench
    made: list[GraphedCall] = []

    class Counted(GraphedCall):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(workload, "GraphedCall", Counted)
    s = bench.Setup(shape, 64, 96, 17, 4 if shape == "ltx2-tiny" else 3, "batched", 2, 3, torch.device(device),
                    torch.float32)
    model = workload.random_model(s.cfg, s.device, s.dtype, 0, bench.randomize)
    plan = Plan.build(ParallelConfig(), device)
    outputs = []
    for graphs_on in (False, True):
        step, state = workload.make_step(model, s, plan, None, graphs_on)
        for _ in range(4):
            step()
        outputs.append(state["video" if shape == "ltx2-tiny" else "latents"])
    return made, outputs


@pytest.mark.parametrize("shape", ["ltx2-tiny", "ltx-tiny"])
def test_bench_steps_replayed_equal_plain_ones(shape, monkeypatch):
    """`bench --cuda-graphs`'s step: one graph captured in the second step, then the same latents as plain steps."""
    from usp_infer.ltx2 import bench as ltx2_bench
    from usp_infer.ltx_video import bench as ltxv_bench

    for workload in (ltx2_bench, ltxv_bench):
        monkeypatch.setattr(workload, "CudaGraph", lambda device: Replaying())
    made, (plain, replayed) = bench_steps(shape, "cpu", monkeypatch)
    assert len(made) == 1 and made[0].captures == 1 and len(made[0].entries) == 1
    assert torch.equal(plain, replayed) and plain.abs().sum() > 0


@pytest.mark.parametrize("case", ["sequential", "two-stage"])
def test_more_loops_with_graphed_blocks_equal_plain_ones(folder, made, case):
    """Branches one call each (cond and uncond share a signature, their text copied in; the perturbed and the
    isolated rows have their own) and two stages (a GraphedCall each, the stage-2 loop at 4x the tokens)."""
    from dataclasses import replace

    from usp_infer.ltx2 import stages
    from usp_infer.ltx2.recipes import STAGE2_SIGMAS, Recipe

    tiny = load_components(folder, "cpu", torch.float32)
    g = LTX2Guidance(ModalityGuidance(cfg=3.0, stg=1.0, modality=3.0, rescale=0.7),
                     ModalityGuidance(cfg=7.0, stg=0.5, modality=2.0, rescale=0.5), stg_blocks=(1,))
    req = LTX2Request(prompt="a cat", negative_prompt="blurry", height=64, width=64, num_frames=9, fps=24.0,
                      steps=4, seed=7, max_sequence_length=16, guidance=g)
    if case == "sequential":
        req = replace(req, branches="sequential")
    else:
        req = replace(req, height=128, width=128, recipe=Recipe(
            two_stage=True, upsampler=str(folder / "latent_upsampler"), stage2_sigmas=STAGE2_SIGMAS))
    plain = stages.generate(tiny, req, progress=False)
    tiny.cuda_graphs = True
    replayed = stages.generate(tiny, req, progress=False)
    assert [(c.captures, len(c.entries)) for c in made] == ([(3, 3)] if case == "sequential" else [(1, 1), (1, 1)])
    assert [c.steps for c in made] == ([4] if case == "sequential" else [4, len(STAGE2_SIGMAS)])  # each stage's own
    assert np.array_equal(replayed.frames, plain.frames) and np.array_equal(replayed.audio, plain.audio)
