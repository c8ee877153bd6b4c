"""POST /explain and /predict?explain=1: the prediction, the input the network saw, ∂ log p_digit / ∂input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests

from core import network
from core.preprocess import to_vectors
from service import imaging, inference
from tests.helpers import make_client, png_bytes

EXPLAIN_URLS = ("/explain", "/predict?explain=1", "/predict?explain=true")


def bodies(image: np.ndarray) -> dict[str, dict]:
    """One image in each of the three ways /predict accepts it, as test-client keyword arguments."""
    return {
        "png": {"data": png_bytes(image), "content_type": "image/png"},
        "multipart": {"data": {"image": (io.BytesIO(png_bytes(image)), "a.png")}},
        "json": {"json": {"image": image.tolist()}},
    }


def assert_explanation(body: dict) -> tuple[np.ndarray, np.ndarray]:
    assert set(body) == {"digit", "confidence", "probabilities", "model", "input", "saliency"}
    assert 0 <= body["digit"] <= 9 and body["confidence"] == body["probabilities"][body["digit"]]
    x, s = np.array(body["input"]), np.array(body["saliency"])
    assert x.shape == (28, 28) and s.shape == (28, 28)
    assert x.min() >= 0 and x.max() <= 1
    assert np.isfinite(s).all() and np.abs(s).max() > 0
    return x, s


@pytest.mark.parametrize("url", EXPLAIN_URLS)
@pytest.mark.parametrize("kind", ["png", "multipart", "json"])
def test_explanation_of_mnist_digits(trained_client, trained_net, mnist, url, kind):
    for i in range(3):
        image = mnist.test_images[i]
        r = trained_client.post(url, **bodies(image)[kind])
        assert r.status_code == 200, r.get_data(as_text=True)
        body = r.get_json()
        x, s = assert_explanation(body)
        plain = trained_client.post("/predict", **bodies(image)[kind]).get_json()
        assert {k: body[k] for k in plain} == plain  # the same prediction, bit for bit
        # A 28x28 MNIST image reaches the network untouched: input is exactly to_vectors(image).
        want_x = to_vectors(image)
        np.testing.assert_array_equal(x.ravel(), want_x[0])
        # The map is ∂ log p_digit / ∂x for the [0, 1] input, for the predicted digit.
        want_s = network.log_prob_input_gradient(trained_net, want_x, np.array([plain["digit"]]))
        np.testing.assert_allclose(s.ravel(), want_s[0], rtol=1e-5, atol=1e-7)


def test_a_step_along_the_map_raises_the_probability(trained_client, trained_net, mnist):
    """First order: log p_digit(x + ε s) ≈ log p_digit(x) + ε |s|², so the map points the right way."""
    body = trained_client.post("/explain", json={"image": mnist.test_images[7].tolist()}).get_json()
    x, s = (np.array(body[k], dtype=np.float64).reshape(1, 784) for k in ("input", "saliency"))
    net64 = trained_net.with_params(
        [w.astype(np.float64) for w in trained_net.weights],
        [b.astype(np.float64) for b in trained_net.biases],
    )
    eps = 1e-4 / np.abs(s).max()
    log_p = [np.log(network.probabilities(net64, v)[0, body["digit"]]) for v in (x, x + eps * s)]
    assert log_p[1] - log_p[0] == pytest.approx(eps * float(np.sum(s * s)), rel=0.05)


def test_input_is_what_the_network_saw_after_preprocessing(client):
    """A large dark-on-light drawing is inverted, cropped, scaled and centred: `input` shows that result."""
    drawing = np.full((120, 90), 255, np.uint8)
    drawing[20:100, 40:52] = 0  # a thick dark "1" on white
    data = png_bytes(drawing)
    body = client.post("/explain", data=data, content_type="image/png").get_json()
    seen = imaging.to_mnist(imaging.decode(data, 10**7), True)
    np.testing.assert_array_equal(np.array(body["input"]).ravel(), to_vectors(seen)[0])
    assert (
        np.array(body["input"])[0].max() == 0 and np.array(body["input"]).max() == 1
    )  # inverted, ink centred
    raw = client.post("/explain?preprocess=none", json={"image": np.full((28, 28), 51).tolist()}).get_json()
    assert np.array(raw["input"]) == pytest.approx(np.full((28, 28), 0.2))


def test_explain_off_answers_the_plain_prediction(client, mnist):
    data = png_bytes(mnist.test_images[0])
    plain = client.post("/predict", data=data, content_type="image/png").get_json()
    for flag in ("0", "false", ""):
        r = client.post(f"/predict?explain={flag}", data=data, content_type="image/png")
        assert r.get_json() == plain
    assert set(plain) == {"digit", "confidence", "probabilities", "model"}


def test_predict_computes_no_gradient_unless_asked(client, mnist, monkeypatch):
    calls = []
    real = inference.log_prob_input_gradient

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(inference, "log_prob_input_gradient", counting)
    data = png_bytes(mnist.test_images[0])
    multi = {"image": [(io.BytesIO(data), "a.png"), (io.BytesIO(data), "b.png")]}
    assert client.post("/predict", data=data, content_type="image/png").status_code == 200
    assert client.post("/predict", data=multi).status_code == 200
    assert client.post("/predict?explain=0", json={"image": mnist.test_images[0].tolist()}).status_code == 200
    assert calls == []
    assert client.post("/predict?explain=1", data=data, content_type="image/png").status_code == 200
    assert client.post("/explain", data=data, content_type="image/png").status_code == 200
    assert calls == [1, 1]


def test_explained_digit_counts_as_a_prediction(client, mnist):
    def count() -> float:
        text = client.get("/metrics").get_data(as_text=True)
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("mnist_predictions_total{")
        )

    before = count()
    client.post("/explain", json={"image": mnist.test_images[0].tolist()})
    client.post("/predict?explain=1", json={"image": mnist.test_images[0].tolist()})
    assert count() == before + 2


BAD = [
    ("", {"data": b"", "content_type": "image/png"}),
    ("", {"data": b"not an image", "content_type": "image/png"}),
    ("", {"data": b"{", "content_type": "application/json"}),
    ("", {"json": {"image": [1, 2, 3]}}),
    ("", {"json": {"image": [[300] * 28] * 28}}),
    ("", {"json": {"image": "7"}}),
    ("", {"data": b"abc", "content_type": "text/plain"}),
    ("", {"data": {"file": (b"x", "a.png")}}),  # multipart without an "image" field
    ("?version=../1", {"json": {"image": [0] * 784}}),
    ("?version=9", {"json": {"image": [0] * 784}}),
    ("?preprocess=maybe", {"json": {"image": [0] * 784}}),
    ("?preprocess=none", {"data": png_bytes(np.zeros((40, 40), np.uint8)), "content_type": "image/png"}),
]


@pytest.mark.parametrize(("query", "kwargs"), BAD)
def test_bad_input_is_the_same_4xx_as_predict(client, query, kwargs):
    def post(url: str):
        fields = kwargs.get("data")
        if isinstance(fields, dict):  # multipart: a fresh file per request, the client closes it
            return client.post(url, data={k: (io.BytesIO(b), name) for k, (b, name) in fields.items()})
        return client.post(url, **kwargs)

    want = post("/predict" + query)
    assert 400 <= want.status_code < 500 and set(want.get_json()["error"]) == {"code", "message"}
    sep = "&" if query else "?"
    for url in ("/explain" + query, "/predict" + query + sep + "explain=1"):
        got = post(url)
        assert (got.status_code, got.get_json()) == (want.status_code, want.get_json()), url


def test_413_and_503_are_the_same_as_predict(random_models_dir, tmp_path, mnist):
    small = make_client(random_models_dir, MAX_CONTENT_LENGTH=1000)
    big = {
        "data": png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64))),
        "content_type": "image/png",
    }
    empty = make_client(tmp_path / "none")
    for c, kwargs, status in ((small, big, 413), (empty, {"json": {"image": [0] * 784}}, 503)):
        want = c.post("/predict", **kwargs)
        assert want.status_code == status
        for url in ("/explain", "/predict?explain=1"):
            got = c.post(url, **kwargs)
            assert (got.status_code, got.get_json()) == (status, want.get_json())


def test_batches_are_refused_with_a_reason(client, mnist):
    data = png_bytes(mnist.test_images[0])
    for url in ("/explain", "/predict?explain=1"):
        for kwargs in (
            {"json": {"instances": [mnist.test_images[0].tolist()]}},
            {"data": {"image": [(io.BytesIO(data), "a.png"), (io.BytesIO(data), "b.png")]}},
        ):
            r = client.post(url, **kwargs)
            assert r.status_code == 400 and r.get_json()["error"]["code"] == "batch_not_supported", url


def test_invalid_explain_argument(client):
    r = client.post("/predict?explain=maybe", json={"image": [0] * 784})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_explain"
    assert "maybe" in r.get_json()["error"]["message"]


@pytest.mark.slow
def test_explain_under_gunicorn(gunicorn, trained_models_dir, mnist, trained_net):
    server = gunicorn(trained_models_dir)
    image = mnist.test_images[1]
    r = requests.post(
        server.url + "/predict?explain=1",
        data=png_bytes(image),
        headers={"Content-Type": "image/png"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert_explanation(body)
    assert body["digit"] == int(network.predict(trained_net, to_vectors(image))[0])
    np.testing.assert_array_equal(np.array(body["input"]).ravel(), to_vectors(image)[0])
    r = requests.post(server.url + "/explain", json={"instances": [image.tolist()]}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "batch_not_supported"
