"""The one load generator of the tests: `n` clients, each on its own connection, calling the service
in a loop and recording every outcome, over REST (`rest`) or gRPC (`grpc`).

The integration tests (a version switch, a HUP, spread over workers) and the end-to-end tests (a
rollout, a crashed replica) all ask the same questions of a load: did any call fail, which
version answered, how fast. One class records the same `Outcome` for both protocols, so a fix
to how calls are timed or failures kept reaches every suite.

    with Load(rest(server.url, png), n=8) as load:
        load.wait_recent(lambda o: o.version == 2, timeout=10)
    assert not load.failures
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import numpy as np
import requests


class Outcome(NamedTuple):
    """One call. The first four fields are (started, status, version, seconds), in that order."""

    started: float  # wall-clock time.time() it was sent: the e2e tests compare it with file mtimes
    status: int | str  # HTTP status or gRPC code name ("OK"); the exception's class name if none came
    version: int | None  # the model version that answered, None on failure
    seconds: float
    client: int  # which client (each holds its own connection)
    ok: bool
    body: Any = None  # the answer: /predict's JSON, or for gRPC {"version", "probabilities", "digit"}
    error: str = ""  # what went wrong, for the assertion message


# A call: given the call's number, send it and return (status, ok, version, body, error).
Call = Callable[[int], tuple[int | str, bool, int | None, Any, str]]
# A client: given its number, open its connection and yield its `Call`; closed when the load ends.
Client = Callable[[int], AbstractContextManager[Call]]


def rest(
    url: str,
    body: bytes | Sequence[bytes],
    content_type: str = "image/png",
    path: str = "/predict",
    request_id: str | None = None,
    timeout: float = 30,
) -> Client:
    """POST `body` to `url + path`, one keep-alive requests.Session per client; a list of bodies
    is sent in turn, call i sending body i. `request_id`, a format string with {client} and {i},
    sets X-Request-ID (to find each call in the logs)."""
    bodies = [body] if isinstance(body, bytes) else list(body)

    @contextlib.contextmanager
    def client(k: int) -> Iterator[Call]:
        with requests.Session() as session:

            def call(i: int) -> tuple[int | str, bool, int | None, Any, str]:
                headers = {"Content-Type": content_type}
                if request_id is not None:
                    headers["X-Request-ID"] = request_id.format(client=k, i=i)
                try:
                    data = bodies[i % len(bodies)]
                    r = session.post(url + path, data=data, headers=headers, timeout=timeout)
                except requests.RequestException as e:
                    return type(e).__name__, False, None, None, repr(e)
                if r.status_code != 200:
                    return r.status_code, False, None, None, f"{r.status_code} {r.text[:200]}"
                try:
                    doc = r.json()
                except ValueError as e:  # a 200 that is not JSON fails, named like a lost connection
                    return type(e).__name__, False, None, None, f"200, not JSON: {r.text[:200]}"
                return 200, True, doc.get("model", {}).get("version"), doc, ""

            yield call

    return client


def grpc(target: str, image: np.ndarray, model: str = "mnist", timeout: float = 10) -> Client:
    """ModelInfer of one 28×28 UINT8 image with tritonclient.grpc, one connection per client."""
    import tritonclient.grpc as tgrpc  # only the gRPC tests need it
    from tritonclient.utils import InferenceServerException

    batch = np.asarray(image, dtype=np.uint8)[None]

    @contextlib.contextmanager
    def client(k: int) -> Iterator[Call]:
        # A local subchannel pool: a connection of its own (grpc would share one between channels),
        # which SO_REUSEPORT lands on either worker, so both workers are exercised.
        conn = tgrpc.InferenceServerClient(target, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        try:

            def call(i: int) -> tuple[int | str, bool, int | None, Any, str]:
                tensor = tgrpc.InferInput("input", list(batch.shape), "UINT8")
                tensor.set_data_from_numpy(batch)
                try:
                    r = conn.infer(model, [tensor], client_timeout=timeout)
                except InferenceServerException as e:
                    return str(e.status() or "ERROR"), False, None, None, str(e)
                version = int(r.get_response().model_version)
                answer = {
                    "version": version,
                    "probabilities": r.as_numpy("probabilities")[0].tolist(),
                    "digit": int(r.as_numpy("digit")[0]),
                }
                return "OK", True, version, answer, ""

            yield call
        finally:
            conn.close()

    return client


class Load:
    """`n` clients calling in a loop, each on its own connection, until the `with` block ends;
    with `calls`, each makes exactly that many calls and the block's end waits for them. The
    clients start together (a barrier), so they connect at the same time."""

    def __init__(self, client: Client, n: int = 8, pause: float = 0.0, calls: int | None = None) -> None:
        self.client, self.n, self.pause, self.calls = client, n, pause, calls
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._barrier = threading.Barrier(n)
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(n)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.calls is None:
            self._stop.set()
        for t in self._threads:
            t.join(120 if self.calls else 60)

    def _run(self, k: int) -> None:
        with self.client(k) as call:
            self._barrier.wait(30)
            i = 0
            while not self._stop.is_set() and (self.calls is None or i < self.calls):
                started, t0 = time.time(), time.perf_counter()
                status, ok, version, body, error = call(i)
                outcome = Outcome(started, status, version, time.perf_counter() - t0, k, ok, body, error)
                with self._lock:
                    self.outcomes.append(outcome)
                i += 1
                if self.pause:
                    self._stop.wait(self.pause)

    # --- what happened -----------------------------------------------------------------------

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.snapshot() if o.ok]

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.snapshot() if not o.ok]

    def of_client(self, k: int) -> list[Outcome]:
        """Client k's outcomes, in the order it made the calls."""
        return [o for o in self.snapshot() if o.client == k]

    def p99(self) -> float:
        seconds = sorted(o.seconds for o in self.snapshot())
        return seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]

    def summary(self) -> str:
        outcomes = self.snapshot()
        slowest = max((o.seconds for o in outcomes), default=0.0) * 1000
        failed = sum(not o.ok for o in outcomes)
        return f"{len(outcomes)} requests, {failed} failed, slowest {slowest:.0f} ms"

    # --- waiting for it ----------------------------------------------------------------------

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> float:
        """Wait until `condition()` holds; the seconds it took (AssertionError after `timeout`)."""
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > timeout:
                last = self.snapshot()[-3:]
                raise AssertionError(f"condition not met in {timeout}s; {self.summary()}; last {last}")
            time.sleep(0.05)
        return time.monotonic() - start

    def wait_for(self, n: int, timeout: float = 30) -> float:
        """Wait until at least `n` calls have ended, failed or not."""
        return self.wait_until(lambda: len(self.snapshot()) >= n, timeout)

    def wait_recent(self, predicate: Callable[[Outcome], bool], timeout: float, last: int = 16) -> float:
        """Wait until the `last` successful calls all satisfy `predicate` (a switch has settled)."""

        def settled() -> bool:
            recent = self.ok[-last:]
            return len(recent) == last and all(predicate(o) for o in recent)

        return self.wait_until(settled, timeout)
