"""The HTTP API: POST /predict, POST /explain, GET /healthz, /readyz, /models.

/predict takes `?model=NAME` (default MODEL_NAME), and `?version=N` or
`?label=stable|canary` to pin what answers; unpinned, a canary answers its
share (docs/lifecycle.md). The answer's `model.version` says which did.

This module only translates HTTP to arrays and back; decoding and
normalisation live in `service.imaging`; model choice, the forward pass and the
prediction metrics in the data plane (`service.dataplane`), which V2 REST and
gRPC share.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Config, Request, Response, current_app, g, request

from core.modelstore import LoadedModel, parse_version
from core.preprocess import IMAGE_SIDE, N_INPUTS
from service import feedback, imaging
from service.dataplane import DataPlane
from service.errors import ApiError, error_response, json_response
from service.inference import explanation, model_ref, prediction

bp = Blueprint("api", __name__)

IMAGE_TYPES = ("application/octet-stream",)
JSON_TYPES = ("application/json",)


def _plane() -> DataPlane:
    return current_app.extensions["dataplane"]


@bp.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    model, reason = _plane().readiness()
    if model is None:
        return error_response(503, "not_ready", reason)
    return json_response({"status": "ready", "model": model_ref(model)})


@bp.get("/models")
def models() -> Response:
    # MODEL_NAME's status at the top level (as before), every model's under "models".
    plane = _plane()
    statuses = [feedback.live_figures(s) for s in plane.statuses()]
    default = next(s for s in statuses if s["name"] == plane.default_name)
    return json_response({**default, "models": statuses})


def _explain_when_asked(view: Callable[[], Response]) -> Callable[[], Response]:
    """`?explain=1` turns /predict into /explain; without it the view runs as it is, so a plain
    /predict reads one query argument more and never computes a gradient."""

    @functools.wraps(view)
    def wrapper() -> Response:
        return explain() if _explain_arg(request) else view()

    return wrapper


@bp.post("/predict")
@_explain_when_asked
def predict() -> Response:
    plane = _plane()
    model = _requested_model(plane, request)
    images, batch = _read_images(request, current_app.config, preprocess_arg(request))
    digits, probs = plane.predict(model, images)
    return predictions_response(model, digits, probs, batch)


def _requested_model(plane: DataPlane, req: Request) -> LoadedModel:
    """The version a prediction answers with: `?model`, then `?version` or `?label`, else the
    model's policy (stable, or the canary for its share of requests)."""
    return plane.model(_arg(req, "model"), _version_arg(req), _label_arg(req))


def predictions_response(model: LoadedModel, digits: np.ndarray, probs: np.ndarray, batch: bool) -> Response:
    """/predict's answer (the data plane has counted the prediction)."""
    chosen = digits.tolist()
    _answered(model)
    if batch:
        predictions = [prediction(d, p) for d, p in zip(chosen, probs, strict=True)]
        return json_response({"predictions": predictions, "model": model_ref(model)})
    return json_response({**prediction(chosen[0], probs[0]), "model": model_ref(model)})


@bp.post("/explain")
def explain() -> Response:
    """The prediction for one image, the 28×28 input the network saw and ∂ log p_digit / ∂input.

    Same body, arguments and errors as /predict, through the same parsing; one
    image only, since each answer carries two 28×28 maps.
    """
    plane = _plane()
    model = _requested_model(plane, request)
    images, _ = _read_images(request, current_app.config, preprocess_arg(request), single=True)
    digits, probs, x, saliency = plane.explain(model, images)
    digit = int(digits[0])
    _answered(model)
    body = explanation(digit, probs[0], x[0], saliency[0])
    return json_response({**body, "model": model_ref(model)})


def _answered(model: LoadedModel) -> None:
    """Which version answered, for the after_request hook: the request's metrics name it."""
    g.answered_by = model


def _arg(req: Request, name: str) -> str | None:
    """A query argument's first value, or None. `MultiDict.get` raises and catches a werkzeug
    HTTP exception for every absent name (about 2 µs), and a plain /predict asks for five."""
    args = req.args
    return args[name] if name in args else None  # noqa: SIM401 - .get is the slow path here


def _explain_arg(req: Request) -> bool:
    text = _arg(req, "explain")
    if text is None or text in ("", "0", "false"):
        return False
    if text in ("1", "true"):
        return True
    raise ApiError(400, "invalid_explain", f"explain must be 1, true, 0 or false, got {text!r}")


def _version_arg(req: Request) -> int | None:
    text = _arg(req, "version")
    if text is None or text == "":
        return None
    try:
        return parse_version(text)
    except ValueError:
        raise ApiError(400, "invalid_version", f"version must be a positive integer, got {text!r}") from None


def _label_arg(req: Request) -> str | None:
    label = _arg(req, "label") or None
    if label is not None and _arg(req, "version"):
        raise ApiError(400, "version_and_label", "pin a version or a label, not both")
    return label


def preprocess_arg(req: Request) -> bool:
    """`?preprocess`: auto (centre and scale as MNIST) or none (the image is already 28×28)."""
    mode = _arg(req, "preprocess")
    mode = "auto" if mode is None else mode
    if mode not in ("auto", "none"):
        raise ApiError(400, "invalid_preprocess", f"preprocess must be 'auto' or 'none', got {mode!r}")
    return mode == "auto"


