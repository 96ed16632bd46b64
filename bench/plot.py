"""Table and plot from `usp-infer bench` JSON records: step time and speedup against GPU count.

    python bench/plot.py bench/results/*.json --png bench/results/scaling.png --markdown bench/results/table.md

Speedup is against the fastest 1-GPU record of the same shape, tokens, branches, branch mode, compile
setting and implementation (the most conservative reference); "vs diffusers" divides diffusers' step
time on the same GPU count and tokens by ours.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(paths: list[Path]) -> list[dict]:
    records = []
    for path in paths:
        for r in json.loads(path.read_text()):
            r["run"] = path.parent.name  # bench/results/<date-machine>/<run>/<launch>.json
            records.append(r)
    return records


def _key(r: dict) -> tuple:
    return (r["implementation"], r["shape"], r["tokens"], r["branches"], r["branch_mode"], r["compiled"],
            r["dtype"])


def annotate(records: list[dict]) -> None:
    """Add speedup (vs the fastest matching 1-GPU record) and vs_diffusers (same GPUs and tokens) in place."""
    single: dict[tuple, float] = {}
    for r in records:
        if r["world_size"] == 1:
            single[_key(r)] = min(single.get(_key(r), float("inf")), r["ms_per_step"])
    peer: dict[tuple, float] = {}
    for r in records:
        if r["implementation"] == "diffusers":
            k = (r["shape"], r["tokens"], r["branches"], r["world_size"])
            peer[k] = min(peer.get(k, float("inf")), r["ms_per_step"])
    for r in records:
        base = single.get(_key(r))
        r["speedup"] = base / r["ms_per_step"] if base else None
        theirs = peer.get((r["shape"], r["tokens"], r["branches"], r["world_size"]))
        r["vs_diffusers"] = theirs / r["ms_per_step"] if theirs and r["implementation"] != "diffusers" else None


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(records: list[dict]) -> str:
    head = ("| shape | tokens | branches | GPUs | cfg x ring x ulysses | impl | a2a | chunks | compiled | ms/step "
            "| speedup | TFLOP/s/GPU | % matmul | vs diffusers | a2a share | peak GB/rank | run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = sorted(records, key=lambda r: (r["shape"], r["tokens"], r["branch_mode"], r["world_size"],
                                           r["implementation"] != "usp-infer", r["compiled"], r["ms_per_step"]))
    for r in order:
        share = r.get("a2a_share")
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['branches']} {r['branch_mode']} | {r['world_size']} "
            f"| {r['cfg']} x {r['ring']} x {r['ulysses']} | {r['implementation']} | {r['a2a_mode'] or ''} "
            f"| {r['overlap_chunks'] or ''} | {'yes' if r['compiled'] else 'no'} | {r['ms_per_step']:.1f} "
            f"| {_fmt(r['speedup'], '.2f')} | {r['tflops_per_gpu']:.0f} | {100 * r['fraction_of_matmul_rate']:.1f}% "
            f"| {_fmt(r['vs_diffusers'], '.2f')} | {'' if share is None else f'{100 * share:.1f}%'} "
            f"| {max(r['peak_mem_gb_per_rank']):.1f} | {r.get('run', '')} |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batched = [r for r in records if r["branch_mode"] == "batched" and r["shape"] == "ltx-video-13b"]
    series: dict[tuple, dict[int, float]] = {}
    for r in batched:  # the fastest layout and mode per GPU count
        label = (r["tokens"], r["implementation"], r["compiled"])
        best = series.setdefault(label, {})
        best[r["world_size"]] = min(best.get(r["world_size"], float("inf")), r["ms_per_step"])
    fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (tokens, impl, compiled), points in sorted(series.items()):
        gpus = sorted(points)
        name = f"{impl}{' compiled' if compiled else ''}, {tokens} tokens"
        style = "--" if impl == "diffusers" else "-"
        ax_time.plot(gpus, [points[g] for g in gpus], style, marker="o", label=name)
        if 1 in points:
            ax_speed.plot(gpus, [points[1] / points[g] for g in gpus], style, marker="o", label=name)
    top = max((g for points in series.values() for g in points), default=4)
    ax_speed.plot([1, top], [1, top], ":", color="grey", label="linear")
    ax_time.set(xlabel="GPUs", ylabel="ms per denoising step (3 branches)", yscale="log",
                title="LTX-13B shape, bf16, step time")
    ax_speed.set(xlabel="GPUs", ylabel="speedup over 1 GPU", title="Speedup (fastest layout per GPU count)")
    for ax in (ax_time, ax_speed):
        ax.set_xticks(sorted({g for points in series.values() for g in points}))
        ax.grid(alpha=0.3)
    ax_speed.legend(fontsize=7)
    gpu = next((r["gpu"] for r in records if r.get("gpu")), "CPU")
    fig.suptitle(f"usp-infer bench on {gpu}, torch {records[0]['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    records = load(args.json)
    annotate(records)
    table = markdown(records)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.png:
        plot(records, args.png)


if __name__ == "__main__":
    main()
