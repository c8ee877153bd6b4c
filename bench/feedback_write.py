"""What one feedback write costs, with its fsync, and that /predict costs the same with feedback on.

    python -m bench.feedback_write [--dir DIR] [--records 300] [--rounds 5]

Three measurements, each a median over alternating rounds so that noise from other processes
hits every variant alike:

1. `core.feedback.FeedbackWriter.append` of a typical record (a drawing from the page: a
   280×280 PNG, its 28×28 input, the scores), with its `fdatasync`, and the same append with
   the sync skipped: the difference is what durability costs. DIR (default: a temp folder
   under the repository, so on the disk the service's FEEDBACK_DIR would use) matters: a
   tmpfs syncs for free, a network disk does not.
2. POST /feedback against POST /predict through the app in-process (Flask's test client, no
   HTTP): what the route adds to a prediction (scoring, the record, the write).
3. POST /predict with FEEDBACK_DIR set and unset: the prediction path does not touch feedback,
   so the two should agree within noise.

Small on purpose (a few seconds of CPU): one process, one thread, no load generator.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from core.threads import pin_blas_threads

pin_blas_threads(1)  # as in the workers

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from core import feedback  # noqa: E402
from service.app import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def drawing() -> bytes:
    """A 7 as the page sends it: dark ink on white, 280×280 PNG."""
    img = Image.new("L", (280, 280), 255)
    ImageDraw.Draw(img).line([(70, 50), (210, 50), (120, 240)], fill=17, width=22)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def per_call(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds per call, n calls."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return f"{name:<42} median {statistics.median(ms):7.3f} ms   p99 {p99:7.3f} ms   (n={len(ms)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to write (default: a temp folder under the repository)")
    parser.add_argument("--records", type=int, default=300, help="records per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base = Path(args.dir) if args.dir else ROOT
    work = Path(tempfile.mkdtemp(prefix=".bench-feedback-", dir=base))
    png = drawing()
    try:
        client = create_app(
            {"MODELS_DIR": str(ROOT / "models"), "MODEL_POLL_SECONDS": 0, "FEEDBACK_DIR": str(work / "app")}
        ).test_client()
        off = create_app({"MODELS_DIR": str(ROOT / "models"), "MODEL_POLL_SECONDS": 0}).test_client()
        r = client.post("/feedback?digit=7", data=png, content_type="image/png")
        assert r.status_code == 201, r.get_json()
        event = next(feedback.read_events(work / "app"))
        line_bytes = len(feedback.json.dumps(event, separators=(",", ":"))) + 1
        print(f"writing to {work} ({os.statvfs(work).f_bsize}-byte blocks); one record is {line_bytes} bytes")

        synced = feedback.FeedbackWriter(work / "synced", 1 << 40, 64 << 20)
        unsynced = feedback.FeedbackWriter(work / "unsynced", 1 << 40, 64 << 20)
        real_sync = os.fdatasync

        def append_unsynced() -> None:
            os.fdatasync = lambda fd: None  # the same write, minus the sync
            try:
                unsynced.append(event)
            finally:
                os.fdatasync = real_sync

        predict = lambda c: c.post("/predict", data=png, content_type="image/png")  # noqa: E731
        results: dict[str, list[float]] = {}
        variants = {
            "append + fdatasync (the store)": lambda: synced.append(event),
            "append, no sync (for comparison)": append_unsynced,
            "POST /feedback (in-process)": lambda: client.post(
                "/feedback?digit=7", data=png, content_type="image/png"
            ),
            "POST /predict, FEEDBACK_DIR set": lambda: predict(client),
            "POST /predict, FEEDBACK_DIR unset": lambda: predict(off),
        }
        for _ in range(args.rounds):
            for name, fn in variants.items():
                results.setdefault(name, []).extend(per_call(fn, args.records))
        for name, seconds in results.items():
            print(summary(name, seconds))
        sync = statistics.median(results["append + fdatasync (the store)"])
        nosync = statistics.median(results["append, no sync (for comparison)"])
        on = statistics.median(results["POST /predict, FEEDBACK_DIR set"])
        unset = statistics.median(results["POST /predict, FEEDBACK_DIR unset"])
        print(f"the sync costs {1000 * (sync - nosync):.3f} ms a record; /predict on/off: {on / unset:.3f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    np.seterr(all="raise")
    main()
