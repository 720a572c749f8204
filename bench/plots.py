"""Turns benchmark results (JSON) into the PNG plots the documentation embeds (docs/performance.md).

    .venv/bin/pip install -e '.[bench]'          # matplotlib
    .venv/bin/python bench/plots.py bench/results/throughput.json --out docs/img

Input: ``runs``, each with a ``label``, ``bare_rps`` per worker count, and ``ratios``
``{target: {workers: [ratio of medians, paired ratio]}}`` to bare; ``goals`` ``{target: ratio}``;
``targets`` ``{target: label}``; optionally ``overhead`` (``builds``, and ``stores`` ``{store: [us
per request, one per build]}``). ``bench/results/throughput.json`` holds the runs README.md
records (throughput.py prints tables; its figures were transcribed). Writes
``throughput-ratios.png``, ``throughput-bare.png`` and, with ``overhead``, ``overhead.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

#: PNG metadata without the matplotlib version: the same input gives the same file.
METADATA = {"Software": None}


def throughput_ratios(results: dict[str, Any], out: Path) -> Path:
    runs, goals, targets = results["runs"], results.get("goals", {}), results["targets"]
    workers = sorted({w for run in runs for ratios in run["ratios"].values() for w in ratios}, key=int)
    fig, axes = plt.subplots(1, len(workers), figsize=(max(7.0, 5.2 * len(workers)), 4.2), sharey=True, squeeze=False)
    width = 0.8 / len(runs)
    for ax, count in zip(axes[0], workers, strict=True):
        for i, run in enumerate(runs):
            values = [run["ratios"].get(t, {}).get(count, [float("nan")])[0] for t in targets]
            xs = [x + (i - (len(runs) - 1) / 2) * width for x in range(len(targets))]
            ax.bar(xs, values, width, label=run["label"])
        for x, target in enumerate(targets):
            if target in goals:
                ax.hlines(goals[target], x - 0.45, x + 0.45, colors="black", linestyles="dashed", linewidth=1.2,
                          label="goal" if x == next(i for i, t in enumerate(targets) if t in goals) else None)
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set_xticks(range(len(targets)), [targets[t] for t in targets], rotation=15)
        ax.set_title(f"{count} worker{'s' if count != '1' else ''}")
        ax.set_ylim(0.5, 1.25)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("req/s, ratio to the bare app (medians)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = min(len(labels), 3)  # more runs wrap onto further rows, below the axes
    rows = -(-len(labels) // columns)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.suptitle("Throughput behind the middleware, per run of bench/throughput.py")
    fig.tight_layout(rect=(0, 0.05 * rows + 0.01, 1, 1))
    return _save(fig, out / "throughput-ratios.png")


def throughput_bare(results: dict[str, Any], out: Path) -> Path:
    runs = results["runs"]
    workers = sorted({w for run in runs for w in run["bare_rps"]}, key=int)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    width = 0.8 / len(workers)
    for i, count in enumerate(workers):
        xs = [x + (i - (len(workers) - 1) / 2) * width for x in range(len(runs))]
        ax.bar(xs, [run["bare_rps"].get(count, float("nan")) for run in runs], width,
               label=f"{count} worker{'s' if count != '1' else ''}")
    ax.set_xticks(range(len(runs)), [run["label"] for run in runs])
    ax.set_ylabel("req/s")
    ax.set_title("The bare app on the shared machine, per run (the noise floor)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out / "throughput-bare.png")


def overhead(results: dict[str, Any], out: Path) -> Path:
    data = results["overhead"]
    builds, stores = data["builds"], data["stores"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    height = 0.8 / len(builds)
    for i, build in enumerate(builds):
        ys = [y + (i - (len(builds) - 1) / 2) * height for y in range(len(stores))]
        ax.barh(ys, [values[i] for values in stores.values()], height, label=build)
    ax.set_yticks(range(len(stores)), list(stores))
    ax.invert_yaxis()
    ax.set_xlabel(f"middleware CPU, {data.get('unit', 'us per request')}")
    ax.set_title("In process (bench/overhead.py), by build")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out / "overhead.png")


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110, metadata=METADATA)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="benchmark results, JSON (bench/results/throughput.json)")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="where the PNGs go (docs/img)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    written = [throughput_ratios(results, args.out), throughput_bare(results, args.out)]
    if "overhead" in results:
        written.append(overhead(results, args.out))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
