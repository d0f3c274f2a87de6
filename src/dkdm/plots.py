"""Figures of a run: its curves against steps (training.png) and 2-D samples as scatter plots.

matplotlib is imported here only, through its object API (no pyplot, no global backend), so
plotting never touches a user's own figures.
"""

from __future__ import annotations

import math
from pathlib import Path


def _figure(panels: int, width: float = 4.2, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), layout="constrained")
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def plot_log(records: list[dict], path, metric: str | None = None, stop_step: int | None = None) -> Path:
    """training.png from log.jsonl's records: the training loss, and where evaluations ran, the
    held-out error by quarter of t, the data-free score and the run's ``metric``, against steps."""
    train = [r for r in records if r.get("kind") != "eval" and "loss" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    panels = [p for p, has in (("loss", bool(train)), ("quarters", any("mse_q0" in r for r in train)),
                               ("heldout", any("heldout_mse" in r for r in evals)),
                               ("teacher_fd", any("teacher_fd" in r for r in evals)), ("metric", any(metric in r for r in evals))) if has]
    fig, axes = _figure(max(1, len(panels)))

    def curve(ax, rows, key, label=None, **kw):
        pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), label=label or key, **kw)

    for ax, panel in zip(axes, panels):
        if panel == "loss":
            for key in ("loss", "mse", "vb"):
                curve(ax, train, key)
            ax.set_title("training loss (batches)")
        elif panel == "quarters":
            for i in range(4):
                curve(ax, train, f"mse_q{i}", f"t quarter {i}")
            ax.set_title("training epsilon error by quarter of t")
        elif panel == "heldout":
            curve(ax, evals, "heldout_mse", "all t", color="black", marker=".")
            for i in range(4):
                curve(ax, evals, f"heldout_mse_q{i}", f"t quarter {i}", alpha=0.7)
            ax.set_title("held-out epsilon error (EMA)")
        elif panel == "teacher_fd":
            curve(ax, evals, "teacher_fd", "student", marker=".")
            floors = [r["teacher_fd_floor"] for r in evals if r.get("teacher_fd_floor") is not None]
            if floors:
                ax.axhline(floors[-1], color="gray", linestyle=":", label="noise floor (teacher vs teacher)")
                ax.legend(fontsize=7)
            ax.set_title("data-free score: FD to teacher (EMA)")
        else:
            curve(ax, evals, metric, marker=".")
            ax.set_title(f"{metric} (EMA)")
        ax.set_xlabel("step")
        if all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
        if panel in ("loss", "quarters", "heldout"):
            ax.legend(fontsize=7)
        if stop_step is not None:
            ax.axvline(stop_step, color="red", linestyle="--", linewidth=1)
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)
    return path


def scatter_pair(sets, titles, path) -> Path:
    """Two sets of 2-D points side by side on the same axes limits."""
    import torch

    both = torch.cat([s.float() for s in sets])
    lo, hi = both.min(0).values.tolist(), both.max(0).values.tolist()
    fig, axes = _figure(len(sets), 3.6, 3.6)
    for ax, pts, title in zip(axes, sets, titles):
        ax.scatter(pts[:, 0].tolist(), pts[:, 1].tolist(), s=2, alpha=0.5)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.set_title(title)
    fig.savefig(path, dpi=90)
    return Path(path)
