"""Prometheus metrics against a real gunicorn (2 workers): counted exactly once across workers,
the model gauge, reloads and rejections."""

from __future__ import annotations

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.helpers import Server, png_bytes, publish, start_gunicorn, train_quickly


def scrape(url: str) -> str:
    r = requests.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return r.text


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in the exposition text; 0 when absent."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"^([^{ ]+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def both_workers_answer(server: Server) -> set[int]:
    """Send /healthz until both workers have answered one (their access lines name their pids); the
    pids. A worker still starting accepts nothing, and the other would take every request."""
    pids: set[int] = set()
    deadline = time.monotonic() + 20
    while len(pids) < 2 and time.monotonic() < deadline:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: requests.get(server.url + "/healthz", timeout=5), range(8)))
        pids = {
            json.loads(line)["pid"]
            for line in server.lines()
            if '"logger": "access"' in line and '"/healthz"' in line
        }
    return pids


def test_metrics_count_exactly_k_requests_across_workers(served, mnist):
    k = 60
    assert len(both_workers_answer(served)) == 2  # a fresh server: the second worker may still start
    before = scrape(served.url)
    n_predict = sample(before, "http_requests_total", endpoint="/predict", method="POST", status="200")
    n_hist = sample(before, "http_request_duration_seconds_count", endpoint="/predict")
    digits_before = {d: sample(before, "mnist_predictions_total", digit=str(d)) for d in range(10)}
    body = png_bytes(mnist.test_images[0])

    def one(i: int) -> tuple[int, str, int]:
        r = requests.post(
            served.url + "/predict",
            data=body,
            headers={"Content-Type": "image/png", "X-Request-ID": f"k-{i}"},
            timeout=10,
        )
        return r.status_code, r.headers["X-Request-ID"], r.json()["digit"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(k)))
    assert all(status == 200 for status, _, _ in results)
    assert [rid for _, rid, _ in results] == [f"k-{i}" for i in range(k)]
    digit = results[0][2]

    after = scrape(served.url)
    assert (
        sample(after, "http_requests_total", endpoint="/predict", method="POST", status="200") - n_predict
        == k
    )
    assert sample(after, "http_request_duration_seconds_count", endpoint="/predict") - n_hist == k
    assert sample(after, "mnist_predictions_total", digit=str(digit)) - digits_before[digit] == k

    # More than one worker served them: each access line names its pid and the request id.
    access = [json.loads(line) for line in served.lines() if line.startswith("{") and '"k-' in line]
    access = [a for a in access if a.get("logger") == "access" and a["request_id"].startswith("k-")]
    assert sorted(a["request_id"] for a in access) == sorted(f"k-{i}" for i in range(k))
    assert len({a["pid"] for a in access}) > 1


def test_metrics_model_gauge_and_reloads(served, trained_models_dir, mnist):
    text = scrape(served.url)
    versions = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("mnist_model_version{")
    ]
    assert versions and max(versions) == 1.0
    assert "# TYPE mnist_model_reloads_total counter" in text
    assert "# TYPE mnist_model_rejected_versions_total counter" in text
    assert "# TYPE http_request_duration_seconds histogram" in text


def test_reloads_and_rejections_are_counted_in_every_worker(tmp_path, trained_models_dir, mnist):
    """A new version moves the gauge and the reload counter; a tampered one the rejection counter."""
    root = tmp_path / "models"
    shutil.copytree(trained_models_dir, root)
    with start_gunicorn(root, tmp_path) as g:
        # Each worker starts polling on its first request: make sure both have served one.
        assert len(both_workers_answer(g)) == 2

        net = train_quickly(mnist.train_images[:2000], mnist.train_labels[:2000])
        assert publish(root, net, 0.99) == 2  # recorded above MIN_ACCURACY: the gate lets it go live
        text = wait_for(g.url, lambda t: sample(t, "mnist_model_reloads_total", model="mnist") == 2)
        assert gauge_values(text) == [2.0, 2.0]  # one series per live worker, both on v2

        # A tampered version: complete on disk, but its weights do not match model.json.
        tmp = root / "mnist" / ".tmp-tampered"
        shutil.copytree(root / "mnist" / "2", tmp)
        (tmp / "weights.npz").write_bytes(b"not the weights")
        tmp.rename(root / "mnist" / "3")
        text = wait_for(g.url, lambda t: sample(t, "mnist_model_rejected_versions_total", model="mnist") == 2)
        assert gauge_values(text) == [2.0, 2.0]
        assert sample(text, "mnist_model_reloads_total", model="mnist") == 2


def gauge_values(text: str) -> list[float]:
    return sorted(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("mnist_model_version{")
    )


def wait_for(url: str, condition, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(url)
        if condition(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.3)
