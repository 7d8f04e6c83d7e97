"""Draw every method found in DIR as mean ± stderr test-accuracy curves and print a table.

    python experiments/plot.py experiments/results/from_scratch [--out FILE.png]

Reads DIR/*.json written by the experiment scripts; writes DIR/curves.png by default.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Final test accuracy read off the paper's figure (docs/algorithm.md#experiments), shown only for runs with the
# paper's budget (PAPER_BUDGET) so that short demos are not compared with it.
PAPER_BUDGET = {"from_scratch": 50_000, "pretrained": 10_000}
PAPER = {
    "from_scratch": {"m2n2": 0.87, "cma-es": 0.86, "m2n2-no-crossover": 0.77, "ga-no-crossover": 0.71,
                     "ga": 0.68, "map-elites": 0.60},
    "pretrained": {"m2n2": 0.685, "m2n2-no-attraction": 0.66, "map-elites": 0.62, "slerp-grid": 0.577,
                   "m2n2-no-splitpoint": 0.577, "ga": 0.52},
}


def load(directory: str) -> list[dict]:
    records = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        if "curve" in record and "method" in record:
            records.append(record)
    if not records:
        raise SystemExit(f"error: no result JSON files in {directory}")
    return sorted(records, key=lambda r: -r["final_test_accuracy_mean"])


def table(records: list[dict]) -> str:
    lines = [f"{'method':<22}{'runs':>5}{'passes':>9}{'final test acc':>22}{'paper':>8}{'wall s':>9}"]
    for r in records:
        experiment = r.get("experiment", "")
        paper = PAPER.get(experiment, {}).get(r["method"])
        if (r["forward_passes"] != PAPER_BUDGET.get(experiment) or r.get("specialist_init", "paper") != "paper"
                or r.get("hidden", 256) != 256):
            paper = None
        lines.append(
            f"{r['method']:<22}{r['runs']:>5}{r['forward_passes']:>9}"
            f"{100 * r['final_test_accuracy_mean']:>14.1f} ± {100 * r['final_test_accuracy_stderr']:<5.1f}"
            f"{'' if paper is None else f'{100 * paper:.1f}':>8}{r['wall_seconds']:>9.0f}"
        )
    return "\n".join(lines)


def plot(records: list[dict], path: str, time_axis: bool = False) -> None:
    """Mean ± stderr test accuracy against forward passes, or against wall seconds
    (the time at which each point was available, for time-to-accuracy)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if time_axis:
        records = [r for r in records if r["curve"].get("wall_seconds")]
        if not records:
            raise SystemExit("error: no result in this directory recorded wall times per logged point")
    for r in records:
        c = r["curve"]
        x = c["wall_seconds"] if time_axis else c["forward_passes"]
        mean, err = c["test_accuracy_mean"], c["test_accuracy_stderr"]
        label = f"{r['method']} ({100 * r['final_test_accuracy_mean']:.1f} %"
        label += f", {r['runs']} runs x {r['forward_passes']:,} passes)" if time_axis else ")"
        line, = ax.plot(x, mean, marker="o" if len(x) < 10 else None, markersize=3, label=label)
        ax.fill_between(x, [m - e for m, e in zip(mean, err)], [m + e for m, e in zip(mean, err)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    runs = sorted({r["runs"] for r in records})
    ax.set_xlabel("wall seconds (all runs of a method together, one machine)" if time_axis else "forward passes")
    if time_axis:
        ax.set_xscale("log")
    ax.set_ylabel("test accuracy (best-train model)")
    init = records[0].get("specialist_init")
    title = records[0].get("experiment", "") + (f" (specialists: {init})" if init else "")
    ax.set_title(f"{title}: mean ± stderr over {'/'.join(map(str, runs))} runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--out", help="PNG path (default DIR/curves.png, or DIR/time_to_accuracy.png with --time)")
    p.add_argument("--time", action="store_true", help="x axis: wall seconds instead of forward passes")
    args = p.parse_args(argv)
    records = load(args.dir)
    out = args.out or os.path.join(args.dir, "time_to_accuracy.png" if args.time else "curves.png")
    plot(records, out, args.time)
    print(table(records))
    print(f"plot -> {out}")


if __name__ == "__main__":
    main()
