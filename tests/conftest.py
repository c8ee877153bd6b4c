"""Fixtures every suite shares: the real MNIST files, never downloaded at test time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core import mnist

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """DATA_DIR (default ./data) with MNIST/raw filled, from ../shared if needed (core.mnist.unpack,
    as `make data` does).

    Fails, rather than skips, when the files are nowhere: a suite that
    silently skips its real-data tests proves nothing.
    """
    root = Path(os.environ.get("DATA_DIR", ROOT / "data"))
    if mnist.missing(mnist.raw_dir(root)):
        source = Path(os.environ.get("MNIST_FILES", ROOT.parent / "shared" / "datasets" / "mnist"))
        if not source.is_dir():
            pytest.fail(
                f"MNIST not in {mnist.raw_dir(root)} and no {source}; run `make data MNIST_FILES=dir`"
            )
        mnist.unpack(source, root)
    return root
