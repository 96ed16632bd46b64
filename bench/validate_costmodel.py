"""The cost model (usp_infer/parallel/costmodel.py) against every multi-GPU record, as one table.

    python bench/validate_costmodel.py                 # 2026-11-28 LTX-Video rows: predicted vs measured
    python bench/validate_costmodel.py --calibrate     # the 'current' set's one-GPU calibration, recomputed
    python bench/validate_costmodel.py --predict       # LTX-2.3 and LTX-Video 13B on 2, 4, 8 H200 (predictions)
    python bench/validate_costmodel.py --rank-share DIR  # per-rank compute measured on one GPU (bench/rank_share.py)

Rows are `implementation == "usp-infer"` records with two or more ranks; each is predicted with the
constants of the code that ran it (costs.json set '2026-11-28'; run1 and run2 ran copies before the
16-byte-word ones: copy_tbps 1.39). Where a row's step time set a constant, the table says so. With --rank-share
a row with a share of its layout, token count, compile setting and a2a mode takes that measured share in place of
the modelled compute; the shares ran run3's code (8c0ba2b), so a run1/run2 row adds the modelled difference of
its slower layout copies.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from usp_infer.parallel import costmodel as cm

RECORDS = ["bench/results/2026-11-28-h200x4/run*/*.json", "bench/results/2026-11-28-h200x2-check/*.json"]
BEFORE_WORD_COPIES = {"run1-core", "run2-final"}  # their usp.py packed with torch.stack / per-element copy_
# Rows whose step time set a constant (costs.json says which): predictions elsewhere, calibration here.
CALIBRATION = {
    ("run1-core", "ltx-video-2b", 640, (1, 1, 2), "direct"): "host_ms_per_all_to_all",
    ("run1-core", "ltx-video-2b", 640, (1, 1, 2), "functional"): "host_ms_per_all_to_all",
    ("run1-core", "ltx-video-2b", 640, (1, 2, 1), "direct"): "host_ms_per_ring_step",
}
BRANCHES = {1: ("cond",), 2: ("uncond", "cond"), 3: ("uncond", "cond", "perturbed"),
            4: ("uncond", "cond", "perturbed", "isolated")}


def shape_workload(shape: str, height: int, width: int, frames: int, branches: int, *, text_tokens: int | None = None,
                   batched: bool = True, compiled: bool = False, a2a_mode: str = "direct",
                   dtype_bytes: int = 2, stg_shared: bool = False) -> cm.Workload:
    """The bench's workload of a named shape (bench.SHAPES), as the cost model sees it. `stg_shared`: the
    perturbed row starts at the bench's STG block (LTX-2 block 28, LTX-Video block 19, or the last) where it
    shares a forward with cond, as the code does since 2026-12-07; the records before ran it through every block."""
    from usp_infer.bench import SHAPES, latent_grid

    cfg = SHAPES[shape]
    f, h, w = latent_grid(height, width, frames)
    video = cm.Stream(f * h * w, cfg.num_attention_heads, cfg.attention_head_dim, cfg.in_channels)
    audio = None
    if hasattr(cfg, "audio_num_attention_heads"):  # the LTX-2 bench: 24 fps, 1,024 text tokens
        audio = cm.Stream(round(frames / 24 * 25), cfg.audio_num_attention_heads, cfg.audio_attention_head_dim,
                          cfg.audio_in_channels)
        text_tokens = 1024
    names = BRANCHES[branches]
    if audio is not None:  # LTX-2's pipeline batches cond first (ltx2/request.py LTX2Guidance.branches)
        names = ("cond", "uncond", "perturbed", "isolated")[:branches]
    if audio is not None and not cfg.perturbed_attn:
        names = tuple(n for n in names if n != "perturbed")
    # the block of ltx2/bench.py's and bench.Setup's guidance()
    shared = stg_shared and "perturbed" in names
    first = min(28 if audio is not None else 19, cfg.num_layers - 1) if shared else None
    return cm.Workload(cfg.num_layers, video, text_tokens if text_tokens is not None else 24, names, audio, batched,
                       compiled, a2a_mode, text_kv_per_prompt=audio is not None, dtype_bytes=dtype_bytes,
                       stg_first_block=first)


def record_workload(r: dict) -> cm.Workload:
    return shape_workload(r["shape"], r["height"], r["width"], r["num_frames"], r["branches"],
                          text_tokens=r.get("text_tokens") or 128,  # run1 kept T5's 128 padded positions
                          batched=r["branch_mode"] == "batched", compiled=r["compiled"], a2a_mode=r["a2a_mode"])


def load_rows() -> list[dict]:
    rows = []
    for pattern in RECORDS:
        for path in sorted(glob.glob(str(ROOT / pattern))):
            data = json.loads(Path(path).read_text())
            if not isinstance(data, list):
                continue
            run = Path(path).parent.name
            rows += [{**r, "run": run} for r in data
                     if r.get("implementation") == "usp-infer" and r.get("world_size", 1) > 1]
    return rows


RANK_SHARE = ROOT / "bench/results/2026-12-04-h200x1/rank-share"  # one rank's shares of 8c0ba2b (run3's code)


def rank_share_compute(folder: Path) -> dict:
    """(shape, tokens, layout, compiled, a2a mode) -> ms of one rank's share, from bench/rank_share.py records."""
    found = {}
    for path in sorted(folder.glob("*.json")):
        for r in json.loads(path.read_text()):
            if r.get("implementation") == "usp-infer":
                key = r["shape"], r["tokens"], (r["cfg"], r["ring"], r["ulysses"]), r["compiled"], r["a2a_mode"]
                found[key] = r["ms_per_step"]
    return found


