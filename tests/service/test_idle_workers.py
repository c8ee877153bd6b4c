"""Every worker follows new versions, including one that has had no request since it booted.

Keep-alive connections can pin all traffic to one worker; the other must not
wake up serving the model it booted with. The per-worker version gauge
(`mnist_model_version{pid=...}`, multiprocess mode `liveall`) shows each live
worker's served version without sending that worker a request.
"""

from __future__ import annotations

import re
import time

import requests

from tests.helpers import publish, random_net

GAUGE = re.compile(r'^mnist_model_version\{[^}]*pid="(\d+)"[^}]*\} ([0-9.e+]+)$', re.M)


def worker_versions(url: str) -> dict[str, float]:
    return {pid: float(v) for pid, v in GAUGE.findall(requests.get(url + "/metrics", timeout=10).text)}


def test_an_idle_worker_picks_up_a_new_version(gunicorn, tmp_path):
    models_dir = tmp_path / "models"
    publish(models_dir, random_net(1))
    poll = 0.5
    server = gunicorn(models_dir, MODEL_POLL_SECONDS=str(poll), WEB_CONCURRENCY="2")
    # No request at all after the new version appears: only the workers' own pollers can see it.
    publish(models_dir, random_net(2))
    time.sleep(4 * poll)
    # The first answers on fresh connections, whichever worker takes them, name version 2
    # (a lazily started poller would let an idle worker's first answer be version 1).
    for _ in range(20):
        r = requests.get(server.url + "/readyz", timeout=10, headers={"Connection": "close"})
        assert r.json()["model"]["version"] == 2
    versions = worker_versions(server.url)
    assert len(versions) == 2, versions
    assert set(versions.values()) == {2.0}, f"a worker still serves an old version: {versions}"
