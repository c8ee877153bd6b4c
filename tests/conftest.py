"""Fixtures every suite shares: the real MNIST files, never downloaded at test time."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

from trainer.data import RAW_FILES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """DATA_DIR (default ./data) with MNIST/raw filled, from ../shared if needed.

    Fails, rather than skips, when the files are nowhere: a suite that
    silently skips its real-data tests proves nothing.
    """
    root = Path(os.environ.get("DATA_DIR", ROOT / "data"))
    raw = root / "MNIST" / "raw"
    if not all((raw / f).exists() for f in RAW_FILES):
        source = Path(os.environ.get("MNIST_FILES", ROOT.parent / "shared" / "datasets" / "mnist"))
        if not source.is_dir():
            pytest.fail(f"MNIST not in {raw} and no {source}; run `make data MNIST_FILES=dir`")
        raw.mkdir(parents=True, exist_ok=True)
        for f in RAW_FILES:
            tmp = raw / f"{f}.part"
            with gzip.open(source / f"{f}.gz", "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(raw / f)
    return root
