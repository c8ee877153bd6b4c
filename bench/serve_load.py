"""Serving throughput: single-image PNG /predict against GET /healthz on one gunicorn.

    python bench/serve_load.py [--models-dir DIR] [--connections 8] [--duration 3] [--rounds 7] [--ablation]

Starts one gunicorn with gunicorn.conf.py (the settings `make serve` and the
image use), drives it with wrk (Lua script for the POST with a PNG body), and
prints req/s and p50/p99 latency for /predict and /healthz, images/s for
256-image batches, and the ratio predict/healthz. /healthz is the framework's
own ceiling on the machine it runs on, so the ratio is the figure that travels between
machines. Rounds alternate healthz and predict so that noise from other
processes hits both; medians are reported.

`--ablation` serves `bench/ablation_app.py` instead, the service plus three
routes that each leave one part of /predict out (the forward pass, the decode,
everything), and adds them to the rounds: how close any /predict could come.

The model is models/mnist (newest valid version) when there is one, else a
random-weight 784-100-10 network published to a temp dir: the cost of serving
does not depend on what the weights learnt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.threads import pin_blas_threads

pin_blas_threads(1)  # as in the workers

import numpy as np  # noqa: E402
import requests  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

from core import mnist, modelstore, network  # noqa: E402

APPS = {False: "service.wsgi:app", True: "bench.ablation_app:create_ablation_app()"}
# /predict with one part left out each (bench/ablation_app.py), from most to least work.
ABLATIONS = ("no-decode", "no-forward", "noop")

LUA = """
wrk.method = "{method}"
wrk.headers["Content-Type"] = "{content_type}"
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_digit(data_dir: Path) -> np.ndarray:
    """A real MNIST test digit when the data is there (PNG size matters), else a drawn stroke."""
    if not mnist.missing(mnist.raw_dir(data_dir)):
        return mnist.read(data_dir, "test_images")[:256]
    rng = np.random.default_rng(0)
    digits = np.zeros((256, 28, 28), np.uint8)
    for d in digits:
        d[6:22, 12:16] = rng.integers(150, 256)
    return digits


def model_dir(requested: str | None, workdir: Path, hidden: int | None = None) -> tuple[Path, str]:
    if requested:
        return Path(requested), f"{requested} (given)"
    if hidden:
        net = network.new_network(
            [784, hidden, 10], ["relu", "softmax"], "cross_entropy", np.random.default_rng(0)
        )
        modelstore.publish(workdir / "models", "mnist", net, {"note": "random weights for the benchmark"})
        return workdir / "models", f"random-weight [784, {hidden}, 10] (--hidden)"
    default = ROOT / "models"
    for v in reversed(modelstore.list_versions(default, "mnist")):
        try:
            m = modelstore.load(default, "mnist", v)
        except modelstore.InvalidModel:
            continue
        return default, f"models/mnist/{v} {list(m.net.sizes)}"
    net = network.new_network(
        [784, 100, 10], ["sigmoid", "softmax"], "cross_entropy", np.random.default_rng(0)
    )
    modelstore.publish(workdir / "models", "mnist", net, {"note": "random weights for the benchmark"})
    return workdir / "models", "random-weight [784, 100, 10] (no models/mnist yet)"


def png_predict_script(workdir: Path, data_dir: Path) -> Path:
    """A wrk script that posts one real MNIST digit as a PNG (written into `workdir`)."""
    from PIL import Image

    png = workdir / "digit.png"
    Image.fromarray(sample_digit(data_dir)[0]).save(png)
    script = workdir / "predict.lua"
    script.write_text(LUA.format(method="POST", content_type="image/png", body=png))
    return script


