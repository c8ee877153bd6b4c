"""Promotion, labels, canary and rollback in the service, and several models side by side:
in process (ModelManager, the Flask app) and against a real gunicorn under load."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

from core import labels, network, release
from core.labels import Labels
from core.preprocess import to_vectors
from service.app import create_app
from service.errors import ApiError
from service.models import ModelManager
from tests.helpers import ROOT, png_bytes, publish, random_net
from tests.load import Load, rest

SHIPPED, QUICK = 0.9916, 0.966


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """mnist 1 at 99.16% and 2 at 96.6% (what `make train EPOCHS=1` reaches)."""
    d = tmp_path / "models"
    publish(d, random_net(1), accuracy=SHIPPED)
    publish(d, random_net(2), accuracy=QUICK)
    return d


def scanned(models_dir: Path, **kw) -> ModelManager:
    m = ModelManager(models_dir, "mnist", poll_seconds=0, **kw)
    m.scan()
    return m


def by_version(status: dict) -> dict[int, dict]:
    return {v["version"]: v for v in status["versions"]}


# --- in process ------------------------------------------------------------------------------------


def test_a_worse_version_is_held_but_reachable(repo):
    m = scanned(repo)
    assert m.current().version == 1 and m.get(None).version == 1
    assert m.get(2).version == 2  # ?version=2 still answers
    held = by_version(m.status())[2]
    assert held["state"] == "held"
    assert held["reason"] == "test accuracy 96.60% < MIN_ACCURACY 98.00%"
    assert m.status()["policy"] == "gate"


def test_latest_and_manual_policies(repo):
    assert scanned(repo, policy="latest").current().version == 2
    publish(repo, random_net(3), accuracy=0.999)
    m = scanned(repo, policy="manual")
    assert m.current().version == 1
    assert {v: s["state"] for v, s in by_version(m.status()).items()} == {1: "serving", 2: "held", 3: "held"}


def test_pinning_stands_above_labels_and_policy(repo):
    labels.write(repo, "mnist", Labels(stable=1, canary=2, canary_percent=100))
    m = scanned(repo, pinned=2)
    assert m.current().version == 2 and all(m.get(None).version == 2 for _ in range(20))


def test_labels_are_reread_on_every_scan(repo):
    m = scanned(repo)
    labels.write(repo, "mnist", Labels(stable=2, previous_stable=1))
    m.scan()
    assert m.current().version == 2 and by_version(m.status())[1]["state"] == "available"
    labels.write(repo, "mnist", Labels(stable=1, previous_stable=2))
    m.scan()
    assert m.current().version == 1


def test_a_broken_labels_file_keeps_the_last_good_state(repo, caplog):
    labels.write(repo, "mnist", Labels(stable=2, previous_stable=1))
    m = scanned(repo)
    assert m.current().version == 2
    (repo / "mnist" / "labels.json").write_text('{"stable": "two"')
    with caplog.at_level(logging.WARNING, logger="service.models"):
        m.scan()
        m.scan()
    assert m.current().version == 2
    assert "not valid JSON" in m.status()["labels_error"]
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1  # logged once
    (repo / "mnist" / "labels.json").write_text('{"stable": 1}')
    m.scan()
    assert m.current().version == 1 and m.status()["labels_error"] is None


def test_canary_split_is_binomial(repo):
    n, percent = 4000, 10
    labels.write(repo, "mnist", Labels(stable=1, canary=2, canary_percent=percent))
    m = scanned(repo)
    status = m.status()
    assert (status["serving"], status["canary"], status["canary_percent"]) == (1, 2, 10.0)
    assert by_version(status)[2]["state"] == "canary"
    to_canary = Counter(m.get(None).version for _ in range(n))[2]
    p = percent / 100
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(to_canary - n * p) < 4.5 * sigma, to_canary  # fails about once in 150,000 runs
    assert m.get(label="canary").version == 2 and m.get(label="stable").version == 1
    assert {m.get(1).version for _ in range(200)} == {1}  # a pinned version is never split
    assert {m.get(label="stable").version for _ in range(200)} == {1}


def test_label_errors(repo):
    m = scanned(repo)
    with pytest.raises(ApiError) as e:
        m.get(label="canary")
    assert (e.value.status, e.value.code) == (409, "no_canary")
    with pytest.raises(ApiError) as e:
        m.get(label="beta")
    assert (e.value.status, e.value.code) == (400, "invalid_label")


@pytest.fixture
def two_models(repo: Path) -> Path:
    publish(repo, random_net(5), accuracy=0.95, name="mnist-seed")
    return repo


def test_every_model_is_served_and_listed(two_models, mnist):
    client = create_app({"MODELS_DIR": str(two_models), "MODEL_POLL_SECONDS": 0}).test_client()
    image = {"image": mnist.test_images[0].tolist()}
    assert client.post("/predict", json=image).get_json()["model"] == {"name": "mnist", "version": 1}
    seed = client.post("/predict?model=mnist-seed", json=image).get_json()
    assert seed["model"] == {"name": "mnist-seed", "version": 1}  # 95%: the first version serves
    assert client.post("/predict?label=stable", json=image).get_json()["model"]["version"] == 1

    r = client.post("/predict?model=fashion", json=image)
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "model_not_found"
    r = client.post("/predict?label=canary", json=image)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "no_canary"
    r = client.post("/predict?label=beta", json=image)
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_label"
    r = client.post("/predict?label=stable&version=1", json=image)
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "version_and_label"

    body = client.get("/models").get_json()
    assert body["name"] == "mnist" and body["serving"] == 1  # MODEL_NAME's fields, as before
    assert [(s["name"], s["serving"]) for s in body["models"]] == [("mnist", 1), ("mnist-seed", 1)]
    assert by_version(body)[2]["state"] == "held"

    index = client.post("/v2/repository/index").get_json()
    assert [(e["name"], e["version"], e["state"], e["labels"]) for e in index] == [
        ("mnist", "1", "READY", ["stable"]),
        ("mnist", "2", "READY", []),
        ("mnist-seed", "1", "READY", ["stable"]),
    ]
    assert index[1]["reason"].startswith("held: test accuracy 96.60%")
    assert client.post("/v2/repository/index", json={"ready": "yes"}).status_code == 400
    assert client.get("/v2/models/mnist-seed").get_json()["versions"] == ["1"]
    assert client.get("/v2/models/fashion").status_code == 404


def test_model_names_restricts_the_models_served(two_models):
    client = create_app(
        {"MODELS_DIR": str(two_models), "MODEL_POLL_SECONDS": 0, "MODEL_NAMES": "mnist"}
    ).test_client()
    assert [s["name"] for s in client.get("/models").get_json()["models"]] == ["mnist"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("PROMOTION", "newest", "PROMOTION must be one of"),
        ("MIN_ACCURACY", "98", "fraction"),
        ("PROMOTION_TOLERANCE", "-0.1", "positive"),
        ("MODEL_NAMES", "mnist,../x", "MODEL_NAMES"),
    ],
)
def test_bad_lifecycle_settings_stop_the_start(key, value, message):
    from core.settings import Settings

    with pytest.raises(ValueError, match=message):
        Settings.from_env({key: value})


def test_metrics_carry_the_version_that_answered(repo, mnist):
    labels.write(repo, "mnist", Labels(stable=1, canary=2, canary_percent=50))
    client = create_app({"MODELS_DIR": str(repo), "MODEL_POLL_SECONDS": 0}).test_client()
    answered = Counter(
        client.post("/predict", json={"image": mnist.test_images[0].tolist()}).get_json()["model"]["version"]
        for _ in range(40)
    )
    text = client.get("/metrics").get_data(as_text=True)
    assert answered[1] and answered[2], answered
    for version in (1, 2):
        labels_ = {"model": "mnist", "version": str(version)}
        assert sample(text, "mnist_prediction_confidence_count", **labels_) == answered[version]
        assert (
            sample(text, "http_requests_total", endpoint="/predict", status="200", **labels_)
            == answered[version]
        )
        assert (
            sum(sample(text, "mnist_predictions_total", digit=str(d), **labels_) for d in range(10))
            == (answered[version])
        )


def test_pinned_versions_share_one_metrics_label(tmp_path, mnist):
    """Requests pinned to versions that are neither stable nor canary are counted as
    version="pinned": cycling through the history adds no series."""
    for seed in range(6):
        publish(tmp_path, random_net(seed))
    client = create_app({"MODELS_DIR": str(tmp_path), "MODEL_POLL_SECONDS": 0}).test_client()
    image = {"image": mnist.test_images[0].tolist()}
    assert client.post("/predict?version=1", json=image).status_code == 200
    assert client.post("/predict", json=image).get_json()["model"]["version"] == 6
    client.get("/metrics")
    before = client.get("/metrics").get_data(as_text=True)
    for v in range(2, 6):
        assert client.post(f"/predict?version={v}", json=image).get_json()["model"]["version"] == v
    after = client.get("/metrics").get_data(as_text=True)

    def series(text: str) -> set[str]:
        """Sample names and labels, the digit aside (each random network predicts its own)."""
        lines = (ln.rsplit(" ", 1)[0] for ln in text.splitlines() if ln and not ln.startswith("#"))
        return {re.sub(r'digit="\d",', "", ln) for ln in lines}

    assert series(after) == series(before), sorted(series(after) ^ series(before))[:10]
    assert sample(after, "mnist_prediction_confidence_count", model="mnist", version="pinned") == 5
    assert sample(after, "mnist_prediction_confidence_count", model="mnist", version="6") == 1


def sample(text: str, name: str, **labels_: str) -> float:
    """The sum of the samples of `name` whose labels include `labels_`."""
    total = 0.0
    for m in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(found.get(k) == v for k, v in labels_.items()):
            total += float(m.group(2))
    return total


# --- a real gunicorn under load ----------------------------------------------------------------------


def worker_versions(url: str) -> list[float]:
    """mnist_model_version of every live worker (one series per pid)."""
    text = requests.get(url + "/metrics", timeout=10).text
    return [
        float(v) for v in re.findall(r'^mnist_model_version\{model="mnist",pid="\d+"\} (\S+)$', text, re.M)
    ]


def test_held_promoted_and_rolled_back_under_load(gunicorn, tmp_path, mnist, monkeypatch):
    models_dir = tmp_path / "models"
    nets = {1: random_net(1), 2: random_net(2)}
    publish(models_dir, nets[1], accuracy=SHIPPED)
    server = gunicorn(models_dir)  # MODEL_POLL_SECONDS=0.5
    image = mnist.test_images[0]
    expected = {v: network.probabilities(n, to_vectors(image))[0].tolist() for v, n in nets.items()}
    monkeypatch.setenv("MODELS_DIR", str(models_dir))
    monkeypatch.setenv("MODEL_NAME", "mnist")

    with Load(rest(server.url, png_bytes(image))) as load:
        load.wait_recent(lambda o: o.version == 1, 10)
        publish(models_dir, nets[2], accuracy=QUICK)  # held: the same clients keep version 1
        time.sleep(2.5)
        assert {o.version for o in load.ok} == {1}
        status = requests.get(server.url + "/models", timeout=10).json()
        assert status["serving"] == 1 and by_version(status)[2]["state"] == "held"
        assert worker_versions(server.url) == [1.0, 1.0]

        assert release.main(["promote", "2"]) == 0
        assert load.wait_recent(lambda o: o.version == 2, 10) < 5
        time.sleep(1.5)  # every worker polls within 0.5 s
        assert worker_versions(server.url) == [2.0, 2.0]
        n = len(load.ok)
        time.sleep(1)
        assert {o.version for o in load.ok[n:]} == {2}

        assert release.main(["rollback"]) == 0
        load.wait_recent(lambda o: o.version == 1, 10)
        time.sleep(1.5)
        assert worker_versions(server.url) == [1.0, 1.0]

    assert not load.failures, load.failures[:5]
    # No mixed request: every answer is exactly what the version it names computes.
    for o in load.ok:
        assert o.body["probabilities"] == expected[o.version]
    assert set(Counter(o.version for o in load.ok)) == {1, 2} and len(load.ok) > 100


def test_both_shipped_models_answer_over_predict_and_tritonclient(gunicorn, mnist):
    server = gunicorn(ROOT / "models")
    images = mnist.test_images[:50]
    labels_ = mnist.test_labels[:50]
    triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        for name, least in (("mnist", 0.96), ("mnist-seed", 0.88)):
            digits = [
                requests.post(
                    f"{server.url}/predict?model={name}",
                    data=png_bytes(im),
                    headers={"Content-Type": "image/png"},
                    timeout=10,
                ).json()["digit"]
                for im in images
            ]
            assert np.mean(np.array(digits) == labels_) >= least, name
            tensor = httpclient.InferInput("input", [len(images), 784], "UINT8")
            tensor.set_data_from_numpy(images.reshape(len(images), 784))
            result = triton.infer(name, [tensor])
            assert result.as_numpy("digit").tolist() == digits
            assert triton.is_model_ready(name)
        index = triton.get_model_repository_index()
        assert {(e["name"], e["version"]) for e in index} >= {("mnist", "2"), ("mnist-seed", "1")}
        shipped = json.loads((ROOT / "models" / "mnist-seed" / "1" / "model.json").read_text())
        assert (
            shipped["architecture"]["sizes"] == [784, 32, 10] and shipped["metrics"]["test_accuracy"] > 0.94
        )
    finally:
        triton.close()
