"""POST /feedback: a person's correction, stored durably, scored by the service itself.

The body is any form /predict accepts, for one image (`service.api.read_upload`,
the same parsing, limits and errors), plus the true `digit` (query argument,
multipart field or JSON member) and, optionally, what the client was answered:
`request_id`, `model`, `version`, `predicted`. The service scores the image
with the version that answered (the one given, else the model's stable
version), so live accuracy never rests on what a client claims. The record is
written and fsynced (`core.feedback.FeedbackWriter`) before the 201.

Live accuracy is counted twice, for two readers: `mnist_feedback_total{model,
version,outcome}` for Prometheus (this replica's workers, summed by the
multiprocess collector), and `/models`' `live` figure per version, read from
the feedback files themselves (`core.feedback.LiveTally`), which every worker
and replica share, so it is the same whichever worker answers.

With FEEDBACK_DIR unset the route answers 404 `feedback_off` and nothing else
changes: no file, no counter, no `live` figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import Counter

from core import feedback as store
from core.modelstore import LoadedModel, check_name, parse_version
from service import api
from service.errors import ApiError, json_response
from service.inference import classify, model_ref

bp = Blueprint("feedback", __name__)
FIELDS = ("digit", "request_id", "model", "version", "predicted")
MAX_REQUEST_ID = 200


def init_app(app: Flask) -> None:
    """The route always; the writer, the tally and the counter only when FEEDBACK_DIR is set."""
    directory = app.config.get("FEEDBACK_DIR")
    if directory:
        app.extensions["feedback"] = store.FeedbackWriter(
            directory, app.config["FEEDBACK_MAX_BYTES"], app.config["FEEDBACK_ROTATE_BYTES"]
        )
        app.extensions["feedback_tally"] = store.LiveTally(directory)
        app.extensions["feedback_counter"] = Counter(
            "mnist_feedback",
            "Corrections stored, by the version that scored them and whether it was right.",
            ["model", "version", "outcome"],
            registry=app.extensions["metrics"].registry,
        )
    app.register_blueprint(bp)


@bp.post("/feedback")
def feedback() -> Response:
    """Parse and check everything before the write, so a refused request leaves no record, and
    answer 201 only after it: a client that got 201 never has to send the correction again."""
    writer: store.FeedbackWriter | None = current_app.extensions.get("feedback")
    if writer is None:
        raise ApiError(404, "feedback_off", "this server does not store feedback: FEEDBACK_DIR is not set")
    preprocess = api.preprocess_arg(request)
    upload = api.read_upload(request, current_app.config, preprocess, single=True)  # a batch: 400
    fields = _fields(request.args, upload.fields)
    digit = _digit(fields.get("digit"), "digit")
    if digit is None:
        raise ApiError(400, "missing_digit", "say which digit the image is: digit=0..9")
    predicted = _digit(fields.get("predicted"), "predicted")
    request_id = _request_id(fields.get("request_id"))
    model = _answering_model(fields.get("model"), fields.get("version"))
    g.answered_by = model  # the request's metrics name the version that scored it
    digits, probs = classify(model, upload.images)
    scored = int(digits[0])
    media_type, raw = upload.files[0] if upload.files else (None, None)
    data = {
        "schema_version": store.SCHEMA_VERSION,
        "request_id": request_id,
        "feedback_request_id": g.get("request_id") or "",
        "model": model_ref(model),
        "digit": digit,
        "predicted": predicted,
        "scored": {"digit": scored, "probabilities": probs[0].tolist()},
        "correct": scored == digit,
        "preprocess": "auto" if preprocess else "none",
        "input": store.pixels_json(upload.images[0]),
        "image": store.image_field(media_type, raw, current_app.config["FEEDBACK_IMAGE_MAX_BYTES"]),
    }
    event = store.make_event(data, f"{model.name}/{model.version}")
    try:
        writer.append(event)
    except store.FeedbackError as e:
        raise ApiError(e.status, e.code, e.message) from None
    outcome = "correct" if scored == digit else "wrong"
    current_app.extensions["feedback_counter"].labels(model.name, str(model.version), outcome).inc()
    kept = ["the 28x28 input the network saw", "your digit", "the answering model and version"]
    if data["image"] is not None:
        whole = data["image"]["base64"] is not None
        kept.append("the image file as sent" if whole else "the image file's size and hash")
    body = {
        "id": event["id"],
        "stored": True,
        "digit": digit,
        "scored": scored,
        "correct": scored == digit,
        "model": model_ref(model),
        "kept": kept,
    }
    return json_response(body, 201)


def _fields(args: Mapping[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """The feedback fields from the query string and the body; the same field given twice with
    different values is refused rather than one silently winning."""
    out: dict[str, Any] = {}
    for name in FIELDS:
        values = [v for v in (args.get(name), body.get(name)) if v is not None and v != ""]
        if len({str(v) for v in values}) > 1:
            raise ApiError(400, f"conflicting_{name}", f"{name} is given twice with different values")
        if values:
            out[name] = values[-1]
    return out


def _digit(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) == 1 and value in "0123456789":
        return int(value)
    if type(value) is int and 0 <= value <= 9:
        return value
    raise ApiError(400, f"invalid_{name}", f"{name} must be one digit 0..9, got {value!r}")


def _request_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_REQUEST_ID or not value.isprintable():
        message = f"request_id must be printable text of at most {MAX_REQUEST_ID} characters"
        raise ApiError(400, "invalid_request_id", message)
    return value


def _answering_model(name: Any, version: Any) -> LoadedModel:
    """The version that answered: the one named, else the model's stable one (never a canary
    drawn at random: the record must be scored by what the client most likely saw)."""
    if name is not None:
        if not isinstance(name, str):
            raise ApiError(400, "invalid_model", "model must be a model name")
        try:
            check_name(name)
        except ValueError as e:
            raise ApiError(400, "invalid_model", str(e)) from None
    number = None
    if version is not None:
        bad = ApiError(400, "invalid_version", f"version must be a positive integer, got {version!r}")
        if isinstance(version, bool) or not isinstance(version, int | str):
            raise bad
        try:
            number = parse_version(version)
        except ValueError:
            raise bad from None
    manager = current_app.extensions["dataplane"].manager(name)
    return manager.get(number) if number is not None else manager.get(None, "stable")


def live_figures(status: dict[str, Any]) -> dict[str, Any]:
    """A /models status with each version's live accuracy (`live`) from the stored feedback:
    {"feedback": records, "correct": n, "accuracy": n / records}, or null with none yet."""
    tally: store.LiveTally | None = current_app.extensions.get("feedback_tally")
    if tally is None:
        return status
    counts = tally.counts()
    for entry in status.get("versions", []):
        n, correct = counts.get((status["name"], entry["version"]), (0, 0))
        entry["live"] = {"feedback": n, "correct": correct, "accuracy": correct / n} if n else None
    return status
