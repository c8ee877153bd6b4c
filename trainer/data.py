"""MNIST as numpy arrays, loaded through torchvision.

This is the only module in the project that imports torch (via torchvision):
the tensors are turned into numpy at once, so everything downstream, and the
service, stays torch-free. Loading problems become one `DataError` whose
message says what to do, because a user who has not unpacked the dataset
needs a command, not a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.modelstore import sha256_file
from core.settings import Settings

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
HOW_TO_FIX = (
    "unpack the four MNIST *-ubyte.gz files with `make data MNIST_FILES=dir` "
    "(the Makefile's default dir is ../shared/datasets/mnist), or allow torchvision to download them"
)


class DataError(Exception):
    """The dataset is missing or unreadable; the message tells the user what to run."""


@dataclass(frozen=True)
class MNIST:
    """Raw images (m, 28, 28) uint8 and labels (m,) int64, plus the files they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    files: dict[str, str]  # raw file name -> sha256


def raw_dir(data_dir: Path | str) -> Path:
    """Where torchvision keeps the files: DATA_DIR/MNIST/raw/."""
    return Path(data_dir) / "MNIST" / "raw"


def download_allowed() -> bool:
    """MNIST_DOWNLOAD=0 forbids torchvision's download (tests, offline machines)."""
    return Settings.from_env().mnist_download


def _split(data_dir: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision  # the project's single torch entry point; imported late so --help is fast

    ds = torchvision.datasets.MNIST(root=str(data_dir), train=train, download=download)
    images = ds.data.numpy().astype(np.uint8, copy=False)
    labels = ds.targets.numpy().astype(np.int64, copy=False)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"images of shape {images.shape} do not match {len(labels)} labels")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError("labels outside 0..9")
    return images, labels


def load_mnist(data_dir: Path | str, download: bool | None = None) -> MNIST:
    """Both splits of MNIST from DATA_DIR, or a `DataError` saying how to get them.

    torchvision only downloads when a raw file is missing; with all four files
    present (as `make data` leaves them) nothing touches the network.
    """
    data_dir = Path(data_dir)
    raw = raw_dir(data_dir)
    if download is None:
        download = download_allowed()
    missing = [f for f in RAW_FILES if not (raw / f).is_file()]
    if missing and not download:
        raise DataError(f"MNIST files missing in {raw}: {', '.join(missing)}; {HOW_TO_FIX}")
    try:
        train_images, train_labels = _split(data_dir, True, download)
        test_images, test_labels = _split(data_dir, False, download)
    except Exception as e:  # torchvision raises RuntimeError, AssertionError, URLError, ValueError...
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise DataError(f"cannot load MNIST from {raw} ({reason}); {HOW_TO_FIX}") from None
    files = {f: sha256_file(raw / f) for f in RAW_FILES}
    return MNIST(train_images, train_labels, test_images, test_labels, files)
