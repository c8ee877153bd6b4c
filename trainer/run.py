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

from core import modelstore
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


def train_and_publish(
    config: Config,
    preset: str,
    data_dir: Path | str,
    models_dir: Path | str,
    name: str,
    publish: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[int | None, dict[str, Any]]:
    """Train per config, score on the test set and publish; returns (version or None, metadata)."""
    modelstore.check_name(name)
    data = load_mnist(data_dir)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    result = train(config, data.train_images, data.train_labels, progress=progress, log=log)
    test = evaluate.metrics(result.net, data.test_images, data.test_labels)
    meta = build_metadata(config, preset, result, test, data.files, started)
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
