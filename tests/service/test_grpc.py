"""The Open Inference Protocol over gRPC, against a real gunicorn (gunicorn.conf.py) on a free
GRPC_PORT, with the real, unmodified tritonclient.grpc (and its own generated messages and stub
where a test needs a request tritonclient's helpers would not build)."""

from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as tgrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from core import network
from core.preprocess import to_vectors
from tests.helpers import png_bytes, publish, random_net, start_gunicorn
from tests.load import Load
from tests.load import grpc as grpc_client

pytestmark = pytest.mark.slow

Code = grpc.StatusCode
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def served_max_batch_64(trained_models_dir, tmp_path_factory):
    """`served` with MAX_BATCH=64 (2 workers, gRPC on a free port): a small limit the tests can exceed."""
    with start_gunicorn(trained_models_dir, tmp_path_factory.mktemp("grpc"), MAX_BATCH="64") as server:
        yield server


@pytest.fixture(scope="module")
def stub(served_max_batch_64):
    with grpc.insecure_channel(served_max_batch_64.grpc) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def infer_input(images: np.ndarray, datatype: str = "UINT8", flat: bool = False) -> tgrpc.InferInput:
    arr = to_vectors(images) if datatype == "FP32" else images.astype(np.uint8)
    if flat:
        arr = arr.reshape(len(images), 784)
    tensor = tgrpc.InferInput("input", list(arr.shape), datatype)
    tensor.set_data_from_numpy(arr)
    return tensor


def request(**fields) -> service_pb2.ModelInferRequest:
    """A valid one-image typed-contents request, with `fields` overridden."""
    base = {"model_name": "mnist", "inputs": [tensor_proto()]}
    base.update(fields)
    return service_pb2.ModelInferRequest(**base)


def tensor_proto(
    datatype="UINT8", shape=(1, 784), **contents
) -> service_pb2.ModelInferRequest.InferInputTensor:
    if not contents:
        contents = {"uint_contents": [0] * 784} if datatype == "UINT8" else {"fp32_contents": [0.0] * 784}
    return service_pb2.ModelInferRequest.InferInputTensor(
        name="input",
        datatype=datatype,
        shape=list(shape),
        contents=service_pb2.InferTensorContents(**contents),
    )


def code_of(call, *args) -> Code:
    try:
        call(*args, timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return Code.OK


# --- the protocol's calls, with tritonclient -----------------------------------------------------


def test_server_and_model_metadata(served_max_batch_64):
    client = tgrpc.InferenceServerClient(served_max_batch_64.grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mnist")
    assert client.is_model_ready("mnist", "1")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "mnist-serving" and meta["version"] == "0.1.0"
    model = client.get_model_metadata("mnist", as_json=True)
    rest = requests.get(served_max_batch_64.url + "/v2/models/mnist", timeout=10).json()
    assert model["versions"] == rest["versions"] == ["1"]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in model["inputs"]] == [
        ("input", "FP32", [-1, 784])
    ]
    assert [t["name"] for t in model["outputs"]] == ["probabilities", "digit"]
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        client.get_model_metadata("other")
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        client.is_model_ready("mnist", "7")


@pytest.mark.parametrize(
    ("datatype", "flat"), [("UINT8", False), ("UINT8", True), ("FP32", True), ("FP32", False)]
)
def test_binary_inputs_give_the_digits_of_predict(served_max_batch_64, mnist, trained_net, datatype, flat):
    """Real MNIST test images, raw_input_contents: the digits /predict gives for the same PNGs."""
    images = mnist.test_images[:64]
    client = tgrpc.InferenceServerClient(served_max_batch_64.grpc)
    result = client.infer("mnist", [infer_input(images, datatype, flat)], request_id="abc")
    with requests.Session() as s:
        rest = [
            s.post(
                served_max_batch_64.url + "/predict",
                data=png_bytes(im),
                headers={"Content-Type": "image/png"},
            ).json()
            for im in images[:16]
        ]
    digits = result.as_numpy("digit")
    probs = result.as_numpy("probabilities")
    assert digits.dtype == np.int64 and digits.shape == (64,)
    assert probs.dtype == np.float32 and probs.shape == (64, 10)
    assert digits[:16].tolist() == [r["digit"] for r in rest]
    assert digits.tolist() == network.predict(trained_net, to_vectors(images)).tolist()
    np.testing.assert_allclose(probs[:16], [r["probabilities"] for r in rest], rtol=1e-6, atol=1e-7)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("mnist", "1", "abc")
    assert np.mean(digits == mnist.test_labels[:64]) > 0.85


def test_typed_contents_and_output_choice(stub, mnist, trained_net):
    images = mnist.test_images[100:108]
    expected = network.predict(trained_net, to_vectors(images)).tolist()
    uint = tensor_proto("UINT8", (8, 28, 28), uint_contents=images.ravel().tolist())
    fp32 = tensor_proto("FP32", (8, 784), fp32_contents=to_vectors(images).ravel().tolist())
    for tensor in (uint, fp32):
        wanted = [service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="digit")]
        response = stub.ModelInfer(request(inputs=[tensor], outputs=wanted), timeout=10)
        assert [o.name for o in response.outputs] == ["digit"] and list(response.outputs[0].shape) == [8]
        assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == expected


