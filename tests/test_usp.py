"""The sequence-parallel layer (dist, sharding, usp) against single-process references.

Multi-process cases run in one spawned gloo job per world size (start-up costs seconds);
the job returns plain numbers and the tests below assert on them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from dist_utils import run_spawn

from usp_infer.config import ParallelConfig
from usp_infer.parallel.dist import (
    Mesh,
    init_mesh,
    layouts,
    resolve_parallel,
    shared_seed,
    validate_layout,
)
from usp_infer.parallel.sharding import SeqShard
from usp_infer.parallel.usp import KVShardedAttention, USPAttention, start_all_to_all

TIMEOUT_S = 60.0  # a broken collective fails the test in a minute instead of hanging for 30

# fp32 attention through a different kernel blocking, the online-softmax merge over ring
# chunks and the all-to-all permutes: each output element sees a few dozen roundings of
# ~6e-8, so errors land near 1e-7 relative. 1e-5 leaves ~100x headroom, while a wrong key
# chunk, a pad used as a key or a mixed-up head gives errors of order 1e-1.
FP32_RTOL = 1e-5
PEAKY_RTOL = 1e-4
# bf16: the kernel rounds each chunk's partial output to bf16 (2^-8 relative) before the
# fp32 merge, and the result is rounded once more: a few bf16 ulps, 4 of them = 1.6e-2.
BF16_RTOL = 1.6e-2

WORLD_LAYOUTS = {  # (cfg, ring, ulysses) per world size
    2: [(1, 1, 2), (1, 2, 1)],
    4: [(1, 1, 4), (1, 4, 1), (1, 2, 2), (2, 1, 2), (2, 2, 1)],
}
# Token counts: even; uneven (18 on 4 -> 5,5,5,3); last rank a single token (13 on 4 -> 4,4,4,1);
# last rank only pads (9 on 4 -> 3,3,3,0); and fewer tokens than ranks (whole ring chunks of pads).
WORLD_TOTALS = {2: [8, 7, 1], 4: [16, 18, 13, 9, 2]}
B, H, D = 2, 4, 8


def _parallel(cfg: int, ring: int, ulysses: int, a2a_mode: str = "direct") -> ParallelConfig:
    return ParallelConfig(cfg=cfg, ring=ring, ulysses=ulysses, a2a_mode=a2a_mode, timeout_s=TIMEOUT_S)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _qkv(total: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, total, H, D, generator=gen).to(dtype) for _ in range(3))


def _usp_vs_full(mesh: Mesh, total: int, a2a_mode: str, dtype: torch.dtype,
                 q_scale: float = 1.0) -> tuple[float, torch.Tensor]:
    """USP attention on the shards, gathered, vs SDPA on the full sequence; each cfg rank gets its own data.
    q_scale: logits that many times larger (x100: beyond exp's fp32 range, which a merge must subtract first)."""
    shard = SeqShard.for_mesh(total, mesh)
    q, k, v = _qkv(total, seed=1000 * total + mesh.cfg_rank, dtype=dtype)
    q = q * q_scale
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = USPAttention(mesh, shard, a2a_mode)(shard.split(q), shard.split(k), shard.split(v))
    assert out.shape == (B, shard.local, H, D) and out.dtype == dtype
    return _rel_err(shard.gather(out), ref), out


def _attention_job(world: int) -> dict:
    errors = {}
    for layout in WORLD_LAYOUTS[world]:
        mesh = init_mesh(_parallel(*layout), "cpu")
        for total in WORLD_TOTALS[world]:
            errors[layout, total] = _usp_vs_full(mesh, total, "direct", torch.float32)[0]
        if layout[1] > 1:  # ring chunks merged by log-sum-exp: peaky logits of either sign
            for scale in (100.0, -100.0):
                errors[layout, "q x", scale] = _usp_vs_full(mesh, WORLD_TOTALS[world][1], "direct", torch.float32, scale)[0]
    mesh = init_mesh(_parallel(1, world // 2, 2), "cpu")
    _, direct = _usp_vs_full(mesh, 13, "direct", torch.float32)
    _, functional = _usp_vs_full(mesh, 13, "functional", torch.float32)
    bf16_err = _usp_vs_full(mesh, 13, "direct", torch.bfloat16)[0]
    return {"errors": errors, "modes_equal": torch.equal(direct, functional), "bf16_err": bf16_err}


def _a2a_job(world: int) -> dict:
    mesh = init_mesh(_parallel(1, 1, world), "cpu")
    group, rank = mesh.ulysses_group, mesh.ulysses_rank
    checks = {}
    for dtype in (torch.float32, torch.bfloat16):
        for shape in [(world, 3), (2 * world, 5, 7)]:
            sent = [torch.randn(shape, generator=torch.Generator().manual_seed(r)).to(dtype) for r in range(world)]
            want = torch.cat([x.chunk(world)[rank] for x in sent])  # chunk `rank` of every sender, in rank order
            direct = start_all_to_all(sent[rank], group, "direct")()
            functional = start_all_to_all(sent[rank], group, "functional")()
            checks[dtype, shape] = (torch.equal(direct, want), torch.equal(direct, functional),
                                    type(functional) is torch.Tensor)
    return checks


def _shard_job(world: int) -> dict:
    mesh = init_mesh(_parallel(1, 1, world), "cpu")
    found = {}
    for total in WORLD_TOTALS[world]:
        shard = SeqShard.for_mesh(total, mesh)
        gen = torch.Generator().manual_seed(total)
        # Integer values keep every sum exact, so reduction order cannot hide a wrong term.
        tensors = {  # name: (full tensor, token dim)
            "latents": (torch.randint(-9, 9, (B, total, 3), generator=gen).float(), 1),
            "rope": (torch.randint(-9, 9, (1, total, 6), generator=gen).float(), 1),
            "timestep": (torch.randint(0, 9, (B, total), generator=gen).float(), 1),
            "channels_first": (torch.randint(-9, 9, (B, 3, total), generator=gen).float(), -1),
        }
        for name, (full, dim) in tensors.items():
            local = shard.split(full, dim)
            mask = shard.valid_mask("cpu")
            pads_zero = bool((local.movedim(dim, 0)[~mask] == 0).all())
            round_trip = torch.equal(shard.gather(local, dim), full)
            poisoned = local.movedim(dim, 0).clone()
            poisoned[~mask] = 1e6  # pads must drop out of the sum whatever they hold
            sum_ok = torch.equal(shard.sum(poisoned.movedim(0, dim), dim), full.sum(dim))
            found[total, name] = (local.shape[dim] == shard.local, pads_zero, round_trip, sum_ok)
        found[total, "valid"] = shard.valid
    return found


def _mesh_job(world: int) -> dict:
    def ranks(group: dist.ProcessGroup | None) -> list[int] | None:
        return None if group is None else dist.get_process_group_ranks(group)

    found = {}
    for layout in [(1, 2, 2), (2, 1, 2)] if world == 4 else [(1, 2, 1)]:
        m = init_mesh(_parallel(*layout), "cpu")
        found[layout] = ((m.cfg_rank, m.ring_rank, m.ulysses_rank, m.seq_rank),
                         ranks(m.cfg_group), ranks(m.ring_group), ranks(m.ulysses_group), ranks(m.seq_group))
    found["seed"] = (shared_seed(None, m), shared_seed(7, m))
    return found


def _kv_sharded_job(world: int) -> dict:
    """Whole queries (LTX-2's audio) over sharded keys (its video): local attention + log-sum-exp merge."""
    errors = {}
    for layout in WORLD_LAYOUTS[world]:
        if layout[0] > 1:
            continue  # a cfg split leaves the sequence group smaller; the seq layouts cover the merge
        mesh = init_mesh(_parallel(*layout), "cpu")
        for total in WORLD_TOTALS[world]:
            shard = SeqShard.for_mesh(total, mesh)
            gen = torch.Generator().manual_seed(total)
            q = torch.randn(B, 5, H, D, generator=gen)  # 5 query tokens, the same on every rank
            q[0] *= 100.0  # peaky logits (beyond exp's fp32 range before the merge subtracts the max)
            q[1] *= -100.0 if total % 2 else 1.0
            k, v = (torch.randn(B, total, H, D, generator=gen) for _ in range(2))
            ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            poisoned_k, poisoned_v = shard.split(k), shard.split(v)
            poisoned_k[:, shard.valid:], poisoned_v[:, shard.valid:] = 1e3, 1e3  # pads must never act as keys
            sent, real = [], dist.all_reduce

            def counted(t, *args, **kwargs):  # the exchange's payload, for bench_ltx2.v2a_exchange_bytes
                sent.append(t.numel() * t.element_size())
                return real(t, *args, **kwargs)

            dist.all_reduce = counted
            try:
                out = KVShardedAttention(shard)(q, poisoned_k, poisoned_v)
            finally:
                dist.all_reduce = real
            errors[layout, total] = _rel_err(out, ref.transpose(1, 2))
            errors["bytes", layout, total] = sum(sent)
    return errors


def _spy_job(world: int) -> dict:
    """Which all-to-all API each a2a mode calls through a whole USP attention (both give the same bytes on
    gloo, so only a spy tells a swapped implementation apart). Module attributes are looked up per call."""
    calls: list[str] = []
    real = {"direct": dist.all_to_all_single, "functional": funcol.all_to_all_single}

    def spy(name):
        def counted(*args, **kwargs):
            calls.append(name)
            return real[name](*args, **kwargs)
        return counted

    dist.all_to_all_single, funcol.all_to_all_single = spy("direct"), spy("functional")
    try:
        found = {}
        mesh = init_mesh(_parallel(1, 1, world), "cpu")
        for mode in ("direct", "functional"):
            calls.clear()
            _usp_vs_full(mesh, 13, mode, torch.float32)
            found[mode] = sorted(set(calls)), len(calls)
        return found
    finally:
        dist.all_to_all_single, funcol.all_to_all_single = real["direct"], real["functional"]


def _nonfinite_job(world: int) -> dict:
    """Plan.any_nonfinite when only one rank holds the NaN (or inf): every rank must say True, on every
    layout, or the ranks leave the loop at different steps (a hang, or one rank's error alone)."""
    from usp_infer.parallel.plan import Plan

    found = {}
    for layout in WORLD_LAYOUTS[world][-1:] + [(1, 1, world)]:
        plan = Plan(init_mesh(_parallel(*layout), "cpu"))
        for bad_rank in [None, *range(world)]:
            for bad in (float("nan"), float("inf")):
                latents, other = torch.zeros(1, 3, 4), torch.zeros(1, 3)
                if plan.mesh.rank == bad_rank:
                    latents[0, -1, 2] = bad
                found[layout, bad_rank, bad] = plan.any_nonfinite(other, latents)
    return found


def _job(world: int) -> dict:
    return {"nonfinite": _nonfinite_job(world), "attention": _attention_job(world), "a2a": _a2a_job(world),
            "kv_sharded": _kv_sharded_job(world), "shard": _shard_job(world), "mesh": _mesh_job(world),
            "spy": _spy_job(world)}


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def spawned(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    return request.param, run_spawn(_job, request.param, request.param)


def test_usp_attention_matches_full_sdpa(spawned: tuple[int, list[dict]]) -> None:
    world, results = spawned
    for rank, result in enumerate(results):
        errors = result["attention"]["errors"]
        assert set(errors) == ({(layout, total) for layout in WORLD_LAYOUTS[world] for total in WORLD_TOTALS[world]}
                               | {(layout, "q x", scale) for layout in WORLD_LAYOUTS[world] if layout[1] > 1
                                  for scale in (100.0, -100.0)})
        # logits of a few hundred carry fp32's rounding x100 into the weights (1.2e-5 seen); a merge that
        # overflows gives inf or NaN
        bad = {case: err for case, err in errors.items() if not err <= (PEAKY_RTOL if "q x" in case else FP32_RTOL)}
        assert not bad, f"rank {rank}: relative error above {FP32_RTOL} ({PEAKY_RTOL} for peaky logits): {bad}"
        assert result["attention"]["modes_equal"], "direct and functional a2a gave different attention outputs"
        assert result["attention"]["bf16_err"] <= BF16_RTOL


def test_all_to_all_modes_bitwise(spawned: tuple[int, list[dict]]) -> None:
    world, results = spawned
    for rank, result in enumerate(results):
        checks = result["a2a"]
        failed = [case for case, ok in checks.items() if not (all(ok) if isinstance(ok, tuple) else ok)]
        assert not failed, f"rank {rank} of {world}: {failed}"


def test_each_a2a_mode_calls_its_own_api(spawned: tuple[int, list[dict]]) -> None:
    world, results = spawned
    for rank, result in enumerate(results):
        # Ulysses: q, k, v there (one exchange, or one each) and the output back: at least two calls.
        (direct, n_direct), (functional, n_functional) = result["spy"]["direct"], result["spy"]["functional"]
        assert direct == ["direct"] and functional == ["functional"], f"rank {rank} of {world}: {result['spy']}"
        assert n_direct == n_functional >= 2


def test_nonfinite_on_one_rank_stops_every_rank(spawned: tuple[int, list[dict]]) -> None:
    world, results = spawned
    for rank, result in enumerate(results):
        wrong = {case: said for case, said in result["nonfinite"].items() if said != (case[1] is not None)}
        assert not wrong, f"rank {rank} of {world}: {wrong}"


def test_parallel_config_rejects_bad_values() -> None:
    """The layout's values are validated once, where the config is made (the CLI turns these into exit 2)."""
    with pytest.raises(ValueError, match="--a2a-mode 'bogus' is unknown; use one of direct, functional"):
        ParallelConfig(a2a_mode="bogus")
    with pytest.raises(ValueError, match="--ring-degree 0 must be at least 1"):
        ParallelConfig(ring=0)
    with pytest.raises(ValueError, match="--dist-timeout 0 must be positive"):
        ParallelConfig(timeout_s=0)


def test_kv_sharded_attention_matches_full_attention(spawned: tuple[int, list[dict]]) -> None:
    """Including a last rank holding only pads (9 on 4) and ranks with nothing but pads (2 on 4)."""
    world, results = spawned
    for rank, result in enumerate(results):
        errors = dict(result["kv_sharded"])
        # The payload is query-sized whatever the key count: fp32 (B, H, Sq) maxima + (B, H, Sq, D + 1) sums.
        payloads = {errors.pop(case) for case in [c for c in errors if c[0] == "bytes"]}
        assert payloads == {4 * B * H * 5 * (1 + D + 1)}
        assert len(errors) == sum(layout[0] == 1 for layout in WORLD_LAYOUTS[world]) * len(WORLD_TOTALS[world])
        bad = {case: err for case, err in errors.items() if not err <= FP32_RTOL}
        assert not bad, f"rank {rank}: relative error above {FP32_RTOL}: {bad}"


def test_seq_shard_split_gather_sum(spawned: tuple[int, list[dict]]) -> None:
    world, results = spawned
    for rank, result in enumerate(results):
        found = result["shard"]
        failed = [case for case, ok in found.items() if case[1] != "valid" and not all(ok)]
        assert not failed, f"rank {rank} of {world}: (local shape, pads zero, round trip, sum) failed for {failed}"
    valid = {total: [r["shard"][total, "valid"] for r in results] for total in WORLD_TOTALS[world]}
    expected = {
        2: {8: [4, 4], 7: [4, 3], 1: [1, 0]},
        4: {16: [4, 4, 4, 4], 18: [5, 5, 5, 3], 13: [4, 4, 4, 1], 9: [3, 3, 3, 0], 2: [1, 1, 0, 0]},
    }
    assert valid == expected[world]


def test_mesh_rank_order_and_seed(spawned: tuple[int, list[dict]]) -> None:
    world, results = spawned
    if world == 4:
        # (cfg_rank, ring_rank, ulysses_rank, seq_rank), cfg / ring / ulysses / seq group members
        expected = {
            (1, 2, 2): [((0, 0, 0, 0), None, [0, 2], [0, 1], [0, 1, 2, 3]),
                        ((0, 0, 1, 1), None, [1, 3], [0, 1], [0, 1, 2, 3]),
                        ((0, 1, 0, 2), None, [0, 2], [2, 3], [0, 1, 2, 3]),
                        ((0, 1, 1, 3), None, [1, 3], [2, 3], [0, 1, 2, 3])],
            (2, 1, 2): [((0, 0, 0, 0), [0, 2], None, [0, 1], [0, 1]),
                        ((0, 0, 1, 1), [1, 3], None, [0, 1], [0, 1]),
                        ((1, 0, 0, 0), [0, 2], None, [2, 3], [2, 3]),
                        ((1, 0, 1, 1), [1, 3], None, [2, 3], [2, 3])],
        }
    else:
        expected = {(1, 2, 1): [((0, 0, 0, 0), None, [0, 1], None, [0, 1]),
                                ((0, 1, 0, 1), None, [0, 1], None, [0, 1])]}
    for layout, per_rank in expected.items():
        assert [r["mesh"][layout] for r in results] == per_rank, layout
    seeds = [r["mesh"]["seed"] for r in results]
    assert len(set(seeds)) == 1 and seeds[0][1] == 7, seeds


def _single_process_mesh(monkeypatch: pytest.MonkeyPatch) -> Mesh:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return init_mesh(ParallelConfig(), "cpu")


def test_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = _single_process_mesh(monkeypatch)
    assert not dist.is_initialized()
    assert (mesh.world_size, mesh.seq_degree, mesh.seq_rank, mesh.is_main) == (1, 1, 0, True)
    assert (mesh.cfg_group, mesh.ring_group, mesh.ulysses_group, mesh.seq_group) == (None, None, None, None)
    shard = SeqShard.for_mesh(5, mesh)
    q, k, v = _qkv(5, seed=0, dtype=torch.float32)
    # Same SDPA call on the same tensors: bitwise equal.
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert torch.equal(USPAttention(mesh, shard, "direct")(q, k, v), want)
    assert torch.equal(shard.gather(shard.split(q)), q)
    assert torch.equal(shard.sum(q), q.sum(1))
    assert shared_seed(3, mesh) == 3 and 0 <= shared_seed(None, mesh) < 2**32
    with pytest.raises(ValueError, match="= 2 but the world size is 1"):
        init_mesh(ParallelConfig(ulysses=2), "cpu")


def test_seq_shard_rejects_wrong_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    shard = SeqShard.for_mesh(5, _single_process_mesh(monkeypatch))
    with pytest.raises(ValueError, match="has 4 tokens along dim 1 .* expects 5"):
        shard.split(torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="0 tokens"):
        SeqShard(total=0, degree=1, rank=0, group=None)


def test_validate_layout_messages() -> None:
    with pytest.raises(ValueError) as err:
        validate_layout(ParallelConfig(ulysses=3), 3, num_heads=32)
    assert str(err.value) == "--ulysses-degree 3 does not divide 32 attention heads; use one of 1, 2, 4, 8, 16, 32"
    with pytest.raises(ValueError) as err:
        validate_layout(ParallelConfig(ulysses=2), 4, num_heads=32)
    assert str(err.value) == (
        "cfg 1 x ring 1 x ulysses 2 = 2 but the world size is 4; for 4 processes try --ulysses-degree 4, "
        "or --ring-degree 2 --ulysses-degree 2, or --ring-degree 4"
    )
    with pytest.raises(ValueError, match=r"try --cfg-degree 2 --ulysses-degree 2, or --cfg-degree 2 --ring-degree 2$"):
        validate_layout(ParallelConfig(cfg=2, ring=3), 4, num_heads=2)
    # Degrees below 1, unknown a2a modes and timeouts: test_parallel_config_rejects_bad_values.
    validate_layout(ParallelConfig(cfg=2, ring=2, ulysses=2), 8, num_heads=2)  # fits: no error


def test_layouts() -> None:
    assert layouts(4, 32, 2) == [(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1)]
    assert layouts(4, 2, 1) == [(1, 2, 2), (1, 4, 1)]  # 2 heads: Ulysses at most 2; one branch: no cfg split
    # cfg 2 over 3 branches is uneven but runs (one cfg group takes two): listed; cfg 6 > 3 branches is not
    assert layouts(6, 3, 3) == [(1, 2, 3), (1, 6, 1), (2, 1, 3), (2, 3, 1), (3, 2, 1)]
    assert layouts(1, 1, 1) == [(1, 1, 1)]


def test_resolve_parallel() -> None:
    assert resolve_parallel(ParallelConfig(), 4).ulysses == 4
    assert resolve_parallel(ParallelConfig(), 1) == ParallelConfig()
    assert resolve_parallel(ParallelConfig(ring=2), 8) == ParallelConfig(ring=2, ulysses=4)
    assert resolve_parallel(ParallelConfig(cfg=2, ring=2), 4) == ParallelConfig(cfg=2, ring=2)
    assert resolve_parallel(ParallelConfig(ulysses=2), 4) == ParallelConfig(ulysses=2)  # given: left to validation
    assert resolve_parallel(ParallelConfig(ring=3), 4) == ParallelConfig(ring=3)  # does not fit: left to validation


# --- 8 ranks (issue 7's CPU part): the layouts an 8-GPU node runs --------------------------------------------

WORLD8_LAYOUTS = [(1, 1, 8), (2, 1, 4), (1, 2, 4)]  # Ulysses 8 needs 8 heads; cfg 2 x Ulysses 4; Ulysses 4 x ring 2
WORLD8_TOTALS = [16, 13]  # even, and uneven with the last rank holding pads only (13 on 8 -> 2 x 6 + 1 + pads)
H8 = 8


def _world8_job() -> dict:
    errors = {}
    for layout in WORLD8_LAYOUTS:
        mesh = init_mesh(_parallel(*layout), "cpu")
        for total in WORLD8_TOTALS:
            shard = SeqShard.for_mesh(total, mesh)
            gen = torch.Generator().manual_seed(100 * total + mesh.cfg_rank)  # each cfg group its own data
            q, k, v = (torch.randn(B, total, H8, D, generator=gen) for _ in range(3))
            ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            ref = ref.transpose(1, 2)
            for mode in ("direct", "functional"):
                attn = USPAttention(mesh, shard, mode)
                out = shard.gather(attn(shard.split(q), shard.split(k), shard.split(v)))
                errors[layout, total, mode] = _rel_err(out, ref)
            # LTX-2's video->audio: 5 whole queries over the sharded keys, merged by log-sum-exp
            audio = q[:, :5]
            merged = KVShardedAttention(shard)(audio, shard.split(k), shard.split(v))
            full = F.scaled_dot_product_attention(audio.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            errors[layout, total, "kv-sharded"] = _rel_err(merged, full.transpose(1, 2))
    return errors


def test_world8_layouts_match_full_sdpa() -> None:
    results = run_spawn(_world8_job, 8)
    for rank, errors in enumerate(results):
        assert len(errors) == len(WORLD8_LAYOUTS) * len(WORLD8_TOTALS) * 3
        bad = {case: err for case, err in errors.items() if not err <= FP32_RTOL}
        assert not bad, f"rank {rank}: relative error above {FP32_RTOL}: {bad}"
