"""MNIST for the trainer: core.mnist's arrays, or one `DataError` that says what to run.

The files are read by `core.mnist`, the project's one MNIST reader (numpy only).
torchvision is used for a single thing, fetching the four files when none are on
disk and downloading is allowed (MNIST_DOWNLOAD), so torch stays out of every
run that has the data. Loading problems become one `DataError` whose message
says what to do, because a user who has not unpacked the dataset needs a
command, not a traceback.
"""

from __future__ import annotations

from pathlib import Path

from core.mnist import MNIST, RAW_FILES, MnistError, load, missing, raw_dir
from core.settings import Settings

__all__ = ["HOW_TO_FIX", "MNIST", "RAW_FILES", "DataError", "download_allowed", "load_mnist", "raw_dir"]

HOW_TO_FIX = (
    "unpack the four MNIST *-ubyte.gz files with `make data MNIST_FILES=dir` "
    "(the Makefile's default dir is ../shared/datasets/mnist), or allow torchvision to download them"
)


class DataError(Exception):
    """The dataset is missing or unreadable; the message tells the user what to run."""


def download_allowed() -> bool:
    """MNIST_DOWNLOAD=0 forbids torchvision's download (tests, offline machines)."""
    return Settings.from_env().mnist_download


def _download(data_dir: Path) -> None:
    """Fetch the four files into DATA_DIR/MNIST/raw/ with torchvision (its mirrors, its checksums)."""
    import torchvision  # the project's single torch entry point; imported late, and only to download

    # Either split downloads all four files; the test split is the smaller one to parse.
    torchvision.datasets.MNIST(root=str(data_dir), train=False, download=True)


def load_mnist(data_dir: Path | str, download: bool | None = None) -> MNIST:
    """Both splits of MNIST from DATA_DIR/MNIST/raw/, or a `DataError` saying how to get them.

    Only a missing file triggers a download; with all four files present (as `make data`
    leaves them) nothing touches the network, and a corrupt file is an error, not a re-download.
    """
    data_dir = Path(data_dir)
    raw = raw_dir(data_dir)
    if download is None:
        download = download_allowed()
    absent = missing(raw)
    if absent and not download:
        raise DataError(f"MNIST files missing in {raw}: {', '.join(absent)}; {HOW_TO_FIX}")
    try:
        if absent:
            _download(data_dir)
        return load(data_dir)
    except Exception as e:  # MnistError, OSError, and torchvision's RuntimeError, URLError...
        reason = str(e) if isinstance(e, MnistError) else " ".join(str(e).split())[:300]
        raise DataError(
            f"cannot load MNIST from {raw} ({reason or type(e).__name__}); {HOW_TO_FIX}"
        ) from None
