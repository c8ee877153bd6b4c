"""Which model version each worker serves, and how it changes without failing a request.

The manager scans `MODELS_DIR/<name>/` (at start, then every
`MODEL_POLL_SECONDS` from a thread in each worker process). A scan reads the
`model.json` of each new or changed version (bounded: `core.modelstore.read_json`),
and validates in full (checksum, shapes, finite weights, one inference)
only what it is about to serve, plus at most BACKGROUND_CHECKS others; a
pinned request validates its version when it asks. So a worker boots in
time proportional to the number of versions times one small file read, not
times their weights, and each verdict is remembered until the version's
files change. Only a validated version is swapped into the single `_live`
reference. A request reads that reference once and uses the model it got to
the end, so a swap never fails or mixes a request, and deleting a served
version's folder changes nothing for requests: its arrays are in memory.

Invalid, half-written, tampered or unreadable versions (whatever the
exception) are recorded with the reason and logged once; the other versions,
the labels and the last good model keep working, and a request pinned to a
rejected version gets a 404.

Which valid version is live is the promotion policy's call (`core.promotion`,
PROMOTION), made from the versions' recorded accuracies and the model's
`labels.json` (`core.labels`), which every scan re-reads. A canary, when the
labels set one, answers its share of unpinned requests. The live pair
(stable, canary) is one tuple swapped in one assignment, so a request never
sees a stable from one decision and a canary from another.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core import labels as labels_file
from core import modelstore, promotion
from core.labels import InvalidLabels, Labels
from core.modelstore import InvalidModel, LoadedModel
from core.network import probabilities
from core.preprocess import DTYPE, N_INPUTS
from service.errors import ApiError
from service.poller import Poller

log = logging.getLogger(__name__)
N_CLASSES = 10
# Versions validated per scan besides the ones served: the rest of a long history is
# checked in the background, a few each poll, newest first.
BACKGROUND_CHECKS = 8
Listener = Callable[..., None]


@dataclass
class VersionInfo:
    """What a scan learnt about one version folder."""

    version: int
    signature: tuple
    valid: bool  # not rejected (so far: see `checked`)
    reason: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    checked: bool = False  # validated in full, with these files


def _signature(path: Path) -> tuple:
    """Names, sizes and mtimes of a version's files: changes when anything is rewritten."""
    try:
        st = path.stat()
        entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path))
    except OSError:
        return ()
    return (st.st_ino, st.st_mtime_ns, tuple(entries))


def _reason(e: Exception) -> str:
    """Why a version was rejected, for logs and /models: never a path on the host."""
    if isinstance(e, OSError):
        return f"{type(e).__name__}: {e.strerror}"
    text = str(e) if isinstance(e, InvalidModel) else f"{type(e).__name__}: {e}"
    return text[:300]


@dataclass(frozen=True)
class Live:
    """What answers unpinned requests: stable, and a canary taking `canary_percent` of them."""

    stable: LoadedModel
    canary: LoadedModel | None = None
    canary_percent: float = 0.0
    held: tuple[tuple[int, str], ...] = ()


