"""Feedback end to end: POST /feedback through nginx to both api replicas, into the host's ./feedback.

docker-compose.yml mounts ./feedback at FEEDBACK_DIR. A plain `docker compose up` on a fresh
clone (what the stack fixture runs) lets Docker create the missing folder as root; compose's
one-shot `feedback-dir` step opens it to the api's uid 10001 before any replica starts, so the
first correction is stored. Every correction lands in the host
folder, one file per writer process in each replica, each line valid against the schema;
/models tells the same live figure whichever replica answers, and it equals an offline
scoring of the same images; the export reads the folder in one line.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import requests
from jsonschema import Draft202012Validator, FormatChecker
from PIL import Image

from core import feedback, modelstore, network
from core.preprocess import to_vectors
from tests.e2e.conftest import Stack, Timer, mnist_test_sample
from tests.helpers import ROOT, SHIPPED_MODEL, SHIPPED_VERSION

N = 120
SCHEMA = json.loads((ROOT / "schemas" / "feedback-record.v1.json").read_text())

pytestmark = pytest.mark.timeout(1800)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def post(stack: Stack, body: bytes, digit: int) -> requests.Response:
    # A new connection each time, so nginx spreads the corrections over the replicas.
    return requests.post(
        f"{stack.url}/feedback?digit={digit}", data=body, headers={"Content-Type": "image/png"}, timeout=30
    )


def test_corrections_reach_the_host_folder_from_both_replicas(stack: Stack, timer: Timer, tmp_path):
    images, labels = mnist_test_sample(stack.repo, N)
    # Some wrong labels too, so both outcomes are counted.
    digits = np.where(np.arange(N) % 4 == 0, (labels + 1) % 10, labels)
    bodies = [png(a) for a in images]
    folder = stack.repo / "feedback"

    first = post(stack, bodies[0], int(digits[0]))
    assert first.status_code == 201, first.text
    ids = [first.json()["id"]]
    with timer.step(f"{N - 1} corrections through nginx"):
        for body, digit in zip(bodies[1:], digits[1:], strict=True):
            r = post(stack, body, int(digit))
            assert r.status_code == 201, r.text
            assert r.headers["Content-Type"] == "application/json"
            ids.append(r.json()["id"])

    validator = Draft202012Validator(SCHEMA, format_checker=FormatChecker())
    files = feedback.feedback_files(folder)
    events = []
    for path in files:
        data = path.read_bytes()
        assert data.endswith(b"\n")
        lines = [json.loads(line) for line in data.splitlines()]
        assert len({e["source"] for e in lines}) == 1, f"{path.name} has more than one writer"
        for e in lines:
            validator.validate(e)
        events.extend(lines)
    assert sorted(e["id"] for e in events) == sorted(ids)  # every correction, exactly once
    hosts = Counter(e["source"].split("/")[2] for e in events)
    timer.note(f"{len(events)} records in {len(files)} files from replicas {dict(hosts)}")
    assert len(hosts) == 2, hosts  # both replicas wrote to the shared host folder

    shipped = modelstore.load(SHIPPED_MODEL.parent.parent, "mnist", SHIPPED_VERSION)
    right = int(np.sum(network.predict(shipped.net, to_vectors(images)) == digits))
    assert 0 < right < N
    figures = set()
    for _ in range(12):
        status = requests.get(f"{stack.url}/models", timeout=10).json()
        (entry,) = [v for v in status["versions"] if v["version"] == SHIPPED_VERSION]
        figures.add((entry["live"]["feedback"], entry["live"]["correct"]))
    assert figures == {(N, right)}

    out = tmp_path / "corrections.npz"
    subprocess.run(
        [sys.executable, "-m", "trainer", "export-feedback", "--feedback", str(folder), "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    d = np.load(out)
    order = np.argsort(d["ids"])
    by_id = dict(zip(ids, range(N), strict=True))
    sent = np.array([by_id[i] for i in d["ids"][order]])
    np.testing.assert_array_equal(d["images"][order], images[sent])
    np.testing.assert_array_equal(d["labels"][order], digits[sent])
