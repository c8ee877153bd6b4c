"""The Open Inference Protocol (KServe V2) over REST, as Triton, KServe and MLServer speak it.

Unmodified clients (tritonclient.http, KServe's and MLServer's) can use the
service through these routes:

    GET  /v2                                          server metadata
    GET  /v2/health/live, /v2/health/ready            liveness, readiness
    GET  /v2/models/<name>[/versions/<v>]             model metadata
    GET  /v2/models/<name>[/versions/<v>]/ready       model readiness
    POST /v2/models/<name>[/versions/<v>]/infer       inference
    POST /v2/repository/index                         every model's versions, states and labels
                                                      (Triton's and MLServer's repository extension)

The views only glue HTTP to the codec (`service.v2_codec`: tensors, datatypes,
shapes, the protocol's errors) and to the data plane (`service.dataplane`:
model lookup, inference, metrics), which gRPC (service/grpc_server.py) shares.
Errors are `{"error": "<message>"}`, as the protocol requires, not the base
service's `{"error": {"code", "message"}}`: `service.errors` picks the shape by path.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, g, request

from service.dataplane import DataPlane
from service.errors import V2_PREFIX, json_response
from service.v2_codec import (
    EXTENSIONS,
    HEADER_LENGTH,
    SERVER_NAME,
    SERVER_VERSION,
    V2Error,
    decompress,
    encode_response,
    json_object,
    model_metadata,
    parse_infer_request,
    repository_index,
)

bp = Blueprint("v2", __name__, url_prefix=V2_PREFIX)


def _plane() -> DataPlane:
    return current_app.extensions["dataplane"]


@bp.get("")
def server_metadata() -> Response:
    return json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)})


@bp.get("/health/live")
def live() -> Response:
    return json_response({"live": True})


@bp.get("/health/ready")
def ready() -> Response:
    # The protocol signals "false" with a 4xx status (Triton sends 400), not 503.
    is_ready = _plane().ready()
    return json_response({"ready": is_ready}, 200 if is_ready else 400)


@bp.get("/models/<name>")
@bp.get("/models/<name>/versions/<version>")
def metadata(name: str, version: str | None = None) -> Response:
    plane = _plane()
    model = plane.v2_model(name, version)
    return json_response(model_metadata(model.name, plane.versions(model)))


@bp.get("/models/<name>/ready")
@bp.get("/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None) -> Response:
    if not _plane().v2_model_ready(name, version):
        return json_response({"name": name, "ready": False}, 400)
    return json_response({"name": name, "ready": True})


@bp.post("/models/<name>/infer")
@bp.post("/models/<name>/versions/<version>/infer")
def infer_view(name: str, version: str | None = None) -> Response:
    plane = _plane()
    model = plane.v2_model(name, version)
    body = decompress(
        request.get_data(cache=False),
        request.headers.get("Content-Encoding"),
        current_app.config["MAX_CONTENT_LENGTH"],
    )
    req = parse_infer_request(body, request.headers.get(HEADER_LENGTH), plane.max_batch)
    results = plane.infer(model, req.x)
    g.answered_by = model  # the request's metrics name the version that answered
    response_id = req.id if req.id is not None else g.get("request_id")
    payload, header_length = encode_response(model, req, results, response_id)
    if header_length is None:
        return Response(payload, mimetype="application/json")
    return Response(payload, mimetype="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


@bp.post("/repository/index")
def repository_index_view() -> Response:
    raw = request.get_data(cache=False)
    doc = json_object(raw) if raw.strip(b" \t\r\n") else {}  # JSON's whitespace only: "\v" is no JSON
    ready_only = doc.get("ready", False)
    if not isinstance(ready_only, bool):
        raise V2Error(400, "ready must be a boolean")
    return json_response(repository_index(_plane().statuses(), ready_only))
