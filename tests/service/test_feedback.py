"""POST /feedback: every body form, every refusal, durability under SIGKILL, and live accuracy
that equals an offline scoring, through Flask's test client and a real gunicorn."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from jsonschema import Draft202012Validator, FormatChecker
from prometheus_client.parser import text_string_to_metric_families

from core import feedback, network
from core.preprocess import to_vectors
from core.settings import Settings
from service import imaging
from tests.helpers import ROOT, make_client, png_bytes, publish, random_net
from tests.segment_digits import sample

SCHEMA = json.loads((ROOT / "schemas" / "feedback-record.v1.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=FormatChecker())


def feedback_client(models_dir: Path, fb: Path | None, **config):
    """make_client with FEEDBACK_DIR=fb (None: feedback off)."""
    return make_client(models_dir, **config, **({} if fb is None else {"FEEDBACK_DIR": str(fb)}))


def stored(fb: Path) -> list[dict]:
    """Every line in the folder, each checked against the schema; a partial line fails the test."""
    events = []
    for path in feedback.feedback_files(fb):
        data = path.read_bytes()
        assert data.endswith(b"\n")
        for line in data.splitlines():
            event = json.loads(line)
            VALIDATOR.validate(event)
            events.append(event)
    return events


def assert_error(r, status: int, code: str) -> None:
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.mimetype == "application/json"
    body = r.get_json()
    assert body["error"]["code"] == code and body["error"]["message"], body


@pytest.fixture
def digit_image() -> np.ndarray:
    a = np.zeros((28, 28), np.uint8)
    a[4:24, 12:16] = 255
    return a


def _forms(image: np.ndarray):
    png = png_bytes(image)
    drawn = 255 - np.kron(image, np.ones((5, 5), np.uint8))  # 140x140 dark ink on white, like the page
    drawn_png = png_bytes(drawn)
    return {
        "png": ({"data": png, "content_type": "image/png"}, "?digit=1", png, image),
        "octet-stream": ({"data": png, "content_type": "application/octet-stream"}, "?digit=1", png, image),
        "drawn": ({"data": drawn_png, "content_type": "image/png"}, "?digit=1", drawn_png, None),
        "multipart": (
            {
                "data": {"image": (io.BytesIO(png), "d.png"), "digit": "1"},
                "content_type": "multipart/form-data",
            },
            "",
            png,
            image,
        ),
        "json": ({"json": {"image": image.tolist(), "digit": 1}}, "", None, image),
        "json-flat": ({"json": {"image": image.ravel().tolist()}}, "?digit=1", None, image),
    }


@pytest.mark.parametrize("form", ["png", "octet-stream", "drawn", "multipart", "json", "json-flat"])
def test_every_body_form_is_stored_scored_and_valid(random_models_dir, tmp_path, digit_image, form):
    kwargs, query, raw, expected_input = _forms(digit_image)[form]
    client = feedback_client(random_models_dir, tmp_path / "fb")
    r = client.post("/feedback" + query + ("&" if query else "?") + "request_id=abc-1&predicted=7", **kwargs)
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    [event] = stored(tmp_path / "fb")
    assert event["id"] == body["id"] and body["stored"] is True
    d = event["data"]
    assert d["digit"] == body["digit"] == 1 and d["predicted"] == 7 and d["request_id"] == "abc-1"
    assert d["feedback_request_id"] == r.headers["X-Request-ID"]
    assert d["model"] == body["model"] == {"name": "mnist", "version": 1}
    # The service scored the image itself, with the stable version, whatever the client claimed.
    seen = np.asarray(d["input"], dtype=np.float64)
    if expected_input is not None:
        np.testing.assert_array_equal(seen, expected_input)
    else:
        np.testing.assert_array_equal(seen, imaging.to_mnist(imaging.decode(raw, 10**7)))
    served = network.probabilities(random_net(1), to_vectors(seen))[0]
    assert d["scored"]["probabilities"] == served.tolist()
    assert d["scored"]["digit"] == body["scored"] == int(served.argmax())
    assert d["correct"] is body["correct"] is (int(served.argmax()) == 1)
    if raw is None:
        assert d["image"] is None
    else:
        assert base64.b64decode(d["image"]["base64"]) == raw and d["image"]["bytes"] == len(raw)


def test_an_image_over_the_kept_size_keeps_its_size_and_hash(random_models_dir, tmp_path, digit_image):
    png = png_bytes(digit_image)
    client = feedback_client(random_models_dir, tmp_path, FEEDBACK_IMAGE_MAX_BYTES=len(png) - 1)
    r = client.post("/feedback?digit=1", data=png, content_type="image/png")
    assert r.status_code == 201
    [event] = stored(tmp_path)
    assert event["data"]["image"]["base64"] is None and event["data"]["image"]["bytes"] == len(png)
    assert "the image file's size and hash" in r.get_json()["kept"]


@pytest.mark.parametrize(
    "query, doc, code",
    [
        ("", None, "missing_digit"),
        ("?digit=", None, "missing_digit"),
        ("?digit=10", None, "invalid_digit"),
        ("?digit=-1", None, "invalid_digit"),
        ("?digit=a", None, "invalid_digit"),
        ("?digit=%EF%BC%93", None, "invalid_digit"),  # a full-width ３ is not a digit here
        ("", {"digit": 3.0}, "invalid_digit"),
        ("", {"digit": True}, "invalid_digit"),
        ("", {"digit": [3]}, "invalid_digit"),
        ("", {"digit": None}, "missing_digit"),
        ("?digit=3", {"digit": 4}, "conflicting_digit"),
        ("?digit=3&predicted=12", None, "invalid_predicted"),
        ("?digit=3&version=x", None, "invalid_version"),
        ("?digit=3&version=0", None, "invalid_version"),
        ("", {"digit": 3, "version": True}, "invalid_version"),
        ("?digit=3&model=..%2Fx", None, "invalid_model"),
        ("", {"digit": 3, "request_id": "x" * 201}, "invalid_request_id"),
        ("", {"digit": 3, "request_id": 5}, "invalid_request_id"),
        ("?digit=3&preprocess=maybe", None, "invalid_preprocess"),
    ],
)
def test_bad_fields_are_400_and_store_nothing(random_models_dir, tmp_path, digit_image, query, doc, code):
    client = feedback_client(random_models_dir, tmp_path)
    if doc is None:
        r = client.post("/feedback" + query, data=png_bytes(digit_image), content_type="image/png")
    else:
        r = client.post("/feedback" + query, json={"image": digit_image.tolist(), **doc})
    assert_error(r, 400, code)
    assert stored(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        ({"data": b"", "content_type": "image/png"}, 400, "empty_body"),
        ({"data": b"not an image", "content_type": "image/png"}, 400, "invalid_image"),
        ({"data": b"x", "content_type": "text/plain"}, 415, "unsupported_media_type"),
        ({"json": {"digit": 3}}, 400, "wrong_shape"),
        ({"json": {"image": [[300] * 28] * 28, "digit": 3}}, 400, "out_of_range"),
    ],
)
def test_bad_images_get_predicts_errors_and_store_nothing(random_models_dir, tmp_path, kwargs, status, code):
    r = feedback_client(random_models_dir, tmp_path).post("/feedback", **kwargs)
    assert_error(r, status, code)
    assert stored(tmp_path) == []


def test_a_batch_is_refused(random_models_dir, tmp_path, digit_image):
    client = feedback_client(random_models_dir, tmp_path)
    png = png_bytes(digit_image)
    r = client.post(
        "/feedback?digit=1",
        data={"image": [(io.BytesIO(png), "a.png"), (io.BytesIO(png), "b.png")]},
        content_type="multipart/form-data",
    )
    assert_error(r, 400, "batch_not_supported")
    r = client.post("/feedback", json={"instances": [digit_image.tolist()] * 2, "digit": 1})
    assert_error(r, 400, "batch_not_supported")
    assert stored(tmp_path) == []


def test_without_feedback_dir_the_route_says_so_and_nothing_else_changes(
    random_models_dir, tmp_path, digit_image
):
    assert Settings.from_env({}).feedback_dir is None
    off = feedback_client(random_models_dir, None)
    r = off.post("/feedback?digit=1", data=png_bytes(digit_image), content_type="image/png")
    assert_error(r, 404, "feedback_off")
    assert "FEEDBACK_DIR" in r.get_json()["error"]["message"]
    models = off.get("/models").get_json()
    assert all("live" not in v for v in models["versions"])
    assert "mnist_feedback" not in off.get("/metrics").get_data(as_text=True)
    on = feedback_client(random_models_dir, tmp_path / "fb")
    # /predict answers the same with feedback on or off.
    a = off.post("/predict", data=png_bytes(digit_image), content_type="image/png").get_json()
    b = on.post("/predict", data=png_bytes(digit_image), content_type="image/png").get_json()
    assert a == b
    assert not (tmp_path / "fb").exists()  # nothing is created until a record is written


def test_the_size_cap_is_a_507_and_the_stored_lines_stay_whole(random_models_dir, tmp_path, digit_image):
    client = feedback_client(random_models_dir, tmp_path, FEEDBACK_MAX_BYTES=12_000)
    statuses = []
    for _ in range(10):
        r = client.post("/feedback?digit=1", data=png_bytes(digit_image), content_type="image/png")
        statuses.append(r.status_code)
        if r.status_code != 201:
            assert_error(r, 507, "feedback_full")
    assert 201 in statuses and statuses[-1] == 507
    assert len(stored(tmp_path)) == statuses.count(201)
    assert feedback.folder_bytes(tmp_path) <= 12_000


def test_an_unwritable_folder_is_a_503_with_the_reason(random_models_dir, tmp_path, digit_image):
    """A real failure even as root: FEEDBACK_DIR below a regular file cannot be created."""
    (tmp_path / "file").write_text("x")
    client = feedback_client(random_models_dir, tmp_path / "file" / "fb")
    r = client.post("/feedback?digit=1", data=png_bytes(digit_image), content_type="image/png")
    assert_error(r, 503, "feedback_unwritable")
    assert str(tmp_path / "file" / "fb") in r.get_json()["error"]["message"]


def test_a_read_only_folder_is_a_503(random_models_dir, tmp_path, digit_image, monkeypatch):
    """EROFS where the kernel reports it (a read-only mount cannot be made here without privileges)."""
    client = feedback_client(random_models_dir, tmp_path)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    r = client.post("/feedback?digit=1", data=png_bytes(digit_image), content_type="image/png")
    assert_error(r, 503, "feedback_unwritable")
    assert "Read-only file system" in r.get_json()["error"]["message"]


def test_the_given_version_scores_the_image(random_models_dir, tmp_path, mnist):
    publish(random_models_dir, random_net(2))  # version 2 becomes stable
    client = feedback_client(random_models_dir, tmp_path)
    image = mnist.test_images[0]
    for version, seed in ((1, 1), (2, 2), (None, 2)):
        query = f"?digit=7{'' if version is None else f'&version={version}'}"
        r = client.post("/feedback" + query, data=png_bytes(image), content_type="image/png")
        assert r.status_code == 201
        expected = int(network.predict(random_net(seed), to_vectors(image))[0])
        assert r.get_json()["scored"] == expected
        assert r.get_json()["model"]["version"] == (version or 2)
    assert_error(client.post("/feedback?digit=7&version=9", data=png_bytes(image), content_type="image/png"),
                 404, "version_not_found")  # fmt: skip
    assert_error(client.post("/feedback?digit=7&model=nope", data=png_bytes(image), content_type="image/png"),
                 404, "model_not_found")  # fmt: skip
    assert len(stored(tmp_path)) == 3


# --- a real gunicorn ------------------------------------------------------------------------------


def _metric(server, name: str) -> dict[tuple, float]:
    text = requests.get(server.url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.mark.slow
def test_live_counters_and_models_figure_equal_an_offline_scoring(
    gunicorn, trained_models_dir, trained_net, mnist, tmp_path
):
    """Corrections for MNIST and for hollow seven-segment digits through 2 workers: the Prometheus
    counters and /models' live figure (whichever worker answers) equal the offline count."""
    fb = tmp_path / "fb"
    server = gunicorn(trained_models_dir, FEEDBACK_DIR=str(fb))
    hollow, hollow_labels = sample(40, seed=3)
    bodies = [png_bytes(a) for a in mnist.test_images[:60]] + [png_bytes(a) for a in hollow]
    labels = mnist.test_labels[:60].tolist() + hollow_labels.tolist()
    with requests.Session() as s:
        for body, label in zip(bodies, labels, strict=True):
            r = s.post(
                f"{server.url}/feedback?digit={label}", data=body, headers={"Content-Type": "image/png"}
            )
            assert r.status_code == 201, r.text
    seen = np.stack([imaging.to_mnist(imaging.decode(b, 10**7)) for b in bodies])
    offline = network.predict(trained_net, to_vectors(seen)) == np.asarray(labels)
    right, wrong = int(offline.sum()), int((~offline).sum())
    assert right and wrong  # both outcomes occur, so each count is tested

    counts = _metric(server, "mnist_feedback_total")
    key = lambda outcome: (("model", "mnist"), ("outcome", outcome), ("version", "1"))  # noqa: E731
    assert counts == {key("correct"): right, key("wrong"): wrong}
    figures = set()
    for _ in range(8):  # two workers: each must give the same figure
        versions = requests.get(server.url + "/models", timeout=10).json()["versions"]
        live = versions[0]["live"]
        figures.add((live["feedback"], live["correct"], live["accuracy"]))
    assert figures == {(len(labels), right, right / len(labels))}
    assert [e["data"]["correct"] for e in feedback.read_events(fb)] == offline.tolist()


