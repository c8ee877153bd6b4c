"""What the extras' per-request hooks (request id, access line, metrics) cost, in one process.

    python bench/extras_overhead.py [--models-dir models] [--rounds 15] [--requests 300]

Builds three apps from the same model, in the same process: without the
per-request hooks (`service.logs.init_app` and `service.metrics.init_app`
skipped), with them but `ACCESS_LOG=0`, and as served. Rounds alternate
between the three, so noise from other processes hits all of them; it prints
the median CPU time per request for GET /healthz and a single-image PNG POST
/predict through Flask's test client, and each variant's ratio to the bare
app. stdout goes to /dev/null while measuring, as the access lines would go
to a pipe.

The figure that matters for serving is the difference in microseconds: the
hooks cost the same on every route, so they do not lower /predict relative
to /healthz (bench/serve_load.py measures that ratio over HTTP).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import time
from pathlib import Path
from unittest import mock

from core.threads import pin_blas_threads

pin_blas_threads(1)
ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from service import logs, metrics  # noqa: E402
from service.app import create_app  # noqa: E402


def build(models_dir: str) -> dict:
    cfg = {"MODELS_DIR": models_dir, "MODEL_POLL_SECONDS": 0}
    with mock.patch.object(logs, "init_app"), mock.patch.object(metrics, "init_app"):
        bare = create_app(cfg)
    os.environ["ACCESS_LOG"] = "0"
    try:
        no_access = create_app(cfg)
    finally:
        del os.environ["ACCESS_LOG"]
    full = create_app(cfg)
    return {"bare": bare, "extras, ACCESS_LOG=0": no_access, "extras (as served)": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()

    apps = build(args.models_dir)
    clients = {name: app.test_client() for name, app in apps.items()}
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    calls = {
        "healthz": lambda c: c.get("/healthz"),
        "predict": lambda c: c.post("/predict", data=png, content_type="image/png"),
    }
    times = {(name, route): [] for name in clients for route in calls}
    # The log lines go through the root logger's stdout handler: point it at /dev/null meanwhile.
    handler = next(h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler))
    with open(os.devnull, "w") as devnull:
        previous = handler.setStream(devnull)
        try:
            for _ in range(args.rounds):
                for name, client in clients.items():
                    for route, call in calls.items():
                        t0 = time.process_time()
                        for _ in range(args.requests):
                            call(client)
                        times[name, route].append((time.process_time() - t0) / args.requests * 1e6)
        finally:
            handler.setStream(previous)

    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"median CPU µs per request, {args.rounds} rounds x {args.requests} requests, Flask test client")
    print(f"{'app':24s} {'healthz':>9s} {'predict':>9s}   added vs bare (healthz, predict)")
    for name in clients:
        h, p = med[name, "healthz"], med[name, "predict"]
        dh, dp = h - med["bare", "healthz"], p - med["bare", "predict"]
        print(f"{name:24s} {h:9.0f} {p:9.0f}   {dh:+6.0f} µs {dp:+6.0f} µs")


if __name__ == "__main__":
    main()
