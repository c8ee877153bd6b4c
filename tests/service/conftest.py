"""Fixtures for the service tests: real MNIST, real models published with core.modelstore,
and a real gunicorn started from gunicorn.conf.py on a free port (helpers in tests/helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core import mnist as mnist_files
from core import network
from tests.helpers import (
    Server,
    accuracy,
    publish,
    random_net,
    start_gunicorn,
    train_quickly,
)


@pytest.fixture(scope="session")
def mnist(data_dir: Path) -> mnist_files.MNIST:
    return mnist_files.load(data_dir)


@pytest.fixture(scope="session")
def trained_net(mnist: mnist_files.MNIST) -> network.Network:
    """A 784-64-10 sigmoid network trained on real MNIST for a few seconds (90-95% test
    accuracy): good enough that recognising digits is a real test."""
    net = train_quickly(
        mnist.train_images,
        mnist.train_labels,
        epochs=2,
        activation="sigmoid",
        init="scaled",
        lr=1.0,
        seconds=12,  # bound the time, not the epochs: a busy host must not stall the suite
    )
    reached = accuracy(net, mnist.test_images, mnist.test_labels)
    assert reached > 0.9, f"the fixture network only reached {reached:.3f}"
    return net


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


@pytest.fixture
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Factory: start_gunicorn with env overrides; every server is terminated after the test."""
    started: list[Server] = []

    def start(models_dir: Path, ready: bool = True, **env: str) -> Server:
        server = start_gunicorn(models_dir, tmp_path_factory.mktemp("gunicorn"), ready, **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
