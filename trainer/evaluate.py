"""Scoring a network on the test set, and re-scoring a published model.

The same `metrics` function fills model.json at training time and checks a
published version later, so the two numbers are comparable by construction;
it predicts through `core.network.predict`, the service's forward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from core import modelstore
from core.feedback import load_corrections
from core.network import Network, predict
from core.preprocess import to_vectors


def metrics(net: Network, images: np.ndarray, labels: np.ndarray, batch: int = 10_000) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix (rows: true digit, columns: predicted)."""
    predicted = np.concatenate(
        [predict(net, to_vectors(images[i : i + batch])) for i in range(0, len(labels), batch)]
    )
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    totals = confusion.sum(axis=1)
    per_class = {str(d): (float(confusion[d, d] / totals[d]) if totals[d] else None) for d in range(10)}
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "n": len(labels),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def rescore(
    models_dir: Path | str,
    name: str,
    version: int | None,
    images,
    labels,
    feedback_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Load a published version (newest if None) through the verifying loader and score it; with
    `feedback_dir`, also on the current feedback holdout (`feedback`: accuracy and size)."""
    if version is None:
        versions = modelstore.list_versions(models_dir, name)
        if not versions:
            raise modelstore.InvalidModel(f"no published versions of {name!r} in {models_dir}")
        version = versions[-1]
    model = modelstore.load(models_dir, name, version)
    result = metrics(model.net, images, labels)
    recorded = modelstore.recorded_accuracy(model.metadata)
    out = {"name": name, "version": model.version, "path": str(model.path), "recorded": recorded, **result}
    if feedback_dir is not None:
        holdout_images, holdout_labels = load_corrections(feedback_dir).holdout_part()
        scored = metrics(model.net, holdout_images, holdout_labels) if len(holdout_labels) else None
        out["feedback"] = {
            "holdout_size": len(holdout_labels),
            "accuracy": scored["accuracy"] if scored else None,
            "recorded": model.metadata.get("metrics", {}).get("feedback_holdout_accuracy"),
        }
    return out
