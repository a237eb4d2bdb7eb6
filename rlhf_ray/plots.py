"""Plots of learning curves (PNG), written by the driver at the end of a run."""

from __future__ import annotations

from pathlib import Path


def plot_metrics(history: list[tuple[int, dict[str, float]]], keys: list[str], path: Path,
                 title: str, xlabel: str = "step") -> Path:
    """One panel per metric in ``keys`` that was logged at least once; x = step (integer ticks,
    labelled ``xlabel``). A series
    of 8 points or more also gets its trailing moving average (window: an eighth of it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    present = [k for k in keys if any(k in m for _, m in history)]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(4.2 * max(len(present), 1), 3.2),
                             squeeze=False)
    for ax, key in zip(axes[0], present):
        points = [(step, m[key]) for step, m in history if key in m]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if len(points) >= 8:
            w = max(3, len(points) // 8)
            ax.plot(xs, ys, marker="o", markersize=2, alpha=0.35, label="per step")
            avg = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1])
                   for i in range(len(ys))]
            ax.plot(xs, avg, linewidth=2, label=f"mean of last {w}")
            ax.legend(fontsize=7)
        else:
            ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
