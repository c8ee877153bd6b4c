"""`python -m trainer`: every flag documented, train publishes a full version, evaluate re-scores it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core import modelstore as ms
from trainer.cli import main
from trainer.presets import Config

ROOT = Path(__file__).resolve().parents[2]


def test_help_documents_every_flag():
    r = subprocess.run(
        [sys.executable, "-m", "trainer", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0
    flags = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(Config)]
    flags += [
        "--preset",
        "--data-dir",
        "--models-dir",
        "--name",
        "--version",
        "--no-publish",
        "--no-progress",
    ]
    missing = [f for f in flags if f not in r.stdout]
    assert not missing, f"undocumented flags: {missing}"
    for env in ("DATA_DIR", "MODELS_DIR", "MODEL_NAME"):
        assert env in r.stdout


def test_bad_flag_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "0"])
    assert e.value.code == 2
    assert "epochs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--sizes", "784,x,10"])


def test_train_publishes_and_evaluate_rescores(data_dir, tmp_path, capsys):
    models = tmp_path / "models"
    common = ["--data-dir", str(data_dir), "--models-dir", str(models)]
    argv = ["train", "--preset", "best", "--epochs", "1", "--sizes", "784,64,10", "--train-limit", "3000"]
    assert main([*argv, "--validation-size", "1000", "--seed", "3", "--no-progress", *common]) == 0
    out = capsys.readouterr().out
    assert "epoch   1/1" in out and "published" in out

    m = ms.load(models, "mnist", 1)
    meta = m.metadata
    assert meta["architecture"] == {
        "sizes": [784, 64, 10],
        "activations": ["relu", "softmax"],
        "cost": "cross_entropy",
        "dtype": "float32",
    }
    assert meta["preset"] == "best" and meta["seed"] == 3
    hp = meta["hyperparameters"]
    assert (
        hp["train_limit"] == 3000 and hp["epochs"] == 1 and hp["shift"] == 2 and hp["optimizer"] == "momentum"
    )
    assert meta["preprocessing"]["scale"] == "x / 255 -> [0, 1]"
    metrics = meta["metrics"]
    assert 0.5 < metrics["test_accuracy"] <= 1 and 0.5 < metrics["validation_accuracy"] <= 1
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 10_000
    assert metrics["per_class_accuracy"]["3"] == pytest.approx(cm[3, 3] / cm[3].sum())
    assert meta["training"]["seconds"] > 0 and meta["created"]
    files = meta["dataset"]["files"]
    assert set(files) == {"train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                          "t10k-labels-idx1-ubyte"}  # fmt: skip
    assert files["t10k-labels-idx1-ubyte"]["sha256"] == ms.sha256_file(
        data_dir / "MNIST/raw/t10k-labels-idx1-ubyte"
    )
    assert (m.path / ms.REPORT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["evaluate", *common]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {metrics['test_accuracy']:.4f} on 10000 images" in out
    assert "mnist version 1" in out

    # evaluate goes through the verifying loader: a tampered version is refused, not scored
    meta_path = m.path / ms.METADATA_FILE
    doc = json.loads(meta_path.read_text())
    doc["files"][ms.WEIGHTS_FILE]["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(doc))
    assert main(["evaluate", "--version", "1", *common]) == 1
    assert "sha256" in capsys.readouterr().err
    assert main(["evaluate", "--version", "2", *common]) == 1
    assert "missing" in capsys.readouterr().err


def test_only_data_loading_imports_torch():
    """The service shares core/ and must stay torch-free; in the trainer only a download of MNIST
    pulls torch in (trainer.data._download)."""
    code = (
        "import sys, trainer.cli, trainer.run, trainer.train, trainer.sgd, trainer.evaluate, trainer.report, "
        "trainer.data, core.network, core.modelstore; print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def _corrections(directory: Path, n: int) -> list[str]:
    """n hollow seven-segment digits stored as the service stores them (tests/segment_digits.py)."""
    from core import feedback
    from service.imaging import to_mnist
    from tests.segment_digits import sample

    writer = feedback.FeedbackWriter(directory, 1 << 30, 1 << 20)
    images, labels = sample(n, seed=5)
    ids = []
    for image, label in zip(images, labels, strict=True):
        data = {
            "schema_version": 1,
            "request_id": None,
            "feedback_request_id": "t",
            "model": {"name": "mnist", "version": 2},
            "digit": int(label),
            "predicted": None,
            "scored": {"digit": 0, "probabilities": [0.1] * 10},
            "correct": int(label) == 0,
            "preprocess": "auto",
            "input": feedback.pixels_json(to_mnist(image)),
            "image": None,
        }
        event = feedback.make_event(data, "mnist/2")
        writer.append(event)
        ids.append(event["id"])
    return ids


def test_train_with_feedback_records_it_and_evaluate_and_export_read_it(data_dir, tmp_path, capsys):
    from core import feedback
    from trainer.train import feedback_repeat

    fb = tmp_path / "fb"
    ids = _corrections(fb, 60)
    held = sum(feedback.in_holdout(i) for i in ids)
    models = tmp_path / "models"
    common = ["--data-dir", str(data_dir), "--models-dir", str(models)]
    argv = ["train", "--preset", "best", "--epochs", "1", "--sizes", "784,64,10", "--train-limit", "3000"]
    assert main([*argv, "--no-progress", "--feedback", str(fb), *common]) == 0
    out = capsys.readouterr().out
    assert f"60 corrections in {fb}: {60 - held} to train on, {held} held out" in out
    meta = ms.load(models, "mnist", 1).metadata
    section = meta["dataset"]["feedback"]
    repeat = feedback_repeat(Config(), 3000, 60 - held)
    assert section == {
        "dir": str(fb),
        "records": 60,
        "trained_on": 60 - held,
        "repeat": repeat,
        "holdout_size": held,
        "skipped": 0,
        "holdout_accuracy": section["holdout_accuracy"],
        "holdout": section["holdout"],
    }
    assert 0 <= section["holdout_accuracy"] <= 1
    assert meta["metrics"]["feedback_holdout_accuracy"] == section["holdout_accuracy"]
    assert meta["dataset"]["train_size"] == 3000 + repeat * (60 - held)

    assert main(["evaluate", "--feedback", str(fb), *common]) == 0
    out = capsys.readouterr().out
    assert f"feedback holdout accuracy {section['holdout_accuracy']:.4f} on {held} records" in out

    out_file = tmp_path / "c.npz"
    assert main(["export-feedback", "--feedback", str(fb), "--out", str(out_file)]) == 0
    d = np.load(out_file)
    assert d["images"].shape == (60, 28, 28) and d["ids"].tolist() == ids
    assert int(d["holdout"].sum()) == held

    with pytest.raises(SystemExit) as e:
        main(["export-feedback", "--feedback", str(tmp_path / "nope"), "--out", str(out_file)])
    assert e.value.code == 2


def test_the_feedback_weighting():
    from trainer.train import MAX_FEEDBACK_REPEAT, feedback_repeat

    # 480 corrections against 60,000 images: 7 copies each, 3360 of 63,360 examples (5%).
    assert feedback_repeat(Config(), 60_000, 480) == 7
    assert feedback_repeat(Config(), 60_000, 5) == MAX_FEEDBACK_REPEAT  # a handful is not learnt by heart
    assert feedback_repeat(Config(), 60_000, 100_000) == 1
    assert feedback_repeat(Config(), 60_000, 0) == 0
    assert feedback_repeat(dataclasses.replace(Config(), feedback_repeat=3), 60_000, 480) == 3
