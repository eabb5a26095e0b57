"""Plots for MLflow artifacts: a run's loss curve (train and validation, against steps and tokens)."""

from __future__ import annotations

from pathlib import Path

from llmcore.metrics import read_metrics, split_kinds


def loss_curve_png(metrics_path: Path, out: Path, title: str) -> Path:
    """Train and validation loss against optimiser steps (bottom axis) and tokens seen (top axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = split_kinds(read_metrics(metrics_path))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot([r.step for r in train], [r.loss for r in train], lw=1, alpha=0.8, label="train/loss")
    if evals:
        ax.plot([r.step for r in evals], [r.val_loss for r in evals], "o-", lw=1.5, label="val/loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if train and train[-1].step and train[-1].tokens_seen:
        per_step = train[-1].tokens_seen / train[-1].step
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(fig, out)
    plt.close(fig)
    return out


def save_atomically(fig, out: Path) -> None:
    """Write a figure through llmcore.io's atomic writer: readers never see half a PNG."""
    from llmcore.io import atomic_open

    with atomic_open(out, "wb") as f:
        fig.savefig(f, format=out.suffix.lstrip(".") or "png")