def wrk(
    url: str, script: Path | None, connections: int, duration: float, prefix: list[str] | None = None
) -> dict[str, float]:
    """One wrk run (one thread); `prefix` runs it under another command, such as nsenter."""
    cmd = [
        *(prefix or []),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    if script:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
        result[f"p{pct}"] = float(m.group(1)) * scale
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    result["non2xx"] = int(bad.group(1)) if bad else 0
    result["socket_errors"] = errors.group(1) if errors else ""
    return result


def breakdown(models: Path, png: bytes) -> str:
    """Microseconds for decode+normalise, the forward pass and the JSON body, in this process."""
    import timeit

    from core.network import probabilities
    from core.preprocess import to_vectors
    from service import imaging
    from service.inference import prediction

    version = modelstore.list_versions(models, "mnist")[-1]
    net = modelstore.load(models, "mnist", version).net
    image = imaging.to_mnist(imaging.decode(png, 16_000_000))
    x = to_vectors(image[None])
    p = probabilities(net, x)
    steps = {
        "decode": lambda: imaging.to_mnist(imaging.decode(png, 16_000_000)),
        "forward": lambda: probabilities(net, to_vectors(image[None])),
        "json": lambda: json.dumps({**prediction(int(p[0].argmax()), p[0]), "model": {"name": "mnist"}}),
    }
    times = {
        k: statistics.median(timeit.repeat(f, number=200, repeat=5)) / 200 * 1e6 for k, f in steps.items()
    }
    return ", ".join(f"{k} {v:.0f} us" for k, v in times.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", help="model repository (default: ./models, else a temp random model)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", str(ROOT / "data")))
    parser.add_argument("--hidden", type=int, help="serve a random 784-HIDDEN-10 network instead")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", default=os.environ.get("WEB_CONCURRENCY", "2"))
    parser.add_argument("--worker-class", default=os.environ.get("GUNICORN_WORKER_CLASS", "gthread"))
    parser.add_argument("--threads", default=os.environ.get("GUNICORN_THREADS", "4"))
    parser.add_argument(
        "--ablation", action="store_true", help="also time /predict without its parts (bench/ablation_app.py)"
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    server = None
    try:
        models, model_desc = model_dir(args.models_dir, work, args.hidden)
        digits = sample_digit(Path(args.data_dir))
        from PIL import Image  # only the benchmark's own PNG

        png = work / "digit.png"
        Image.fromarray(digits[0]).save(png)
        batch = work / "batch.json"
        batch.write_text(json.dumps({"instances": digits.reshape(256, -1).tolist()}))
        scripts = {}
        for name, body, ctype in (("predict", png, "image/png"), ("batch", batch, "application/json")):
            scripts[name] = work / f"{name}.lua"
            scripts[name].write_text(LUA.format(method="POST", content_type=ctype, body=body))

        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(
            PORT=str(port),
            MODELS_DIR=str(models),
            WEB_CONCURRENCY=str(args.workers),
            GUNICORN_WORKER_CLASS=args.worker_class,
            GUNICORN_THREADS=str(args.threads),
        )
        log = open(work / "server.log", "wb")  # noqa: SIM115 - closed with the server
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", APPS[args.ablation]],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print((work / "server.log").read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.2)
        r = requests.post(url + "/predict", data=png.read_bytes(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text

        print(f"model: {model_desc}")
        print(f"/predict's own steps in-process (hot cache): {breakdown(models, png.read_bytes())}")
        print(
            f"server: gunicorn, {args.workers} {args.worker_class} workers"
            f"{f' x {args.threads} threads' if args.worker_class == 'gthread' else ''}; "
            f"wrk: 1 thread, {args.connections} connections, {args.duration:g}s x {args.rounds} rounds; "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
        )
        # name -> (path, wrk script): one POSTs the PNG, GET /healthz needs none.
        endpoints = {"healthz": ("/healthz", None), "predict": ("/predict", scripts["predict"])}
        if args.ablation:
            for name in ABLATIONS:
                endpoints[name] = (f"/ablation/{name}", scripts["predict"])
        for path, script in endpoints.values():  # warm-up
            wrk(url + path, script, args.connections, 1)
        runs: dict[str, list[dict]] = {name: [] for name in [*endpoints, "batch"]}
        ratios: dict[str, list[float]] = {name: [] for name in endpoints if name != "healthz"}
        for i in range(args.rounds):
            for name, (path, script) in endpoints.items():
                runs[name].append(wrk(url + path, script, args.connections, args.duration))
            for name in ratios:
                ratios[name].append(runs[name][-1]["rps"] / runs["healthz"][-1]["rps"])
            h, p = runs["healthz"][-1], runs["predict"][-1]
            print(
                f"  round {i + 1}: healthz {h['rps']:7.0f} req/s  predict {p['rps']:7.0f} req/s  "
                f"ratio {ratios['predict'][-1]:.2f}  (predict p99 {p['p99']:.2f} ms)"
                + "".join(f"  {name} {ratios[name][-1]:.2f}" for name in ABLATIONS if name in ratios)
            )
        for _ in range(args.rounds):
            runs["batch"].append(
                wrk(url + "/predict", scripts["batch"], min(args.connections, 4), args.duration)
            )

        def med(name: str, key: str) -> float:
            return statistics.median(r[key] for r in runs[name])

        print()
        print(f"{'endpoint':34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
        labels = {
            "healthz": "GET /healthz",
            "predict": "POST /predict (1 PNG, 28x28)",
            **{name: f"POST /ablation/{name}" for name in ABLATIONS if name in runs},
            "batch": "POST /predict (256 as JSON)",
        }
        for name, label in labels.items():
            print(f"{label:34} {med(name, 'rps'):9.0f} {med(name, 'p50'):8.2f} {med(name, 'p99'):8.2f}")
            errors = sum(r["non2xx"] for r in runs[name])
            if errors or any(r["socket_errors"] for r in runs[name]):
                print(f"  !! {errors} non-2xx; socket errors: {[r['socket_errors'] for r in runs[name]]}")
        print(f"batch throughput: {med('batch', 'rps') * 256:.0f} images/s (256-image JSON batches)")
        for name in ratios:
            print(
                f"{name}/healthz throughput ratio: median {statistics.median(ratios[name]):.2f} "
                f"(rounds: {', '.join(f'{x:.2f}' for x in ratios[name])}"
                f"{'; target >= 0.80' if name == 'predict' else ''})"
            )
        p99 = med("predict", "p99")
        print(f"predict p99 at {args.connections} connections: {p99:.2f} ms (target <= 10 ms)")
        return 0
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
