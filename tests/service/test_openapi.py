"""The OpenAPI document: valid 3.1, lists every route, real responses match it, schemathesis agrees."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator, ValidationError
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from tests.helpers import ROOT, png_bytes

MEDIA_JSON = "application/json"


@pytest.fixture
def document(client) -> dict:
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.mimetype == MEDIA_JSON
    return r.get_json()


def test_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    broken = json.loads(json.dumps(document))
    broken["paths"]["/predict"]["post"]["responses"]["200"]["content"] = "oops"
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_document_lists_exactly_the_app_routes(app, document):
    served = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((path, method.lower()))
    documented = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete", "patch")
    }
    assert served == documented


def response_validator(document: dict, path: str, method: str, status: int, media: str = MEDIA_JSON):
    responses = document["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, which is not documented"
    schema = responses[str(status)]["content"][media]["schema"]
    return Draft202012Validator({**schema, "components": document["components"]})


def test_real_responses_match_their_schemas(client, document, mnist, tmp_path):
    image = mnist.test_images[0]
    v2_req = {
        "inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 784], "data": image.ravel().tolist()}]
    }
    cases = [
        ("get", "/healthz", "/healthz", {}),
        ("get", "/readyz", "/readyz", {}),
        ("get", "/models", "/models", {}),
        ("post", "/predict", "/predict", {"data": png_bytes(image), "content_type": "image/png"}),
        ("post", "/predict", "/predict", {"json": {"instances": [image.tolist(), image.ravel().tolist()]}}),
        ("post", "/predict", "/predict", {"data": {"image": [(io.BytesIO(png_bytes(image)), "a.png")] * 2}}),
        ("post", "/predict?version=9", "/predict", {"json": {"image": image.tolist()}}),
        ("post", "/predict", "/predict", {"data": b"not an image", "content_type": "image/png"}),
        ("post", "/predict", "/predict", {"data": b"x", "content_type": "text/plain"}),
        ("post", "/predict", "/predict", {"json": {"image": [[300] * 28] * 28}}),
        ("get", "/v2", "/v2", {}),
        ("get", "/v2/health/live", "/v2/health/live", {}),
        ("get", "/v2/health/ready", "/v2/health/ready", {}),
        ("get", "/v2/models/mnist", "/v2/models/{name}", {}),
        ("get", "/v2/models/other", "/v2/models/{name}", {}),
        ("get", "/v2/models/mnist/versions/1", "/v2/models/{name}/versions/{version}", {}),
        ("get", "/v2/models/mnist/versions/x", "/v2/models/{name}/versions/{version}", {}),
        ("get", "/v2/models/mnist/ready", "/v2/models/{name}/ready", {}),
        ("get", "/v2/models/mnist/versions/3/ready", "/v2/models/{name}/versions/{version}/ready", {}),
        ("post", "/v2/models/mnist/infer", "/v2/models/{name}/infer", {"json": v2_req}),
        ("post", "/v2/models/mnist/infer", "/v2/models/{name}/infer", {"json": {"inputs": []}}),
        (
            "post",
            "/v2/models/mnist/versions/1/infer",
            "/v2/models/{name}/versions/{version}/infer",
            {"json": v2_req},
        ),
    ]
    seen = set()
    for method, url, path, kwargs in cases:
        r = getattr(client, method)(url, **kwargs)
        assert r.mimetype == MEDIA_JSON, url
        response_validator(document, path, method, r.status_code).validate(r.get_json())
        assert r.headers["X-Request-ID"]
        seen.add(r.status_code)
    assert {200, 400, 404, 415} <= seen

    # Binary outputs: the JSON header validates, and the documented header gives its length.
    req = {**v2_req, "parameters": {"binary_data_output": True}}
    r = client.post("/v2/models/mnist/infer", json=req)
    assert r.mimetype == "application/octet-stream"
    n = int(r.headers["Inference-Header-Content-Length"])
    response_validator(document, "/v2/models/{name}/infer", "post", 200).validate(json.loads(r.data[:n]))
    assert len(r.data) - n == 10 * 4 + 8

    # No model: 503s and the V2 "not ready" 400 are documented too.
    from service.app import create_app

    empty = create_app({"MODELS_DIR": str(tmp_path), "MODEL_POLL_SECONDS": 0}).test_client()
    for method, url, path in [
        ("get", "/readyz", "/readyz"),
        ("get", "/v2/health/ready", "/v2/health/ready"),
        ("get", "/v2/models/mnist/ready", "/v2/models/{name}/ready"),
        ("get", "/v2/models/mnist", "/v2/models/{name}"),
        ("post", "/predict", "/predict"),
    ]:
        kwargs = {"json": {"image": np.zeros((28, 28)).tolist()}} if method == "post" else {}
        r = getattr(empty, method)(url, **kwargs)
        assert r.status_code in (400, 503)
        response_validator(document, path, method, r.status_code).validate(r.get_json())


def test_explanations_match_their_schemas(client, document, mnist, tmp_path):
    """/explain and /predict?explain=1: answers, refused batches and every error class, as documented."""
    image = mnist.test_images[0]
    png = png_bytes(image)
    cases = [
        ("/explain", "/explain", {"data": png, "content_type": "image/png"}, 200),
        ("/explain", "/explain", {"data": {"image": [(io.BytesIO(png), "a.png")]}}, 200),
        ("/explain?preprocess=none", "/explain", {"json": {"image": image.ravel().tolist()}}, 200),
        ("/predict?explain=1", "/predict", {"data": png, "content_type": "image/png"}, 200),
        ("/explain", "/explain", {"json": {"instances": [image.tolist()]}}, 400),
        ("/predict?explain=true", "/predict", {"json": {"instances": [image.tolist()] * 2}}, 400),
        ("/predict?explain=maybe", "/predict", {"json": {"image": image.tolist()}}, 400),
        ("/explain", "/explain", {"data": b"not an image", "content_type": "image/png"}, 400),
        ("/explain?version=9", "/explain", {"json": {"image": image.tolist()}}, 404),
        ("/explain", "/explain", {"data": b"x", "content_type": "text/plain"}, 415),
    ]
    for url, path, kwargs, status in cases:
        r = client.post(url, **kwargs)
        assert r.status_code == status and r.mimetype == MEDIA_JSON, url
        response_validator(document, path, "post", status).validate(r.get_json())
    explanation = client.post("/explain", data=png, content_type="image/png").get_json()
    broken = {**explanation, "input": [[2.0] * 28] * 28}  # outside [0, 1]: the schema must notice
    with pytest.raises(ValidationError):
        response_validator(document, "/explain", "post", 200).validate(broken)

    from service.app import create_app

    empty = create_app({"MODELS_DIR": str(tmp_path), "MODEL_POLL_SECONDS": 0}).test_client()
    r = empty.post("/explain", json={"image": image.tolist()})
    assert r.status_code == 503
    response_validator(document, "/explain", "post", 503).validate(r.get_json())


def test_pages_and_metrics_have_their_documented_types(client, document):
    for url, media in (("/", "text/html"), ("/metrics", "text/plain"), ("/openapi.json", MEDIA_JSON)):
        r = client.get(url)
        assert r.status_code == 200 and r.mimetype == media
        assert media in document["paths"][url]["get"]["responses"]["200"]["content"]


def test_schemathesis_finds_no_5xx_and_no_schema_violation(served, tmp_path):
    """Fuzz the live gunicorn from its own document (a few hundred requests, fixed seed)."""
    checks = (
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_headers_conformance,response_schema_conformance,negative_data_rejection"
    )
    cmd = [
        str(Path(sys.executable).parent / "st"),
        "run",
        served.url + "/openapi.json",
        "--checks",
        checks,
        "--max-examples",
        os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "8"),
        "--seed",
        os.environ.get("SCHEMATHESIS_SEED", "20261128"),
        # One worker: CPython 3.11's ast.parse is not thread-safe and hypothesis calls it.
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    summary = result.stdout[-6000:]
    assert result.returncode == 0, summary
    generated = re.search(r"(\d+) generated", result.stdout)
    assert generated and int(generated.group(1)) >= 200, summary
    assert not [line for line in served.lines() if '"level": "ERROR"' in line]
