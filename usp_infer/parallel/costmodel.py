"""A step's time on a (cfg, ring, ulysses) layout, predicted from measurements; the layout chooser.

    step = max(gpu, host)
    gpu  = per-rank compute (GEMMs, attention, memory-bound passes, the exchanges' layout copies and
           ring merges, at rates measured on one GPU) + exposed exchange time (the bytes the code's
           collectives carry, at bandwidths from the recorded profiles, less what overlaps them:
           nothing today, as the profiles show)
    host = launch-bound floor: per layer, per all-to-all and per ring step host costs (measured)

Plain functions over plain data; torch-free, so `info` and the CLI's layout choice stay fast. The
constants live in costs.json beside this file, each with where it came from; bench/validate_costmodel.py
checks the model against every multi-GPU record. Only what the code does is modelled: cfg rank k runs
branches k, k + c, ... batched (one forward) or one forward each; in an LTX-2 forward that holds the cond row the
perturbed row runs only the blocks from the first STG block on (before it, it is cond); the video tokens are split over
ring x ulysses (tail pads), audio and text are replicated; Ulysses exchanges are waited for at once;
ring passes k/v to the next rank while it attends to the current chunk (which hides none of it: measured).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from pathlib import Path

Layout = tuple[int, int, int]  # (cfg, ring, ulysses)
FP32 = 4  # the cfg gather and the video->audio merge move fp32


@dataclass(frozen=True)
class Stream:
    """One token stream of the transformer: its length and attention width."""

    tokens: int
    heads: int
    head_dim: int
    channels: int = 128  # latent channels (the cfg gather carries predictions of this width)

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class Workload:
    """What one denoising step computes: the model's widths, the token counts, the branches."""

    layers: int
    video: Stream  # split over ring x ulysses
    text_tokens: int
    branches: tuple[str, ...]  # in batch order: ("uncond", "cond", "perturbed", "isolated")
    audio: Stream | None = None  # replicated on every rank (LTX-2)
    batched: bool = True  # False: --branches sequential, one forward per branch
    compiled: bool = False
    a2a_mode: str = "direct"
    text_kv_per_prompt: bool = False  # LTX-2 computes the text K/V once per distinct prompt, LTX-Video per row
    dtype_bytes: int = 2  # the activations' dtype: bf16 on GPUs (what the constants were measured with)
    # LTX-2: the first STG block. In a forward that also holds the cond row, the perturbed row is the cond row
    # until there (same inputs, no block perturbed yet): it starts from cond's hidden states at this block and runs
    # only the blocks from here on. None: the perturbed row runs every block (LTX-Video).
    stg_first_block: int | None = None

    @property
    def kind(self) -> str:
        """Which calibration of the memory-bound passes applies: the block's structure."""
        return "video+audio" if self.audio else "video"

    @property
    def heads(self) -> int:
        """What a Ulysses degree must divide: every stream's heads that the exchange splits."""
        return math.gcd(self.video.heads, self.audio.heads) if self.audio else self.video.heads