def loopback_copies_ms(w: cm.Workload, lay: tuple, costs: dict) -> float:
    """What bench/loopback.py adds to a share in place of the exchanges: each all-to-all and ring payload copied
    once (read and written), the cfg gather's into every slot; all-reduces move nothing."""
    b = cm.exchange_bytes(w, lay)
    moved = b["ulysses_all_to_all"] + b["ring_p2p"] + b["cfg_gather"] * lay[0]
    return 2 * moved / (costs["copy_tbps"]["value"] * 1e9)


def _with_rank_share(p: cm.Prediction, share_code: cm.Prediction, w: cm.Workload, lay: tuple, measured: float,
                     costs: dict) -> float:
    """The measured per-rank step, less the loopback's own copies, plus the modelled exposed exchange; the host
    floor as the model has it. `share_code` is the model for the code the share was timed with: a row of other code
    (run1, run2: slower layout copies) gets the modelled difference of its layout copies on top."""
    code = p.parts["layout_copies"] - share_code.parts["layout_copies"]
    exposed = p.parts["all_to_all"] + p.parts["ring_exposed"] + p.parts["small_collectives"]
    return max(measured - loopback_copies_ms(w, lay, costs) + code + exposed, p.parts["host"])


def validate(rows: list[dict], rank_share: dict | None = None) -> tuple[list[dict], float]:
    base = cm.load_costs("2026-11-28")
    out = []
    for r in rows:
        costs = dict(base)
        if r["run"] in BEFORE_WORD_COPIES:
            costs["copy_tbps"] = {"value": 1.39}
        lay = (r["cfg"], r["ring"], r["ulysses"])
        w = record_workload(r)
        p = cm.predict(w, lay, costs)
        share = (rank_share or {}).get((r["shape"], r["tokens"], lay, r["compiled"], r["a2a_mode"]))
        if share is not None:
            p = cm.Prediction(lay, _with_rank_share(p, cm.predict(w, lay, base), w, lay, share, base), p.parts)
        key = (r["run"], r["shape"], r["tokens"], lay, r["a2a_mode"])
        out.append({**r, "layout": lay, "predicted": p.ms, "error": p.ms / r["ms_per_step"] - 1, "share": share,
                    "fitted": CALIBRATION.get(key) if r.get("overlap_chunks", 1) == 1 and not r["compiled"] else None})
    return out, max(abs(x["error"]) for x in out)


def winners(out: list[dict], strict: bool = False) -> list[tuple]:
    """Per launch group (run, shape, tokens, world, mode, chunks, compile): the measured fastest and the layout the
    chooser picks from the predictions (ties within 1% to the larger Ulysses degree: costmodel.fastest); `strict`:
    the predicted fastest."""
    groups: dict[tuple, list[dict]] = {}
    for x in out:
        key = (x["run"], x["shape"], x["tokens"], x["branch_mode"], x["world_size"], x["a2a_mode"],
               x.get("overlap_chunks", 1), x["compiled"])
        groups.setdefault(key, []).append(x)
    result = []
    for key, xs in groups.items():
        if len({x["layout"] for x in xs}) < 2:
            continue
        measured = min(xs, key=lambda x: x["ms_per_step"])["layout"]
        if strict:
            predicted = min(xs, key=lambda x: x["predicted"])["layout"]
        else:
            predicted = cm.fastest([cm.Prediction(x["layout"], x["predicted"]) for x in xs]).layout
        result.append((key, measured, predicted))
    return result


def _lay(t: tuple) -> str:
    return " x ".join(map(str, t))


