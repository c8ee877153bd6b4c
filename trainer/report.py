"""report.png: the learning curves and the confusion matrix of a run, in one picture.

Drawn with matplotlib's Agg backend (no display needed, works in Docker) and
returned as bytes so the model store can write it atomically with the rest.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def render(history: list[dict[str, Any]], confusion: np.ndarray, title: str) -> bytes:
    """PNG bytes: loss and accuracy per epoch (left), test confusion matrix (right)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # Figure, not pyplot: no global state, no GUI

    fig = Figure(figsize=(12, 5), dpi=100)
    ax_loss, ax_cm = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:red", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss per example", color="tab:red")
    ax_acc = ax_loss.twinx()
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "s-", color="tab:blue", label="train acc")
    if history and history[0].get("validation_accuracy") is not None:
        ax_acc.plot(
            epochs, [h["validation_accuracy"] for h in history], "^-", color="tab:green", label="val acc"
        )
    ax_acc.set_ylabel("accuracy")
    lines = ax_loss.get_lines() + ax_acc.get_lines()
    ax_loss.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    ax_loss.set_title("learning curves")

    cm = np.asarray(confusion)
    ax_cm.imshow(np.log1p(cm), cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax_cm.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if i == j else "black")
    ax_cm.set_xticks(range(cm.shape[1]))
    ax_cm.set_yticks(range(cm.shape[0]))
    ax_cm.set_xlabel("predicted")
    ax_cm.set_ylabel("true")
    ax_cm.set_title("test confusion matrix")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
