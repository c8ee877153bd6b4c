"""gRPC through the front door: tritonclient.grpc against nginx's published gRPC port
(grpc_pass over HTTP/2 to the api replicas), on real MNIST test images from the clone's data."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from core import mnist
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.timeout(900)


def test_model_infer_through_nginx_matches_rest(stack: Stack) -> None:
    images = mnist.read(stack.repo / "data", "test_images")[:64]
    labels = mnist.read(stack.repo / "data", "test_labels")[:64]
    client = tgrpc.InferenceServerClient(stack.grpc_target)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mnist")

    tensor = tgrpc.InferInput("input", [64, 28, 28], "UINT8")
    tensor.set_data_from_numpy(images)
    result = client.infer("mnist", [tensor], client_timeout=30)
    digits = result.as_numpy("digit")

    body = {
        "inputs": [
            {"name": "input", "datatype": "UINT8", "shape": [64, 28, 28], "data": images.ravel().tolist()}
        ]
    }
    rest = requests.post(f"{stack.url}/v2/models/mnist/infer", json=body, timeout=30).json()
    by_name = {o["name"]: o for o in rest["outputs"]}
    assert digits.tolist() == by_name["digit"]["data"]
    np.testing.assert_allclose(
        result.as_numpy("probabilities").ravel(), by_name["probabilities"]["data"], rtol=1e-6
    )
    assert result.get_response().model_version == rest["model_version"]
    assert np.mean(digits == labels) > 0.95

    # Single images, over several calls (nginx opens an upstream connection per call: both replicas serve).
    for image in images[:8]:
        one = tgrpc.InferInput("input", [1, 784], "UINT8")
        one.set_data_from_numpy(image.reshape(1, 784))
        assert client.infer("mnist", [one], client_timeout=30).as_numpy("digit").shape == (1,)

    # The api's errors pass through nginx with their status.
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        client.infer("other", [tensor], client_timeout=30)
    big = tgrpc.InferInput("input", [6000, 784], "UINT8")
    big.set_data_from_numpy(np.zeros((6000, 784), np.uint8))
    with pytest.raises(InferenceServerException, match="RESOURCE_EXHAUSTED"):
        client.infer("mnist", [big], client_timeout=30)
    assert client.is_server_ready()
