"""Plain helpers every service and browser test shares: small real networks published with
core.modelstore, the app with Flask's test client, PNG bodies, IDX bytes for MNIST files of a
test's own, and a real gunicorn started from gunicorn.conf.py on a free port. MNIST itself is
read by core.mnist (the `mnist` and `data_dir` fixtures); the load generator is tests/load.py.

One copy, so that a fix to (say) how gunicorn is started or awaited reaches every suite."""

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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import requests
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from threadpoolctl import threadpool_limits

from core import modelstore, network
from core.preprocess import to_vectors
from service.app import create_app

ROOT = Path(__file__).resolve().parent.parent
# The one version committed to the repository: what a fresh clone serves.
SHIPPED_VERSION = 2
SHIPPED_MODEL = ROOT / "models" / "mnist" / str(SHIPPED_VERSION)
# The second shipped model: the reference network of `--preset seed` (784-32-10 sigmoid, ≈95%).
SHIPPED_SEED_MODEL = ROOT / "models" / "mnist-seed" / "1"

# --- MNIST (read by core.mnist, the project's one reader) ----------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An array as an IDX file, MNIST's format: magic (0x08 = ubyte, then the rank), the dims
    big-endian, the bytes. For tests that need small or broken MNIST files of their own."""
    header = struct.pack(">i", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


# --- networks and model repositories ----------------------------------------------------------


def random_net(seed: int = 0, hidden: int = 30) -> network.Network:
    """Weights that mean nothing: for tests where only the plumbing matters."""
    return network.new_network(
        [784, hidden, 10], ["sigmoid", "softmax"], "cross_entropy", np.random.default_rng(seed), init="scaled"
    )


def train_quickly(
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int = 1,
    hidden: int = 64,
    activation: str = "relu",
    init: str = "he",
    lr: float = 0.5,
) -> network.Network:
    """A small 784-hidden-10 softmax network by plain minibatch SGD through core.network.backprop,
    in seconds: real enough that recognising digits is a real test, without the trainer.

    Deterministic: a fixed seed and a fixed number of steps (`epochs` over `images` in batches of
    100), never a time budget, so the same call gives the same weights on any host, busy or not."""
    rng = np.random.default_rng(0)
    net = network.new_network([784, hidden, 10], [activation, "softmax"], "cross_entropy", rng, init=init)
    x = to_vectors(images)
    y = network.one_hot(labels)
    batch = 100
    # One BLAS thread: small matrices run up to 15x slower when BLAS threads oversubscribe the cores.
    with threadpool_limits(1):
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(x), batch):
                idx = order[start : start + batch]
                gw, gb = network.backprop(net, x[idx].T, y[:, idx])
                net = net.with_params(
                    [w - (lr / len(idx)) * g for w, g in zip(net.weights, gw, strict=True)],
                    [b - (lr / len(idx)) * g for b, g in zip(net.biases, gb, strict=True)],
                )
    return net


def accuracy(net: network.Network, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(network.predict(net, to_vectors(images)) == labels))


def publish(models_dir: Path, net: network.Network, accuracy: float = 0.99, name: str = "mnist") -> int:
    """Publish the next version of `name`, its accuracy where the trainer puts it. The default
    accuracy passes the promotion gate (PROMOTION=gate, MIN_ACCURACY 0.98) over an equal one, so
    tests of reloading see a new version go live; tests of the gate pass a worse one."""
    return modelstore.publish(models_dir, name, net, {"metrics": {"test_accuracy": accuracy}})


# --- the app, without a server ----------------------------------------------------------------


def make_app(models_dir: Path, **config: object) -> Flask:
    """The app serving `models_dir`, never polling: a test that wants a new state builds a new app."""
    return create_app({"MODELS_DIR": str(models_dir), "MODEL_POLL_SECONDS": 0, **config})


def make_client(models_dir: Path, **config: object) -> FlaskClient:
    """Flask's test client on `make_app(models_dir, **config)` (the app is `client.application`)."""
    return make_app(models_dir, **config).test_client()


# --- request bodies ---------------------------------------------------------------------------


def png_bytes(a: np.ndarray, mode: str | None = None, fmt: str = "PNG", **save) -> bytes:
    """An image file's bytes (PNG unless `fmt`), optionally converted to `mode` first."""
    img = Image.fromarray(np.asarray(a, dtype=np.uint8))
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header declaring width×height pixels, with almost no data: a decompression bomb's
    first bytes, built by hand so the test does not have to allocate the gigapixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + png_chunk(b"IEND", b"")
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
    """A started gunicorn. The one way a test stops it is leaving `with start_gunicorn(...) as server:`
    (the `gunicorn` fixture does it for the servers it starts); tests of TERM and HUP send their
    signal to `proc` themselves."""

    proc: subprocess.Popen
    url: str
    log: Path
    grpc: str = ""  # host:port of the workers' gRPC server (GRPC_PORT)

    def workers(self) -> set[int]:
        return child_pids(self.proc.pid)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[str]:
        """The server's stdout+stderr so far, line by line (the JSON logs)."""
        return self.logs().splitlines()

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM (gunicorn's graceful stop), then SIGKILL if it hangs; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def wait_workers(self, n: int, exclude: set[int] = frozenset(), timeout: float = 20) -> set[int]:
        """Wait until n workers not in `exclude` are alive and each has logged that it is ready
        (gunicorn.conf.py's post_worker_init): a booting gevent worker is alive before it accepts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.workers()
            if len(pids) == n and not pids & exclude:
                logs = self.logs()
                if all(f"Worker ready (pid: {pid})" in logs for pid in pids):
                    return pids
            time.sleep(0.1)
        raise AssertionError(f"workers {self.workers()} after {timeout}s\n{self.logs()[-3000:]}")

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_gunicorn(models_dir: Path, log_dir: Path, ready: bool = True, **env: str) -> Server:
    """Start `gunicorn -c gunicorn.conf.py service.wsgi:app` (as `make serve` and the image do) on
    a free port and wait for /readyz (or /healthz) and its 2 workers. `env` overrides the settings.
    Use it as `with start_gunicorn(...) as server:`, which stops it however the block ends."""
    port = free_port()
    log = log_dir / "server.log"
    full_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    full_env.update(
        PORT=str(port),
        MODELS_DIR=str(models_dir),
        WEB_CONCURRENCY="2",
        MODEL_POLL_SECONDS="0.5",
        PYTHONUNBUFFERED="1",
        GRPC_PORT=str(free_port()),  # never the default 8001, which another server may hold
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
    server = Server(proc, f"http://127.0.0.1:{port}", log, f"127.0.0.1:{full_env['GRPC_PORT']}")
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
        server.stop()
        raise
    return server
