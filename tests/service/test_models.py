"""The model manager: which version is served, and what happens when the repository changes."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from core import modelstore, network
from service.errors import ApiError
from service.models import ModelManager
from service.registry import ModelRegistry
from tests.helpers import publish, random_net


def manager(models_dir: Path, **kw) -> tuple[ModelManager, list]:
    events: list = []
    m = ModelManager(models_dir, "mnist", poll_seconds=kw.pop("poll_seconds", 0), **kw)
    m.add_listener(lambda event, **info: events.append((event, info)))
    m.scan()
    return m, events


def polled(models_dir: Path, poll_seconds: float) -> tuple[ModelRegistry, ModelManager]:
    """A registry (whose poller production starts) and its one model's manager, scanned once."""
    registry = ModelRegistry(models_dir, "mnist", poll_seconds=poll_seconds)
    registry.scan()
    return registry, registry.default


def corrupt_copy(models_dir: Path, src: int, dst: int) -> Path:
    path = models_dir / "mnist" / str(dst)
    shutil.copytree(models_dir / "mnist" / str(src), path)
    return path


def test_serves_newest_valid_version(random_models_dir):
    publish(random_models_dir, random_net(2))
    m, events = manager(random_models_dir)
    assert m.current().version == 2 and m.get(None).version == 2 and m.get(1).version == 1
    assert events == [("loaded", {"version": 2})]


def test_empty_repository_gives_503_then_picks_up_a_version(tmp_path):
    m, events = manager(tmp_path / "models")
    assert m.current() is None
    with pytest.raises(ApiError) as e:
        m.get(None)
    assert e.value.status == 503 and "no model versions" in e.value.message
    publish(tmp_path / "models", random_net())
    m.scan()
    assert m.current().version == 1 and events == [("loaded", {"version": 1})]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: (p / "weights.npz").write_bytes(b"not the weights"), "sha256"),
        (lambda p: (p / "model.json").unlink(), "missing"),
        (lambda p: (p / "model.json").write_text("{half"), "not valid JSON"),
        (lambda p: (p / "weights.npz").unlink(), "weights.npz"),
    ],
    ids=["tampered", "half-written", "bad-json", "no-weights"],
)
def test_invalid_version_is_skipped_with_reason(random_models_dir, damage, reason):
    damage(corrupt_copy(random_models_dir, 1, 2))
    m, events = manager(random_models_dir)
    assert m.current().version == 1
    assert events[0][0] == "rejected" and events[0][1]["version"] == 2 and reason in events[0][1]["reason"]
    status = {v["version"]: v for v in m.status()["versions"]}
    assert status[2]["state"] == "rejected" and reason in status[2]["reason"]
    with pytest.raises(ApiError) as e:
        m.get(2)
    assert e.value.status == 404 and e.value.code == "version_invalid"
    m.scan()  # rejected once, not re-validated and re-reported at every poll
    assert [e for e, _ in events].count("rejected") == 1


def test_wrong_architecture_is_rejected(random_models_dir):
    net = network.new_network([784, 5], ["softmax"], "cross_entropy", np.random.default_rng(0))
    publish(random_models_dir, net)
    m, _ = manager(random_models_dir)
    assert m.current().version == 1
    assert "outputs" in m.status()["versions"][1]["reason"]


def test_half_written_version_is_taken_once_complete(random_models_dir):
    path = corrupt_copy(random_models_dir, 1, 2)
    meta = (path / "model.json").read_bytes()
    (path / "model.json").unlink()
    m, events = manager(random_models_dir)
    assert m.current().version == 1
    (path / "model.json").write_bytes(meta)  # the copy finishes
    m.scan()
    assert m.current().version == 2 and events[-1] == ("loaded", {"version": 2})


def test_served_version_tampered_in_place_keeps_serving_last_good(random_models_dir):
    m, _ = manager(random_models_dir)
    good = m.current()
    (random_models_dir / "mnist" / "1" / "weights.npz").write_bytes(b"evil")
    m.scan()
    assert m.current() is good
    assert m.status()["versions"][0]["state"] == "rejected"


def test_deleting_the_served_version(random_models_dir):
    publish(random_models_dir, random_net(2))
    m, events = manager(random_models_dir)
    served = m.current()
    shutil.rmtree(random_models_dir / "mnist" / "2")
    # a request that already holds the model is unaffected: its arrays are in memory
    assert network.probabilities(served.net, np.zeros((1, 784), np.float32)).shape == (1, 10)
    m.scan()
    assert m.current().version == 1 and events[-1] == ("loaded", {"version": 1})
    shutil.rmtree(random_models_dir / "mnist" / "1")
    m.scan()
    assert m.current().version == 1  # nothing else to serve: the last good one stays
    assert "deleted" in m.status()["versions"][0]["reason"]
    with pytest.raises(ApiError) as e:
        m.get(2)
    assert e.value.status == 404


