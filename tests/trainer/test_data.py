"""trainer.data: core.mnist reads our own small IDX files, torchvision downloads nothing; missing or
corrupt data is one clear error."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import idx_bytes
from trainer.data import RAW_FILES, DataError, load_mnist

ROOT = Path(__file__).resolve().parents[2]


def write_idx(raw: Path, name: str, array: np.ndarray) -> None:
    """The IDX format of the MNIST files: magic (0x08 = ubyte, then the rank), dims big-endian, bytes."""
    (raw / name).write_bytes(idx_bytes(array))


@pytest.fixture
def fake_mnist(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 30),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 12),
    }
    for name, a in arrays.items():
        write_idx(raw, name, a)
    return tmp_path, arrays


def test_loads_idx_files_without_downloading(fake_mnist, monkeypatch):
    root, arrays = fake_mnist
    monkeypatch.setenv("MNIST_DOWNLOAD", "1")  # download allowed, yet nothing is fetched: all files exist
    d = load_mnist(root)
    np.testing.assert_array_equal(d.train_images, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(d.train_labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(d.test_images, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(d.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert isinstance(d.train_images, np.ndarray) and d.train_images.dtype == np.uint8
    raw = root / "MNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(RAW_FILES)  # torchvision downloaded nothing
    assert d.files == {f: hashlib.sha256((raw / f).read_bytes()).hexdigest() for f in RAW_FILES}


def test_loading_present_files_never_imports_torch(fake_mnist):
    """torchvision is only for downloading: a run that has the data starts without torch."""
    root, _ = fake_mnist
    code = (
        f"import sys; from trainer.data import load_mnist; load_mnist({str(root)!r}); "
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_missing_files_give_the_make_data_hint(tmp_path):
    with pytest.raises(DataError, match="make data MNIST_FILES=dir") as e:
        load_mnist(tmp_path, download=False)
    assert "train-images-idx3-ubyte" in str(e.value)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda raw: (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage"),
        lambda raw: (raw / "t10k-labels-idx1-ubyte").write_bytes(b""),
        lambda raw: write_idx(raw, "train-labels-idx1-ubyte", np.full(7, 3)),  # 7 labels for 30 images
        lambda raw: write_idx(raw, "t10k-labels-idx1-ubyte", np.full(12, 200)),  # labels out of 0..9
    ],
)
def test_corrupt_files_give_one_clear_error(fake_mnist, corrupt):
    root, _ = fake_mnist
    corrupt(root / "MNIST" / "raw")
    with pytest.raises(DataError, match="make data MNIST_FILES=dir"):
        load_mnist(root, download=True)  # all four present: nothing may be downloaded


def test_cli_reports_missing_data_in_one_line_without_traceback(tmp_path):
    env = {**os.environ, "MNIST_DOWNLOAD": "0"}
    cmd = [
        sys.executable,
        "-m",
        "trainer",
        "train",
        "--data-dir",
        str(tmp_path),
        "--models-dir",
        str(tmp_path),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MNIST files missing")
    assert "make data MNIST_FILES=dir" in lines[0]
    assert not (tmp_path / "mnist").exists()  # nothing published
