"""Every model the service serves: one `ModelManager` per model folder under MODELS_DIR.

MODEL_NAMES (comma-separated) fixes the list; unset, every folder under
MODELS_DIR with a valid model name is served, and a folder that appears later
is picked up at the next poll. MODEL_NAME is always served and is the default
of `/predict` and `/readyz`; MODEL_VERSION pins it alone.

One poller thread per worker process scans every model in turn.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from core import modelstore
from service.errors import ApiError
from service.models import Listener, ModelManager
from service.poller import Poller

log = logging.getLogger(__name__)


class ModelRegistry:
    """Model name -> ModelManager, with one poller for all of them."""

    def __init__(
        self,
        models_dir: Path | str,
        default: str,
        names: list[str] | None = None,
        pinned: int | None = None,
        poll_seconds: float = 5.0,
        **manager_options: Any,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.default_name = modelstore.check_name(default)
        self.fixed_names = [modelstore.check_name(n) for n in names] if names else None
        self.poll_seconds = poll_seconds
        self._options = manager_options
        self._listeners: list[Listener] = []
        self._lock = threading.RLock()
        self._poller = Poller(self.scan, poll_seconds, "model repository")
        self._managers: dict[str, ModelManager] = {}
        self._add(self.default_name, pinned)

    @property
    def default(self) -> ModelManager:
        return self._managers[self.default_name]

    def names(self) -> list[str]:
        """Served models, the default first, then by name."""
        rest = sorted(n for n in self._managers if n != self.default_name)
        return [self.default_name, *rest]

    def managers(self) -> list[ModelManager]:
        managers = self._managers
        return [managers[n] for n in self.names()]

    def get(self, name: str | None) -> ModelManager:
        """The manager of `name` (None: MODEL_NAME); 404 for a model this server does not serve."""
        if name is None or name == "":
            return self.default
        manager = self._managers.get(name)
        if manager is None:
            raise ApiError(
                404, "model_not_found", f"unknown model {name!r}; served: {', '.join(self.names())}"
            )
        return manager

    def add_listener(self, fn: Listener) -> None:
        """fn(event, model=NAME, **info) for every model's events, also those discovered later."""
        self._listeners.append(fn)
        for manager in list(self._managers.values()):
            self._attach(manager, fn)

    @staticmethod
    def _attach(manager: ModelManager, fn: Listener) -> None:
        manager.add_listener(lambda event, **info: fn(event, model=manager.name, **info))

    def _add(self, name: str, pinned: int | None = None) -> ModelManager:
        manager = ModelManager(
            self.models_dir, name, pinned=pinned, poll_seconds=self.poll_seconds, **self._options
        )
        for fn in self._listeners:
            self._attach(manager, fn)
        # Replace the dict rather than mutate it: readers iterate it without the lock.
        self._managers = {**self._managers, name: manager}
        return manager

    def _discover(self) -> list[str]:
        if self.fixed_names is not None:
            return self.fixed_names
        try:
            entries = list(os.scandir(self.models_dir))
        except OSError:
            return []
        found = []
        for e in entries:
            try:
                if e.is_dir() and not e.name.startswith("."):
                    found.append(modelstore.check_name(e.name))
            except (ValueError, OSError):  # not a model folder, or one that cannot be stat'ed
                continue
        return found

    def scan(self) -> None:
        """Pick up new model folders, then scan every model."""
        with self._lock:
            for name in self._discover():
                if name not in self._managers:
                    log.info("serving new model %s", name)
                    self._add(name)
        for manager in self.managers():
            try:
                manager.scan()
            except Exception:  # one model's surprise must not stop the others' scans
                log.exception("model %s scan failed", manager.name)

    # --- polling ---------------------------------------------------------------

    def ensure_polling(self) -> None:
        """Start this process's poller (service.poller) if it has none: one for every model."""
        self._poller.ensure()

    def stop(self) -> None:
        self._poller.stop()
