"""One model's versions on disk: what a scan learnt about each, their validation, and a cache.

A scan reads the `model.json` of each new or changed version (bounded:
`core.modelstore.read_json`), and validates in full (checksum, shapes, finite
weights, one inference) only what is about to be served, plus at most
BACKGROUND_CHECKS others; a pinned request validates its version when it asks.
So a worker boots in time proportional to the number of versions times one
small file read, not times their weights, and each verdict is remembered until
the version's files change.

Invalid, half-written, tampered or unreadable versions (whatever the
exception) are recorded with the reason and logged once; a request pinned to a
rejected version gets a 404. Loaded versions that are not live stay in a small
LRU cache, so clients cycling through pinned versions reuse them.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core import modelstore
from core.modelstore import InvalidModel, LoadedModel, recorded_accuracy
from core.network import probabilities
from core.preprocess import DTYPE, N_INPUTS
from service.errors import ApiError

log = logging.getLogger("service.models")  # one logger for a model's whole lifecycle
N_CLASSES = 10
# Versions validated per scan besides the ones served: the rest of a long history is
# checked in the background, a few each poll, newest first.
BACKGROUND_CHECKS = 8


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


def rejection_reason(e: Exception) -> str:
    """Why a file was refused, for logs and /models: never a path on the host."""
    if isinstance(e, OSError):
        return f"{type(e).__name__}: {e.strerror}"
    text = str(e) if isinstance(e, InvalidModel) else f"{type(e).__name__}: {e}"
    return text[:300]


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


class VersionStore:
    """The versions of one model: their verdicts, and loaded ones in an LRU cache.

    Not locked itself: its owner (service.models.ModelManager) holds its lock around every
    call. `serving()` names the live models, which are reused rather than loaded again;
    `on_reject(version, reason)` hears of each rejection."""

    def __init__(
        self,
        models_dir: Path,
        name: str,
        cache_size: int,
        serving: Callable[[], Iterable[LoadedModel]],
        on_reject: Callable[[int, str], None],
    ) -> None:
        self.models_dir = models_dir
        self.name = name
        self.cache_size = cache_size
        self.infos: dict[int, VersionInfo] = {}
        self.cache: OrderedDict[int, LoadedModel] = OrderedDict()
        self._serving = serving
        self._on_reject = on_reject

    @property
    def folder(self) -> str:
        """The model's folder as answers name it: relative to MODELS_DIR, no path on the host."""
        return f"MODELS_DIR/{self.name}"

    def _path(self, version: int) -> Path:
        return self.models_dir / self.name / str(version)

    def refresh(self) -> None:
        """Forget deleted versions and read new or changed ones' model.json; OSError if the
        model's folder cannot be listed."""
        on_disk = modelstore.list_versions(self.models_dir, self.name)
        present = set(on_disk)
        for v in list(self.infos):
            if v not in present:
                del self.infos[v]
                self.cache.pop(v, None)
        for v in on_disk:
            info = self.infos.get(v)
            if info is None or info.signature != _signature(self._path(v)):
                self._inspect(v)

    def accuracies(self) -> dict[int, float | None]:
        """The recorded accuracy of every version not rejected: what the promotion policy weighs."""
        return {v: recorded_accuracy(info.metadata) for v, info in self.infos.items() if info.valid}

    def pinned(self, version: int) -> LoadedModel:
        """A version a request pinned: from the cache, else validated now (404 if it cannot serve)."""
        model = self.cache.get(version)
        if model is not None:
            self.cache.move_to_end(version)
            return model
        info = self.infos.get(version)
        path = self._path(version)
        if info is None or info.signature != _signature(path):
            if not path.is_dir():
                raise ApiError(404, "version_not_found", f"model {self.name!r} has no version {version}")
            info = self._inspect(version)  # appeared or changed since the last scan
        model = self.validated(version) if info.valid else None
        if model is None:
            reason = self.infos[version].reason
            raise ApiError(404, "version_invalid", f"version {version} cannot be served: {reason}")
        return model

    def validated(self, version: int, remember: bool = True) -> LoadedModel | None:
        """A listed version's model, validated in full the first time; None, with the version
        rejected, if it cannot serve. A version validated before is loaded again without its
        checksum, its verdict being remembered with its files' signature; `remember=False`
        (background checks) leaves the cache as it is."""
        info = self.infos.get(version)
        if info is None or not info.valid:
            return None
        if info.checked:
            model = self.cache.get(version)
            for m in self._serving():
                if model is None and m.version == version:
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

    def check_in_background(self, limit: int = BACKGROUND_CHECKS) -> None:
        """Validate up to `limit` versions not validated yet, newest first, without caching them."""
        pending = [v for v, info in sorted(self.infos.items(), reverse=True) if not info.checked]
        for v in pending[:limit]:
            self.validated(v, remember=False)

    def _inspect(self, version: int) -> VersionInfo:
        """Read a new or changed version's model.json and record it: valid so far, or rejected
        with the reason. Its weights wait for `validated`."""
        path = self._path(version)
        signature = _signature(path)  # read first: a change during the read shows at the next scan
        self.cache.pop(version, None)
        try:
            meta = modelstore.read_metadata(path)
        except Exception as e:  # whatever is wrong with the files, it is this version's fault
            return self._reject(VersionInfo(version, signature, False), e)
        info = VersionInfo(version, signature, True, None, meta)
        self.infos[version] = info
        return info

    def _reject(self, info: VersionInfo, error: Exception) -> VersionInfo:
        info.valid, info.reason, info.checked = False, rejection_reason(error), True
        log.warning("model %s version %d rejected: %s", self.name, info.version, info.reason)
        self.cache.pop(info.version, None)
        self.infos[info.version] = info
        self._on_reject(info.version, info.reason)
        return info

    def _remember(self, model: LoadedModel) -> None:
        self.cache[model.version] = model
        self.cache.move_to_end(model.version)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
