"""Fixtures for the service tests: real MNIST, real models published with core.modelstore, the
app with Flask's test client, and a real gunicorn started from gunicorn.conf.py on a free port
(helpers in tests/helpers.py).

Each fixture is named by what it holds: `random_models_dir` (weights that mean nothing, for the
plumbing) or `trained_models_dir` (a network that recognises digits); `client` is the app on the
former, `trained_client` on the latter; `served` is a gunicorn serving the latter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from core import mnist as mnist_files
from core import network
from tests.helpers import (
    Server,
    accuracy,
    make_app,
    make_client,
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
    """A 784-64-10 sigmoid network trained on real MNIST for two epochs (94.8% test accuracy, about
    two seconds): good enough that recognising digits is a real test. A fixed number of steps
    from a fixed seed, not a time budget, so its weights, and every answer the tests compare,
    are the same on a busy host as on an idle one."""
    net = train_quickly(
        mnist.train_images, mnist.train_labels, epochs=2, activation="sigmoid", init="scaled", lr=1.0
    )
    reached = accuracy(net, mnist.test_images, mnist.test_labels)
    assert reached > 0.9, f"the fixture network only reached {reached:.3f}"
    return net


@pytest.fixture
def random_models_dir(tmp_path: Path) -> Path:
    """A repository with one random-weight version, 1: a fresh one for each test, which may change it."""
    d = tmp_path / "models"
    publish(d, random_net(1))
    return d


@pytest.fixture(scope="session")
def trained_models_dir(tmp_path_factory: pytest.TempPathFactory, trained_net: network.Network) -> Path:
    """A repository with one version, 1: `trained_net`, recorded at 95% (shared: do not change it)."""
    d = tmp_path_factory.mktemp("trained") / "models"
    publish(d, trained_net, accuracy=0.95)
    return d


@pytest.fixture
def app(random_models_dir: Path) -> Flask:
    return make_app(random_models_dir)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Flask's test client on `random_models_dir`: every route, without a server."""
    return app.test_client()


@pytest.fixture(scope="module")
def trained_client(trained_models_dir: Path) -> FlaskClient:
    """Flask's test client on `trained_models_dir`, for tests whose answers must be right."""
    return make_client(trained_models_dir)


@pytest.fixture(scope="module")
def served(trained_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One gunicorn (2 workers, as `make serve` runs it) serving `trained_models_dir`, shared by a
    module's tests that only read."""
    with start_gunicorn(trained_models_dir, tmp_path_factory.mktemp("served")) as server:
        yield server


@pytest.fixture
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Factory: start_gunicorn with env overrides, for tests that change the server; every server
    it started is stopped after the test."""
    with ExitStack() as servers:

        def start(models_dir: Path, ready: bool = True, **env: str) -> Server:
            return servers.enter_context(
                start_gunicorn(models_dir, tmp_path_factory.mktemp("gunicorn"), ready, **env)
            )

        yield start
