"""Fixtures for the extras' tests: a model trained in seconds on real MNIST, apps and a gunicorn.
MNIST itself comes from tests/service/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.mnist import MNIST
from service.app import create_app
from tests.helpers import Server, accuracy, publish, start_gunicorn, train_quickly


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, mnist: MNIST) -> Path:
    """A repository with one version: 784-64-10, one epoch on 20k images (~92%, under a second)."""
    root = tmp_path_factory.mktemp("models")
    net = train_quickly(mnist.train_images[:20000], mnist.train_labels[:20000])
    publish(root, net, accuracy(net, mnist.test_images[:2000], mnist.test_labels[:2000]))
    return root


@pytest.fixture
def app(models_dir: Path):
    return create_app({"MODELS_DIR": str(models_dir), "MODEL_POLL_SECONDS": 0})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn with 2 sync workers, as `make serve` runs it."""
    with start_gunicorn(models_dir, tmp_path_factory.mktemp("gunicorn")) as s:
        yield s
