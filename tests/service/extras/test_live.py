"""Against a real gunicorn (2 workers): tritonclient, metrics summed across workers, JSON logs."""

from __future__ import annotations

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from core.preprocess import to_vectors
from tests.helpers import png_bytes, publish, start_gunicorn, train_quickly

N_IMAGES = 64


@pytest.fixture(scope="module")
def images(mnist) -> np.ndarray:
    return mnist.test_images[:N_IMAGES]


@pytest.fixture(scope="module")
def predict_digits(server, images) -> list[int]:
    """What /predict answers for each image sent as a PNG: the reference for the V2 route."""
    with requests.Session() as s:
        return [
            s.post(server.url + "/predict", data=png_bytes(im), headers={"Content-Type": "image/png"}).json()[
                "digit"
            ]
            for im in images
        ]


@pytest.fixture
def triton(server):
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


def test_tritonclient_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("mnist") and triton.is_model_ready("mnist", "1")
    assert not triton.is_model_ready("fashion")
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    meta = triton.get_model_metadata("mnist", "1")
    assert meta["inputs"][0]["name"] == "input"
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("fashion")
    assert e.value.status() == "404"


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
@pytest.mark.parametrize("form", ["UINT8-28x28", "FP32-784"])
def test_tritonclient_infer_matches_predict(triton, images, predict_digits, binary_in, binary_out, form):
    if form == "UINT8-28x28":
        tensor = np.ascontiguousarray(images, dtype=np.uint8)
        inp = httpclient.InferInput("input", list(tensor.shape), "UINT8")
    else:
        tensor = to_vectors(images)
        inp = httpclient.InferInput("input", list(tensor.shape), "FP32")
    inp.set_data_from_numpy(tensor, binary_data=binary_in)
    outputs = [
        httpclient.InferRequestedOutput("digit", binary_data=binary_out),
        httpclient.InferRequestedOutput("probabilities", binary_data=binary_out),
    ]
    result = triton.infer("mnist", [inp], model_version="1", outputs=outputs, request_id="req-42")
    digits = result.as_numpy("digit")
    probs = result.as_numpy("probabilities")
    assert digits.dtype == np.int64 and digits.tolist() == predict_digits
    assert probs.dtype == np.float32 and probs.shape == (N_IMAGES, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs.argmax(axis=1) == digits).all()
    response = result.get_response()
    assert response["id"] == "req-42" and response["model_version"] == "1"


def test_tritonclient_default_outputs_are_binary(triton, images, predict_digits):
    # With no outputs named, tritonclient asks for every output as binary (binary_data_output).
    inp = httpclient.InferInput("input", [N_IMAGES, 784], "UINT8")
    inp.set_data_from_numpy(images.reshape(N_IMAGES, 784), binary_data=True)
    result = triton.infer("mnist", [inp], parameters={"trace": "t1"})
    assert result.as_numpy("digit").tolist() == predict_digits
    assert result.get_response()["parameters"]["trace"] == "t1"
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_tritonclient_errors(triton):
    bad = httpclient.InferInput("input", [1, 784], "FP32")
    bad.set_data_from_numpy(np.full((1, 784), 2.0, dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        triton.infer("mnist", [bad])
    assert e.value.status() == "400" and "[0, 1]" in e.value.message()
    ok = httpclient.InferInput("input", [1, 784], "UINT8")
    ok.set_data_from_numpy(np.zeros((1, 784), dtype=np.uint8))
    with pytest.raises(InferenceServerException) as e:
        triton.infer("mnist", [ok], model_version="99")
    assert e.value.status() == "404"


# --- metrics -------------------------------------------------------------------


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


def test_metrics_count_exactly_k_requests_across_workers(server, images):
    k = 60
    before = scrape(server.url)
    n_predict = sample(before, "http_requests_total", endpoint="/predict", method="POST", status="200")
    n_hist = sample(before, "http_request_duration_seconds_count", endpoint="/predict")
    digits_before = {d: sample(before, "mnist_predictions_total", digit=str(d)) for d in range(10)}
    body = png_bytes(images[0])

    def one(i: int) -> tuple[int, str, int]:
        r = requests.post(
            server.url + "/predict",
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

    after = scrape(server.url)
    assert (
        sample(after, "http_requests_total", endpoint="/predict", method="POST", status="200") - n_predict
        == k
    )
    assert sample(after, "http_request_duration_seconds_count", endpoint="/predict") - n_hist == k
    assert sample(after, "mnist_predictions_total", digit=str(digit)) - digits_before[digit] == k

    # More than one worker served them: each access line names its pid and the request id.
    access = [json.loads(line) for line in server.lines() if line.startswith("{") and '"k-' in line]
    access = [a for a in access if a.get("logger") == "access" and a["request_id"].startswith("k-")]
    assert sorted(a["request_id"] for a in access) == sorted(f"k-{i}" for i in range(k))
    assert len({a["pid"] for a in access}) > 1


def test_metrics_model_gauge_and_reloads(server, models_dir, mnist):
    text = scrape(server.url)
    versions = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("mnist_model_version{")
    ]
    assert versions and max(versions) == 1.0
    assert "# TYPE mnist_model_reloads_total counter" in text
    assert "# TYPE mnist_model_rejected_versions_total counter" in text
    assert "# TYPE http_request_duration_seconds histogram" in text


def test_every_line_on_stdout_is_json(server):
    requests.get(server.url + "/healthz", headers={"X-Request-ID": "bad id with spaces"}, timeout=5)
    lines = [line for line in server.lines() if line.strip()]
    assert lines
    docs = [json.loads(line) for line in lines]  # raises on any non-JSON line
    assert {"ts", "level", "logger", "message", "pid"} <= set(docs[-1])
    assert any(d.get("logger") == "gunicorn.error" for d in docs)
    # One access line per request: the app's (with the request id), not gunicorn's as well.
    assert not any(d.get("logger") == "gunicorn.access" for d in docs)
    health = [d for d in docs if d.get("logger") == "access" and d.get("path") == "/healthz"]
    # An unsafe client id is replaced by a generated one, not echoed into logs and headers.
    assert health and re.fullmatch(r"[0-9a-f]{32}", health[-1]["request_id"])


def test_reloads_and_rejections_are_counted_in_every_worker(tmp_path, models_dir, mnist):
    """A new version moves the gauge and the reload counter; a tampered one the rejection counter."""
    root = tmp_path / "models"
    shutil.copytree(models_dir, root)
    with start_gunicorn(root, tmp_path) as g:
        # Each worker starts polling on its first request: make sure both have served one.
        pids: set[int] = set()
        deadline = time.monotonic() + 20
        while len(pids) < 2 and time.monotonic() < deadline:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda _: requests.get(g.url + "/healthz", timeout=5), range(8)))
            pids = {
                json.loads(line)["pid"]
                for line in g.lines()
                if '"logger": "access"' in line and '"/healthz"' in line
            }
        assert len(pids) == 2

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


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests(triton, images, predict_digits, algorithm):
    inp = httpclient.InferInput("input", [N_IMAGES, 28, 28], "UINT8")
    inp.set_data_from_numpy(np.ascontiguousarray(images), binary_data=True)
    result = triton.infer("mnist", [inp], request_compression_algorithm=algorithm)
    assert result.as_numpy("digit").tolist() == predict_digits
