"""PNG plots of a run's TensorBoard scalars: loss curves and expert load over time.

    python tools/plot_moe.py RUN_DIR                 # writes RUN_DIR/plots/*.png
    python tools/plot_moe.py RUN_DIR --out DIR

RUN_DIR is searched for TensorBoard event files (`--tensorboard-dir` of one run, or a directory
above it; every directory holding event files is read and their scalars merged by step, the
later file winning, as after a resume). Written:

    loss.png                  lm loss (training, and validation when evaluated) and the MoE aux losses
    expert_load_heatmap.png   rows: every (MoE layer, expert); columns: log steps; colour: the
                              expert's share of its layer's tokens over the mean share (1 = balanced),
                              from `moe/layer_NN/tokens_per_expert/expert_EEE`
    moe_health.png            per layer: max/mean load, Gini coefficient, load and token entropy

Needs matplotlib (`pip install -e .[plot]`). Problems are reported as one `plot_moe.py: error: ...`
line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict

_EXPERT_TAG = re.compile(r"^moe/layer_(\d+)/tokens_per_expert/expert_(\d+)$")
_HEALTH_TAG = re.compile(r"^moe/layer_(\d+)/(max_over_mean_load|gini|entropy|token_entropy|dropped_fraction)$")
AUX_LOSSES = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss", "z_loss")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="plot_moe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's TensorBoard directory, or a directory above it")
    p.add_argument("--out", default=None, help="where the PNGs go (default: RUN_DIR/plots)")
    p.add_argument("--dpi", type=int, default=120)
    return p


def event_dirs(root: str) -> list[str]:
    """Every directory under `root` (itself included) holding TensorBoard event files."""
    found = []
    for directory, _, files in os.walk(root):
        if any(f.startswith("events.out.tfevents") for f in files):
            found.append(directory)
    return sorted(found)


def read_scalars(root: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] sorted by step, over every event directory under `root`."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    merged: dict[str, dict[int, float]] = defaultdict(dict)
    for directory in event_dirs(root):
        acc = EventAccumulator(directory, size_guidance={SCALARS: 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for event in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
                merged[tag][event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def expert_load_matrix(scalars: dict) -> tuple[list[int], list[tuple[int, int]], "object"]:
    """steps, rows [(layer, expert)], and load_RS: each expert's tokens over its layer's mean at
    each logged step (nan where a step lacks the expert's scalar)."""
    import numpy as np

    series = {}
    for tag, points in scalars.items():
        m = _EXPERT_TAG.match(tag)
        if m:
            series[(int(m.group(1)), int(m.group(2)))] = dict(points)
    rows = sorted(series)
    steps = sorted({s for points in series.values() for s in points})
    counts = np.array([[series[r].get(s, np.nan) for s in steps] for r in rows], dtype=np.float64)
    load = np.full_like(counts, np.nan)
    for layer in sorted({r[0] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r[0] == layer]
        mean = np.nanmean(counts[idx], axis=0, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            load[idx] = np.where(mean > 0, counts[idx] / mean, np.nan)
    return steps, rows, load


def plot_losses(plt, scalars: dict, path: str, dpi: int) -> None:
    aux = [t for t in AUX_LOSSES if t in scalars]
    fig, axes = plt.subplots(1, 2 if aux else 1, figsize=(12 if aux else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for tag, label in (("lm loss", "training"), ("lm loss validation", "validation")):
        if tag in scalars:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, marker="o" if tag != "lm loss" else None, markersize=3, label=label)
    ax.set(title="lm loss", xlabel="iteration", ylabel="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if aux:
        ax = axes[0][1]
        for tag in aux:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, label=tag)
        ax.set(title="MoE auxiliary losses (without coefficients)", xlabel="iteration")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_heatmap(plt, scalars: dict, path: str, dpi: int) -> None:
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    steps, rows, load = expert_load_matrix(scalars)
    layers = sorted({r[0] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 4 + 0.15 * len(steps))), max(3.0, min(20.0, 1 + 0.12 * len(rows)))))
    finite = load[np.isfinite(load)]
    top = max(2.0, float(finite.max()) if finite.size else 2.0)
    # Expert load over its layer's mean: 1 (white) balanced, blue starved, red overloaded.
    image = ax.imshow(load, aspect="auto", interpolation="nearest", cmap="RdBu_r",
                      norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top),
                      extent=(-0.5, len(steps) - 0.5, len(rows) - 0.5, -0.5))
    fig.colorbar(image, ax=ax, label="tokens / layer mean (1 = balanced)")
    for i in range(1, len(rows)):
        if rows[i][0] != rows[i - 1][0]:
            ax.axhline(i - 0.5, color="black", linewidth=0.8)
    centres = [np.mean([i for i, r in enumerate(rows) if r[0] == layer]) for layer in layers]
    ax.set_yticks(centres, [f"layer {layer}" for layer in layers])
    ticks = list(range(0, len(steps), -(-len(steps) // 10)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    experts = len(rows) // max(len(layers), 1)
    ax.set(title=f"expert load over time ({len(layers)} MoE layers x {experts} experts)", xlabel="iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_health(plt, scalars: dict, path: str, dpi: int) -> None:
    by_metric: dict[str, dict[int, list]] = defaultdict(dict)
    for tag, points in scalars.items():
        m = _HEALTH_TAG.match(tag)
        if m:
            by_metric[m.group(2)][int(m.group(1))] = points
    metrics = [k for k in ("max_over_mean_load", "gini", "entropy", "token_entropy") if k in by_metric]
    if any(v for points in by_metric.get("dropped_fraction", {}).values() for _, v in points):
        metrics.append("dropped_fraction")  # only with a capacity factor
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for layer, points in sorted(by_metric[metric].items()):
            steps, values = zip(*points)
            ax.plot(steps, values, label=f"layer {layer}")
        ax.set(title=metric.replace("_", " "), xlabel="iteration")
        ax.grid(alpha=0.3)
    if len(by_metric[metrics[0]]) <= 12:
        axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not os.path.isdir(args.run_dir):
            raise ValueError(f"RUN_DIR {args.run_dir} is not a directory")
        try:
            import matplotlib
        except ImportError:
            raise ValueError("matplotlib is not installed; pip install -e .[plot]") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not event_dirs(args.run_dir):
            raise ValueError(f"no TensorBoard event files under {args.run_dir} (train with --tensorboard-dir)")
        scalars = read_scalars(args.run_dir)
        out = args.out or os.path.join(args.run_dir, "plots")
        os.makedirs(out, exist_ok=True)
        written = []
        if "lm loss" in scalars:
            written.append(os.path.join(out, "loss.png"))
            plot_losses(plt, scalars, written[-1], args.dpi)
        if any(_EXPERT_TAG.match(t) for t in scalars):
            written.append(os.path.join(out, "expert_load_heatmap.png"))
            plot_heatmap(plt, scalars, written[-1], args.dpi)
        if any(_HEALTH_TAG.match(t) and not t.endswith("dropped_fraction") for t in scalars):
            written.append(os.path.join(out, "moe_health.png"))
            plot_health(plt, scalars, written[-1], args.dpi)
        if not written:
            raise ValueError(f"the event files under {args.run_dir} hold neither 'lm loss' nor MoE load scalars")
    except (ValueError, OSError) as e:
        print(f"plot_moe.py: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
