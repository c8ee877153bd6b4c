"""GET /openapi.json: an OpenAPI 3.1 document of every route the app serves.

The document is written by hand, next to the code it describes, and kept
honest by tests rather than generated: the tests check that it lists exactly
the app's routes and methods, validate it against the OpenAPI 3.1 schema,
check real responses against it, and let schemathesis fuzz the live server
with it (no 5xx, no response outside the document).

Limits that depend on configuration (MAX_BATCH, MAX_CONTENT_LENGTH) are read
from the app, so the document describes the server that serves it.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, Response, current_app

from core.preprocess import IMAGE_SIDE, N_INPUTS
from service import v2

REQUEST_ID = "X-Request-ID"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {REQUEST_ID: {"$ref": "#/components/headers/RequestId"}},
        "content": {"application/json": {"schema": schema}},
    }


def _errors(schema: str, codes: dict[int, str]) -> dict[str, Any]:
    return {str(code): _json(_ref(schema), text) for code, text in codes.items()}


def _schemas(max_batch: int) -> dict[str, Any]:
    pixel = {"type": "number", "minimum": 0, "maximum": 255}
    batch = {"type": "integer", "minimum": 1, "description": f"N, at most MAX_BATCH={max_batch} (413 beyond)"}
    image = {
        "description": "28 rows of 28 pixel values, or 784 values row by row (0..255, light ink on dark).",
        "oneOf": [
            {
                "type": "array",
                "minItems": IMAGE_SIDE,
                "maxItems": IMAGE_SIDE,
                "items": {"type": "array", "minItems": IMAGE_SIDE, "maxItems": IMAGE_SIDE, "items": pixel},
            },
            {"type": "array", "minItems": N_INPUTS, "maxItems": N_INPUTS, "items": pixel},
        ],
    }
    probs = {
        "type": "array",
        "minItems": 10,
        "maxItems": 10,
        "items": {"type": "number", "minimum": 0, "maximum": 1},
        "description": "Probability of each digit 0..9; they sum to 1.",
    }
    prediction = {
        "type": "object",
        "required": ["digit", "confidence", "probabilities"],
        "properties": {
            "digit": {"type": "integer", "minimum": 0, "maximum": 9},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "probabilities": probs,
        },
    }
    parameters = {
        "type": "object",
        "additionalProperties": {"type": ["string", "number", "boolean"]},
    }
    number = {"type": "number"}
    tensor_data = {
        "type": "array",
        "description": "Row-major values: flat, or nested in the tensor's shape ([N][784] or [N][28][28]).",
        "items": {
            "oneOf": [
                number,
                {"type": "array", "items": {"oneOf": [number, {"type": "array", "items": number}]}},
            ]
        },
    }
    metadata_tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    return {
        "Error": {
            "type": "object",
            "description": "Every error of the base API.",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "additionalProperties": False,
                    "properties": {
                        "code": {"type": "string", "description": "Stable machine-readable code."},
                        "message": {"type": "string", "description": "What went wrong, for a human."},
                    },
                }
            },
        },
        "V2Error": {
            "type": "object",
            "description": "Every error of the Open Inference Protocol routes, as the protocol defines it.",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {"error": {"type": "string"}},
        },
        "ModelRef": {
            "type": "object",
            "required": ["name", "version"],
            "properties": {"name": {"type": "string"}, "version": {"type": "integer", "minimum": 1}},
        },
        "Image": image,
        "PredictJson": {
            "oneOf": [
                {"type": "object", "required": ["image"], "properties": {"image": _ref("Image")}},
                {
                    "type": "object",
                    "required": ["instances"],
                    "properties": {
                        "instances": {
                            "type": "array",
                            "minItems": 1,
                            "description": f"At most MAX_BATCH={max_batch} images (413 beyond).",
                            "items": _ref("Image"),
                        }
                    },
                },
            ]
        },
        "Prediction": {**prediction, "properties": {**prediction["properties"], "model": _ref("ModelRef")}},
        "BatchPrediction": {
            "type": "object",
            "required": ["predictions", "model"],
            "properties": {
                "predictions": {"type": "array", "items": prediction},
                "model": _ref("ModelRef"),
            },
        },
        "ModelVersion": {
            "type": "object",
            "required": ["version", "state"],
            "properties": {
                "version": {"type": "integer", "minimum": 1},
                "state": {"enum": ["serving", "available", "rejected"]},
                "reason": {"type": ["string", "null"], "description": "Why a version is rejected."},
                "accuracy": {"type": ["number", "null"]},
                "created": {"type": ["string", "null"]},
                "architecture": {"type": ["object", "null"]},
                "metadata": {"type": "object", "description": "model.json, less its file list."},
            },
        },
        "Models": {
            "type": "object",
            "required": ["name", "serving", "ready", "versions"],
            "properties": {
                "name": {"type": "string"},
                "serving": {"type": ["integer", "null"]},
                "pinned": {"type": ["integer", "null"]},
                "ready": {"type": "boolean"},
                "reason": {"type": ["string", "null"]},
                "poll_seconds": {"type": "number"},
                "last_scan": {"type": ["string", "null"]},
                "versions": {"type": "array", "items": _ref("ModelVersion")},
            },
        },
        "V2ServerMetadata": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "V2ModelMetadata": {
            "type": "object",
            "required": ["name", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": metadata_tensor},
                "outputs": {"type": "array", "items": metadata_tensor},
            },
        },
        "V2Parameters": parameters,
        "V2InferenceRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {
                    "allOf": [_ref("V2Parameters")],
                    "description": "Echoed back; binary_data_output: true asks for binary outputs.",
                },
                "inputs": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "shape", "datatype"],
                        "properties": {
                            "name": {"const": v2.INPUT_NAME},
                            "shape": {
                                "description": "[N, 784] or [N, 28, 28]",
                                "oneOf": [
                                    {
                                        "type": "array",
                                        "prefixItems": [batch, {"const": N_INPUTS}],
                                        "minItems": 2,
                                        "maxItems": 2,
                                    },
                                    {
                                        "type": "array",
                                        "prefixItems": [batch, {"const": IMAGE_SIDE}, {"const": IMAGE_SIDE}],
                                        "minItems": 3,
                                        "maxItems": 3,
                                    },
                                ],
                            },
                            "datatype": {"enum": sorted(v2.INPUT_DTYPES)},
                            "parameters": {
                                "allOf": [_ref("V2Parameters")],
                                "description": "binary_data_size: the tensor's bytes follow the JSON header.",
                            },
                            "data": tensor_data,
                        },
                    },
                },
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"enum": sorted(v2.OUTPUT_DTYPES)},
                            "parameters": {
                                "allOf": [_ref("V2Parameters")],
                                "description": "binary_data: true returns this output as raw bytes.",
                            },
                        },
                    },
                },
            },
        },
        "V2InferenceResponse": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string", "description": "The request's id, else the X-Request-ID."},
                "parameters": _ref("V2Parameters"),
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "datatype", "shape"],
                        "properties": {
                            "name": {"enum": sorted(v2.OUTPUT_DTYPES)},
                            "datatype": {"enum": ["FP32", "INT64"]},
                            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "parameters": _ref("V2Parameters"),
                            "data": {"type": "array", "items": {"type": "number"}},
                        },
                    },
                },
            },
        },
    }


def _binary(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {
            REQUEST_ID: {"$ref": "#/components/headers/RequestId"},
            v2.HEADER_LENGTH: {
                "description": "Length of the JSON header; the binary outputs follow it.",
                "schema": {"type": "integer", "minimum": 1},
                "required": True,
            },
        },
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }


def _v2_model_paths(base: str, versioned: bool) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"$ref": "#/components/parameters/ModelName"}]
    if versioned:
        params.append({"$ref": "#/components/parameters/ModelVersion"})
    lookup_errors = {
        400: "Malformed version.",
        404: "Unknown model or version.",
        503: "No version of the model is loaded.",
    }
    infer_ok = _json(_ref("V2InferenceResponse"), "Outputs as JSON data.")
    infer_ok["content"].update(
        _binary("Outputs as JSON with binary tensors appended (binary tensor data extension).")["content"]
    )
    infer_ok["headers"][v2.HEADER_LENGTH] = {
        "description": "Present when binary outputs follow the JSON header: the header's length.",
        "schema": {"type": "integer", "minimum": 1},
    }
    return {
        base: {
            "parameters": params,
            "get": {
                "tags": ["Open Inference Protocol"],
                "summary": "Model metadata: input and output tensors",
                "operationId": "v2ModelMetadata" + ("Version" if versioned else ""),
                "responses": {
                    "200": _json(_ref("V2ModelMetadata"), "The model's tensors."),
                    **_errors("V2Error", lookup_errors),
                },
            },
        },
        base + "/ready": {
            "parameters": params,
            "get": {
                "tags": ["Open Inference Protocol"],
                "summary": "Is the model ready for inference?",
                "operationId": "v2ModelReady" + ("Version" if versioned else ""),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["name", "ready"],
                            "properties": {"name": {"type": "string"}, "ready": {"const": True}},
                        },
                        "Ready.",
                    ),
                    "400": _json(
                        {
                            "oneOf": [
                                {
                                    "type": "object",
                                    "required": ["name", "ready"],
                                    "properties": {"name": {"type": "string"}, "ready": {"const": False}},
                                },
                                _ref("V2Error"),
                            ]
                        },
                        "Not ready (the protocol's 4xx for false), or a malformed version.",
                    ),
                    **_errors("V2Error", {404: "Unknown model or version."}),
                },
            },
        },
        base + "/infer": {
            "parameters": params,
            "post": {
                "tags": ["Open Inference Protocol"],
                "summary": "Classify a batch of images given as a tensor",
                "description": (
                    "One input `input`: [N, 784] or [N, 28, 28]; FP32 in [0, 1] (the network's input, used "
                    "as is) or UINT8 in 0..255 (scaled like /predict). Outputs `probabilities` FP32 [N, 10] "
                    "and `digit` INT64 [N]; choose with `outputs`. With the binary tensor data extension the "
                    "body is the JSON header followed by raw little-endian tensors, and the "
                    "Inference-Header-Content-Length header gives the JSON's length."
                ),
                "operationId": "v2Infer" + ("Version" if versioned else ""),
                "parameters": [
                    {
                        "name": v2.HEADER_LENGTH,
                        "in": "header",
                        "required": False,
                        "description": "Length of the JSON header when binary tensors follow it.",
                        "schema": {"type": "integer", "minimum": 1},
                    },
                    {
                        "name": "Content-Encoding",
                        "in": "header",
                        "required": False,
                        "description": "gzip or deflate: tritonclient's request_compression_algorithm.",
                        "schema": {"enum": ["gzip", "deflate", "identity"]},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("V2InferenceRequest")},
                        "application/octet-stream": {
                            "schema": {
                                "type": "string",
                                "format": "binary",
                                "description": "The JSON request followed by its binary tensors.",
                            }
                        },
                    },
                },
                "responses": {
                    "200": infer_ok,
                    **_errors(
                        "V2Error",
                        {
                            400: "Malformed request, tensor or version.",
                            404: "Unknown model or version.",
                            413: "Body (decompressed) over MAX_CONTENT_LENGTH, or batch over MAX_BATCH.",
                            415: "Unsupported Content-Encoding.",
                            503: "No version of the model is loaded.",
                        },
                    ),
                },
            },
        },
    }


def build_document(max_batch: int, max_content_length: int) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a server with these limits."""
    base_errors_predict = {
        400: "Undecodable image, wrong shape or type, values outside 0..255, NaN/inf, empty body, "
        "malformed JSON, bad version or preprocess argument.",
        404: "Unknown or invalid version.",
        413: f"Body over {max_content_length} bytes, batch over {max_batch} images, or too many pixels.",
        415: "Unsupported Content-Type.",
        503: "No model loaded.",
    }
    paths: dict[str, Any] = {
        "/": {
            "get": {
                "tags": ["Page"],
                "summary": "Draw a digit: the interactive page",
                "operationId": "page",
                "responses": {
                    "200": {
                        "description": "A self-contained HTML page.",
                        "headers": {REQUEST_ID: {"$ref": "#/components/headers/RequestId"}},
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/static/{filename}": {
            "get": {
                "tags": ["Page"],
                "summary": "Files the page uses",
                "operationId": "static",
                "parameters": [
                    {"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "The file.",
                        "headers": {REQUEST_ID: {"$ref": "#/components/headers/RequestId"}},
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    **_errors("Error", {404: "No such file."}),
                },
            }
        },
        "/predict": {
            "post": {
                "tags": ["Prediction"],
                "summary": "Classify one image, or a batch",
                "description": (
                    "A raw image body (any format Pillow decodes), multipart/form-data with one or more "
                    'files in the field `image`, or JSON `{"image": ...}` / `{"instances": [...]}`. '
                    "Real-world images are normalised like MNIST (inverted if dark-on-light, cropped, "
                    "scaled to 20x20, centred by mass) unless `preprocess=none`; a 28x28 image is used "
                    "as is."
                ),
                "operationId": "predict",
                "parameters": [
                    {
                        "name": "version",
                        "in": "query",
                        "required": False,
                        "description": "Pin a model version (default, or empty: the served one).",
                        "schema": {"type": "string", "pattern": "^([1-9][0-9]{0,9})?$"},
                    },
                    {
                        "name": "preprocess",
                        "in": "query",
                        "required": False,
                        "schema": {"enum": ["auto", "none"], "default": "auto"},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "image/png": {"schema": {"type": "string", "format": "binary"}},
                        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["image"],
                                "properties": {
                                    "image": {
                                        "description": f"One file, or up to {max_batch} (413 beyond).",
                                        "type": "array",
                                        "minItems": 1,
                                        "items": {"type": "string", "format": "binary"},
                                    }
                                },
                            }
                        },
                        "application/json": {"schema": _ref("PredictJson")},
                    },
                },
                "responses": {
                    "200": _json(
                        {"oneOf": [_ref("Prediction"), _ref("BatchPrediction")]},
                        "One prediction for one image; `predictions` in request order for a batch "
                        "(`instances`, or several multipart files).",
                    ),
                    **_errors("Error", base_errors_predict),
                },
            }
        },
        "/healthz": {
            "get": {
                "tags": ["Health"],
                "summary": "Liveness: 200 whenever the process is up",
                "operationId": "healthz",
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
                        "Up.",
                    )
                },
            }
        },
        "/readyz": {
            "get": {
                "tags": ["Health"],
                "summary": "Readiness: 200 when a model is loaded",
                "operationId": "readyz",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status", "model"],
                            "properties": {"status": {"const": "ready"}, "model": _ref("ModelRef")},
                        },
                        "A model is loaded.",
                    ),
                    **_errors("Error", {503: "No model loaded; the message says why."}),
                },
            }
        },
        "/models": {
            "get": {
                "tags": ["Models"],
                "summary": "Every version in the repository, which one is served, why others are not",
                "operationId": "models",
                "responses": {"200": _json(_ref("Models"), "The repository as this worker sees it.")},
            }
        },
        "/metrics": {
            "get": {
                "tags": ["Operations"],
                "summary": "Prometheus metrics, summed over all gunicorn workers",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4.",
                        "headers": {REQUEST_ID: {"$ref": "#/components/headers/RequestId"}},
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "tags": ["Operations"],
                "summary": "This document",
                "operationId": "openapi",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
        "/v2": {
            "get": {
                "tags": ["Open Inference Protocol"],
                "summary": "Server metadata",
                "operationId": "v2ServerMetadata",
                "responses": {"200": _json(_ref("V2ServerMetadata"), "Name, version, extensions.")},
            }
        },
        "/v2/health/live": {
            "get": {
                "tags": ["Open Inference Protocol"],
                "summary": "Server liveness",
                "operationId": "v2Live",
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["live"], "properties": {"live": {"const": True}}},
                        "Live.",
                    )
                },
            }
        },
        "/v2/health/ready": {
            "get": {
                "tags": ["Open Inference Protocol"],
                "summary": "Server readiness",
                "operationId": "v2Ready",
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["ready"], "properties": {"ready": {"const": True}}},
                        "A model is loaded.",
                    ),
                    "400": _json(
                        {"type": "object", "required": ["ready"], "properties": {"ready": {"const": False}}},
                        "No model loaded (the protocol's 4xx for false).",
                    ),
                },
            }
        },
        **_v2_model_paths("/v2/models/{name}", versioned=False),
        **_v2_model_paths("/v2/models/{name}/versions/{version}", versioned=True),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MNIST digit classifier",
            "version": v2.SERVER_VERSION,
            "description": (
                "A numpy network served by Flask under gunicorn. The base API answers errors as "
                '`{"error": {"code", "message"}}`; the Open Inference Protocol routes under /v2 as '
                '`{"error": "..."}`, as that protocol requires. Every response carries X-Request-ID '
                "(the client's, when it sends one)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(max_batch),
            "headers": {
                "RequestId": {
                    "description": "The request's id: the client's X-Request-ID if sane, else a new one.",
                    "schema": {"type": "string", "minLength": 1},
                    "required": True,
                }
            },
            "parameters": {
                "ModelName": {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                "ModelVersion": {
                    "name": "version",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,9}$"},
                    "description": "A positive integer; anything else is a 400.",
                },
            },
        },
    }


def init_app(app: Flask) -> None:
    """Serve the document, built once for this app's limits."""
    body = json.dumps(build_document(app.config["MAX_BATCH"], app.config["MAX_CONTENT_LENGTH"]))
    app.extensions["openapi"] = body

    @app.get("/openapi.json")
    def openapi_json() -> Response:
        return Response(current_app.extensions["openapi"], mimetype="application/json")
