"""Every endpoint and every error of the API, through Flask's test client."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core import network
from core.preprocess import to_vectors
from core.settings import Settings
from tests.helpers import bomb_png, make_client, png_bytes, publish, random_net


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body


def assert_prediction(p: dict) -> None:
    assert isinstance(p["digit"], int) and 0 <= p["digit"] <= 9
    assert len(p["probabilities"]) == 10
    assert abs(sum(p["probabilities"]) - 1) < 1e-5
    assert p["confidence"] == max(p["probabilities"]) == p["probabilities"][p["digit"]]


# --- configuration ---------------------------------------------------------------------------


def test_config_defaults_and_env():
    cfg = Settings.from_env({}).as_env()
    assert cfg["MODELS_DIR"] == "./models" and cfg["MODEL_NAME"] == "mnist"
    assert cfg["MODEL_VERSION"] is None and cfg["MODEL_POLL_SECONDS"] == 5
    assert cfg["MAX_BATCH"] == 1024 and cfg["MAX_CONTENT_LENGTH"] == 4 * 1024 * 1024
    assert cfg["TRUSTED_PROXIES"] == 0
    cfg = Settings.from_env({"MODEL_VERSION": "3", "MAX_BATCH": "8", "MODEL_POLL_SECONDS": "0.5"}).as_env()
    assert cfg["MODEL_VERSION"] == 3 and cfg["MAX_BATCH"] == 8 and cfg["MODEL_POLL_SECONDS"] == 0.5
    assert Settings.from_env({"TRUSTED_PROXIES": "1"}).as_env()["TRUSTED_PROXIES"] == 1


@pytest.mark.parametrize(
    "env",
    [
        {"MAX_BATCH": "many"},
        {"MAX_BATCH": "0"},
        {"MODEL_VERSION": "../1"},
        {"MODEL_POLL_SECONDS": "-1"},
        {"TRUSTED_PROXIES": "-1"},
        {"TRUSTED_PROXIES": "one"},
    ],
)
def test_bad_config_stops_the_start(env):
    with pytest.raises(ValueError):
        Settings.from_env(env)


# --- health, readiness, models ------------------------------------------------------------


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.get_json() == {"status": "ok"}


def test_readyz_with_model(client):
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.get_json()["model"] == {"name": "mnist", "version": 1}


def test_readyz_without_model_is_503_with_reason(tmp_path):
    client = make_client(tmp_path / "empty")
    body = assert_error(client.get("/readyz"), 503, "not_ready")
    assert "no model versions" in body["error"]["message"]
    assert client.get("/healthz").status_code == 200
    assert_error(client.post("/predict", json={"image": [0] * 784}), 503, "no_model")


def test_models_lists_versions_metadata_and_rejections(random_models_dir: Path):
    publish(random_models_dir, random_net(2), accuracy=0.995)
    bad = random_models_dir / "mnist" / "3"
    shutil.copytree(random_models_dir / "mnist" / "1", bad)
    (bad / "weights.npz").write_bytes(b"tampered")
    client = make_client(random_models_dir)
    body = client.get("/models").get_json()
    assert body["name"] == "mnist" and body["serving"] == 2 and body["ready"] is True
    by_version = {v["version"]: v for v in body["versions"]}
    assert by_version[1]["state"] == "available"
    assert by_version[2]["state"] == "serving" and by_version[2]["accuracy"] == 0.995
    assert by_version[2]["architecture"]["sizes"] == [784, 30, 10] and by_version[2]["created"]
    assert by_version[3]["state"] == "rejected" and "sha256" in by_version[3]["reason"]


# --- predictions ---------------------------------------------------------------------------


def test_png_prediction_matches_offline(mnist, trained_models_dir: Path, trained_net):
    client = make_client(trained_models_dir)
    images = mnist.test_images[:20]
    offline = network.predict(trained_net, to_vectors(images))
    # The same image through the same functions gives the same bits. (A batch of 20 may differ in
    # the last bit from 20 single images: BLAS sums in another order for another shape.)
    expected_p = [network.probabilities(trained_net, to_vectors(image))[0] for image in images]
    for image, digit, p in zip(images, offline, expected_p, strict=True):
        r = client.post("/predict", data=png_bytes(image), content_type="image/png")
        assert r.status_code == 200
        body = r.get_json()
        assert_prediction(body)
        assert body["digit"] == digit
        assert body["probabilities"] == p.tolist()  # bit for bit
        assert body["model"] == {"name": "mnist", "version": 1}


@pytest.mark.parametrize("content_type", ["image/png", "image/x-anything", "application/octet-stream"])
def test_raw_body_content_types(client, mnist, content_type):
    r = client.post("/predict", data=png_bytes(mnist.test_images[0]), content_type=content_type)
    assert r.status_code == 200
    assert_prediction(r.get_json())


def test_jpeg_and_other_formats(client, mnist):
    for fmt in ("JPEG", "BMP", "GIF", "WEBP"):
        r = client.post("/predict", data=png_bytes(mnist.test_images[0], fmt=fmt), content_type="image/*")
        assert r.status_code == 200, (fmt, r.get_json())
    for fmt in ("TIFF", "ICO", "PPM"):  # formats Pillow reads but the service does not accept
        r = client.post("/predict", data=png_bytes(mnist.test_images[0], fmt=fmt), content_type="image/*")
        assert_error(r, 415, "unsupported_image_format")


def test_multipart_single_and_batch(mnist, trained_models_dir, trained_net):
    client = make_client(trained_models_dir)
    images = mnist.test_images[:5]
    r = client.post("/predict", data={"image": (io.BytesIO(png_bytes(images[0])), "0.png")})
    assert r.status_code == 200 and "digit" in r.get_json()
    files = [(io.BytesIO(png_bytes(a)), f"{i}.png") for i, a in enumerate(images)]
    r = client.post("/predict", data={"image": files})
    body = r.get_json()
    assert r.status_code == 200 and body["model"]["version"] == 1
    assert [p["digit"] for p in body["predictions"]] == network.predict(
        trained_net, to_vectors(images)
    ).tolist()


def test_multipart_without_image_field(client):
    r = client.post("/predict", data={"file": (io.BytesIO(b"x"), "x.png")})
    assert_error(r, 400, "missing_image")


def test_json_image_28x28_and_flat(mnist, trained_models_dir, trained_net):
    client = make_client(trained_models_dir)
    image = mnist.test_images[3]
    expected = network.probabilities(trained_net, to_vectors(image))[0].tolist()
    for payload in (image.tolist(), image.reshape(-1).tolist(), (image / 1.0).tolist()):
        body = client.post("/predict", json={"image": payload}).get_json()
        assert body["probabilities"] == expected


def test_json_instances_batch_in_order(mnist, trained_models_dir, trained_net):
    client = make_client(trained_models_dir)
    images = mnist.test_images[:64]
    r = client.post("/predict", json={"instances": images.tolist()})
    body = r.get_json()
    assert r.status_code == 200 and len(body["predictions"]) == 64
    for p in body["predictions"]:
        assert_prediction(p)
    got = [p["digit"] for p in body["predictions"]]
    assert got == network.predict(trained_net, to_vectors(images)).tolist()
    flat = client.post("/predict", json={"instances": images.reshape(64, -1).tolist()}).get_json()
    assert flat["predictions"] == body["predictions"]


def test_version_pinning(random_models_dir, mnist):
    publish(random_models_dir, random_net(7))
    client = make_client(random_models_dir)
    data = png_bytes(mnist.test_images[0])
    assert client.post("/predict", data=data, content_type="image/png").get_json()["model"]["version"] == 2
    r = client.post("/predict?version=1", data=data, content_type="image/png")
    assert r.get_json()["model"]["version"] == 1
    assert_error(
        client.post("/predict?version=9", data=data, content_type="image/png"), 404, "version_not_found"
    )


@pytest.mark.parametrize("version", ["0", "-1", "abc", "../1", "1/../../etc", "1.0", "%2e%2e", "99999999999"])
def test_malformed_versions_are_refused(client, mnist, version):
    r = client.post(
        f"/predict?version={version}", data=png_bytes(mnist.test_images[0]), content_type="image/png"
    )
    assert_error(r, 400, "invalid_version")


def test_model_version_env_pins(random_models_dir, mnist):
    publish(random_models_dir, random_net(7))
    client = make_client(random_models_dir, MODEL_VERSION=1)
    assert client.get("/readyz").get_json()["model"]["version"] == 1
    client = make_client(random_models_dir, MODEL_VERSION=5)
    assert "MODEL_VERSION=5" in assert_error(client.get("/readyz"), 503)["error"]["message"]


def test_sigmoid_model_probabilities_sum_to_one(tmp_path, mnist):
    net = network.new_network([784, 20, 10], ["sigmoid", "sigmoid"], "quadratic", np.random.default_rng(3))
    publish(tmp_path / "m", net)
    client = make_client(tmp_path / "m")
    body = client.post("/predict", json={"image": mnist.test_images[0].tolist()}).get_json()
    assert_prediction(body)
    assert body["digit"] == int(network.predict(net, to_vectors(mnist.test_images[0]))[0])


def test_preprocess_none(client, mnist):
    r = client.post(
        "/predict?preprocess=none", data=png_bytes(mnist.test_images[0]), content_type="image/png"
    )
    assert r.status_code == 200
    big = np.zeros((40, 40), np.uint8)
    r = client.post("/predict?preprocess=none", data=png_bytes(big), content_type="image/png")
    assert_error(r, 400, "wrong_shape")
    assert_error(
        client.post("/predict?preprocess=maybe", json={"image": [0] * 784}), 400, "invalid_preprocess"
    )


# --- errors ----------------------------------------------------------------------------------


def test_404_unknown_route(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.post("/predict/extra"), 404, "not_found")


@pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
def test_405_wrong_method(client, method):
    r = getattr(client, method)("/predict")
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["Allow"]
    assert_error(client.post("/healthz"), 405)


def test_413_body_too_large(random_models_dir):
    client = make_client(random_models_dir, MAX_CONTENT_LENGTH=1000)
    assert_error(
        client.post("/predict", data=b"\0" * 1001, content_type="image/png"), 413, "payload_too_large"
    )
    r = client.post("/predict", json={"image": [0] * 784})  # ~1.6 kB of JSON
    assert_error(r, 413)
    r = client.post("/predict", data={"image": (io.BytesIO(b"\0" * 2000), "x.png")})
    assert_error(r, 413)


def test_413_batch_over_max_batch(random_models_dir, mnist):
    client = make_client(random_models_dir, MAX_BATCH=4)
    assert client.post("/predict", json={"instances": mnist.test_images[:4].tolist()}).status_code == 200
    r = client.post("/predict", json={"instances": mnist.test_images[:5].tolist()})
    assert_error(r, 413, "batch_too_large")
    files = [(io.BytesIO(png_bytes(a)), "x.png") for a in mnist.test_images[:5]]
    assert_error(client.post("/predict", data={"image": files}), 413, "batch_too_large")


def test_413_decompression_bomb(client):
    r = client.post("/predict", data=bomb_png(20000, 20000), content_type="image/png")
    assert_error(r, 413, "image_too_large")


def test_415_unsupported_content_type(client):
    for ct in ("text/plain", "application/xml", "application/x-www-form-urlencoded"):
        assert_error(client.post("/predict", data=b"abc", content_type=ct), 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        (b"", "image/png", "empty_body"),
        (b"", "application/json", "empty_body"),
        (b"", None, "empty_body"),
        (b"not an image", "image/png", "invalid_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "image/png", "invalid_image"),
        (b"{", "application/json", "malformed_json"),
        (b"\xff\xfe", "application/json", "malformed_json"),
        (b'{"image": [NaN]}', "application/json", "malformed_json"),
        (b'{"image": [Infinity]}', "application/json", "malformed_json"),
        (b"[1, 2]", "application/json", "wrong_shape"),
        (b'{"img": []}', "application/json", "wrong_shape"),
        (b'{"image": []}', "application/json", "wrong_shape"),
        (b'{"image": [1, 2, 3]}', "application/json", "wrong_shape"),
        (b'{"instances": []}', "application/json", "wrong_shape"),
        (b'{"instances": {"a": 1}}', "application/json", "wrong_shape"),
        (b'{"image": "abc"}', "application/json", "wrong_type"),
        (b'{"image": null}', "application/json", "wrong_type"),
    ],
)
def test_400_bad_bodies(client, body, content_type, code):
    assert_error(client.post("/predict", data=body, content_type=content_type), 400, code)


def test_400_json_values(client):
    image = np.zeros((28, 28)).tolist()
    cases = {
        "out_of_range": [(0, 0, 256), (5, 5, -1)],
        "not_finite": [(1, 1, 1e999)],
        "wrong_type": [(2, 2, "7"), (3, 3, True), (4, 4, None), (6, 6, 10**40)],
    }
    for code, edits in cases.items():
        for r, c, value in edits:
            bad = json.loads(json.dumps(image))
            bad[r][c] = value
            text = json.dumps({"image": bad}).replace("Infinity", "1e999")
            assert_error(client.post("/predict", data=text, content_type="application/json"), 400, code)
    ragged = [[0] * 28] * 27 + [[0] * 27]
    assert_error(client.post("/predict", json={"image": ragged}), 400, "wrong_shape")
    assert_error(client.post("/predict", json={"instances": [[0] * 784, [0] * 783]}), 400, "wrong_shape")


def test_unexpected_exception_is_generic_json_500(random_models_dir, caplog):
    client = make_client(random_models_dir)
    app = client.application

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret detail")

    r = client.get("/boom")
    body = assert_error(r, 500, "internal_error")
    assert "secret" not in r.get_data(as_text=True) and "Traceback" not in r.get_data(as_text=True)
    assert "secret detail" in caplog.text  # logged for us, not shown to the client
    assert body["error"]["message"] == "internal server error"


def test_large_multipart_upload_stays_in_memory(client, monkeypatch):
    """werkzeug spools uploads over 500 kB to a temp file; the container's rootfs is read-only."""
    import tempfile

    def no_temp_files(*args, **kwargs):
        raise AssertionError("an upload went to a temp file")

    for name in ("TemporaryFile", "SpooledTemporaryFile", "NamedTemporaryFile"):
        monkeypatch.setattr(tempfile, name, no_temp_files)
    big = np.random.default_rng(0).integers(0, 256, (1100, 1100), dtype=np.uint8)
    data = png_bytes(big)
    assert 500_000 < len(data) < 4 << 20
    r = client.post("/predict", data={"image": (io.BytesIO(data), "big.png")})
    assert r.status_code == 200
    assert_prediction(r.get_json())
