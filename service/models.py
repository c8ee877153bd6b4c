"""Which model version each worker serves, and how it changes without failing a request.

The manager scans `MODELS_DIR/<name>/` (at start, then every
`MODEL_POLL_SECONDS` from a thread in each worker process), validates every
new or changed version once (checksum, shapes, finite weights, one
inference), and only then swaps the single `_current` reference. A request
reads that reference once and uses the model it got to the end, so a swap
never fails or mixes a request, and deleting a served version's folder
changes nothing for requests: its arrays are in memory.

Invalid, half-written or tampered versions are recorded with the reason and
logged once; the last good model keeps serving.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core import modelstore
from core.modelstore import InvalidModel, LoadedModel
from core.network import probabilities
from core.preprocess import DTYPE, N_INPUTS
from service.errors import ApiError

log = logging.getLogger(__name__)
N_CLASSES = 10
Listener = Callable[..., None]


@dataclass
class VersionInfo:
    """What a scan learnt about one version folder."""

    version: int
    signature: tuple
    valid: bool
    reason: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _signature(path: Path) -> tuple:
    """Names, sizes and mtimes of a version's files: changes when anything is rewritten."""
    try:
        st = path.stat()
        entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path))
    except OSError:
        return ()
    return (st.st_ino, st.st_mtime_ns, tuple(entries))


