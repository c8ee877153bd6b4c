"""Shared pieces of the extras' tests: MNIST from the raw files, a quickly trained model, gunicorn."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image
from threadpoolctl import threadpool_limits

from core import modelstore
from core.network import Network, backprop, new_network, one_hot
from core.preprocess import to_vectors

ROOT = Path(__file__).resolve().parents[3]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format) as a numpy array, without torch."""
    data = path.read_bytes()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(data_dir: Path) -> dict[str, np.ndarray]:
    raw = Path(data_dir) / "MNIST" / "raw"
    return {
        "train_images": read_idx(raw / "train-images-idx3-ubyte"),
        "train_labels": read_idx(raw / "train-labels-idx1-ubyte").astype(np.int64),
        "test_images": read_idx(raw / "t10k-images-idx3-ubyte"),
        "test_labels": read_idx(raw / "t10k-labels-idx1-ubyte").astype(np.int64),
    }


def train_quickly(images: np.ndarray, labels: np.ndarray, epochs: int = 1, hidden: int = 64) -> Network:
    """A small softmax network by plain minibatch SGD through core.network.backprop (seconds)."""
    rng = np.random.default_rng(0)
    net = new_network([784, hidden, 10], ["relu", "softmax"], "cross_entropy", rng, init="he")
    x = to_vectors(images)
    y = one_hot(labels)
    batch, lr = 100, 0.5
    # One BLAS thread: small matrices on a shared 2-core box run 15x slower oversubscribed.
    with threadpool_limits(1):
        return _sgd(net, x, y, rng, epochs, batch, lr)


def _sgd(
    net: Network, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, epochs: int, batch: int, lr: float
) -> Network:
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            gw, gb = backprop(net, x[idx].T, y[:, idx])
            net = net.with_params(
                [w - (lr / len(idx)) * g for w, g in zip(net.weights, gw, strict=True)],
                [b - (lr / len(idx)) * g for b, g in zip(net.biases, gb, strict=True)],
            )
    return net


def accuracy(net: Network, images: np.ndarray, labels: np.ndarray) -> float:
    from core.network import predict

    return float(np.mean(predict(net, to_vectors(images)) == labels))


def publish(models_dir: Path, net: Network, accuracy_value: float) -> int:
    return modelstore.publish(models_dir, "mnist", net, {"metrics": {"test_accuracy": accuracy_value}})


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    """A real gunicorn on a free port, its stdout+stderr in a file the tests can read."""

    def __init__(self, models_dir: Path, workers: int = 2, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="gunicorn-", suffix=".log")[1])
        full_env = {
            **os.environ,
            "PORT": str(self.port),
            "MODELS_DIR": str(models_dir),
            "WEB_CONCURRENCY": str(workers),
            "MODEL_POLL_SECONDS": "1",
        }
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        full_env.update(env or {})
        self._out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "gunicorn.conf.py",
                "--bind",
                f"127.0.0.1:{self.port}",
                "service.wsgi:app",
            ],
            cwd=ROOT,
            env=full_env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gunicorn not ready after {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()
