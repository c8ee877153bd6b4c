"""core.mnist, the one MNIST reader: plain and gzipped IDX files, every malformed file refused with
its name, `unpack` (what `make data` runs), and no torch on the way."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core import mnist
from tests.helpers import idx_bytes

ROOT = Path(__file__).resolve().parents[2]


def arrays(n_train: int = 30, n_test: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)).astype(np.uint8),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8),
        "test_labels": rng.integers(0, 10, n_test),
    }


def write(folder: Path, data: dict[str, np.ndarray], gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, a in data.items():
        raw = idx_bytes(a)
        name = mnist.FILES[kind]
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return folder


@pytest.mark.parametrize("gz", [False, True])
def test_plain_and_gzipped_files_give_the_same_arrays_and_checksums(tmp_path, gz):
    data = arrays()
    write(mnist.raw_dir(tmp_path / "a"), data)
    write(mnist.raw_dir(tmp_path / "b"), data, gz=gz)
    a, b = mnist.load(tmp_path / "a"), mnist.load(tmp_path / "b")
    for kind, expected in data.items():
        got = getattr(b, kind)
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == (np.uint8 if kind.endswith("images") else np.int64)
        assert got.flags.writeable and got.flags.c_contiguous
    assert a.files == b.files  # the checksum is of the IDX bytes, packed or not
    assert mnist.read(tmp_path / "b", "test_labels").tolist() == data["test_labels"].tolist()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "bad magic"),
        (b"\x01\x00\x08\x01" + b"\0" * 8, "bad magic"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01" + b"\0" * 4, "IDX type 0x0d"),
        (b"\x00\x00\x08\x03garbage", "truncated IDX header"),
        (idx_bytes(np.zeros(5))[:-1], r"the header \(5,\) says 13"),
        (idx_bytes(np.zeros(5)) + b"\0", r"the header \(5,\) says 13"),
        (b"\x1f\x8b not gzip", "broken gzip"),
    ],
)
def test_malformed_files_are_refused_naming_the_file(tmp_path, data, message):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(mnist.MnistError, match=message) as e:
        mnist.read_idx(path)
    assert path.name in str(e.value)


@pytest.mark.parametrize(
    ("kind", "array", "message"),
    [
        ("train_images", np.zeros((30, 28, 27)), "expected \\(m, 28, 28\\)"),
        ("train_labels", np.zeros(7), "30 images but 7 labels"),
        ("test_labels", np.full(12, 200), "labels outside 0..9"),
        ("test_labels", np.zeros((12, 1)), "expected \\(m,\\)"),
    ],
)
def test_files_that_are_not_mnist_are_refused(tmp_path, kind, array, message):
    data = arrays()
    data[kind] = array
    write(mnist.raw_dir(tmp_path), data)
    with pytest.raises(mnist.MnistError, match=message):
        mnist.load(tmp_path)


def test_missing_files_are_named(tmp_path):
    write(mnist.raw_dir(tmp_path), {k: v for k, v in arrays().items() if k != "test_images"})
    with pytest.raises(mnist.MnistError, match="t10k-images-idx3-ubyte"):
        mnist.load(tmp_path)


def test_unpack_writes_the_raw_layout_and_refuses_a_corrupt_source(tmp_path):
    data = arrays()
    source = write(tmp_path / "gz", data, gz=True)
    raw = mnist.unpack(source, tmp_path / "data")
    assert raw == tmp_path / "data" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(mnist.RAW_FILES)  # no temp file left
    np.testing.assert_array_equal(mnist.load(tmp_path / "data").train_images, data["train_images"])
    (source / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x09" + b"\0"))
    with pytest.raises(mnist.MnistError, match="train-labels-idx1-ubyte"):
        mnist.unpack(source, tmp_path / "again")


def test_cli_unpacks_and_reports_errors_in_one_line_without_torch(tmp_path):
    source = write(tmp_path / "gz", arrays(), gz=True)
    code = (
        "import sys, runpy; sys.argv = ['core.mnist', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('core.mnist', run_name='__main__')\n"
        "finally:\n    print('torch' in sys.modules, file=sys.stderr)\n"
    )
    ok = subprocess.run(
        [sys.executable, "-c", code, "unpack", str(source), str(tmp_path / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr.strip() == "False"  # the reader is numpy only: the service image can use it
    assert not mnist.missing(mnist.raw_dir(tmp_path / "data"))
    bad = subprocess.run(
        [sys.executable, "-m", "core.mnist", "unpack", str(tmp_path / "nowhere"), str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: MNIST files missing")