def _read_metadata(path: Path) -> dict[str, Any]:
    """model.json for display, even for a rejected version; {} when unreadable."""
    try:
        meta = json.loads((path / modelstore.METADATA_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def validate(models_dir: Path, name: str, version: int) -> LoadedModel:
    """Load a version and prove it can serve: the store's checks plus one inference."""
    model = modelstore.load(models_dir, name, version)
    sizes = model.net.sizes
    if sizes[0] != N_INPUTS or sizes[-1] != N_CLASSES:
        raise InvalidModel(f"network maps {sizes[0]} inputs to {sizes[-1]} outputs, need {N_INPUTS} -> 10")
    p = probabilities(model.net, np.zeros((1, N_INPUTS), DTYPE))
    if p.shape != (1, N_CLASSES) or not np.all(np.isfinite(p)) or abs(float(p.sum()) - 1.0) > 1e-3:
        raise InvalidModel(f"test inference gave {p.shape} output that is not a probability vector")
    return model


class ModelManager:
    """The served version of one model, plus on-demand access to pinned versions."""

    def __init__(
        self,
        models_dir: Path | str,
        name: str,
        pinned: int | None = None,
        poll_seconds: float = 5.0,
        cache_size: int = 4,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.name = modelstore.check_name(name)
        self.pinned = pinned
        self.poll_seconds = poll_seconds
        self.cache_size = cache_size
        self._current: LoadedModel | None = None
        self._current_deleted = False
        self._versions: dict[int, VersionInfo] = {}
        self._cache: OrderedDict[int, LoadedModel] = OrderedDict()
        self._listeners: list[Listener] = []
        self._lock = threading.RLock()
        self._last_scan: str | None = None
        self._scan_error: str | None = None
        self._poller_pid: int | None = None
        self._stop = threading.Event()

    # --- reading -------------------------------------------------------------

    def current(self) -> LoadedModel | None:
        return self._current

    def get(self, version: int | None = None) -> LoadedModel:
        """The model for a request: the served one, or a pinned `version` (404 if not servable)."""
        current = self._current
        if version is None or (current is not None and current.version == version):
            if current is None:
                raise ApiError(503, "no_model", self.unready_reason())
            return current
        with self._lock:
            model = self._cache.get(version)
            if model is not None:
                self._cache.move_to_end(version)
                return model
            info = self._versions.get(version)
            path = self.models_dir / self.name / str(version)
            if info is None or info.signature != _signature(path):
                if not path.is_dir():
                    raise ApiError(404, "version_not_found", f"model {self.name!r} has no version {version}")
                info = self._check(version)  # appeared or changed since the last scan
            if not info.valid:
                raise ApiError(404, "version_invalid", f"version {version} cannot be served: {info.reason}")
            model = self._cache.get(version)
            if model is None:
                try:
                    model = validate(self.models_dir, self.name, version)
                except (InvalidModel, ValueError) as e:
                    message = f"version {version} cannot be served: {e}"
                    raise ApiError(404, "version_invalid", message) from None
                self._remember(model)
            return model

    def unready_reason(self) -> str:
        if self._current is not None:
            return ""
        if self._scan_error:
            return self._scan_error
        if self.pinned is not None:
            info = self._versions.get(self.pinned)
            if info is None:
                return f"MODEL_VERSION={self.pinned} is not in {self.models_dir / self.name}"
            return f"MODEL_VERSION={self.pinned} is invalid: {info.reason}"
        if not self._versions:
            return f"no model versions in {self.models_dir / self.name}"
        return f"no valid version of {self.name!r}: every one was rejected (see /models)"

    def status(self) -> dict[str, Any]:
        """Every version on disk with its metadata; which is served; why others are not."""
        current = self._current
        versions = []
        for v, info in sorted(self._versions.items()):
            if not info.valid:
                versions.append(_version_entry(v, info.metadata, "rejected", info.reason))
                continue
            state = "serving" if current and current.version == v else "available"
            versions.append(_version_entry(v, info.metadata, state, None))
        if current is not None and current.version not in self._versions:
            reason = "deleted from the repository; still served from memory"
            versions.append(_version_entry(current.version, current.metadata, "serving", reason))
        return {
            "name": self.name,
            "serving": current.version if current else None,
            "pinned": self.pinned,
            "ready": current is not None,
            "reason": None if current else self.unready_reason(),
            "poll_seconds": self.poll_seconds,
            "last_scan": self._last_scan,
            "versions": versions,
        }

    # --- events ----------------------------------------------------------------

    def add_listener(self, fn: Listener) -> None:
        """fn("loaded", version=N) on each swap; fn("rejected", version=N, reason=...) on each skip."""
        self._listeners.append(fn)

    def _emit(self, event: str, **info: Any) -> None:
        for fn in list(self._listeners):
            try:
                fn(event, **info)
            except Exception:
                log.exception("model listener failed on %s %s", event, info)

    # --- scanning --------------------------------------------------------------

    def _check(self, version: int) -> VersionInfo:
        """Validate one version folder (caller holds the lock) and record the verdict."""
        path = self.models_dir / self.name / str(version)
        signature = _signature(path)
        try:
            model = validate(self.models_dir, self.name, version)
        except (InvalidModel, ValueError) as e:
            info = VersionInfo(version, signature, False, str(e), _read_metadata(path))
            log.warning("model %s version %d rejected: %s", self.name, version, e)
            self._cache.pop(version, None)
            self._versions[version] = info
            self._emit("rejected", version=version, reason=str(e))
            return info
        # Signature read before loading: a change during the load shows up at the next scan.
        info = VersionInfo(version, signature, True, None, model.metadata)
        self._versions[version] = info
        self._remember(model)
        return info

    def _remember(self, model: LoadedModel) -> None:
        self._cache[model.version] = model
        self._cache.move_to_end(model.version)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def scan(self) -> None:
        """Look at the repository once; swap the served model if a better valid one is there."""
        with self._lock:
            try:
                on_disk = modelstore.list_versions(self.models_dir, self.name)
                self._scan_error = None
            except OSError as e:
                self._scan_error = f"cannot list {self.models_dir / self.name}: {e.strerror}"
                log.warning(self._scan_error)
                return
            for v in list(self._versions):
                if v not in on_disk:
                    del self._versions[v]
                    self._cache.pop(v, None)
            for v in on_disk:
                info = self._versions.get(v)
                if info is None or info.signature != _signature(self.models_dir / self.name / str(v)):
                    self._check(v)
            self._last_scan = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            valid = [v for v, info in self._versions.items() if info.valid]
            if self.pinned is not None:
                target = self.pinned if self.pinned in valid else None
            else:
                target = max(valid, default=None)
            current = self._current
            if target is None or (current is not None and current.version == target):
                return  # keep the last good model (if any)
            model = self._cache.get(target)
            if model is None:
                try:
                    model = validate(self.models_dir, self.name, target)
                except (InvalidModel, ValueError) as e:
                    log.warning("model %s version %d failed to reload: %s", self.name, target, e)
                    return
                self._remember(model)
            self._current = model  # the one atomic swap
            log.info("serving model %s version %d", self.name, target)
            self._emit("loaded", version=target)

    # --- polling ---------------------------------------------------------------

    def ensure_polling(self) -> None:
        """Start this process's poller if it has none: threads do not survive gunicorn's fork."""
        pid = os.getpid()
        if self._poller_pid == pid or self.poll_seconds <= 0:
            return
        with self._lock:
            if self._poller_pid == pid:
                return
            self._poller_pid = pid
            self._stop = threading.Event()
            # Scan now, not only from the thread: a worker that has been idle since it
            # booted must not answer its first request with the model it booted with.
            self._scan_logged()
            threading.Thread(target=self._poll, name="model-poller", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _scan_logged(self) -> None:
        try:
            self.scan()
        except Exception:  # the poller must outlive any surprise in the repository
            log.exception("model scan failed")

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self._scan_logged()


def _version_entry(version: int, metadata: dict[str, Any], state: str, reason: str | None) -> dict[str, Any]:
    """One version as /models lists it; the checksums of its files are left out."""
    meta = {k: v for k, v in metadata.items() if k != "files"}
    entry: dict[str, Any] = {
        "version": version,
        "state": state,
        "accuracy": _accuracy(meta),
        "created": meta.get("created"),
        "architecture": meta.get("architecture"),
    }
    if reason is not None:
        entry["reason"] = reason
    entry["metadata"] = meta
    return entry


def _accuracy(meta: dict[str, Any]) -> float | None:
    """The test accuracy, where the trainer records it: `metrics.test_accuracy` (trainer/run.py)."""
    metrics = meta.get("metrics")
    value = metrics.get("test_accuracy") if isinstance(metrics, dict) else None
    return value if isinstance(value, int | float) else None
