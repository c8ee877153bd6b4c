"""The e2e stack: a newcomer's `git clone`, `docker compose up`, real HTTP to the container.

The clone is of the committed HEAD, so what is tested is what a user gets:
uncommitted files (and the developer's ./data, ./models) are not in it. Its
data directory is filled from ../shared/datasets/mnist (MNIST_FILES), so
the trainer container never downloads. Everything runs under one unique
compose project on a free port; the finaliser runs `docker compose down -v`
and checks that no container of the project is left, whatever the tests did.

Environment (default):
    E2E_TORCH_INDEX_URL  https://pypi.org/simple   the trainer image's TORCH_INDEX_URL build arg
                                                    (the CPU wheel index is unreachable here)
    E2E_POLL_SECONDS     2                          MODEL_POLL_SECONDS of the api under test
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from core import mnist
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
HEALTHY_WITHIN = 120.0
API_REPLICAS = 2  # docker-compose.yml's default
TIMINGS = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[TIMINGS] = []


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    rows = config.stash.get(TIMINGS, [])
    if rows:
        terminalreporter.section("e2e step timings")
        for row in rows:
            terminalreporter.write_line(row)


@dataclass
class Timer:
    """Records and prints (live, despite output capture) how long each step took."""

    config: pytest.Config

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - t0
            self.config.stash[TIMINGS].append(f"{seconds:8.1f} s  {name}")
            self._say(f"[e2e] {name}: {seconds:.1f} s")

    def note(self, text: str) -> None:
        """A measured fact worth seeing in the summary (counts, rates)."""
        self.config.stash[TIMINGS].append(f"          {text}")
        self._say(f"[e2e] {text}")

    def _say(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        # Live, not in the captured output of whichever test is running.
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line(line)


@dataclass
class Stack:
    """One compose project in a fresh clone; `compose(...)` runs `docker compose` in it."""

    repo: Path
    project: str
    port: int
    env: dict[str, str]
    poll_seconds: float
    grpc_port: int = 0  # nginx's published gRPC port (HOST_GRPC_PORT)

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["docker", "compose", *args]
        proc = subprocess.run(
            cmd, cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"`{' '.join(cmd)}` exited {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}"
                f"\n--- stderr\n{proc.stderr[-5000:]}\n--- api logs\n{self.logs()}"
            )
        return proc

    def logs(self, tail: int = 200) -> str:
        proc = subprocess.run(
            ["docker", "compose", "logs", "--no-color", "--tail", str(tail)],
            cwd=self.repo,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc.stdout + proc.stderr

    def containers(self, service: str | None = None) -> list[str]:
        """Ids of the project's running containers: one service's, or all (nginx and every api)."""
        ids = self.compose("ps", "-q", *([service] if service else [])).stdout.split()
        assert ids, f"no {service or ''} container in project {self.project}\n{self.logs()}"
        return ids

    def inspect(self, cid: str) -> dict:
        out = subprocess.run(
            ["docker", "inspect", cid], capture_output=True, text=True, check=True, timeout=60
        )
        return json.loads(out.stdout)[0]

    def health(self, cid: str) -> str:
        state = self.inspect(cid)["State"]
        return state.get("Health", {}).get("Status", state["Status"])

    def wait_healthy(self, within: float = HEALTHY_WITHIN, replicas: int | None = None) -> None:
        """Until Docker's healthcheck says healthy for nginx and every api replica (and, given
        `replicas`, that many api replicas run); fails with the logs if they do not."""
        deadline = time.monotonic() + within
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            apis = self.compose("ps", "-q", "api").stdout.split()
            states = {cid[:12]: self.health(cid) for cid in self.containers()}
            if set(states.values()) == {"healthy"} and (replicas is None or len(apis) == replicas):
                return
            time.sleep(0.5)
        pytest.fail(f"not healthy within {within:.0f} s: {states}\n{self.logs()}")

    def replica_versions(self) -> dict[str, int | None]:
        """The version each api replica serves, asked of the replica itself (not through nginx)."""
        code = (
            "import json, urllib.request as u\n"
            "print(json.load(u.urlopen('http://127.0.0.1:8000/readyz', timeout=5)).get('model', {})"
            ".get('version'))"
        )
        versions = {}
        for cid in self.containers("api"):
            out = subprocess.run(
                ["docker", "exec", cid, "python", "-c", code],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            versions[cid[:12]] = int(out.stdout) if out.stdout.strip().isdigit() else None
        return versions


def mnist_test_sample(repo: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random sample of `n` MNIST test images (uint8, 28×28) and labels, from a clone's ./data."""
    images, labels = mnist.read(repo / "data", "test_images"), mnist.read(repo / "data", "test_labels")
    idx = np.random.default_rng(0).choice(len(images), n, replace=False)
    return images[idx], labels[idx]


