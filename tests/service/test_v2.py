"""service/v2.py, the Open Inference Protocol (KServe V2) over REST: the parser and encoder as pure
functions, then through Flask's test client, then with the real tritonclient.http against a real
gunicorn (2 workers). gRPC is tests/service/test_grpc.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from core.network import probabilities
from core.preprocess import to_vectors
from service import v2_codec as v2
from service.v2_codec import V2Error, parse_infer_request
from tests.helpers import png_bytes

N_IMAGES = 64


def request_doc(datatype="UINT8", shape=(1, 784), data=None, **extra) -> dict:
    tensor = {"name": "input", "datatype": datatype, "shape": list(shape)}
    if data is not None:
        tensor["data"] = data
    return {"inputs": [tensor], **extra}


def parse(doc: dict, raw: bytes = b"", max_batch: int = 1024) -> v2.InferRequest:
    header = json.dumps(doc).encode()
    return parse_infer_request(header + raw, str(len(header)) if raw else None, max_batch)


def status_of(doc: dict, raw: bytes = b"", max_batch: int = 1024) -> int:
    with pytest.raises(V2Error) as e:
        parse(doc, raw, max_batch)
    return e.value.status


# --- parsing -----------------------------------------------------------------


def test_uint8_json_flat_and_nested_give_to_vectors_rows(mnist):
    images = mnist.test_images[:3]
    expected = to_vectors(images)
    flat = parse(request_doc("UINT8", (3, 784), images.ravel().tolist()))
    nested = parse(request_doc("UINT8", (3, 28, 28), images.tolist()))
    assert flat.x.dtype == np.float32 and flat.x.shape == (3, 784)
    np.testing.assert_array_equal(flat.x, expected)
    np.testing.assert_array_equal(nested.x, expected)


def test_fp32_json_and_binary_are_used_bit_for_bit(mnist):
    x = to_vectors(mnist.test_images[:2])
    from_json = parse(request_doc("FP32", (2, 784), x.ravel().tolist()))
    doc = request_doc("FP32", (2, 28, 28))
    doc["inputs"][0]["parameters"] = {"binary_data_size": x.nbytes}
    from_bytes = parse(doc, x.astype("<f4").tobytes())
    np.testing.assert_array_equal(from_json.x, x)
    np.testing.assert_array_equal(from_bytes.x, x)


def test_uint8_binary(mnist):
    images = mnist.test_images[:4]
    doc = request_doc("UINT8", (4, 784))
    doc["inputs"][0]["parameters"] = {"binary_data_size": images.size}
    np.testing.assert_array_equal(parse(doc, images.tobytes()).x, to_vectors(images))


def test_outputs_default_all_and_binary_flags():
    data = [0] * 784
    assert parse(request_doc(data=data)).outputs == (("probabilities", False), ("digit", False))
    everything_binary = parse(request_doc(data=data, parameters={"binary_data_output": True}))
    assert everything_binary.outputs == (("probabilities", True), ("digit", True))
    # A per-output binary_data overrides the request-wide default, and selection keeps the order asked.
    chosen = parse(
        request_doc(
            data=data,
            parameters={"binary_data_output": True},
            outputs=[{"name": "digit", "parameters": {"binary_data": False}}, {"name": "probabilities"}],
        )
    )
    assert chosen.outputs == (("digit", False), ("probabilities", True))
    only = parse(request_doc(data=data, outputs=[{"name": "digit"}]))
    assert only.outputs == (("digit", False),)


def test_id_and_parameters_are_kept():
    req = parse(request_doc(data=[0] * 784, id="abc", parameters={"custom": 3, "flag": True}))
    assert req.id == "abc" and req.parameters == {"custom": 3, "flag": True}


@pytest.mark.parametrize(
    "doc, status",
    [
        ({"inputs": []}, 400),
        ({"inputs": "x"}, 400),
        ({}, 400),
        (request_doc(data=[0] * 784) | {"id": 5}, 400),
        (request_doc(data=[0] * 784) | {"parameters": [1]}, 400),
        (request_doc(data=[0] * 784) | {"parameters": {"a": {"nested": 1}}}, 400),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}]}, 400),
        (request_doc("FP16", data=[0] * 784), 400),
        (request_doc("INT64", data=[0] * 784), 400),
        (request_doc(shape=(1, 783), data=[0] * 783), 400),
        (request_doc(shape=(784,), data=[0] * 784), 400),
        (request_doc(shape=(0, 784), data=[]), 400),
        (request_doc(shape=(1, 28, 27), data=[0] * 756), 400),
        (request_doc(shape=(1, "784"), data=[0] * 784), 400),
        (request_doc(shape=(1, True), data=[0] * 784), 400),
        (request_doc(shape=(2, 784), data=[0] * 784), 400),
        (request_doc(shape=(1, 28, 28), data=[[0] * 784]), 400),
        (request_doc(data=[256] + [0] * 783), 400),
        (request_doc(data=[-1] + [0] * 783), 400),
        (request_doc(data=[0.5] + [0] * 783), 400),
        (request_doc(data=["1"] + [0] * 783), 400),
        (request_doc(data=[None] + [0] * 783), 400),
        (request_doc(data=[[0, 1], [2]]), 400),
        (request_doc(data=[10**30] + [0] * 783), 400),
        (request_doc(data="0" * 784), 400),
        (request_doc(), 400),
        (request_doc("FP32", data=[1.5] + [0] * 783), 400),
        (request_doc("FP32", data=[-0.1] + [0] * 783), 400),
        (request_doc("FP32", data=[255] + [0] * 783), 400),
        (request_doc("FP32", data=[1e400] + [0] * 783), 400),
        (request_doc(data=[0] * 784, outputs=[{"name": "logits"}]), 400),
        (request_doc(data=[0] * 784, outputs=[{"name": "digit"}, {"name": "digit"}]), 400),
        (request_doc(data=[0] * 784, outputs={"name": "digit"}), 400),
        (request_doc(data=[0] * 784, outputs=[{"name": "digit", "parameters": {"binary_data": "yes"}}]), 400),
        (request_doc(data=[0] * 784, parameters={"binary_data_output": 1}), 400),
        (request_doc(shape=(1025, 784), data=[0] * 784 * 1025), 413),
    ],
)
def test_bad_requests_are_refused_with_the_right_status(doc, status):
    assert status_of(doc) == status


def test_nan_literal_in_json_is_refused():
    body = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,784],"data":[NaN' + b",0" * 783 + b"]}]}"
    with pytest.raises(V2Error) as e:
        parse_infer_request(body, None, 1024)
    assert e.value.status == 400


@pytest.mark.parametrize(
    "size, raw, header_length",
    [
        (784, b"\0" * 783, None),  # fewer bytes than declared
        (784, b"\0" * 785, None),  # bytes that belong to no input
        (783, b"\0" * 783, None),  # declared size does not fit the shape
        (-1, b"\0" * 784, None),
        ("784", b"\0" * 784, None),
        (784, b"\0" * 784, "abc"),
        (784, b"\0" * 784, "0"),
        (784, b"\0" * 784, "99999"),
    ],
)
def test_bad_binary_requests(size, raw, header_length):
    doc = request_doc("UINT8", (1, 784))
    doc["inputs"][0]["parameters"] = {"binary_data_size": size}
    header = json.dumps(doc).encode()
    with pytest.raises(V2Error) as e:
        parse_infer_request(header + raw, header_length or str(len(header)), 1024)
    assert e.value.status == 400


def test_data_and_binary_together_is_refused():
    doc = request_doc("UINT8", (1, 784), [0] * 784)
    doc["inputs"][0]["parameters"] = {"binary_data_size": 784}
    assert status_of(doc, b"\0" * 784) == 400


def test_malformed_json_header():
    for body in (b"{", b"[1]", b"\xff\xfe", b'"x"'):
        with pytest.raises(V2Error) as e:
            parse_infer_request(body, None, 1024)
        assert e.value.status == 400


# --- encoding ----------------------------------------------------------------


def test_encode_binary_outputs_round_trip(app, mnist):
    model = app.extensions["registry"].default.current()
    x = to_vectors(mnist.test_images[:5])
    req = v2.InferRequest("r1", {"p": 1}, x, (("probabilities", True), ("digit", False)))
    results = app.extensions["dataplane"].infer(model, x)
    body, header_length = v2.encode_response(model, req, results, "r1")
    header = json.loads(body[:header_length])
    assert header["id"] == "r1" and header["parameters"] == {"p": 1}
    assert header["model_name"] == "mnist" and header["model_version"] == str(model.version)
    probs_out, digit_out = header["outputs"]
    assert probs_out["datatype"] == "FP32" and probs_out["shape"] == [5, 10]
    assert probs_out["parameters"] == {"binary_data_size": 200} and "data" not in probs_out
    probs = np.frombuffer(body[header_length:], dtype="<f4").reshape(5, 10)
    np.testing.assert_array_equal(probs, probabilities(model.net, x))
    assert digit_out == {"name": "digit", "datatype": "INT64", "shape": [5], "data": probs.argmax(1).tolist()}


# --- through Flask -------------------------------------------------------------


def test_server_metadata_and_health(client):
    meta = client.get("/v2").get_json()
    assert meta["name"] == "mnist-serving" and "binary_tensor_data" in meta["extensions"]
    assert client.get("/v2/health/live").get_json() == {"live": True}
    assert client.get("/v2/health/ready").get_json() == {"ready": True}
    assert client.get("/v2/models/mnist/ready").get_json() == {"name": "mnist", "ready": True}
    assert client.get("/v2/models/mnist/versions/1/ready").status_code == 200


def test_model_metadata(client):
    for path in ("/v2/models/mnist", "/v2/models/mnist/versions/1"):
        meta = client.get(path).get_json()
        assert meta["name"] == "mnist" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
        assert [o["name"] for o in meta["outputs"]] == ["probabilities", "digit"]


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("get", "/v2/models/fashion", 404),
        ("get", "/v2/models/mnist/versions/7", 404),
        ("get", "/v2/models/mnist/versions/..%2F..%2Fetc", 404),
        ("get", "/v2/models/mnist/versions/abc", 400),
        ("get", "/v2/models/mnist/versions/-1/ready", 400),
        ("get", "/v2/models/mnist/versions/0", 400),
        ("get", "/v2/models/fashion/ready", 404),
        ("get", "/v2/models/mnist/versions/7/ready", 404),
        ("post", "/v2/models/fashion/infer", 404),
        ("post", "/v2/models/mnist/versions/9/infer", 404),
        ("get", "/v2/models/mnist/infer", 405),
        ("post", "/v2/health/live", 405),
        ("get", "/v2/nothing/here", 404),
    ],
)
def test_v2_errors_have_the_protocol_shape(client, method, path, status):
    r = getattr(client, method)(path)
    assert r.status_code == status
    body = r.get_json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]


def test_base_errors_keep_their_own_shape(client):
    body = client.get("/no/such/route").get_json()
    assert body["error"]["code"] == "not_found"


def test_infer_matches_predict_over_flask(client, mnist):
    images = mnist.test_images[:8]
    doc = request_doc("UINT8", (8, 28, 28), images.tolist(), id="batch-1")
    r = client.post("/v2/models/mnist/infer", json=doc)
    assert r.status_code == 200 and r.mimetype == "application/json"
    out = {o["name"]: o for o in r.get_json()["outputs"]}
    assert r.get_json()["id"] == "batch-1"
    expected = [
        client.post("/predict", data=png_bytes(im), content_type="image/png").get_json()["digit"]
        for im in images
    ]
    assert out["digit"]["data"] == expected
    preds = client.post("/predict", json={"instances": images.tolist()}).get_json()["predictions"]
    np.testing.assert_allclose(
        np.reshape(out["probabilities"]["data"], (8, 10)), [p["probabilities"] for p in preds]
    )


def test_infer_without_id_answers_with_the_request_id(client):
    r = client.post(
        "/v2/models/mnist/infer", json=request_doc(data=[0] * 784), headers={"X-Request-ID": "trace-7"}
    )
    assert r.get_json()["id"] == "trace-7" and r.headers["X-Request-ID"] == "trace-7"


def test_infer_body_over_the_limit_is_413(random_models_dir):
    from service.app import create_app

    small = create_app(
        {"MODELS_DIR": str(random_models_dir), "MODEL_POLL_SECONDS": 0, "MAX_CONTENT_LENGTH": 1000}
    )
    r = small.test_client().post("/v2/models/mnist/infer", json=request_doc(data=[0] * 784))
    assert r.status_code == 413 and isinstance(r.get_json()["error"], str)


def test_not_ready_is_a_4xx(tmp_path):
    from service.app import create_app

    empty = create_app({"MODELS_DIR": str(tmp_path), "MODEL_POLL_SECONDS": 0}).test_client()
    r = empty.get("/v2/health/ready")
    assert r.status_code == 400 and r.get_json() == {"ready": False}
    assert empty.get("/v2/models/mnist/ready").status_code == 400
    r = empty.post("/v2/models/mnist/infer", json=request_doc(data=[0] * 784))
    assert r.status_code == 503 and isinstance(r.get_json()["error"], str)
    assert empty.get("/v2/health/live").status_code == 200


def test_decompress_is_bounded():
    import gzip
    import zlib

    assert v2.decompress(gzip.compress(b"abc"), "gzip", 10) == b"abc"
    assert v2.decompress(zlib.compress(b"abc"), "deflate", 10) == b"abc"
    assert v2.decompress(b"abc", None, 10) == b"abc"
    for body, encoding, status in [
        (gzip.compress(b"\0" * 1_000_000), "gzip", 413),  # a 1 KB bomb against a 1000-byte limit
        (b"not gzip", "gzip", 400),
        (gzip.compress(b"abc")[:-6], "gzip", 400),
        (b"abc", "br", 415),
    ]:
        with pytest.raises(V2Error) as e:
            v2.decompress(body, encoding, 1000)
        assert e.value.status == status


# --- tritonclient.http against a real gunicorn (2 workers) ---------------------------------------


@pytest.fixture(scope="module")
def images(mnist) -> np.ndarray:
    return mnist.test_images[:N_IMAGES]


@pytest.fixture(scope="module")
def predict_digits(served, images) -> list[int]:
    """What /predict answers for each image sent as a PNG: the reference for the V2 route."""
    with requests.Session() as s:
        return [
            s.post(served.url + "/predict", data=png_bytes(im), headers={"Content-Type": "image/png"}).json()[
                "digit"
            ]
            for im in images
        ]


@pytest.fixture
def triton(served):
    client = httpclient.InferenceServerClient(served.url.removeprefix("http://"))
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


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests(triton, images, predict_digits, algorithm):
    inp = httpclient.InferInput("input", [N_IMAGES, 28, 28], "UINT8")
    inp.set_data_from_numpy(np.ascontiguousarray(images), binary_data=True)
    result = triton.infer("mnist", [inp], request_compression_algorithm=algorithm)
    assert result.as_numpy("digit").tolist() == predict_digits
