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
import math
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import TEMP_PREFIX, fsync_dir, write_synced
from core.names import VERSION_RE, check_name, parse_version
from core.network import Network, check_architecture

FORMAT = "mlp-npz/1"
WEIGHTS_FILE = "weights.npz"
METADATA_FILE = "model.json"
REPORT_FILE = "report.png"


class InvalidModel(Exception):
    """A version that must not be served; the message says why."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    path: Path
    net: Network
    metadata: dict[str, Any]


def list_versions(models_dir: Path | str, name: str) -> list[int]:
    """Integer-named folders under models/<name>/, ascending. Temp folders are not versions.

    An entry that cannot even be stat'ed (a symlink loop, a dangling mount) is
    listed too: it is a version its loader rejects with a reason, not a reason
    to stop listing the others."""
    root = Path(models_dir) / check_name(name)
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    return sorted(int(e.name) for e in entries if VERSION_RE.fullmatch(e.name) and _is_dir_or_broken(e))


def _is_dir_or_broken(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except FileNotFoundError:
        return False  # deleted while listing
    except OSError:
        return True


MAX_JSON_BYTES = 1 << 20  # model.json is a few kB; labels.json a few bytes
MAX_WEIGHTS_BYTES = 1 << 30  # a 784-1024-10 float32 network is 3 MB


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} overflows")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def read_file(path: Path, limit: int) -> bytes:
    """A repository file's bytes, or ValueError: only a regular file is read (a FIFO would
    block the scan for good), and at most `limit` bytes of it. OSError (missing, unreadable,
    a symlink loop) is left to the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is larger than {limit} bytes")
    return data


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A small JSON file of the repository, parsed, or ValueError saying what is wrong with it.

    Repository files are read by every worker on every scan, so a pathological
    one must cost little and fail cleanly: the read is bounded (`read_file`),
    nesting too deep for the parser, numbers that overflow to infinity and NaN
    are errors. OSError is left to the caller.
    """
    data = read_file(path, limit)
    try:
        return json.loads(data, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"{path.name} is nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError too
        raise ValueError(f"{path.name} is not valid JSON: {e}") from None


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


def recorded_accuracy(meta: dict[str, Any]) -> float | None:
    """The test accuracy a version's model.json records (`metrics.test_accuracy`, trainer/run.py),
    or None when there is none that means anything.

    The promotion gate, `python -m core.release`, `/models` and `make evaluate` all read it here,
    so they agree on what counts: a number in [0, 1]. A boolean (JSON `true` is an int to Python),
    NaN, an infinity or a percentage such as 99.2 is no accuracy, rather than one that passes or
    fails the gate by accident.
    """
    metrics = meta.get("metrics")
    value = metrics.get("test_accuracy") if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


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
        write_synced(tmp / WEIGHTS_FILE, weights)
        for fname, data in (extra_files or {}).items():
            write_synced(tmp / fname, data)
        # model.json last: its presence means the rest was written.
        write_synced(tmp / METADATA_FILE, json.dumps(meta, indent=2).encode())
        os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        while True:
            versions = list_versions(models_dir, name)
            version = (versions[-1] if versions else 0) + 1
            try:
                os.rename(tmp, root / str(version))
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise
            fsync_dir(root)
            return version
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_metadata(path: Path) -> dict[str, Any]:
    """A version folder's model.json, checked as far as it goes without the weights: the format,
    the architecture and the weights' checksum entry (InvalidModel otherwise). What a scan reads
    of every version; no reason names a path on the host."""
    try:
        meta = read_json(path / METADATA_FILE)
    except FileNotFoundError:
        raise InvalidModel(f"{METADATA_FILE} is missing (incomplete or not a model)") from None
    except OSError as e:
        raise InvalidModel(f"{METADATA_FILE} is unreadable: {e.strerror}") from None
    except ValueError as e:
        raise InvalidModel(str(e)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InvalidModel(f"unknown format {str(found)[:40]!r}")
    _architecture(meta)
    return meta


def _architecture(meta: dict[str, Any]) -> tuple[tuple[int, ...], tuple[str, ...], str]:
    try:
        arch = meta["architecture"]
        sizes = tuple(int(n) for n in arch["sizes"])
        activations = tuple(str(a) for a in arch["activations"])
        cost = str(arch["cost"])
        if not isinstance(meta["files"][WEIGHTS_FILE]["sha256"], str):
            raise TypeError("the sha256 of weights.npz must be a string")
        check_architecture(sizes, activations, cost)
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        message = f"{type(e).__name__}: {e}"[:200]
        raise InvalidModel(f"{METADATA_FILE} has a bad architecture or file list: {message}") from None
    return sizes, activations, cost


def load(models_dir: Path | str, name: str, version: int | str, verify: bool = True) -> LoadedModel:
    """Load and verify one version: checksum, architecture, array shapes, finiteness.

    `verify=False` skips the checksum, for a version whose files were verified
    before and have not changed since (service.versions remembers that)."""
    version = parse_version(version)
    path = Path(models_dir) / check_name(name) / str(version)
    meta = read_metadata(path)
    sizes, activations, cost = _architecture(meta)
    try:
        data = read_file(path / WEIGHTS_FILE, MAX_WEIGHTS_BYTES)
    except OSError as e:
        raise InvalidModel(f"{WEIGHTS_FILE} is unreadable: {e.strerror}") from None
    except ValueError as e:
        raise InvalidModel(str(e)) from None
    if verify:
        actual, expected = sha256_bytes(data), meta["files"][WEIGHTS_FILE]["sha256"]
        if actual != expected:
            raise InvalidModel(
                f"{WEIGHTS_FILE} sha256 {actual[:12]}… does not match model.json {expected[:12]}…"
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