def fill_mnist(data_dir: Path) -> None:
    """DATA_DIR/MNIST/raw from ../shared/datasets/mnist (core.mnist.unpack, as `make data` does)."""
    source = Path(os.environ.get("MNIST_FILES", SHARED / "datasets" / "mnist"))
    if not source.is_dir():
        pytest.fail(f"no MNIST files in {source}: set MNIST_FILES to the folder with the *-ubyte.gz files")
    mnist.unpack(source, data_dir)


@pytest.fixture(scope="session")
def timer(request: pytest.FixtureRequest) -> Timer:
    return Timer(request.config)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, timer: Timer) -> Iterator[Stack]:
    """nginx and the api replicas up and healthy from a fresh clone; `docker compose down -v`
    whatever happens."""
    setup = SHARED / "tools" / "docker-setup"
    with timer.step("docker-setup"):
        if setup.exists():
            subprocess.run([str(setup)], check=True, timeout=900)
        elif shutil.which("docker") is None:
            pytest.fail(f"no docker and no {setup}")

    repo = tmp_path_factory.mktemp("newcomer") / "repo"
    with timer.step("git clone + MNIST into ./data"):
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True, timeout=120)
        fill_mnist(repo / "data")

    poll = float(os.environ.get("E2E_POLL_SECONDS", "2"))
    project = f"mnist-e2e-{os.getpid()}-{int(time.time()) % 100000}"
    env = {
        k: v
        for k, v in os.environ.items()
        # the developer's shell must not configure the newcomer's stack
        if k
        not in (
            *("MODEL_NAME", "MODEL_VERSION", "MODELS_DIR", "DATA_DIR", "WEB_CONCURRENCY", "API_REPLICAS"),
            *("HOST_MODELS_DIR", "HOST_DATA_DIR"),
        )
        and not k.startswith("COMPOSE_")
    }
    port, grpc_port = free_port(), free_port()
    env.update(
        COMPOSE_PROJECT_NAME=project,
        HOST_PORT=str(port),
        HOST_GRPC_PORT=str(grpc_port),
        MODEL_POLL_SECONDS=str(poll),
        HOST_UID=str(os.getuid()),
        HOST_GID=str(os.getgid()),
        TORCH_INDEX_URL=os.environ.get("E2E_TORCH_INDEX_URL", "https://pypi.org/simple"),
        MNIST_DOWNLOAD="0",
    )
    s = Stack(repo, project, port, env, poll, grpc_port)
    try:
        with timer.step("docker compose up -d --build (nginx + api replicas)"):
            s.compose("up", "-d", "--build", timeout=900)
        with timer.step("up -> healthy"):
            s.wait_healthy(replicas=API_REPLICAS)
        yield s
    finally:
        with timer.step("docker compose down -v"):
            # --rmi local drops this project's image tags; BuildKit's cache keeps the layers,
            # so the next run's build is a cache hit all the same.
            s.compose(
                "--profile", "train", "down", "-v", "--remove-orphans", "--rmi", "local", "--timeout", "30",
                check=False,
            )  # fmt: skip
        left = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        # The clone's ./models may hold files the trainer container wrote; they belong to us (HOST_UID).
        shutil.rmtree(repo, ignore_errors=True)
        assert not left, f"containers left behind by project {project}: {left}"
