"""The model repository: `models/<name>/<version>/`, as TensorFlow Serving lays it out.

A version folder holds `weights.npz` (plain arrays W1..WL, b1..bL), `model.json`
(architecture, preprocessing, hyperparameters, metrics, checksums) and
optionally `report.png`. Versions are immutable: a trainer writes into a
hidden temporary folder, fsyncs it, and renames it into place, so a reader
sees either a complete version or nothing, and a crash leaves only a
`.tmp-*` folder that no loader takes for a version.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.network import Network, check_architecture

FORMAT = "mlp-npz/1"
WEIGHTS_FILE = "weights.npz"
METADATA_FILE = "model.json"
REPORT_FILE = "report.png"
TEMP_PREFIX = ".tmp-"
# fullmatch, not match with `$`: `$` also matches before a final newline ("2\n").
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")


class InvalidModel(Exception):
    """A version that must not be served; the message says why."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    path: Path
    net: Network
    metadata: dict[str, Any]


def check_name(name: str) -> str:
    """Model names become path components, so only a safe alphabet is allowed."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.'")
    return name


def parse_version(text: str | int) -> int:
    """A version is a positive integer; anything else (e.g. '../x') is refused."""
    s = str(text)
    if not _VERSION_RE.fullmatch(s):
        raise ValueError(f"invalid version {text!r}: expected a positive integer")
    return int(s)


def list_versions(models_dir: Path | str, name: str) -> list[int]:
    """Integer-named folders under models/<name>/, ascending. Temp folders are not versions."""
    root = Path(models_dir) / check_name(name)
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    return sorted(int(e.name) for e in entries if _VERSION_RE.fullmatch(e.name) and e.is_dir())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_bytes(net: Network) -> bytes:
    """The network's parameters as an .npz of plain arrays (no pickle)."""
    arrays: dict[str, np.ndarray] = {}
    for i, (w, b) in enumerate(zip(net.weights, net.biases, strict=True), start=1):
        arrays[f"W{i}"] = np.ascontiguousarray(w)
        arrays[f"b{i}"] = np.ascontiguousarray(b)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def architecture(net: Network) -> dict[str, Any]:
    return {
        "sizes": list(net.sizes),
        "activations": list(net.activations),
        "cost": net.cost,
        "dtype": str(net.weights[0].dtype),
    }


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(
    models_dir: Path | str,
    name: str,
    net: Network,
    metadata: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
) -> int:
    """Write a new immutable version and return its number.

    The folder is complete and fsynced before it gets a version name. The
    rename fails if another trainer took that number first (the target then
    exists and is not empty), so concurrent publishers retry with the next
    number and never overwrite each other.
    """
    root = Path(models_dir) / check_name(name)
    root.mkdir(parents=True, exist_ok=True)
    weights = weights_bytes(net)
    meta = {
        "format": FORMAT,
        "name": name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **metadata,
        "architecture": architecture(net),
        "files": {WEIGHTS_FILE: {"sha256": sha256_bytes(weights), "bytes": len(weights)}},
    }
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))
    try:
        _write_synced(tmp / WEIGHTS_FILE, weights)
        for fname, data in (extra_files or {}).items():
            _write_synced(tmp / fname, data)
        # model.json last: its presence means the rest was written.
        _write_synced(tmp / METADATA_FILE, json.dumps(meta, indent=2).encode())
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        while True:
            versions = list_versions(models_dir, name)
            version = (versions[-1] if versions else 0) + 1
            try:
                os.rename(tmp, root / str(version))
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise
            _fsync_dir(root)
            return version
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(models_dir: Path | str, name: str, version: int | str) -> LoadedModel:
    """Load and verify one version: checksum, architecture, array shapes, finiteness."""
    version = parse_version(version)
    path = Path(models_dir) / check_name(name) / str(version)
    try:
        meta = json.loads((path / METADATA_FILE).read_bytes())
    except FileNotFoundError:
        raise InvalidModel(f"{METADATA_FILE} is missing (incomplete or not a model)") from None
    except (OSError, ValueError) as e:
        raise InvalidModel(f"{METADATA_FILE} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidModel(f"unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    try:
        arch = meta["architecture"]
        sizes = tuple(int(n) for n in arch["sizes"])
        activations = tuple(str(a) for a in arch["activations"])
        cost = str(arch["cost"])
        expected_sha = meta["files"][WEIGHTS_FILE]["sha256"]
        check_architecture(sizes, activations, cost)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidModel(f"{METADATA_FILE} has a bad architecture or file list: {e}") from None

    try:
        data = (path / WEIGHTS_FILE).read_bytes()
    except OSError as e:
        raise InvalidModel(f"{WEIGHTS_FILE} is unreadable: {e.strerror}") from None
    actual_sha = sha256_bytes(data)
    if actual_sha != expected_sha:
        raise InvalidModel(
            f"{WEIGHTS_FILE} sha256 {actual_sha[:12]}… does not match model.json {str(expected_sha)[:12]}…"
        )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:
        raise InvalidModel(f"{WEIGHTS_FILE} is not a valid npz: {e}") from None

    weights, biases = [], []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes), start=1):
        for key, shape, out in ((f"W{i}", (n_out, n_in), weights), (f"b{i}", (n_out, 1), biases)):
            arr = arrays.get(key)
            if arr is None:
                raise InvalidModel(f"{WEIGHTS_FILE} has no array {key}")
            if arr.shape != shape:
                raise InvalidModel(f"{key} has shape {arr.shape}, architecture needs {shape}")
            if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
                raise InvalidModel(f"{key} is not a finite float array")
            out.append(arr)
    if len(arrays) != 2 * (len(sizes) - 1):
        raise InvalidModel(f"{WEIGHTS_FILE} has unexpected arrays {sorted(arrays)}")
    net = Network(sizes, activations, cost, tuple(weights), tuple(biases))
    return LoadedModel(name, version, path, net, meta)
