"""Fixtures for the service tests: real MNIST, real models published with core.modelstore,
and a real gunicorn started from gunicorn.conf.py on a free port."""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from core import modelstore, network
from core.preprocess import to_vectors

ROOT = Path(__file__).resolve().parents[2]


def read_idx(path: Path, offset: int) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8, offset=offset)


@dataclass(frozen=True)
class Mnist:
    train_images: np.ndarray  # (60000, 28, 28) uint8
    train_labels: np.ndarray
    test_images: np.ndarray  # (10000, 28, 28) uint8
    test_labels: np.ndarray


@pytest.fixture(scope="session")
def mnist(data_dir: Path) -> Mnist:
    raw = data_dir / "MNIST" / "raw"
    return Mnist(
        read_idx(raw / "train-images-idx3-ubyte", 16).reshape(-1, 28, 28),
        read_idx(raw / "train-labels-idx1-ubyte", 8),
        read_idx(raw / "t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28),
        read_idx(raw / "t10k-labels-idx1-ubyte", 8),
    )


def random_net(seed: int = 0, hidden: int = 30) -> network.Network:
    """Weights that mean nothing: for tests where only the plumbing matters."""
    return network.new_network(
        [784, hidden, 10], ["sigmoid", "softmax"], "cross_entropy", np.random.default_rng(seed), init="scaled"
    )


@pytest.fixture(scope="session")
def trained_net(mnist: Mnist) -> network.Network:
    """A 784-64-10 network trained by core.network.backprop on real MNIST for a few seconds
    (90-95% test accuracy): good enough that recognising digits is a real test."""
    rng = np.random.default_rng(0)
    net = network.new_network([784, 64, 10], ["sigmoid", "softmax"], "cross_entropy", rng, init="scaled")
    perm = rng.permutation(len(mnist.train_labels))
    x = np.ascontiguousarray(to_vectors(mnist.train_images[perm]).T)
    y = network.one_hot(mnist.train_labels[perm])
    m, eta = 100, 1.0
    deadline = time.monotonic() + 12  # the machine is shared: bound the time, not the epochs
    for k in list(range(0, x.shape[1], m)) * 2:
        gw, gb = network.backprop(net, x[:, k : k + m], y[:, k : k + m])
        net = net.with_params(
            [w - (eta / m) * g for w, g in zip(net.weights, gw, strict=True)],
            [b - (eta / m) * g for b, g in zip(net.biases, gb, strict=True)],
        )
        if time.monotonic() > deadline and k >= 30_000:
            break
    accuracy = float(np.mean(network.predict(net, to_vectors(mnist.test_images)) == mnist.test_labels))
    assert accuracy > 0.9, f"the fixture network only reached {accuracy:.3f}"
    return net


def publish(models_dir: Path, net: network.Network, **metadata) -> int:
    return modelstore.publish(
        models_dir, "mnist", net, {"accuracy": metadata.pop("accuracy", 0.5), **metadata}
    )


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A repository with one random-weight version, 1."""
    d = tmp_path / "models"
    publish(d, random_net(1))
    return d


@pytest.fixture(scope="session")
def trained_models_dir(tmp_path_factory: pytest.TempPathFactory, trained_net: network.Network) -> Path:
    d = tmp_path_factory.mktemp("trained") / "models"
    publish(d, trained_net, accuracy=0.95)
    return d


def png_bytes(a: np.ndarray, mode: str | None = None, fmt: str = "PNG", **save) -> bytes:
    img = Image.fromarray(a) if mode is None else Image.fromarray(a).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header declaring width×height pixels, with almost no data: a decompression bomb's
    first bytes, built by hand so the test does not have to allocate the gigapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


# --- a real gunicorn ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> set[int]:
    """Live processes whose parent is `pid` (the gunicorn workers), from /proc."""
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(entry))
    return children


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def workers(self) -> set[int]:
        return child_pids(self.proc.pid)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_workers(self, n: int, exclude: set[int] = frozenset(), timeout: float = 20) -> set[int]:
        """Wait until n workers not in `exclude` are alive and the server answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.workers()
            if len(pids) == n and not pids & exclude:
                return pids
            time.sleep(0.1)
        raise AssertionError(f"workers {self.workers()} after {timeout}s\n{self.logs()[-3000:]}")


def stop(proc: subprocess.Popen, timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def start_gunicorn(models_dir: Path, log_dir: Path, ready: bool = True, **env: str) -> Server:
    """Start `gunicorn -c gunicorn.conf.py service.wsgi:app` on a free port and wait for /readyz
    (or /healthz) and its workers. The caller must `stop(server.proc)`."""
    port = free_port()
    log = log_dir / "server.log"
    full_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    full_env.update(
        PORT=str(port),
        MODELS_DIR=str(models_dir),
        WEB_CONCURRENCY="2",
        MODEL_POLL_SECONDS="0.5",
        PYTHONUNBUFFERED="1",
    )
    full_env.update(env)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "service.wsgi:app"],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 30
        path = "/readyz" if ready else "/healthz"
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {proc.returncode}:\n{server.logs()[-3000:]}")
            try:
                if requests.get(server.url + path, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"gunicorn not ready after 30s:\n{server.logs()[-3000:]}")
            time.sleep(0.1)
        server.wait_workers(int(full_env["WEB_CONCURRENCY"]))
    except BaseException:
        stop(proc)
        raise
    return server


@pytest.fixture
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Factory: start_gunicorn with env overrides; every server is terminated after the test."""
    started: list[subprocess.Popen] = []

    def start(models_dir: Path, ready: bool = True, **env: str) -> Server:
        server = start_gunicorn(models_dir, tmp_path_factory.mktemp("gunicorn"), ready, **env)
        started.append(server.proc)
        return server

    yield start
    for proc in started:
        stop(proc)