def from_config(transformer: dict, *, height: int, width: int, num_frames: int, branches: tuple[str, ...],
                text_tokens: int, batched: bool = True, audio_tokens: int = 0, text_kv_per_prompt: bool = False,
                a2a_mode: str = "direct", compiled: bool = False, stg_first_block: int | None = None) -> Workload:
    """A workload from a diffusers transformer config.json and the request's size (the VAE's 32x spatial, 8x
    temporal compression, as both families' pipelines compute the latent grid); an audio stream when the
    config has audio heads and the request audio tokens."""
    t = transformer
    tokens = ((num_frames - 1) // 8 + 1) * (height // 32) * (width // 32)
    video = Stream(tokens, t.get("num_attention_heads", 32), t.get("attention_head_dim", 128), t.get("in_channels", 128))
    audio = None
    if audio_tokens and "audio_num_attention_heads" in t:
        audio = Stream(audio_tokens, t["audio_num_attention_heads"], t.get("audio_attention_head_dim", 64),
                       t.get("audio_in_channels", 128))
    return Workload(t.get("num_layers", 48), video, text_tokens, tuple(branches), audio, batched, compiled, a2a_mode,
                    text_kv_per_prompt, stg_first_block=stg_first_block)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def rank_branches(w: Workload, cfg: int) -> list[tuple[str, ...]]:
    """Each cfg rank's branches, as Plan.run_branches places them: branch j on cfg rank j % cfg."""
    return [w.branches[k::cfg] for k in range(cfg)]


def _calls(w: Workload, names: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The forwards one rank runs per step: one with every row, or one per branch."""
    return [names] if w.batched else [(n,) for n in names]


def _segments(w: Workload, call: tuple[str, ...]) -> list[tuple[tuple[str, ...], int]]:
    """The blocks of one forward as (rows, layers) spans: every row through every block, unless the perturbed row
    shares the cond row's blocks before the first STG block (w.stg_first_block, both in this forward)."""
    k = w.stg_first_block
    if k is None or "perturbed" not in call or "cond" not in call:
        return [(call, w.layers)]
    return [(tuple(n for n in call if n != "perturbed"), k), (call, w.layers - k)]


def block_rows(w: Workload, cfg: int) -> list[float]:
    """Per cfg rank, the rows its forwards carry through the blocks in a step, in whole branches (row x block
    evaluations over the layers): 4 for LTX-2.3's four branches in one forward without sharing, 4 - 28/48 with."""
    return [sum(len(rows) * layers for call in _calls(w, names) for rows, layers in _segments(w, call)) / w.layers
            for names in rank_branches(w, cfg)]


def _text_rows(w: Workload, rows: tuple[str, ...]) -> int:
    if not w.text_kv_per_prompt:
        return len(rows)
    return len({"uncond" if n == "uncond" else "cond" for n in rows})


def exchange_bytes(w: Workload, layout: Layout) -> dict[str, int]:
    """Bytes handed to each collective per step by cfg rank 0's ranks (the payload, own chunk included).

    ulysses_all_to_all: per layer and forward, the packed q/k/v (3 x rows x s_local x d) and the output back
    (rows x s_local x d), in the activations' dtype; ring_p2p: k and v sent on at each of ring - 1 steps; cfg_gather: one
    all-gather per stream of (slots, s_local, C) fp32; v2a_merge: the video->audio log-sum-exp merge, a max
    all-reduce of (rows, H_a, S_a) and a sum of (rows, H_a, S_a, D_a + 1) fp32 per layer (rows that run the
    cross-modal attention). A perturbed row sharing the cond row's first blocks is in none of those blocks' exchanges.
    Tests count what the collectives carry and compare.
    """
    c, r, u = layout
    n = _ceil(w.video.tokens, r * u)
    d = w.video.dim
    out = {"ulysses_all_to_all": 0, "ring_p2p": 0, "cfg_gather": 0, "v2a_merge": 0}
    for call in _calls(w, rank_branches(w, c)[0]):
        for names, layers in _segments(w, call):
            rows = len(names)
            if u > 1:
                out["ulysses_all_to_all"] += layers * (3 + 1) * rows * n * d * w.dtype_bytes
            if r > 1:
                kv = 2 * rows * n * u * (w.video.heads // u) * w.video.head_dim * w.dtype_bytes  # k and v, one step
                out["ring_p2p"] += layers * (r - 1) * kv
            cross = sum(name != "isolated" for name in names)
            if w.audio and r * u > 1 and cross:
                a = w.audio
                out["v2a_merge"] += layers * cross * a.heads * a.tokens * (1 + a.head_dim + 1) * FP32
    if c > 1:
        slots = _ceil(len(w.branches), c)
        out["cfg_gather"] = slots * n * w.video.channels * FP32
        if w.audio:
            out["cfg_gather"] += slots * w.audio.tokens * w.audio.channels * FP32
    return out


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    ms: float  # predicted median ms per denoising step
    parts: dict = field(default_factory=dict, compare=False)  # ms by part (gpu side) and the host floor


def _value(costs: dict, *keys):
    """costs[k1][k2]..., looking through each constant's {"value": ..., "source": ...} record."""
    x = costs
    for k in keys:
        x = x[k]
        if isinstance(x, dict) and "value" in x:
            x = x["value"]
    return x


def _by_degree(costs: dict, name: str, degree: int) -> float:
    """A per-degree constant; degrees beyond the measured ones take the largest measured (stated in costs.json)."""
    table = _value(costs, name)
    known = sorted(int(k) for k in table)
    return table[str(max((k for k in known if k <= degree), default=known[0]))]


def _sdpa_shape_factor(costs: dict, flops_per_call: float) -> float:
    """Attention time per FLOP at this call size relative to a large call (microbench cuDNN rates)."""
    points = _value(costs, "sdpa_rate_by_call_flops")  # [[flops, TFLOP/s], ...] ascending
    top = max(rate for _, rate in points)
    x = math.log(max(flops_per_call, 1.0))
    if x <= math.log(points[0][0]):
        return top / points[0][1]
    for (f0, r0), (f1, r1) in pairwise(points):
        if x <= math.log(f1):
            t = (x - math.log(f0)) / (math.log(f1) - math.log(f0))
            return top / (r0 + t * (r1 - r0))
    return 1.0


def _layer_flops(w: Workload, names: tuple[str, ...], n: int, r: int, u: int) -> tuple[float, float, float]:
    """FLOPs of one block for the rows `names` of one forward on a rank holding n video tokens: (GEMMs, attention
    other than the video self-attention, one ring chunk's video self-attention call)."""
    v, a, d = w.video, w.audio, w.video.dim
    rows, t_rows = len(names), _text_rows(w, names)
    cross = sum(name != "isolated" for name in names)
    # Per video row and layer: self-attention q, k, v, out 8 n d^2, text cross-attention q, out 4 n d^2, FFN
    # 16 n d^2 (2 FLOP per multiply-add; the families' flops() count the same); text K/V 4 t d^2 per text row.
    gemm = 28 * n * d * d * rows + 4 * w.text_tokens * d * d * t_rows
    attn_other = 4 * n * w.text_tokens * d * rows
    if a:
        da = a.dim
        gemm += (28 * a.tokens * da * da) * rows + 4 * w.text_tokens * da * da * t_rows
        gemm += cross * (2 * 2 * n * d * da + 2 * 2 * a.tokens * da * da) * 2  # a2v and v2a q/out and k/v
        gemm += 4 * (n * d * v.heads + a.tokens * da * a.heads) * rows  # gate logits
        attn_other += (4 * a.tokens * a.tokens * da + 4 * a.tokens * w.text_tokens * da) * rows
        attn_other += cross * 2 * 4 * n * a.tokens * da
    per_call = 4 * rows * (v.heads // u) * (n * u) * _ceil(v.tokens, r) * v.head_dim  # one chunk's QK^T + PV
    return gemm, attn_other, per_call


def step_flops(w: Workload) -> float:
    """GEMM and attention FLOPs of one step on one GPU, as the model counts them (per-block work only: the
    embeddings and the input/output projections are left out, well under 0.1%)."""
    total = 0.0
    for call in _calls(w, w.branches):
        for names, layers in _segments(w, call):
            gemm, other, self_attn = _layer_flops(w, names, w.video.tokens, 1, 1)
            total += layers * (gemm + other + self_attn)
    return total


def _rank_parts(w: Workload, layout: Layout, names: tuple[str, ...], costs: dict) -> dict[str, float]:
    """ms of one rank's work per step by part (GPU side), and its host floor."""
    c, r, u = layout
    v, a = w.video, w.audio
    n, d = _ceil(v.tokens, r * u), v.dim
    gemm_rate = _value(costs, "gemm_tflops") * 1e9  # FLOP per ms
    sdpa_rate = _value(costs, "sdpa_tflops") * 1e9
    elem_ns = _value(costs, "elementwise_ns", w.kind)
    if w.compiled:
        elem_ns *= _value(costs, "compiled_elementwise_factor", w.kind)
    parts = ("gemm", "attention", "elementwise", "layout_copies", "ring_merge", "all_to_all", "ring_exposed",
             "small_collectives", "host")
    p = dict.fromkeys(parts, 0.0)
    lat = _value(costs, "collective_latency_ms")
    for call in _calls(w, names):
        for rows_names, L in _segments(w, call):  # L blocks with these rows
            rows, cross = len(rows_names), sum(name != "isolated" for name in rows_names)
            gemm, attn_other, per_call = _layer_flops(w, rows_names, n, r, u)
            elem = rows * n * d + (rows * a.tokens * a.dim if a else 0)
            self_ms = r * per_call / sdpa_rate * _sdpa_shape_factor(costs, per_call)
            p["gemm"] += L * gemm / gemm_rate
            p["attention"] += L * (self_ms + attn_other / sdpa_rate)
            p["elementwise"] += L * elem * elem_ns * 1e-6
            p["host"] += L * _value(costs, "host_ms_per_layer", w.kind)
            q_bytes = rows * n * d * w.dtype_bytes  # one (rows, s_local, d) tensor
            if u > 1:
                p["layout_copies"] += L * 5 * 2 * q_bytes / (_value(costs, "copy_tbps") * 1e9)
                sent = 4 * q_bytes * (u - 1) / u
                exposed = 1 - _by_degree(costs, "all_to_all_overlap", u)
                p["all_to_all"] += L * sent / (_by_degree(costs, "all_to_all_gbps", u) * 1e6) * exposed
                p["host"] += L * 2 * _value(costs, "host_ms_per_all_to_all", w.a2a_mode)
            if r > 1:
                p["ring_merge"] += L * (26 * (r - 1) + 12) * (rows * n * d) / (_value(costs, "ring_merge_tbps") * 1e9)
                # The k/v of the next chunk travel while this chunk is attended to, but NCCL's kernels and cuDNN's
                # attention share the SMs: what the transfer hides it takes back (ring_p2p_overlap, measured 0).
                transfer = 2 * q_bytes / (_value(costs, "ring_p2p_gbps") * 1e6)
                p["ring_exposed"] += L * (r - 1) * transfer * (1 - _value(costs, "ring_p2p_overlap"))
                p["host"] += L * (r - 1) * _value(costs, "host_ms_per_ring_step")
            if a and r * u > 1 and cross:
                p["small_collectives"] += L * 2 * lat  # the video->audio merge's two all-reduces
    if c > 1:
        p["small_collectives"] += lat * (2 if a else 1)
    return p


def predict(w: Workload, layout: Layout, costs: dict | None = None) -> Prediction:
    """The predicted ms per step: the slowest cfg rank's GPU time, or the host floor where that is higher."""
    costs = costs or load_costs()
    worst = None
    for names in rank_branches(w, layout[0]):
        if not names:
            continue
        p = _rank_parts(w, layout, names, costs)
        gpu = sum(v for k, v in p.items() if k != "host")
        ms = max(gpu, p["host"])
        if worst is None or ms > worst.ms:
            worst = Prediction(layout, ms, {**{k: round(v, 2) for k, v in p.items()}, "gpu": round(gpu, 2)})
    return worst


def memory_gib(w: Workload, layout: Layout, weight_bytes: float, costs: dict | None = None) -> float:
    """Peak GiB per rank: the whole transformer's weights (every rank holds them) + activations of its rows."""
    costs = costs or load_costs()
    c, r, u = layout
    rows = len(rank_branches(w, c)[0]) if w.batched else 1
    n = _ceil(w.video.tokens, r * u)
    act = rows * n * w.video.dim * _value(costs, "activation_bytes_per_row_token_dim", w.kind)
    return (weight_bytes + act) / 2**30


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidates(world: int, w: Workload, max_cfg: int | None = None) -> list[Layout]:
    """Every layout the code runs for this world and model: Ulysses divides the heads; cfg at most the
    branch count (uneven splits run: the rank with more branches sets the pace; `max_cfg` allows more, whose
    extra ranks idle); ring takes any degree."""
    most = len(w.branches) if max_cfg is None else max_cfg
    return [(c, world // (c * u), u) for c in _divisors(world) if c <= most
            for u in _divisors(world // c) if w.heads % u == 0]


@dataclass(frozen=True)
class Choice:
    best: Prediction
    runner_up: Prediction | None
    error: float  # the model's largest relative error on the validation records (costs.json)


def ranked(world: int, w: Workload, costs: dict | None = None, max_cfg: int | None = None) -> list[Prediction]:
    """Every candidate layout, fastest first. Within `tie_fraction` of the fastest, the layout with the larger
    Ulysses degree (then the smaller ring degree) goes first: the model cannot tell them apart, and it runs
    fewer fp32 merges and host-side calls."""
    costs = costs or load_costs()
    order = sorted((predict(w, lay, costs) for lay in candidates(world, w, max_cfg)), key=lambda p: p.ms)
    if not order:
        return order
    first = fastest(order, costs)
    return [first] + [p for p in order if p is not first]


def fastest(predictions: list[Prediction], costs: dict | None = None) -> Prediction:
    """The chooser's pick: the fastest prediction, or among those within `tie_fraction` of it the one with the
    larger Ulysses degree (then the smaller ring degree)."""
    costs = costs or load_costs()
    top = min(p.ms for p in predictions)
    close = [p for p in predictions if p.ms <= top * (1 + _value(costs, "tie_fraction"))]
    return min(close, key=lambda p: (-p.layout[2], p.layout[1]))


def choose(world: int, w: Workload, costs: dict | None = None) -> Choice | None:
    """The predicted fastest layout and the runner-up; None when no layout fits (see candidates)."""
    costs = costs or load_costs()
    order = ranked(world, w, costs)
    if not order:
        return None
    return Choice(order[0], order[1] if len(order) > 1 else None, _value(costs, "validation_max_error"))


@cache
def _load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def load_costs(name: str = "current", path: Path | None = None) -> dict:
    """One constant set of costs.json ('current': today's code; '2026-11-28': the code of those records)."""
    data = _load(str(path or Path(__file__).with_name("costs.json")))
    base = data["sets"][name]
    return {**data["shared"], **base}