@dataclass(frozen=True)
class Upload:
    """A request body read once: the (m, 28, 28) images, whether a batch was sent, each image
    file as sent ((media type, bytes); none for JSON) and the body's other fields (multipart form
    fields or the JSON object's members), for routes such as /feedback that need them."""

    images: np.ndarray
    batch: bool
    files: list[tuple[str, bytes]]
    fields: Mapping[str, Any]


def _read_images(
    req: Request, config: Config, preprocess: bool, single: bool = False
) -> tuple[np.ndarray, bool]:
    """(m, 28, 28) images from the request body, and whether a batch was sent."""
    upload = read_upload(req, config, preprocess, single)
    return upload.images, upload.batch


def read_upload(req: Request, config: Config, preprocess: bool, single: bool = False) -> Upload:
    """The body in any form /predict accepts, decoded and normalised (`service.imaging`).

    The number of images (MAX_BATCH, or one when `single`) and their declared
    pixels (MAX_IMAGE_PIXELS each, MAX_REQUEST_PIXELS together) are checked
    before any image is decoded or any JSON value becomes an array."""
    mimetype = req.mimetype
    if mimetype.startswith("image/") or mimetype in IMAGE_TYPES:
        data = req.get_data(cache=False)
        if not data:
            raise ApiError(400, "empty_body", "the request body is empty")
        return Upload(np.stack(_decode_all([data], config, preprocess)), False, [(mimetype, data)], {})
    if mimetype == "multipart/form-data":
        files = req.files.getlist("image")
        if not files:
            raise ApiError(400, "missing_image", 'multipart body has no file in the field "image"')
        _check_batch(len(files), config, single)
        raw = [(f.mimetype, f.read()) for f in files]
        images = _decode_all([data for _, data in raw], config, preprocess)
        return Upload(np.stack(images), len(files) > 1, raw, req.form)
    if mimetype in JSON_TYPES or mimetype.endswith("+json"):
        return _read_json(req, config, preprocess, single)
    if not mimetype and not req.content_length:
        raise ApiError(400, "empty_body", "the request body is empty; send an image or JSON")
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {mimetype or '(none)'!r} is not supported: send image/*, "
        "application/octet-stream, multipart/form-data (field 'image') or application/json",
    )


def _decode_all(blobs: list[bytes], config: Config, preprocess: bool) -> list[np.ndarray]:
    images = imaging.decode_batch(blobs, config["MAX_IMAGE_PIXELS"], config["MAX_REQUEST_PIXELS"])
    return [imaging.to_mnist(a, preprocess) for a in images]


def _check_batch(n: int, config: Config, single: bool = False) -> None:
    """MAX_BATCH images at most (413); one when the route explains (400 for a batch)."""
    if single and n > 1:
        raise _batch_not_supported()
    limit = config["MAX_BATCH"]
    if n > limit:
        raise ApiError(413, "batch_too_large", f"batch of {n} images exceeds MAX_BATCH={limit}")


def _batch_not_supported() -> ApiError:
    return ApiError(400, "batch_not_supported", 'send one image (a body, one file or {"image": ...})')


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _read_json(req: Request, config: Config, preprocess: bool, single: bool) -> Upload:
    raw = req.get_data(cache=False)
    if not raw:
        raise ApiError(400, "empty_body", "the request body is empty")
    try:
        doc = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not ("image" in doc or "instances" in doc):
        raise ApiError(400, "wrong_shape", 'expected a JSON object with "image" or "instances"')
    if "instances" in doc:
        items = doc["instances"]
        if not isinstance(items, list) or not items:
            raise ApiError(400, "wrong_shape", '"instances" must be a non-empty list of images')
        if single:  # "instances" asks for a batch, even of one
            raise _batch_not_supported()
        _check_batch(len(items), config)
        batch = True
    else:
        items = [doc["image"]]
        batch = False
    _reject_booleans(items)  # numpy would quietly read booleans as 1 and 0
    images = _as_images(items)
    return Upload(np.stack([imaging.to_mnist(a, preprocess) for a in images]), batch, [], doc)


def _reject_booleans(items: list) -> None:
    stack = [items]
    while stack:
        for v in stack.pop():
            if isinstance(v, bool):
                raise ApiError(400, "wrong_type", "image values must be numbers 0..255, not booleans")
            if isinstance(v, list):
                stack.append(v)


def _as_images(items: list) -> np.ndarray:
    """JSON lists -> (m, 28, 28) float64, refusing anything but finite numbers 0..255."""
    try:
        a = np.asarray(items)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ApiError(
            400, "wrong_shape", "each image must be 28 rows of 28 numbers, or 784 numbers"
        ) from None
    if a.dtype.kind not in "iuf":
        raise ApiError(
            400, "wrong_type", "image values must be numbers 0..255, not strings, booleans or null"
        )
    if a.shape[1:] == (N_INPUTS,):
        a = a.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    if a.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ApiError(
            400, "wrong_shape", f"each image must be 28x28 or 784 values, got shape {list(a.shape[1:])}"
        )
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ApiError(400, "not_finite", "image values must be finite (no NaN or infinity)")
    if a.min() < 0 or a.max() > 255:
        raise ApiError(400, "out_of_range", "image values must be between 0 and 255")
    return a