def print_validation(rank_share: Path | None = None) -> None:
    out, worst = validate(load_rows(), rank_share_compute(rank_share) if rank_share else None)
    print("| records | shape | tokens | branches | GPUs | cfg x ring x ulysses | a2a | chunks | compiled | measured ms | predicted ms | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for x in out:
        note = f" (fitted: {x['fitted']})" if x["fitted"] else ""
        print(f"| {x['run']} | {x['shape']} | {x['tokens']:,} | {x['branches']} {x['branch_mode']} | {x['world_size']} | "
              f"{_lay(x['layout'])} | {x['a2a_mode']} | {x.get('overlap_chunks', 1)} | {'yes' if x['compiled'] else 'no'} | "
              f"{x['ms_per_step']:,.1f} | {x['predicted']:,.1f} | {100 * x['error']:+.1f}%{note} |")
    wins = winners(out)
    right = sum(m == p for _, m, p in wins)
    print(f"\n{len(out)} rows; max |error| {100 * worst:.1f}%; mean {100 * sum(abs(x['error']) for x in out) / len(out):.1f}%")
    big = [x for x in out if not (x["shape"] == "ltx-video-2b" and x["tokens"] == 640)]
    print(f"without the host-bound 2B 640-token rows: {len(big)} rows, max |error| {100 * max(abs(x['error']) for x in big):.1f}%")
    measured = [abs(x["error"]) for x in out if x["share"] is not None]
    if measured:
        print(f"rows with a measured share: {len(measured)}, max |error| {100 * max(measured):.1f}%, "
              f"mean {100 * sum(measured) / len(measured):.1f}%")
    print(f"fastest layout right in {right} of {len(wins)} launch groups (the chooser's pick, ties within 1% to the "
          f"larger Ulysses degree)")
    for key, m, p in wins:
        if m != p:
            print(f"  wrong: {key}: measured {_lay(m)}, chosen {_lay(p)}")
    strict = winners(out, strict=True)
    print(f"strictly fastest predicted: right in {sum(m == p for _, m, p in strict)} of {len(strict)}")
    for key, m, p in strict:
        if m != p:
            print(f"  other: {key}: measured {_lay(m)} ({_ms(out, key, m)}), predicted fastest {_lay(p)} "
                  f"({_ms(out, key, p)})")


def _ms(out: list[dict], key: tuple, lay: tuple) -> str:
    """measured / predicted ms of one layout of a launch group."""
    x = next(x for x in out if x["layout"] == lay and (x["run"], x["shape"], x["tokens"], x["branch_mode"],
             x["world_size"], x["a2a_mode"], x.get("overlap_chunks", 1), x["compiled"]) == key)
    return f"measured {x['ms_per_step']:,.1f}, predicted {x['predicted']:,.1f}"


CURRENT = {  # one-GPU records of today's code: (file, shape, height, width, frames, eager ms, compiled ms)
    "video": ("2026-12-01-h200x1-b/final-ltxv13b-6144.json", "ltx-video-13b", 512, 768, 121),
    "video+audio": ("2026-12-01-h200x1-b/ab3-ltx23-6144.json", "ltx-2.3-22b", 512, 768, 121),
}


def _one_gpu_ms(path: str, compiled: bool) -> float:
    rows = json.loads((ROOT / "bench/results" / path).read_text())
    return next(r["ms_per_step"] for r in rows if r["implementation"] == "usp-infer" and r["compiled"] == compiled
                and not r.get("image_to_video"))


def calibrate() -> dict:
    """elementwise_ns and compiled_elementwise_factor of the 'current' set: the one-GPU step less its GEMMs and
    attention at the shared rates, per (row x d x layer) of the memory-bound passes."""
    costs = cm.load_costs("current")
    found = {"elementwise_ns": {}, "compiled_elementwise_factor": {}}
    for kind, (path, shape, h, w, f) in CURRENT.items():
        work = shape_workload(shape, h, w, f, 4 if kind == "video+audio" else 3)
        probe = {**costs, "elementwise_ns": {"value": {kind: 1.0}}, "compiled_elementwise_factor": {"value": {kind: 1.0}}}
        p = cm.predict(work, (1, 1, 1), probe).parts
        per_ns = p["elementwise"]  # ms at 1 ns per unit
        eager, compiled = _one_gpu_ms(path, False), _one_gpu_ms(path, True)
        ns = (eager - p["gemm"] - p["attention"]) / per_ns
        found["elementwise_ns"][kind] = round(ns, 5)
        found["compiled_elementwise_factor"][kind] = round(1 - (eager - compiled) / (ns * per_ns), 3)
        print(f"{kind}: {path}: eager {eager:.1f} ms = GEMM {p['gemm']:.1f} + attention {p['attention']:.1f} "
              f"+ elementwise {ns * per_ns:.1f} ms -> {ns:.5f} ns; compiled {compiled:.1f} ms -> factor "
              f"{found['compiled_elementwise_factor'][kind]}")
    return found


def ring_merge_tbps(folder: Path = RANK_SHARE) -> float:
    """ring_merge_tbps from one rank's shares (eager, direct, 13B, 6,144 tokens, the 2026-11-28 code): a ring
    layout's share less the Ulysses 4 share is its merges plus what else differs between the two as the model counts
    it (attention in ring chunks, the loopback's copies, Ulysses's layout copies; GEMMs and the memory-bound passes
    are the same); the merges' bytes over that time, ring 4 and Ulysses 2 x ring 2 pooled."""
    costs = cm.load_costs("2026-11-28")
    shares = rank_share_compute(folder)
    work = shape_workload("ltx-video-13b", 512, 768, 121, 3, text_tokens=24)
    probe = {**costs, "ring_merge_tbps": {"value": 1.0}}  # ring_merge in ms = GB merged

    def other(lay: tuple) -> tuple[float, float]:  # (the share less the modelled rest, the merges' GB)
        p = cm.predict(work, lay, probe).parts
        share = shares["ltx-video-13b", 6144, lay, False, "direct"]
        return share - loopback_copies_ms(work, lay, costs) - p["attention"] - p["layout_copies"], p["ring_merge"]

    base, _ = other((1, 1, 4))
    found = [other(lay) for lay in ((1, 4, 1), (1, 2, 2))]
    for lay, (ms, gb) in zip(((1, 4, 1), (1, 2, 2)), found):
        print(f"ring merges, {_lay(lay)}: {ms - base:.1f} ms for {gb:.1f} GB: {gb / (ms - base):.2f} TB/s")
    return round(sum(gb for _, gb in found) / sum(ms - base for ms, _ in found), 2)


# One-GPU eager records from the code before the STG sharing (the perturbed row ran every block).
ONE_GPU_BEFORE = {("ltx-2.3-22b", 512, 768): "2026-12-01-h200x1-b/ab3-ltx23-6144.json",
                  ("ltx-2.3-22b", 1024, 1536): "2026-12-01-h200x1-b/final-ltx23-24576.json",
                  ("ltx-video-13b", 512, 768): "2026-12-01-h200x1-b/final-ltxv13b-6144.json"}


def print_predictions() -> None:
    """Today's code on 2, 4, 8 H200: LTX-2.3 and LTX-Video 13B with the perturbed row sharing the cond row's
    blocks before the STG block (28 and 19) where both run in one forward. A one-GPU step with the sharing that
    is not measured yet is given as the record before it times the FLOP ratio the model counts."""
    costs = cm.load_costs("current")
    for shape, sizes, branches in (("ltx-2.3-22b", ((512, 768, 121), (1024, 1536, 121)), 4),
                                   ("ltx-video-13b", ((512, 768, 121),), 3)):
        for h, w, f in sizes:
            work = shape_workload(shape, h, w, f, branches, stg_shared=True)
            one = cm.predict(work, (1, 1, 1), costs).ms
            print(f"\n{shape} {w}x{h}x{f} ({work.video.tokens:,} video tokens), {len(work.branches)} branches: 1 GPU "
                  f"{one:,.1f} ms predicted")
            if (shape, h, w) in ONE_GPU_BEFORE:
                before = shape_workload(shape, h, w, f, branches)
                ratio = cm.step_flops(work) / cm.step_flops(before)
                measured = _one_gpu_ms(ONE_GPU_BEFORE[shape, h, w], False)
                model = cm.predict(before, (1, 1, 1), costs).ms
                print(f"  one GPU before the sharing: measured {measured:,.1f} ms (model {model:,.1f}); "
                      f"FLOP ratio with it {ratio:.4f}: {measured * ratio:,.1f} ms (not measured)")
            for world in (2, 4, 8):
                order = cm.ranked(world, work, costs)
                best, nxt = order[0], order[1] if len(order) > 1 else None
                print(f"  {world} GPUs: {_lay(best.layout)} {best.ms:,.1f} ms ({one / best.ms:.2f}x)"
                      + (f"; runner-up {_lay(nxt.layout)} {nxt.ms:,.1f}" if nxt else "")
                      + "; all: " + ", ".join(f"{_lay(p.layout)} {p.ms:,.0f}" for p in order))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--predict", action="store_true")
    ap.add_argument("--rank-share", type=Path, help="folder of bench/rank_share.py records (one GPU, the same code)")
    args = ap.parse_args()
    if args.calibrate:
        print(json.dumps({**calibrate(), "ring_merge_tbps": ring_merge_tbps()}, indent=1))
    elif args.predict:
        print_predictions()
    else:
        print_validation(args.rank_share)


if __name__ == "__main__":
    main()
