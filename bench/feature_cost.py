"""What each part of a `/predict` costs beyond the peers' bare Flask app, in one process.

    python -m bench.feature_cost [--peers ../shared/peers] [--models-dir DIR] [--rounds 40] [--requests 200]

The service and the bare app (`../shared/peers/flask_app.py`: decode, forward
pass, `{"digit": d}`) serve the same weights; between them lie the service's
features. Each variant below is the service with one part of `/predict` done
the bare app's way, so its difference from the service is what that part
costs:

    decode     the body straight to Pillow (`Image.open(...).convert("L")`), no
               media-type dispatch, header probe, size checks or MNIST normalisation
    forward    the bare app's three products on the same weights, the softmax
               inline: no `to_vectors`, `feedforward`, `probabilities`
    answer     `{"digit": d}`: no confidence, probabilities or model and version
    hooks      no before/after-request hooks: request id, clock, request metrics,
               the access line's check, the poller's start
    all        all four: the bare app's view in the service's Flask app

Every app is called as a WSGI callable (no server, no socket), in blocks that
alternate between the apps, so noise from other processes hits all of them;
the medians of CPU time per request are printed. Prometheus runs in
multiprocess mode, as under gunicorn. ACCESS_LOG=0: the line itself is
`bench.access_line`'s figure. Without `--models-dir`, the peers' npz is
published into a temporary repository, as `../shared/peers/project/publish_ref.py`
does.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.threads import pin_blas_threads

pin_blas_threads(1)
ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
from flask import Flask, Response, current_app, request  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client import values  # noqa: E402

from core.modelstore import publish  # noqa: E402
from core.network import Network  # noqa: E402
from service import api  # noqa: E402
from service.app import create_app  # noqa: E402
from service.errors import json_response  # noqa: E402

Wsgi = Callable[[dict, Callable], Any]


def load_bare_app(peers: Path) -> Flask:
    """flask_app.py by its path: the peers' folder also holds a bench.py, which would shadow ours."""
    spec = importlib.util.spec_from_file_location("flask_app", peers / "flask_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app


def publish_peers_model(peers: Path, models_dir: Path) -> None:
    d = np.load(peers / "ref_model.npz")
    weights = (d["arr_0"], d["arr_1"], d["arr_2"])
    biases = tuple(d[f"arr_{i}"].reshape(-1, 1) for i in (3, 4, 5))
    net = Network((784, 512, 256, 10), ("relu", "relu", "softmax"), "cross_entropy", weights, biases)
    publish(models_dir, "mnist", net, {"source": "peers ref_model.npz"})


def _bare_image() -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(request.get_data())).convert("L"))[None]


def _bare_forward(model: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = images.reshape(-1).astype(np.float32) / np.float32(255.0)
    for w, b, name in zip(model.net.weights, model.net.biases, model.net.activations, strict=True):
        a = w @ a + b[:, 0]
        if name == "relu":
            a = np.maximum(a, 0)
    e = np.exp(a - a.max())
    probs = (e / e.sum())[None]
    return probs.argmax(axis=1), probs


def predict_view(decode: bool, forward: bool, answer: bool) -> Callable[[], Response]:
    """/predict with each part done the service's way (True) or the bare app's (False)."""

    def view() -> Response:
        plane = api._plane()
        model = api._requested_model(plane, request)
        images = api._read_images(request, current_app.config, True)[0] if decode else _bare_image()
        if forward:
            digits, probs = plane.predict(model, images)
        else:
            digits, probs = _bare_forward(model, images)
            plane.count(model, digits, probs)
        if answer:
            return api.predictions_response(model, digits, probs, False)
        api._answered(model)  # the request's metrics still name the version
        return json_response({"digit": int(digits[0])})

    return view


def service(
    models_dir: Path, decode: bool = True, forward: bool = True, answer: bool = True, hooks: bool = True
) -> Flask:
    app = create_app({"MODELS_DIR": str(models_dir), "MODEL_POLL_SECONDS": 0, "ACCESS_LOG": "0"})
    if not (decode and forward and answer):
        app.view_functions["api.predict"] = predict_view(decode, forward, answer)
    if not hooks:
        app.before_request_funcs.clear()
        app.after_request_funcs.clear()
    return app


def variants(models_dir: Path, peers: Path) -> dict[str, Wsgi]:
    return {
        "service": service(models_dir),
        "decode": service(models_dir, decode=False),
        "forward": service(models_dir, forward=False),
        "answer": service(models_dir, answer=False),
        "hooks": service(models_dir, hooks=False),
        "all": service(models_dir, decode=False, forward=False, answer=False, hooks=False),
        "bare app": load_bare_app(peers),
    }


def environ(png: bytes) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/predict", "QUERY_STRING": "", "SERVER_NAME": "bench",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "bench",
        "CONTENT_TYPE": "image/png", "CONTENT_LENGTH": str(len(png)), "wsgi.input": io.BytesIO(png),
        "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "wsgi.multithread": False,
        "wsgi.multiprocess": True, "wsgi.run_once": False,
    }  # fmt: skip


def call(app: Wsgi, png: bytes) -> bytes:
    status: list[str] = []
    body = b"".join(app(environ(png), lambda s, h, e=None: status.append(s)))
    if not status[0].startswith("200"):
        raise RuntimeError(f"{status[0]}: {body[:200]!r}")
    return body


def measure(apps: dict[str, Wsgi], png: bytes, rounds: int, requests: int) -> dict[str, float]:
    for app in apps.values():  # warm up: imports, caches, first-request work
        for _ in range(requests):
            call(app, png)
    times: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(rounds):
        for name, app in apps.items():
            t0 = time.process_time()
            for _ in range(requests):
                call(app, png)
            times[name].append((time.process_time() - t0) / requests * 1e6)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=Path, default=ROOT.parent / "shared" / "peers")
    parser.add_argument("--models-dir", type=Path, help="default: the peers' npz, published to a temp dir")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    if not (args.peers / "flask_app.py").is_file():
        parser.error(f"no flask_app.py in {args.peers} (--peers)")
    if args.models_dir is not None and not args.models_dir.is_dir():
        parser.error(f"--models-dir: {args.models_dir} is not a folder")
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests must be at least 1")

    # Prometheus in multiprocess mode, as under gunicorn.conf.py: set here, not at import, so that
    # importing this module (its test does) changes nothing for the rest of the process.
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="feature-cost-metrics-"))
    values.ValueClass = values.MultiProcessValue()
    with tempfile.TemporaryDirectory(prefix="feature-cost-models-") as tmp:
        models_dir = args.models_dir or Path(tmp)
        if args.models_dir is None:
            publish_peers_model(args.peers, models_dir)
        apps = variants(models_dir, args.peers)
        png = (args.peers / "digit.png").read_bytes()
        try:
            digits = {name: json.loads(call(app, png))["digit"] for name, app in apps.items()}
        except RuntimeError as e:  # e.g. no model in --models-dir: the service's own 503
            raise SystemExit(f"a first POST /predict failed: {e}") from None
        if len(set(digits.values())) != 1:
            raise SystemExit(f"the variants disagree on the digit: {digits}")
        med = measure(apps, png, args.rounds, args.requests)

    base = med["service"]
    print(f"median CPU µs per POST /predict, {args.rounds} rounds x {args.requests} WSGI calls, one process")
    print(f"{'variant':10s} {'µs':>7s} {'vs service':>11s}")
    for name, value in med.items():
        print(f"{name:10s} {value:7.0f} {value - base:+11.0f}")


if __name__ == "__main__":
    main()