def test_health_service(served_max_batch_64):
    with grpc.insecure_channel(served_max_batch_64.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert e.value.code() == Code.NOT_FOUND


def test_predictions_and_calls_are_in_the_shared_metrics(served_max_batch_64, mnist):
    def scrape() -> str:
        return requests.get(served_max_batch_64.url + "/metrics", timeout=10).text

    def total(text: str, pattern: str) -> float:
        return sum(float(v) for v in re.findall(pattern + r"\} (\S+)", text))

    before = scrape()
    client = tgrpc.InferenceServerClient(served_max_batch_64.grpc)
    client.infer("mnist", [infer_input(mnist.test_images[:10])])
    with pytest.raises(InferenceServerException):
        client.infer("nope", [infer_input(mnist.test_images[:1])])
    after = scrape()
    # Labels come sorted: the predictions carry the answering version, the calls none.
    digits = r'mnist_predictions_total\{digit="\d",model="mnist",version="1"'
    assert total(after, digits) - total(before, digits) == 10
    ok = r'http_requests_total\{endpoint="' + INFER + r'",method="POST",model="",status="200",version=""'
    missing = r'http_requests_total\{endpoint="' + INFER + r'",method="POST",model="",status="404",version=""'
    assert total(after, ok) - total(before, ok) == 1
    assert total(after, missing) - total(before, missing) == 1
    assert 'http_request_duration_seconds_count{endpoint="' + INFER + '",model="",version=""}' in after


# --- bad input: the right status, never UNKNOWN, never a dead server ----------------------------


def raw(shape=(1, 784), nbytes: int | None = None, copies: int = 1) -> service_pb2.ModelInferRequest:
    """A UINT8 request with raw_input_contents (`nbytes` zeros, by default as many as `shape` needs)."""
    nbytes = int(np.prod(shape)) if nbytes is None else nbytes
    return request(
        inputs=[tensor_proto(shape=shape, uint_contents=[])], raw_input_contents=[b"\0" * nbytes] * copies
    )


def typed(datatype="UINT8", shape=(1, 784), **contents) -> service_pb2.ModelInferRequest:
    return request(inputs=[tensor_proto(datatype, shape, **contents)])


NAMELESS = service_pb2.ModelInferRequest.InferInputTensor(name="x", datatype="UINT8", shape=[1, 784])
BAD = [
    ("unknown model", request(model_name="nope"), Code.NOT_FOUND),
    ("empty model name", request(model_name=""), Code.NOT_FOUND),
    ("unknown version", request(model_version="9"), Code.NOT_FOUND),
    ("malformed version", request(model_version="v1"), Code.INVALID_ARGUMENT),
    ("no input", request(inputs=[]), Code.INVALID_ARGUMENT),
    ("two inputs", request(inputs=[tensor_proto(), tensor_proto()]), Code.INVALID_ARGUMENT),
    ("wrong input name", request(inputs=[NAMELESS]), Code.INVALID_ARGUMENT),
    ("INT32 input", typed("INT32", int_contents=[0] * 784), Code.INVALID_ARGUMENT),
    ("shape [1, 10]", typed(shape=(1, 10), uint_contents=[0] * 10), Code.INVALID_ARGUMENT),
    ("batch 0", raw(shape=(0, 784)), Code.INVALID_ARGUMENT),
    ("negative dim", typed(shape=(-1, 784)), Code.INVALID_ARGUMENT),
    ("too few values", typed(uint_contents=[0] * 783), Code.INVALID_ARGUMENT),
    ("UINT8 over 255", typed(uint_contents=[256] * 784), Code.INVALID_ARGUMENT),
    ("FP32 over 1", typed("FP32", fp32_contents=[2.0] * 784), Code.INVALID_ARGUMENT),
    ("FP32 NaN", typed("FP32", fp32_contents=[float("nan")] * 784), Code.INVALID_ARGUMENT),
    ("UINT8 in fp32_contents", typed(fp32_contents=[0.0] * 784), Code.INVALID_ARGUMENT),
    ("raw of the wrong size", raw(nbytes=10), Code.INVALID_ARGUMENT),
    ("raw and contents", request(raw_input_contents=[b"\0" * 784]), Code.INVALID_ARGUMENT),
    ("two raw for one input", raw(copies=2), Code.INVALID_ARGUMENT),
    ("unknown output", request(outputs=[{"name": "logits"}]), Code.INVALID_ARGUMENT),
    ("output twice", request(outputs=[{"name": "digit"}, {"name": "digit"}]), Code.INVALID_ARGUMENT),
    ("batch over MAX_BATCH", raw(shape=(65, 784)), Code.RESOURCE_EXHAUSTED),
]


@pytest.mark.parametrize(("name", "message", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_the_right_status(served_max_batch_64, stub, name, message, code):
    workers = served_max_batch_64.workers()
    assert code_of(stub.ModelInfer, message) == code
    assert served_max_batch_64.workers() == workers
    assert code_of(stub.ModelInfer, request()) == Code.OK


def test_bad_metadata_requests(stub):
    assert code_of(stub.ModelMetadata, service_pb2.ModelMetadataRequest(name="nope")) == Code.NOT_FOUND
    bad_version = service_pb2.ModelMetadataRequest(name="mnist", version="-1")
    assert code_of(stub.ModelMetadata, bad_version) == Code.INVALID_ARGUMENT
    assert code_of(stub.ModelReady, service_pb2.ModelReadyRequest(name="nope")) == Code.NOT_FOUND


def test_message_over_max_content_length_is_resource_exhausted(served_max_batch_64, stub):
    big = request(
        inputs=[tensor_proto(shape=(6000, 784), uint_contents=[])], raw_input_contents=[b"\0" * 6000 * 784]
    )
    assert big.ByteSize() > 4 * 1024 * 1024
    assert code_of(stub.ModelInfer, big) == Code.RESOURCE_EXHAUSTED
    assert code_of(stub.ModelInfer, request()) == Code.OK


def test_undecodable_bytes_are_invalid_argument(served_max_batch_64):
    with grpc.insecure_channel(served_max_batch_64.grpc) as channel:
        raw = channel.unary_unary(INFER)  # no serializers: the bytes go as they are
        for body in (b"\xff" * 50, b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", b"\x2a\x05abc"):
            assert code_of(raw, body) == Code.INVALID_ARGUMENT
        assert code_of(channel.unary_unary("/inference.GRPCInferenceService/Nope"), b"") == Code.UNIMPLEMENTED


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
ALLOWED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}
numbers = st.one_of(
    st.integers(-(2**31), 2**32 - 1), st.floats(allow_nan=True, allow_infinity=True, width=32)
)


@st.composite
def hostile_requests(draw) -> service_pb2.ModelInferRequest:
    datatype = draw(st.sampled_from(["UINT8", "FP32", "INT64", "BYTES", "", "uint8"]))
    shape = draw(st.one_of(
        st.sampled_from([[1, 784], [2, 28, 28], [1, 28, 28], [1], [], [3, 784], [0, 784], [2**40, 784]]),
        st.lists(st.integers(-(2**62), 2**62), max_size=4),
    ))  # fmt: skip
    n = draw(st.sampled_from([0, 1, 783, 784, 1568, 2352]))
    contents = {}
    raw = []
    kind = draw(st.sampled_from(["raw", "uint", "fp32", "int64", "none", "both"]))
    if kind in ("raw", "both"):
        raw = [draw(st.binary(min_size=0, max_size=16)) + b"\x80" * draw(st.sampled_from([0, n, 4 * n]))]
    if kind in ("uint", "both"):
        contents["uint_contents"] = [
            draw(st.integers(0, 2**32 - 1)) % (256 if draw(st.booleans()) else 2**32)
        ] * n
    if kind == "fp32":
        contents["fp32_contents"] = [draw(numbers.filter(lambda v: isinstance(v, float)))] * n
    if kind == "int64":
        contents["int64_contents"] = [draw(st.integers(-(2**63), 2**63 - 1))] * n
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name=draw(st.sampled_from(["input", "", "x"])),
        datatype=datatype,
        shape=shape,
        contents=service_pb2.InferTensorContents(**contents),
    )
    outputs = [
        {"name": name}
        for name in draw(st.lists(st.sampled_from(["digit", "probabilities", "x"]), max_size=3))
    ]
    return service_pb2.ModelInferRequest(
        model_name=draw(st.sampled_from(["mnist", "", "other"])),
        model_version=draw(st.sampled_from(["", "1", "2", "0", "x", "99999999999999999999"])),
        id=draw(st.text(max_size=10)),
        inputs=[tensor] * draw(st.sampled_from([1, 1, 1, 0, 2])),
        outputs=outputs,
        raw_input_contents=raw,
    )


@st.composite
def valid_requests(draw) -> service_pb2.ModelInferRequest:
    """Well-formed requests with random pixels, so the fuzzing also covers the answers' path."""
    n = draw(st.integers(1, 3))
    datatype = draw(st.sampled_from(["UINT8", "FP32"]))
    if datatype == "UINT8":
        raw = draw(st.binary(min_size=n * 784, max_size=n * 784))
    else:
        raw = np.asarray(draw(st.lists(st.floats(0, 1, width=32), min_size=n * 784, max_size=n * 784)), "<f4")
        raw = raw.tobytes()
    shape = draw(st.sampled_from([(n, 784), (n, 28, 28)]))
    return request(inputs=[tensor_proto(datatype, shape, uint_contents=[])], raw_input_contents=[raw])


def test_fuzzed_requests_get_a_protocol_status(served_max_batch_64, stub):
    workers = served_max_batch_64.workers()
    seen: set[Code] = set()

    @FUZZ
    @given(st.one_of(hostile_requests(), valid_requests()))
    def one(message):
        code = code_of(stub.ModelInfer, message)
        seen.add(code)
        assert code in ALLOWED, (code, message)

    one()
    assert {Code.OK, Code.INVALID_ARGUMENT} <= seen
    assert served_max_batch_64.workers() == workers and code_of(stub.ModelInfer, request()) == Code.OK


def test_fuzzed_bytes_never_kill_the_server(served_max_batch_64):
    workers = served_max_batch_64.workers()
    with grpc.insecure_channel(served_max_batch_64.grpc) as channel:
        raw = channel.unary_unary(INFER)
        valid = request().SerializeToString()

        @FUZZ
        @given(
            st.one_of(
                st.binary(max_size=2000), st.binary(max_size=40).map(lambda b: valid[: len(valid) // 2] + b)
            )
        )
        def one(body):
            assert code_of(raw, body) in ALLOWED

        one()
    assert served_max_batch_64.workers() == workers


# --- no model, version switches, shutdown -------------------------------------------------------


def test_no_model_is_unavailable_then_ready_once_published(gunicorn, tmp_path, trained_net):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    server = gunicorn(models_dir, ready=False)
    client = tgrpc.InferenceServerClient(server.grpc)
    assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready("mnist")
    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert code_of(stub.ModelInfer, request()) == Code.UNAVAILABLE
        assert code_of(stub.ModelMetadata, service_pb2.ModelMetadataRequest(name="mnist")) == Code.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        publish(models_dir, trained_net)
        deadline = time.monotonic() + 10
        while code_of(stub.ModelInfer, request()) != Code.OK:
            assert time.monotonic() < deadline, server.logs()[-2000:]
            time.sleep(0.1)
        # Each worker follows on its own poll, and each connection is held by one worker (the
        # port is shared with SO_REUSEPORT): the worker that answered ModelInfer can be ready
        # while the ones behind the health channel and tritonclient's own are still polling.
        serving = health_pb2.HealthCheckResponse.SERVING
        while not (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
            and client.is_server_ready()
        ):
            assert time.monotonic() < deadline, server.logs()[-2000:]
            time.sleep(0.1)
        assert client.is_server_ready() and client.is_model_ready("mnist")


def test_version_switch_under_grpc_load_drops_nothing(gunicorn, tmp_path, mnist, trained_net):
    models_dir = tmp_path / "models"
    v1 = random_net(1)
    publish(models_dir, v1)
    server = gunicorn(models_dir, MODEL_POLL_SECONDS="0.5")
    image = mnist.test_images[0]
    expected = {
        1: network.probabilities(v1, to_vectors(image))[0].tolist(),
        2: network.probabilities(trained_net, to_vectors(image))[0].tolist(),
    }
    with Load(grpc_client(server.grpc, image), n=6, pause=0.005) as load:
        load.wait_until(lambda: len({o.client for o in load.ok if o.version == 1}) == load.n, 10)
        publish(models_dir, trained_net)
        # Every client (its channel holds one connection to one worker) sees the new version.
        load.wait_until(lambda: len({o.client for o in load.ok if o.version == 2}) == load.n, 10)
        after = len(load.ok)
        load.wait_until(lambda: len(load.ok) > after + 20, 10)
    assert not load.failures, load.failures[:5]
    for o in load.ok:  # no mixed answer
        assert o.body["probabilities"] == pytest.approx(expected[o.version], rel=1e-6, abs=1e-7)
    assert {o.version for o in load.ok} == {1, 2} and len(load.ok) > 50


def test_term_lets_in_flight_calls_finish(gunicorn, tmp_path):
    """Slow calls (a wide network, big batches) are running when TERM arrives: all are answered,
    a call after it is refused, and gunicorn exits cleanly."""
    models_dir = tmp_path / "models"
    publish(models_dir, random_net(1, hidden=2048))
    server = gunicorn(models_dir, MAX_BATCH="4000", GRPC_THREADS="4")
    images = np.random.default_rng(0).integers(0, 256, (4000, 784), dtype=np.uint8)
    client = tgrpc.InferenceServerClient(server.grpc)
    client.infer("mnist", [infer_input(images[:10], flat=True)])  # connected and warm
    t0 = time.monotonic()
    client.infer("mnist", [infer_input(images, flat=True)])
    one_call = time.monotonic() - t0
    with ThreadPoolExecutor(4) as pool:
        calls = [
            pool.submit(
                lambda: tgrpc.InferenceServerClient(server.grpc).infer(
                    "mnist", [infer_input(images, flat=True)], client_timeout=60
                )
            )
            for _ in range(4)
        ]
        time.sleep(min(0.3, one_call / 2))
        assert not any(c.done() for c in calls), f"calls ended before TERM (one takes {one_call:.2f} s)"
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            tgrpc.InferenceServerClient(server.grpc).infer("mnist", [infer_input(images[:1], flat=True)])
        results = [c.result(timeout=60) for c in calls]
    assert all(r.as_numpy("digit").shape == (4000,) for r in results)
    assert server.proc.wait(30) == 0
