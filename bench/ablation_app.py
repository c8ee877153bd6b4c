"""The service with three extra routes that each leave out part of /predict.

    gunicorn -c gunicorn.conf.py 'bench.ablation_app:create_ablation_app()'
    (bench/serve_load.py --ablation does this)

The throughput target compares /predict with /healthz. These routes show, on
the same server, under the same load, what each part of /predict costs, and
so how close any /predict could come on that server:

    POST /ablation/noop        the stack alone: routing, hooks, access log, metrics;
                               the PNG body is sent, and drained by gunicorn
    POST /ablation/no-forward  /predict without the forward pass: body, decode,
                               28×28 checks, and the answer (JSON, metrics) of a
                               prediction computed once per model
    POST /ablation/no-decode   /predict without the body: the forward pass of a fixed
                               digit, and its answer

They reuse /predict's own helpers, so they leave out exactly one part each. They
live here, not in `service/`: only the benchmark serves them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flask import Blueprint, Flask, Response, current_app, request

from service import api
from service.app import create_app
from service.errors import json_response
from service.inference import classify

bp = Blueprint("ablation", __name__, url_prefix="/ablation")


def _fixed_digit() -> np.ndarray:
    """A 28×28 stroke: the forward pass costs the same whatever the pixels."""
    image = np.zeros((1, 28, 28), np.uint8)
    image[0, 6:22, 12:16] = 255
    return image


@bp.post("/noop")
def noop() -> Response:
    return json_response({"status": "ok"})


@bp.post("/no-forward")
def no_forward() -> Response:
    model = current_app.extensions["dataplane"].model(None)
    api._read_images(request, current_app.config, True)
    cache = current_app.extensions["ablation"]
    if cache.get("model") is not model:  # once per model, not per request
        cache["model"], cache["result"] = model, classify(model, cache["digit"])
    current_app.extensions["dataplane"].count(model, *cache["result"])
    return api.predictions_response(model, *cache["result"], batch=False)


@bp.post("/no-decode")
def no_decode() -> Response:
    model = current_app.extensions["dataplane"].model(None)
    digits, probs = classify(model, current_app.extensions["ablation"]["digit"])
    current_app.extensions["dataplane"].count(model, digits, probs)
    return api.predictions_response(model, digits, probs, batch=False)


def create_ablation_app(config: Mapping[str, Any] | None = None) -> Flask:
    app = create_app(config)
    app.extensions["ablation"] = {"digit": _fixed_digit()}
    app.register_blueprint(bp)
    return app
