"""MNIST from its four IDX files, plain or gzipped: the project's one reader of the dataset.

The trainer, the tests, the benchmarks and `make data` all read MNIST here, so
they agree on what a valid file is and see the same arrays. The reader needs
numpy only (no torch), so the service's image and the tests can use it.

An IDX file is a 4-byte magic number (two zero bytes, a type code, 0x08 for
unsigned bytes, and the rank), one big-endian uint32 per dimension, then the
values. Everything is checked: the magic number, the type, the rank and the
shape each file must have, that the data is exactly as long as the header says,
that images and labels pair up and that every label is a digit.

    python -m core.mnist unpack SOURCE DATA_DIR

checks the four `*-ubyte.gz` files in SOURCE and unpacks them into
DATA_DIR/MNIST/raw/ (what `make data` runs), each atomically, so an interrupted
unpack never leaves a truncated file under a final name.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.atomic import write_atomic

# The four files, by the arrays they hold. torchvision's layout, DATA_DIR/MNIST/raw/, is kept
# so that data unpacked (or downloaded) before this reader existed still loads.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
RAW_FILES = tuple(FILES.values())
IMAGE_SIDE = 28
_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


class MnistError(ValueError):
    """A file is missing, is not an IDX file, or does not hold what MNIST holds; the message says which."""


@dataclass(frozen=True)
class MNIST:
    """Raw images (m, 28, 28) uint8 and labels (m,) int64, plus the sha256 of each file's IDX bytes
    (after decompression, so a `.gz` and its unpacked copy record the same dataset)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    files: dict[str, str]  # raw file name -> sha256


def raw_dir(data_dir: Path | str) -> Path:
    """Where the files live: DATA_DIR/MNIST/raw/."""
    return Path(data_dir) / "MNIST" / "raw"


def find(folder: Path | str, name: str) -> Path | None:
    """`name` in `folder`, unpacked or as `name.gz` (the unpacked file first), or None."""
    for candidate in (Path(folder) / name, Path(folder) / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def missing(folder: Path | str) -> list[str]:
    """The raw files that are in `folder` neither unpacked nor gzipped."""
    return [name for name in RAW_FILES if find(folder, name) is None]


def _bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == _GZIP_MAGIC:  # by content, not by name: a renamed file still reads
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise MnistError(f"{path.name}: broken gzip data ({e})") from None
    return data


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """An IDX file's bytes as a uint8 array of the shape its header declares (a read-only view)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise MnistError(f"{name}: not an IDX file (bad magic number)")
    if data[2] != _UBYTE:
        raise MnistError(f"{name}: IDX type 0x{data[2]:02x}, expected 0x08 (unsigned bytes)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise MnistError(f"{name}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise MnistError(f"{name}: {len(data)} bytes, the header {shape} says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: Path | str) -> np.ndarray:
    """One IDX file, plain or gzipped, as a uint8 array; MnistError if it is not a valid IDX file."""
    path = Path(path)
    return parse_idx(_bytes(path), path.name)


def _check(kind: str, a: np.ndarray) -> np.ndarray:
    if kind.endswith("images"):
        if a.ndim != 3 or a.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or len(a) == 0:
            raise MnistError(f"{FILES[kind]}: images of shape {a.shape}, expected (m, 28, 28)")
        return a
    if a.ndim != 1 or len(a) == 0:
        raise MnistError(f"{FILES[kind]}: labels of shape {a.shape}, expected (m,)")
    if a.max() > 9:
        raise MnistError(f"{FILES[kind]}: labels outside 0..9")
    return a.astype(np.int64)


def read(data_dir: Path | str, kind: str) -> np.ndarray:
    """One of the four arrays (`kind` a key of FILES) from DATA_DIR/MNIST/raw/, checked:
    images (m, 28, 28) uint8, labels (m,) int64 in 0..9."""
    raw = raw_dir(data_dir)
    path = find(raw, FILES[kind])
    if path is None:
        raise MnistError(f"MNIST file missing in {raw}: {FILES[kind]}")
    return _check(kind, read_idx(path))


def load(data_dir: Path | str) -> MNIST:
    """Both splits of MNIST from DATA_DIR/MNIST/raw/ (plain or `.gz` files), checked, or MnistError.

    The arrays are writable copies in the files' order: the same bytes torchvision returned,
    so a training run is reproducible across the change of reader.
    """
    raw = raw_dir(data_dir)
    absent = missing(raw)
    if absent:
        raise MnistError(f"MNIST files missing in {raw}: {', '.join(absent)}")
    arrays: dict[str, np.ndarray] = {}
    files: dict[str, str] = {}
    for kind, name in FILES.items():
        path = find(raw, name)
        assert path is not None  # checked above
        data = _bytes(path)
        files[name] = hashlib.sha256(data).hexdigest()
        arrays[kind] = _check(kind, parse_idx(data, name)).copy()
    for split in ("train", "test"):
        n_images, n_labels = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_images != n_labels:
            raise MnistError(f"{split}: {n_images} images but {n_labels} labels")
    return MNIST(**arrays, files=files)


def unpack(source: Path | str, data_dir: Path | str) -> Path:
    """Check the four files in `source` (`*-ubyte.gz` or unpacked) and write them unpacked into
    DATA_DIR/MNIST/raw/, the layout every reader (and torchvision) knows; returns that folder."""
    source, raw = Path(source), raw_dir(data_dir)
    absent = missing(source)
    if absent:
        raise MnistError(f"MNIST files missing in {source}: {', '.join(absent)}")
    raw.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        path = find(source, name)
        assert path is not None  # checked above
        data = _bytes(path)
        parse_idx(data, name)  # a corrupt download is refused here, not at training time
        write_atomic(raw / name, data)
    load(data_dir)  # and the four together: shapes, pairing and labels
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.mnist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("unpack", help="check SOURCE's four files and unpack them into DATA_DIR/MNIST/raw/")
    p.add_argument("source", type=Path)
    p.add_argument("data_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        raw = unpack(args.source, args.data_dir)
    except (MnistError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"MNIST unpacked into {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
