"""A repository scan repeated from a thread of the serving process.

Threads do not survive gunicorn's fork, so each worker starts its own, at boot
(`post_worker_init`) or at its first request, whichever comes first. The first
scan runs at once, in the caller: a worker idle since it booted must not
answer its first request with the model it booted with.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Poller:
    """Calls `scan` now and then every `seconds` (0: never) from one thread per process."""

    def __init__(self, scan: Callable[[], None], seconds: float, what: str) -> None:
        self.scan = scan
        self.seconds = seconds
        self.what = what
        self._pid: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def ensure(self) -> None:
        """Start this process's poller if it has none; cheap when it has (every request calls it)."""
        pid = os.getpid()
        if self._pid == pid or self.seconds <= 0:
            return
        with self._lock:
            if self._pid == pid:
                return
            self._pid = pid
            self._stop = threading.Event()
            self._scan_logged()
            threading.Thread(target=self._run, name="model-poller", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _scan_logged(self) -> None:
        try:
            self.scan()
        except Exception:  # the poller must outlive any surprise in the repository
            log.exception("%s scan failed", self.what)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            self._scan_logged()
