"""Faults stay with their version: a real gunicorn over a repository with every kind of bad file.

Deeply nested or overflowing model.json, a version folder that is a symlink
loop, a model.json that is a FIFO or a folder, a pathological labels.json:
each is rejected with a reason, and the rest (the other versions, the
policy, the labels once fixed, rollback) keeps working, on a fresh start and
in a running worker alike. And a worker with thousands of versions on disk
is ready in bounded time, since it validates only what it serves.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import requests

from core import labels, modelstore, release
from tests.helpers import png_bytes, publish, random_net

POLL_WAIT = 15  # seconds to wait for what MODEL_POLL_SECONDS=0.5 should show within a second


def _nested(path: Path) -> None:
    (path / modelstore.METADATA_FILE).write_text("[" * 100_000 + "]" * 100_000)


def _overflow(path: Path) -> None:
    meta = path / modelstore.METADATA_FILE
    meta.write_text(meta.read_text().replace('"test_accuracy": 0.99', '"test_accuracy": 1e999'))


def _huge_sizes(path: Path) -> None:
    meta = path / modelstore.METADATA_FILE
    meta.write_text(meta.read_text().replace('"sizes": [', '"sizes": [' + "9" * 4000 + ", "))


def _fifo(path: Path) -> None:
    (path / modelstore.METADATA_FILE).unlink()
    os.mkfifo(path / modelstore.METADATA_FILE)


def _folder(path: Path) -> None:
    (path / modelstore.METADATA_FILE).unlink()
    (path / modelstore.METADATA_FILE).mkdir()


def _weights_fifo(path: Path) -> None:
    (path / modelstore.WEIGHTS_FILE).unlink()
    os.mkfifo(path / modelstore.WEIGHTS_FILE)


FAULTS: dict[str, Callable[[Path], None]] = {
    "nested": _nested,
    "overflow": _overflow,
    "huge-sizes": _huge_sizes,
    "fifo": _fifo,
    "folder": _folder,
    "weights-fifo": _weights_fifo,
}


def _bad_copy(models_dir: Path, good: int, version: int, damage: Callable[[Path], None]) -> None:
    target = models_dir / "mnist" / str(version)
    shutil.copytree(models_dir / "mnist" / str(good), target)
    damage(target)


def _symlink_loop(models_dir: Path, version: int) -> None:
    (models_dir / "mnist" / str(version)).symlink_to(str(version))


def _wait(url: str, check: Callable[[dict], bool], what: str) -> dict:
    deadline = time.monotonic() + POLL_WAIT
    while True:
        body = requests.get(url, timeout=10).json()
        if check(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {body}")
        time.sleep(0.2)


def _states(status: dict) -> dict[int, dict]:
    return {v["version"]: v for v in status["versions"]}


def _served_by_both_workers(server, version: int) -> None:
    """Both workers answer with `version` (each has its own poller)."""
    png = png_bytes(np.full((28, 28), 128))
    deadline = time.monotonic() + POLL_WAIT
    seen: list[int] = []
    while time.monotonic() < deadline:
        seen = [
            requests.post(server.url + "/predict", data=png, headers={"Content-Type": "image/png"}).json()[
                "model"
            ]["version"]
            for _ in range(12)
        ]
        if set(seen) == {version}:
            return
        time.sleep(0.3)
    raise AssertionError(f"wanted version {version} from every worker, got {seen}")


@pytest.mark.slow
def test_faults_stay_with_their_version(gunicorn, tmp_path, monkeypatch):
    models_dir = tmp_path / "models"
    publish(models_dir, random_net(1))  # 1
    publish(models_dir, random_net(2))  # 2, passes the gate over 1
    # Before the start: a model.json nested too deeply for the parser, a version that is a
    # symlink loop, and a labels.json nested too deeply (ignored with a reason).
    _bad_copy(models_dir, 2, 3, _nested)
    _symlink_loop(models_dir, 4)
    labels.path(models_dir, "mnist").write_text("[" * 2000 + "]" * 2000)

    server = gunicorn(models_dir)  # waits for /readyz 200
    ready = requests.get(server.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["model"]["version"] == 2
    status = requests.get(server.url + "/models", timeout=10).json()
    states = _states(status)
    assert states[3]["state"] == "rejected" and "nested too deeply" in states[3]["reason"]
    assert states[4]["state"] == "rejected" and "symbolic links" in states[4]["reason"]
    assert "nested too deeply" in status["labels_error"]

    # While it runs: more faults of every kind, then a good version, which goes live.
    for version, damage in enumerate(FAULTS.values(), start=5):
        _bad_copy(models_dir, 2, version, damage)
    _symlink_loop(models_dir, 11)
    (models_dir / "loop").symlink_to("loop")  # a model folder that is a symlink loop, too
    good = publish(models_dir, random_net(3))
    assert good == 12
    faults = dict(enumerate([*FAULTS, "symlink-loop"], start=5))
    status = _wait(
        server.url + "/models",
        lambda s: s["serving"] == good and all(_states(s)[v]["state"] == "rejected" for v in faults),
        "the good version 12 goes live, the faults are rejected (some by the background checks)",
    )
    for version, name in faults.items():
        assert _states(status)[version]["reason"], (name, _states(status)[version])
    _served_by_both_workers(server, good)

    # A request pinned to a rejected version is a 404 in JSON; no answer names a host path.
    png = png_bytes(np.zeros((28, 28)))
    for version in (3, 4, 5, 6, 7, 8, 9, 10, 11):
        r = requests.post(
            server.url + f"/predict?version={version}", data=png, headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "version_invalid", (version, r.text)
    for path in ("/readyz", "/models", "/v2/models/mnist", "/v2/health/ready"):
        text = requests.get(server.url + path, timeout=10).text
        assert str(tmp_path) not in text, (path, text[:300])

    # The labels file fixed: promote, then roll back, through the release command.
    monkeypatch.setenv("MODELS_DIR", str(models_dir))
    monkeypatch.setenv("MODEL_NAME", "mnist")
    labels.path(models_dir, "mnist").unlink()
    assert release.main(["promote", "1"]) == 0
    _wait(server.url + "/models", lambda s: s["serving"] == 1 and s["labels_error"] is None, "promote 1")
    _served_by_both_workers(server, 1)
    assert release.main(["rollback"]) == 0
    _wait(server.url + "/models", lambda s: s["serving"] == good, "rollback to 12")
    _served_by_both_workers(server, good)
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200
    assert "Traceback" not in server.logs()


BOOT_VERSIONS = 2000
BOOT_BOUND_SECONDS = 15.0  # generous: a scan reads 2,000 small model.json files (2 to 5 s here)


@pytest.mark.slow
def test_a_worker_with_2000_versions_is_ready_in_bounded_time(gunicorn, tmp_path):
    """A worker validates what it serves, not every version ever published: with 2,000 versions
    on disk (hard links of one, so the test writes little) both workers are ready within
    BOOT_BOUND_SECONDS, and a pinned request validates an old version when asked."""
    models_dir = tmp_path / "models"
    publish(models_dir, random_net(1, hidden=1024))  # weights a full validation must read
    first = models_dir / "mnist" / "1"
    for version in range(2, BOOT_VERSIONS + 1):
        target = models_dir / "mnist" / str(version)
        target.mkdir()
        for f in first.iterdir():
            os.link(f, target / f.name)
    t0 = time.monotonic()
    server = gunicorn(models_dir, MODEL_POLL_SECONDS="3600", GUNICORN_TIMEOUT="120")
    elapsed = time.monotonic() - t0
    print(f"\n{BOOT_VERSIONS} versions: both workers ready in {elapsed:.1f} s")
    assert elapsed < BOOT_BOUND_SECONDS, elapsed
    status = requests.get(server.url + "/models", timeout=30).json()
    assert status["ready"] and len(status["versions"]) == BOOT_VERSIONS
    png = png_bytes(np.zeros((28, 28)))
    r = requests.post(server.url + "/predict?version=17", data=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["model"]["version"] == 17
