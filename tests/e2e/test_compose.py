"""The containerized service end to end, in the order a user meets it.

1. the shipped model answers real MNIST PNGs exactly as offline evaluation does;
2. hostile inputs get 4xx and leave the container healthy;
3. the trainer container publishes a version the running api takes up live;
4. `docker compose restart api` under load costs refused connections, never a 5xx.

The tests share one stack (tests/e2e/conftest.py) and run in file order:
step 3 needs the model of step 1 to have been the shipped one.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests
from PIL import Image

from tests.e2e.conftest import HEALTHY_WITHIN, Stack, Timer
from tests.helpers import SHIPPED_MODEL, SHIPPED_VERSION

N_IMAGES = 1000  # the issue asks for at least 500
MAX_CONTENT_LENGTH = 4 * 1024 * 1024  # the service's default (service/app.py)
STOP_GRACE_PERIOD = 30  # docker-compose.yml
SWITCH_MARGIN = 2.0  # seconds beyond the poll interval for a worker to validate and swap

pytestmark = pytest.mark.timeout(1800)


def read_idx(path: os.PathLike, offset: int) -> np.ndarray:
    return np.frombuffer(open(path, "rb").read(), np.uint8, offset=offset)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def post_png(url: str, body: bytes, timeout: float = 30) -> requests.Response:
    return requests.post(f"{url}/predict", data=body, headers={"Content-Type": "image/png"}, timeout=timeout)


@pytest.fixture(scope="module")
def test_set(stack: Stack) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random sample of the MNIST test split, from the clone's ./data."""
    raw = stack.repo / "data" / "MNIST" / "raw"
    images = read_idx(raw / "t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28)
    labels = read_idx(raw / "t10k-labels-idx1-ubyte", 8)
    idx = np.random.default_rng(0).choice(len(images), N_IMAGES, replace=False)
    return images[idx], labels[idx]


def offline(stack: Stack, version: int, images: np.ndarray) -> np.ndarray:
    """(m, 10) probabilities from core.modelstore.load + core.network on the host, in the clone."""
    path = stack.repo / "offline-images.npy"
    np.save(path, images)
    code = (
        "import sys, json, numpy as np\n"
        "from core import modelstore\n"
        "from core.network import probabilities\n"
        "from core.preprocess import to_vectors\n"
        "m = modelstore.load('models', 'mnist', int(sys.argv[2]))\n"
        "print(json.dumps(probabilities(m.net, to_vectors(np.load(sys.argv[1]))).tolist()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(version)],
        cwd=stack.repo,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return np.array(json.loads(out.stdout))


@dataclass
class Looper:
    """A client posting one image in a loop, recording every outcome (status or error class)."""

    url: str
    body: bytes
    pause: float = 0.1
    outcomes: list = field(default_factory=list)  # (wall time, status | exception name, version | None)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Looper:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.time()  # wall clock: compared with file mtimes
            try:
                r = post_png(self.url, self.body, timeout=30)
                version = r.json().get("model", {}).get("version") if r.status_code == 200 else None
                self.outcomes.append((t, r.status_code, version))
            except requests.RequestException as e:
                self.outcomes.append((t, type(e).__name__, None))
            self._stop.wait(self.pause)

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.outcomes) >= n, f"the client got only {len(self.outcomes)} answers in {timeout} s"


def started(stack: Stack) -> tuple[str, str, int]:
    """(container id, StartedAt, RestartCount): all three stay put when nothing restarted."""
    info = stack.inspect()
    return info["Id"], info["State"]["StartedAt"], info["RestartCount"]


def served_version(stack: Stack) -> int | None:
    current = requests.get(f"{stack.url}/readyz", timeout=10).json().get("model") or {}
    return current.get("version")


def test_predictions_match_offline_evaluation(stack: Stack, test_set, timer: Timer) -> None:
    images, labels = test_set
    bodies = [png(im) for im in images]
    answers = []
    with timer.step(f"POST {N_IMAGES} MNIST PNGs to /predict"), requests.Session() as http:
        for body in bodies:
            r = http.post(
                f"{stack.url}/predict", data=body, headers={"Content-Type": "image/png"}, timeout=30
            )
            assert r.status_code == 200, r.text
            answers.append(r.json())
    versions = {a["model"]["version"] for a in answers}
    assert versions == {SHIPPED_VERSION}, f"a fresh clone must serve {SHIPPED_MODEL}, got {versions}"

    served = np.array([a["probabilities"] for a in answers])
    digits = np.array([a["digit"] for a in answers])
    with timer.step("offline evaluation on the host"):
        expected = offline(stack, SHIPPED_VERSION, images)
    np.testing.assert_array_equal(digits, expected.argmax(axis=1))
    np.testing.assert_allclose(served, expected, atol=1e-5)
    accuracy = float(np.mean(digits == labels))
    page = requests.get(f"{stack.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    timer.note(
        f"accuracy of version {SHIPPED_VERSION} through the container on {N_IMAGES} test images: "
        f"{accuracy:.4f}"
    )
    assert accuracy > 0.98


def test_api_container_is_non_root_read_only_torch_free_and_under_an_init(stack: Stack) -> None:
    """What service/Dockerfile and docker-compose.yml promise, checked inside the running container."""
    code = r"""
import importlib.util, json, os
procs = {}
for p in filter(str.isdigit, os.listdir('/proc')):
    try:
        argv = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\0')
        ppid = int(open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError):
        continue
    procs[int(p)] = (ppid, [a.decode(errors='replace') for a in argv if a])
try:
    open('/app/probe', 'w')
    rootfs = 'writable'
except OSError as e:
    rootfs = e.strerror
print(json.dumps({'uid': os.getuid(), 'torch': importlib.util.find_spec('torch') is not None,
                  'rootfs': rootfs, 'heartbeat_dir_writable': os.access('/run/gunicorn', os.W_OK),
                  'procs': procs}))
"""
    facts = json.loads(stack.compose("exec", "-T", "api", "python", "-c", code).stdout)
    assert facts["uid"] != 0
    assert facts["torch"] is False, "the inference image must not carry torch"
    assert facts["rootfs"] == "Read-only file system"
    assert facts["heartbeat_dir_writable"]
    procs = {int(pid): (ppid, argv) for pid, (ppid, argv) in facts["procs"].items()}
    assert procs[1][1][0].endswith("docker-init"), procs[1]
    gunicorn = {pid for pid, (_, argv) in procs.items() if "service.wsgi:app" in argv and pid != 1}
    masters = [pid for pid in gunicorn if procs[pid][0] == 1]
    assert len(masters) == 1, f"gunicorn master should be PID 1's child: {procs}"
    workers = [pid for pid in gunicorn if procs[pid][0] == masters[0]]
    assert workers, f"no gunicorn workers under the master: {procs}"


def test_hostile_inputs_get_4xx_and_the_container_stays_healthy(stack: Stack, test_set) -> None:
    before = started(stack)
    oversized = b"\x89PNG\r\n\x1a\n" + os.urandom(MAX_CONTENT_LENGTH)
    r = post_png(stack.url, oversized)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"]

    good = png(test_set[0][0])
    garbage = {
        "random bytes": os.urandom(3000),
        "truncated png": good[: len(good) // 2],
        "text": b"definitely not an image",
    }
    for what, body in garbage.items():
        r = post_png(stack.url, body)
        assert r.status_code == 400, f"{what}: {r.status_code} {r.text}"
        assert r.json()["error"]["message"], what
    r = requests.post(
        f"{stack.url}/predict",
        data=b'{"image": [[1, 2], ',
        timeout=10,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text

    assert post_png(stack.url, good).status_code == 200
    assert requests.get(f"{stack.url}/readyz", timeout=10).status_code == 200
    # Docker's own healthcheck still passes, and nothing restarted the container.
    time.sleep(4)  # > the compose healthcheck interval: a fresh probe ran after the abuse
    assert stack.inspect()["State"]["Health"]["Status"] == "healthy"
    assert started(stack) == before


def test_trainer_container_publishes_a_version_served_live(stack: Stack, test_set, timer: Timer) -> None:
    old = served_version(stack)
    assert old is not None
    before = started(stack)
    with timer.step("build the trainer image"):
        stack.compose("--profile", "train", "build", "trainer", timeout=1800)

    with Looper(stack.url, png(test_set[0][0])) as client:
        client.wait_for(5)
        with timer.step("trainer container: train --epochs 1 on the full data"):
            run = stack.compose(
                "--profile", "train", "run", "--rm", "-T", "-e", "TQDM_DISABLE=1", "trainer",
                "train", "--preset", "best", "--epochs", "1",
                timeout=1200,
            )  # fmt: skip
        new = old + 1
        version_dir = stack.repo / "models" / "mnist" / str(new)
        assert version_dir.is_dir(), f"the trainer did not publish version {new}\n{run.stdout[-3000:]}"
        # Publishing renames the finished folder into models/mnist/: that is the parent's mtime.
        published = version_dir.parent.stat().st_mtime
        # Each worker rescans every poll interval, then validates the version (well under a second).
        deadline = published + stack.poll_seconds + SWITCH_MARGIN
        with timer.step("wait for /readyz to report the new version"):
            while served_version(stack) != new and time.time() < deadline + 10:
                time.sleep(0.2)
        time.sleep(max(0.0, deadline - time.time()) + 2)  # answers after the deadline must all be new

    status = requests.get(f"{stack.url}/models", timeout=10).json()
    assert status["serving"] == new, status
    assert new in [v["version"] for v in status["versions"]], status
    failures = [o for o in client.outcomes if o[1] != 200]
    assert not failures, f"{len(failures)} failed requests during the switch: {failures[:5]}"
    late_old = [o for o in client.outcomes if o[0] > deadline and o[2] != new]
    assert not late_old, f"answers from version {old} after the poll interval: {late_old[:5]}"
    first_new = min(o[0] for o in client.outcomes if o[2] == new)
    assert started(stack) == before, "the api container restarted"
    timer.note(
        f"{len(client.outcomes)} requests while training and switching, 0 failed; first answer from "
        f"version {new} {first_new - published:.1f} s after it was published (poll interval "
        f"{stack.poll_seconds} s), same container"
    )

    # The files belong to the host user and the api's non-root user can read them.
    assert version_dir.stat().st_uid == os.getuid()
    for f in [version_dir, *version_dir.iterdir()]:
        assert f.stat().st_mode & 0o004, f"{f} is not world-readable"
    r = post_png(stack.url, png(test_set[0][0]))
    assert r.status_code == 200 and r.json()["model"]["version"] == new


def test_restart_under_load_refuses_connections_but_never_answers_5xx(stack: Stack, test_set, timer):
    version = served_version(stack)
    with Looper(stack.url, png(test_set[0][0]), pause=0.02) as client:
        client.wait_for(5)
        t0 = time.time()
        with timer.step("docker compose restart api"):
            stack.compose("restart", "api", timeout=120)
        stopped_in = time.time() - t0
        with timer.step("restart -> healthy"):
            stack.wait_healthy(HEALTHY_WITHIN)
        back = time.time()
        n = len(client.outcomes)
        client.wait_for(n + 5)

    statuses = [o[1] for o in client.outcomes]
    server_errors = [s for s in statuses if isinstance(s, int) and s >= 500]
    assert not server_errors, f"5xx answers during the restart: {server_errors}"
    other_http = [s for s in statuses if isinstance(s, int) and s != 200]
    assert not other_http, f"unexpected answers during the restart: {other_http}"
    # No answer at all is what a restarting server may give: refused or closed connections
    # (docker-proxy accepts, then closes when nothing listens behind it). Never a hang.
    errors = [o for o in client.outcomes if not isinstance(o[1], int)]
    assert {o[1] for o in errors} <= {"ConnectionError"}, errors[:5]
    assert all(t0 <= o[0] <= back for o in errors), "connection errors outside the restart window"
    assert client.outcomes[-1][1] == 200 and client.outcomes[-1][2] == version
    # Graceful: SIGTERM reached gunicorn through docker-init, well before compose's SIGKILL (30 s).
    assert "Handling signal: term" in stack.logs(tail=400)
    assert stopped_in < STOP_GRACE_PERIOD, f"restart took {stopped_in:.1f} s: was gunicorn SIGKILLed?"
    timer.note(
        f"restart under load: {statuses.count(200)} answered 200, {len(errors)} connection errors "
        f"in a {back - t0:.1f} s window, no 5xx"
    )