@pytest.mark.slow
def test_a_worker_killed_right_after_its_201_loses_no_record(
    gunicorn, random_models_dir, tmp_path, digit_image
):
    fb = tmp_path / "fb"
    server = gunicorn(random_models_dir, FEEDBACK_DIR=str(fb))
    ids = []
    for i in range(8):
        r = requests.post(
            f"{server.url}/feedback?digit={i % 10}",
            data=png_bytes(digit_image),
            headers={"Content-Type": "image/png"},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
        workers = server.workers()
        for pid in workers:  # whichever worker answered, it dies now, with no chance to flush
            os.kill(pid, signal.SIGKILL)
        server.wait_workers(2, exclude=workers)
        time.sleep(0.2)
    events = stored(fb)
    assert sorted(e["id"] for e in events) == sorted(ids)
    assert len(feedback.feedback_files(fb)) >= 8  # a file per writer process


def test_answers_match_the_openapi_document(random_models_dir, tmp_path, digit_image):
    client = feedback_client(random_models_dir, tmp_path, FEEDBACK_MAX_BYTES=6000)
    document = client.get("/openapi.json").get_json()
    responses = document["paths"]["/feedback"]["post"]["responses"]

    def check(r) -> None:
        assert str(r.status_code) in responses, r.status_code
        schema = responses[str(r.status_code)]["content"]["application/json"]["schema"]
        Draft202012Validator({**schema, "components": document["components"]}).validate(r.get_json())

    png = png_bytes(digit_image)
    statuses = []
    for query in ("digit=1", "digit=x", "digit=1&version=5", *["digit=1"] * 4):
        r = client.post("/feedback?" + query, data=png, content_type="image/png")
        check(r)
        statuses.append(r.status_code)
    r = feedback_client(random_models_dir, None).post("/feedback?digit=1", data=png, content_type="image/png")
    check(r)
    statuses.append(r.status_code)
    assert {201, 400, 404, 507} == set(statuses)
    models = client.get("/models").get_json()
    schema = {"$ref": "#/components/schemas/Models"}
    Draft202012Validator({**schema, "components": document["components"]}).validate(models)
    assert models["versions"][0]["live"]["feedback"] == statuses.count(201)