def validate(models_dir: Path, name: str, version: int, verify: bool = True) -> LoadedModel:
    """Load a version and prove it can serve: the store's checks plus one inference.
    `verify=False` skips the checksum of files validated before (modelstore.load)."""
    model = modelstore.load(models_dir, name, version, verify=verify)
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
        policy: str = "gate",
        min_accuracy: float = 0.98,
        tolerance: float = 0.001,
        rng: random.Random | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.name = modelstore.check_name(name)
        self.pinned = pinned
        self.poll_seconds = poll_seconds
        self.cache_size = cache_size
        if policy not in promotion.POLICIES:
            raise ValueError(f"unknown promotion policy {policy!r}; use one of {promotion.POLICIES}")
        self.policy = policy
        self.min_accuracy = min_accuracy
        self.tolerance = tolerance
        self._random = rng or random.Random()
        self._live: Live | None = None
        self._labels = Labels()
        self._labels_error: str | None = None
        self._current_deleted = False
        self._versions: dict[int, VersionInfo] = {}
        self._cache: OrderedDict[int, LoadedModel] = OrderedDict()
        self._listeners: list[Listener] = []
        self._lock = threading.RLock()
        self._last_scan: str | None = None
        self._scan_error: str | None = None
        self._poller = Poller(self.scan, poll_seconds, f"model {self.name}")

    # --- reading -------------------------------------------------------------

    @property
    def _current(self) -> LoadedModel | None:
        live = self._live
        return live.stable if live else None

    def current(self) -> LoadedModel | None:
        """The stable version (what /readyz reports); a canary may answer some requests."""
        return self._current

    def live(self) -> Live | None:
        return self._live

    def get(self, version: int | None = None, label: str | None = None) -> LoadedModel:
        """The model for a request: a pinned `version` (404 if not servable), a pinned `label`,
        or, unpinned, the stable version or (for its share of requests) the canary."""
        live = self._live  # read once: one request, one decision
        if label is not None:
            return self._by_label(live, label)
        if version is None:
            if live is None:
                raise ApiError(503, "no_model", self.unready_reason())
            if live.canary is not None and self._random.random() * 100 < live.canary_percent:
                return live.canary
            return live.stable
        for model in (live.stable, live.canary) if live else ():
            if model is not None and model.version == version:
                return model  # pinned to a live version: no split
        with self._lock:
            model = self._cache.get(version)
            if model is not None:
                self._cache.move_to_end(version)
                return model
            info = self._versions.get(version)
            path = self._path(version)
            if info is None or info.signature != _signature(path):
                if not path.is_dir():
                    raise ApiError(404, "version_not_found", f"model {self.name!r} has no version {version}")
                info = self._inspect(version)  # appeared or changed since the last scan
            model = self._validated(version) if info.valid else None
            if model is None:
                reason = self._versions[version].reason
                raise ApiError(404, "version_invalid", f"version {version} cannot be served: {reason}")
            return model

    def _by_label(self, live: Live | None, label: str) -> LoadedModel:
        if label not in labels_file.LABELS:
            raise ApiError(
                400, "invalid_label", f"label must be one of {list(labels_file.LABELS)}, got {label!r}"
            )
        if live is None:
            raise ApiError(503, "no_model", self.unready_reason())
        if label == "stable":
            return live.stable
        if live.canary is None:
            raise ApiError(409, "no_canary", f"model {self.name!r} has no canary set (make canary VERSION=N)")
        return live.canary

    def unready_reason(self) -> str:
        if self._current is not None:
            return ""
        if self._scan_error:
            return self._scan_error
        if self.pinned is not None:
            info = self._versions.get(self.pinned)
            if info is None:
                return f"MODEL_VERSION={self.pinned} is not in {self._folder}"
            return f"MODEL_VERSION={self.pinned} is invalid: {info.reason}"
        if not self._versions:
            return f"no model versions in {self._folder}"
        return f"no valid version of {self.name!r}: every one was rejected (see /models)"

    def status(self) -> dict[str, Any]:
        """Every version on disk with its metadata; which is served; why others are not."""
        live = self._live
        current = live.stable if live else None
        canary = live.canary if live else None
        held = dict(live.held) if live else {}
        versions = []
        for v, info in sorted(self._versions.items()):
            if not info.valid:
                versions.append(_version_entry(v, info.metadata, "rejected", info.reason))
                continue
            if current and current.version == v:
                state, reason = "serving", None
            elif canary and canary.version == v:
                state, reason = "canary", None
            elif v in held:
                state, reason = "held", held[v]
            else:
                state, reason = "available", None
            versions.append(_version_entry(v, info.metadata, state, reason))
        if current is not None and current.version not in self._versions:
            reason = "deleted from the repository; still served from memory"
            versions.append(_version_entry(current.version, current.metadata, "serving", reason))
        return {
            "name": self.name,
            "serving": current.version if current else None,
            "pinned": self.pinned,
            "canary": canary.version if canary else None,
            "canary_percent": live.canary_percent if canary and live else 0.0,
            "policy": self.policy,
            "labels": self._labels.to_json(),
            "labels_error": self._labels_error,
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

    @property
    def _folder(self) -> str:
        """The model's folder as answers name it: relative to MODELS_DIR, no path on the host."""
        return f"MODELS_DIR/{self.name}"

    def _path(self, version: int) -> Path:
        return self.models_dir / self.name / str(version)

    def _inspect(self, version: int) -> VersionInfo:
        """Read a new or changed version's model.json (caller holds the lock) and record it:
        valid so far, or rejected with the reason. Its weights wait for `_validated`."""
        path = self._path(version)
        signature = _signature(path)  # read first: a change during the read shows at the next scan
        self._cache.pop(version, None)
        try:
            meta = modelstore.read_metadata(path)
        except Exception as e:  # whatever is wrong with the files, it is this version's fault
            return self._reject(VersionInfo(version, signature, False), e)
        info = VersionInfo(version, signature, True, None, meta)
        self._versions[version] = info
        return info

    def _reject(self, info: VersionInfo, error: Exception) -> VersionInfo:
        info.valid, info.reason, info.checked = False, _reason(error), True
        log.warning("model %s version %d rejected: %s", self.name, info.version, info.reason)
        self._cache.pop(info.version, None)
        self._versions[info.version] = info
        self._emit("rejected", version=info.version, reason=info.reason)
        return info

    def _validated(self, version: int, remember: bool = True) -> LoadedModel | None:
        """A listed version's model, validated in full the first time (caller holds the lock);
        None, with the version rejected, if it cannot serve. A version validated before is
        loaded again without its checksum, its verdict being remembered with its files'
        signature; `remember=False` (background checks) leaves the cache as it is."""
        info = self._versions.get(version)
        if info is None or not info.valid:
            return None
        if info.checked:
            model = self._cache.get(version)
            live = self._live
            for m in (live.stable, live.canary) if live else ():
                if model is None and m is not None and m.version == version:
                    model = m
            if model is not None:
                return model
        try:
            model = validate(self.models_dir, self.name, version, verify=not info.checked)
        except Exception as e:  # any exception: the version is rejected, the others go on
            self._reject(info, e)
            return None
        info.checked = True
        if remember:
            self._remember(model)
        return model

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
                self._scan_error = f"cannot list {self._folder}: {e.strerror}"
                log.warning(self._scan_error)
                return
            present = set(on_disk)
            for v in list(self._versions):
                if v not in present:
                    del self._versions[v]
                    self._cache.pop(v, None)
            for v in on_disk:
                info = self._versions.get(v)
                if info is None or info.signature != _signature(self._path(v)):
                    self._inspect(v)
            self._last_scan = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self._read_labels()
            live = self._choose()
            if live is not None:
                self._swap(live)
            self._check_in_background(BACKGROUND_CHECKS)

    def _choose(self) -> Live | None:
        """The policy's decision, its versions validated; a version that fails is rejected and
        the policy asked again, so this ends after at most one round per version. None: keep
        the last good model (if any)."""
        for _ in range(len(self._versions) + 1):
            decision = self._decide()
            if decision.stable is None:
                return None
            stable = self._validated(decision.stable)
            if stable is None:
                continue
            canary = None
            if decision.canary is not None:
                canary = self._validated(decision.canary)
                if canary is None:
                    continue
            percent = decision.canary_percent if canary else 0.0
            return Live(stable, canary, percent, tuple(decision.held.items()))
        return None

    def _swap(self, live: Live) -> None:
        current = self._current
        old = self._live
        self._live = live  # the one atomic swap
        stable, canary = live.stable, live.canary
        if current is None or current.version != stable.version:
            log.info("serving model %s version %d", self.name, stable.version)
            self._emit("loaded", version=stable.version)
        old_canary = old.canary.version if old and old.canary else None
        if (canary.version if canary else None) != old_canary:
            if canary:
                log.info("model %s canary version %d at %g%%", self.name, canary.version, live.canary_percent)
            else:
                log.info("model %s has no canary", self.name)

    def _check_in_background(self, limit: int) -> None:
        """Validate up to `limit` versions not validated yet, newest first, without caching them."""
        pending = [v for v, info in sorted(self._versions.items(), reverse=True) if not info.checked]
        for v in pending[:limit]:
            self._validated(v, remember=False)

    def _read_labels(self) -> None:
        """Re-read labels.json; a broken file is logged once and the last good labels stay."""
        try:
            self._labels = labels_file.read(self.models_dir, self.name)
        except Exception as e:  # InvalidLabels, or any surprise: the labels' fault, not the model's
            reason = str(e) if isinstance(e, InvalidLabels) else _reason(e)
            if reason != self._labels_error:
                log.warning("model %s: ignoring %s: %s", self.name, labels_file.LABELS_FILE, reason)
            self._labels_error = reason
            return
        self._labels_error = None

    def _decide(self) -> promotion.Decision:
        valid = {v: _accuracy(info.metadata) for v, info in self._versions.items() if info.valid}
        if self.pinned is not None:  # MODEL_VERSION stands above labels and policy
            return promotion.Decision(self.pinned if self.pinned in valid else None)
        return promotion.decide(valid, self._labels, self.policy, self.min_accuracy, self.tolerance)

    # --- polling ---------------------------------------------------------------

    def ensure_polling(self) -> None:
        """Start this process's poller (service.poller) if it has none."""
        self._poller.ensure()

    def stop(self) -> None:
        self._poller.stop()


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
    """The test accuracy, where the trainer records it; one reading for the whole project."""
    return modelstore.recorded_accuracy(meta)
