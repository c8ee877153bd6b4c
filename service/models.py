"""Which model version each worker serves, and how it changes without failing a request.

`ModelManager` ties together one model's parts, each in its own module:

    service.versions      the versions on disk, their validation, the LRU cache of loaded ones
    service.live          the live set (stable, canary) chosen from labels, policy and MODEL_VERSION
    service.model_status  the status /models shows

A scan (at start, then every MODEL_POLL_SECONDS from the registry's poller in
each worker, service.registry) re-reads the repository and the labels, and
swaps in the new live set only once its versions are validated. A request reads
the single `_live` reference once and uses the model it got to the end, so a
swap never fails or mixes a request, and deleting a served version's folder
changes nothing for requests: its arrays are in memory. Invalid versions,
broken labels and an unreadable repository leave the last good model serving.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import modelstore, promotion
from core.modelstore import LoadedModel
from service.errors import ApiError
from service.live import Live, LiveChoice, check_label
from service.model_status import render_status
from service.versions import VersionStore

log = logging.getLogger(__name__)
Listener = Callable[..., None]


class ModelManager:
    """The served version of one model, plus on-demand access to pinned versions."""

    def __init__(
        self,
        models_dir: Path | str,
        name: str,
        pinned: int | None = None,
        poll_seconds: float = 5.0,
        cache_size: int = 4,
        policy: str = promotion.DEFAULT_POLICY,
        min_accuracy: float = promotion.DEFAULT_MIN_ACCURACY,
        tolerance: float = promotion.DEFAULT_TOLERANCE,
        rng: random.Random | None = None,
    ) -> None:
        models_dir = Path(models_dir)
        self.name = modelstore.check_name(name)
        self.poll_seconds = poll_seconds  # the registry polls; /models reports the interval
        self.choice = LiveChoice(models_dir, self.name, pinned, policy, min_accuracy, tolerance)
        self.versions = VersionStore(models_dir, self.name, cache_size, self._serving, self._rejected)
        self.last_scan: str | None = None
        self._random = rng or random.Random()
        self._live: Live | None = None
        self._scan_error: str | None = None
        self._listeners: list[Listener] = []
        self._lock = threading.RLock()

    # --- reading -------------------------------------------------------------

    def current(self) -> LoadedModel | None:
        """The stable version (what /readyz reports); a canary may answer some requests."""
        live = self._live
        return live.stable if live else None

    def live(self) -> Live | None:
        return self._live

    def get(self, version: int | None = None, label: str | None = None) -> LoadedModel:
        """The model for a request: a pinned `version` (404 if not servable), a pinned `label`,
        or, unpinned, the stable version or (for its share of requests) the canary."""
        live = self._live  # read once: one request, one decision
        if label is not None:
            check_label(label)
            if live is None:
                raise ApiError(503, "no_model", self.unready_reason())
            return live.labelled(label, self.name)
        if version is None:
            if live is None:
                raise ApiError(503, "no_model", self.unready_reason())
            return live.pick(self._random)
        for model in live.models() if live else ():
            if model.version == version:
                return model  # pinned to a live version: no split
        with self._lock:
            return self.versions.pinned(version)

    def servable_versions(self) -> list[int]:
        """Every version a client may pin: the ones not rejected, and the stable one (which may
        have left the disk but is still served from memory)."""
        live = self._live
        valid = {v for v, info in list(self.versions.infos.items()) if info.valid}
        if live is not None:
            valid.add(live.stable.version)
        return sorted(valid)

    def unready_reason(self) -> str:
        if self._live is not None:
            return ""
        if self._scan_error:
            return self._scan_error
        pinned, infos, folder = self.choice.pinned, self.versions.infos, self.versions.folder
        if pinned is not None:
            info = infos.get(pinned)
            if info is None:
                return f"MODEL_VERSION={pinned} is not in {folder}"
            return f"MODEL_VERSION={pinned} is invalid: {info.reason}"
        if not infos:
            return f"no model versions in {folder}"
        return f"no valid version of {self.name!r}: every one was rejected (see /models)"

    def status(self) -> dict[str, Any]:
        """Every version on disk with its metadata; which is served; why others are not."""
        return render_status(self)

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

    def _rejected(self, version: int, reason: str) -> None:
        self._emit("rejected", version=version, reason=reason)

    def _serving(self) -> tuple[LoadedModel, ...]:
        live = self._live
        return live.models() if live else ()

    # --- scanning --------------------------------------------------------------

    def scan(self) -> None:
        """Look at the repository once; swap the served model if a better valid one is there."""
        with self._lock:
            try:
                self.versions.refresh()
                self._scan_error = None
            except OSError as e:
                self._scan_error = f"cannot list {self.versions.folder}: {e.strerror}"
                log.warning(self._scan_error)
                return
            self.last_scan = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self.choice.read_labels()
            live = self.choice.choose(self.versions)
            if live is not None:
                self._swap(live)
            self.versions.check_in_background()

    def _swap(self, live: Live) -> None:
        old = self._live
        self._live = live  # the one atomic swap
        stable, canary = live.stable, live.canary
        if old is None or old.stable.version != stable.version:
            log.info("serving model %s version %d", self.name, stable.version)
            self._emit("loaded", version=stable.version)
        old_canary = old.canary.version if old and old.canary else None
        if (canary.version if canary else None) != old_canary:
            if canary:
                log.info("model %s canary version %d at %g%%", self.name, canary.version, live.canary_percent)
            else:
                log.info("model %s has no canary", self.name)
