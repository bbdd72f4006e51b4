"""`curves.png` in the run directory: a job's logged metrics against step, readable without wandb."""
from __future__ import annotations

from pathlib import Path

RL_PANELS = (
    ("reward", ("reward/mean", "eval/reward_mean")),
    ("policy loss", ("train/loss",)),
    ("sync bytes per step", ("sync/payload_bytes", "sync/dense_bytes")),
)
PRETRAIN_PANELS = (
    ("loss", ("train/loss", "eval/loss")),
    ("learning rate", ("lr",)),
    ("density", ("sparsity/density",)),
)
LOG_SCALE = {"sync bytes per step"}


def plot_curves(history: dict[str, list[tuple[int, float]]], panels, path: Path) -> Path | None:
    """One panel per (title, metric names) that has data, each metric a line over its steps.
    Returns the path written, or None when nothing was logged."""
    shown = [(title, [k for k in keys if history.get(k)]) for title, keys in panels]
    shown = [(title, keys) for title, keys in shown if keys]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: never a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 2.6 * len(shown)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], shown):
        for k in keys:
            steps, values = zip(*history[k])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=k)
        ax.set_title(title, fontsize=10)
        if title in LOG_SCALE:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