def test_pinned_version(random_models_dir):
    publish(random_models_dir, random_net(2))
    m, _ = manager(random_models_dir, pinned=1)
    assert m.current().version == 1
    publish(random_models_dir, random_net(3))
    m.scan()
    assert m.current().version == 1 and m.status()["pinned"] == 1
    m, _ = manager(random_models_dir, pinned=7)
    assert m.current() is None and "MODEL_VERSION=7" in m.unready_reason()
    publish(random_models_dir, random_net(4))
    publish(random_models_dir, random_net(5))
    publish(random_models_dir, random_net(6))
    publish(random_models_dir, random_net(7))
    m.scan()
    assert m.current().version == 7


def test_version_appearing_between_scans_is_found_on_demand(random_models_dir):
    m, _ = manager(random_models_dir)
    publish(random_models_dir, random_net(2))
    assert m.get(2).version == 2
    assert m.current().version == 1  # the served one changes only at a scan


def test_status_reports_metadata(random_models_dir):
    m, _ = manager(random_models_dir)
    status = m.status()
    assert status["serving"] == 1 and status["ready"] and status["last_scan"]
    v = status["versions"][0]
    assert v["accuracy"] == 0.99 and v["architecture"]["sizes"] == [784, 30, 10]
    assert "files" not in v["metadata"]


def test_listener_errors_do_not_break_loading(random_models_dir):
    m = ModelManager(random_models_dir, "mnist", poll_seconds=0)

    def broken(event, **info):
        raise RuntimeError("listener bug")

    m.add_listener(broken)
    m.scan()
    assert m.current().version == 1


def test_poller_thread_picks_up_new_versions(random_models_dir):
    registry, m = polled(random_models_dir, poll_seconds=0.1)
    registry.ensure_polling()
    registry.ensure_polling()  # idempotent within a process
    try:
        publish(random_models_dir, random_net(2))
        deadline = time.monotonic() + 10
        while m.current().version != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m.current().version == 2
    finally:
        registry.stop()


def test_polling_starts_with_a_scan_so_a_fresh_worker_is_never_stale(random_models_dir):
    """A worker booted before a new version appeared serves it from its first request on."""
    registry, m = polled(random_models_dir, poll_seconds=60)
    publish(random_models_dir, random_net(2))
    assert m.current().version == 1
    try:
        registry.ensure_polling()  # what post_worker_init and the first request call
        assert m.current().version == 2
    finally:
        registry.stop()


def test_unreadable_repository_keeps_last_good(random_models_dir, monkeypatch):
    m, _ = manager(random_models_dir)

    def fail(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(modelstore, "list_versions", fail)
    m.scan()
    assert m.current().version == 1


def test_metadata_of_rejected_version_is_shown_when_readable(random_models_dir):
    path = corrupt_copy(random_models_dir, 1, 2)
    meta = json.loads((path / "model.json").read_text())
    meta["metrics"]["test_accuracy"] = 0.77
    (path / "model.json").write_text(json.dumps(meta))  # checksum still fine, but weights tampered:
    (path / "weights.npz").write_bytes(b"x")
    m, _ = manager(random_models_dir)
    v2 = m.status()["versions"][1]
    assert v2["state"] == "rejected" and v2["accuracy"] == 0.77


def test_pinned_requests_cycling_through_many_versions_reuse_their_verdicts(tmp_path, monkeypatch):
    """More pinned versions than the cache holds: the cache stays at its size, and a version
    validated once is reloaded without its checksum being computed again."""
    for seed in range(12):
        publish(tmp_path, random_net(seed))
    m, _ = manager(tmp_path, cache_size=3)
    hashed: list[int] = []
    real = modelstore.sha256_bytes
    monkeypatch.setattr(modelstore, "sha256_bytes", lambda data: hashed.append(len(data)) or real(data))
    for _ in range(3):
        for v in range(1, 12):
            assert m.get(v).version == v
            assert len(m.versions.cache) <= 3
    assert len(hashed) <= 11 - 8, hashed  # the background checks of the first scan saw 8 of them
    # A version whose files change is validated again: tampered weights are refused.
    weights = tmp_path / "mnist" / "5" / modelstore.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-100] ^= 1
    time.sleep(0.01)  # a new mtime whatever the file system's resolution
    weights.write_bytes(bytes(data))
    m.scan()
    with pytest.raises(ApiError) as e:
        m.get(5)
    assert e.value.status == 404 and "sha256" in e.value.message
    assert m.get(6).version == 6
