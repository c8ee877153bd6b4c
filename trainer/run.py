"""One training run end to end: data, training, test score, report, publication.

model.json is assembled here, so this is the place that says what a model
records about itself: the recipe (every hyperparameter and the seed), the
data (sha256 of each raw file, split sizes), the preprocessing, the scores,
the learning curves and the time it took.
"""

from __future__ import annotations

import datetime as dt
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core import feedback as feedback_store
from core import modelstore
from core.network import Network
from core.preprocess import DESCRIPTION
from trainer import evaluate, report
from trainer.data import load_mnist
from trainer.presets import Config
from trainer.train import TrainResult, train


def build_metadata(
    config: Config,
    preset: str,
    result: TrainResult,
    test: dict[str, Any],
    files: dict[str, str],
    started: str,
) -> dict[str, Any]:
    last = result.history[-1] if result.history else {}
    return {
        "preset": preset,
        "hyperparameters": config.as_dict(),
        "seed": config.seed,
        "preprocessing": DESCRIPTION,
        "metrics": {
            "test_accuracy": test["accuracy"],
            "validation_accuracy": last.get("validation_accuracy"),
            "train_accuracy": last.get("train_accuracy"),
            "train_loss": last.get("train_loss"),
            "per_class_accuracy": test["per_class_accuracy"],
            "confusion_matrix": test["confusion_matrix"],
            "test_size": test["n"],
        },
        "history": result.history,
        "training": {
            "started": started,
            "seconds": round(result.seconds, 3),
            "epoch_seconds": [round(h["seconds"], 3) for h in result.history],
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "dataset": {
            "source": "torchvision.datasets.MNIST",
            "files": {name: {"sha256": sha} for name, sha in files.items()},
            "train_size": result.train_size,
            "validation_size": result.validation_size,
            "validation": "last validation_size images of the 60k training set",
        },
    }


def feedback_section(
    directory: Path | str, corrections: feedback_store.Corrections, repeat: int, net: Network
) -> dict[str, Any]:
    """What model.json records about the corrections: how many were trained on (and how often),
    and the accuracy on the holdout, which never was."""
    holdout_images, holdout_labels = corrections.holdout_part()
    scored = evaluate.metrics(net, holdout_images, holdout_labels) if len(holdout_labels) else None
    return {
        "dir": str(directory),
        "records": len(corrections),
        "trained_on": int((~corrections.holdout).sum()),
        "repeat": repeat,
        "holdout_size": len(holdout_labels),
        "skipped": corrections.skipped,
        "holdout_accuracy": scored["accuracy"] if scored else None,
        "holdout": f"records whose sha256(id) mod 100 < {feedback_store.HOLDOUT_PERCENT}; never trained on",
    }


def train_and_publish(
    config: Config,
    preset: str,
    data_dir: Path | str,
    models_dir: Path | str,
    name: str,
    publish: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    feedback_dir: Path | str | None = None,
) -> tuple[int | None, dict[str, Any]]:
    """Train per config, score on the test set and publish; returns (version or None, metadata).

    With `feedback_dir`, the stored corrections outside the holdout join the training set
    (`trainer.train`), and model.json records them and the holdout accuracy."""
    modelstore.check_name(name)
    data = load_mnist(data_dir)
    corrections = None if feedback_dir is None else feedback_store.load_corrections(feedback_dir)
    if corrections is not None:
        log(
            f"{len(corrections)} corrections in {feedback_dir}: "
            f"{int((~corrections.holdout).sum())} to train on, {int(corrections.holdout.sum())} held out"
            + (f"; {corrections.skipped} unusable lines skipped" if corrections.skipped else "")
        )
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    result = train(
        config,
        data.train_images,
        data.train_labels,
        progress=progress,
        log=log,
        corrections=corrections.train_part() if corrections is not None else None,
    )
    test = evaluate.metrics(result.net, data.test_images, data.test_labels)
    meta = build_metadata(config, preset, result, test, data.files, started)
    if corrections is not None:
        section = feedback_section(feedback_dir, corrections, result.feedback_repeat, result.net)
        meta["dataset"]["feedback"] = section
        meta["metrics"]["feedback_holdout_accuracy"] = section["holdout_accuracy"]
        meta["metrics"]["feedback_holdout_size"] = section["holdout_size"]
        if section["holdout_accuracy"] is not None:
            accuracy, size = section["holdout_accuracy"], section["holdout_size"]
            log(f"feedback holdout accuracy {accuracy:.4f} ({size} records)")
    log(
        f"test accuracy {test['accuracy']:.4f} ({test['n']} images); "
        f"trained in {result.seconds:.1f}s, {time.perf_counter() - t0:.1f}s with scoring"
    )
    if not publish:
        return None, meta
    png = report.render(
        result.history,
        np.array(test["confusion_matrix"]),
        f"{name} ({preset}): test accuracy {test['accuracy']:.2%}, {result.seconds:.0f}s",
    )
    version = modelstore.publish(models_dir, name, result.net, meta, {modelstore.REPORT_FILE: png})
    log(f"published {Path(models_dir) / name / str(version)}")
    return version, meta
