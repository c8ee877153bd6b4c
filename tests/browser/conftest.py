"""Headless Debian Chromium driven by playwright, against a real gunicorn serving the shipped model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, SHIPPED_MODEL, SHIPPED_SEED_MODEL, Server, start_gunicorn

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Never a downloaded browser, and nothing that phones home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "artifacts" / "browser"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def served_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped models, isolated from the repo: the page is tested with what a clone serves."""
    root = tmp_path_factory.mktemp("browser-models")
    for model in (SHIPPED_MODEL, SHIPPED_SEED_MODEL):
        if not (model / "model.json").exists():
            pytest.fail(f"{model} is missing: the page is tested with the shipped models")
        shutil.copytree(model, root / model.parent.name / model.name)
    return root


@pytest.fixture(scope="session")
def server(served_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_gunicorn(served_models, tmp_path_factory.mktemp("gunicorn")) as s:
        yield s


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
