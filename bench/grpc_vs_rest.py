"""Single-image V2 inference: gRPC ModelInfer against REST /v2/models/mnist/infer on one gunicorn.

    python -m bench.grpc_vs_rest [--models-dir DIR] [--clients 8] [--duration 3] [--rounds 5]

Starts one gunicorn with gunicorn.conf.py (2 workers, the HTTP port and
GRPC_PORT both on free ports) and drives it with `--clients` threads for
`--duration` seconds per round, gRPC and REST alternating (the order flips
each round, so noise from other processes hits both). Each round prints
req/s and p50/p99 latency; the summary gives their medians over the rounds.

Both sides send the same image, one real-looking MNIST digit as UINT8
[1, 28, 28], as raw bytes: gRPC with `raw_input_contents` through
tritonclient.grpc's generated stub, REST with the binary tensor extension
through http.client on a keep-alive connection. Requests are built once, so the clients cost
little next to the server. Each gRPC client has its own channel and its own
connection (a local subchannel pool), as separate client processes would, so
SO_REUSEPORT spreads them over the workers as the kernel spreads HTTP ones.
The clients share the machine with the server: compare the two columns, not
the absolute figures, across machines.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from core.threads import pin_blas_threads

pin_blas_threads(1)  # as in the workers

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

from bench.serve_load import ROOT, free_port, model_dir, sample_digit  # noqa: E402


def grpc_client(target: str, image: np.ndarray) -> Callable[[], int]:
    channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    message = service_pb2.ModelInferRequest(
        model_name="mnist",
        inputs=[{"name": "input", "datatype": "UINT8", "shape": [1, 28, 28]}],
        raw_input_contents=[image.tobytes()],
    )

    def call() -> int:
        response = stub.ModelInfer(message, timeout=10)
        return int(np.frombuffer(response.raw_output_contents[1], "<i8")[0])

    return call


def rest_client(url: str, image: np.ndarray) -> Callable[[], int]:
    """http.client on one keep-alive connection (requests costs the client ~3x more CPU per call)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "UINT8",
                    "shape": [1, 28, 28],
                    "parameters": {"binary_data_size": 784},
                }
            ],
            "outputs": [{"name": "probabilities"}, {"name": "digit"}],
        }
    ).encode()
    body = header + image.tobytes()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }

    def call() -> int:
        try:
            conn.request("POST", "/v2/models/mnist/infer", body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
        except (http.client.HTTPException, OSError):
            conn.close()  # the server closed the keep-alive connection: reconnect next time
            raise
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
        if r.getheader("Connection", "").lower() == "close":
            conn.close()
        return next(o for o in json.loads(data)["outputs"] if o["name"] == "digit")["data"][0]

    return call


def run(make: Callable[[], Callable[[], int]], clients: int, seconds: float) -> dict[str, float]:
    """`clients` threads calling for `seconds`: req/s, p50 and p99 in ms, and the errors."""
    calls = [make() for _ in range(clients)]
    for call in calls:
        call()  # connected and warm
    latencies: list[list[float]] = [[] for _ in calls]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    deadline = 0.0

    def loop(i: int) -> None:
        start.wait()
        while (t0 := time.perf_counter()) < deadline:
            try:
                calls[i]()
            except Exception:
                errors[i] += 1
            latencies[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline = time.perf_counter() + seconds
    start.wait()
    for t in threads:
        t.join()
    flat = sorted(x for per in latencies for x in per)
    return {
        "rps": len(flat) / seconds,
        "p50": 1000 * flat[len(flat) // 2],
        "p99": 1000 * flat[min(len(flat) - 1, int(0.99 * len(flat)))],
        "errors": sum(errors),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", help="model repository (default: models/, else a random net)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", str(ROOT / "data")))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per round and protocol")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models, model_desc = model_dir(args.models_dir, work)
        image = sample_digit(Path(args.data_dir))[0].astype(np.uint8)
        port, grpc_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(PORT=str(port), GRPC_PORT=str(grpc_port), MODELS_DIR=str(models), MODEL_POLL_SECONDS="0")
        env.setdefault("WEB_CONCURRENCY", "2")
        with open(work / "server.log", "wb") as log:  # the child keeps its own copy of the fd
            server = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "service.wsgi:app"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        url, target = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if requests.get(url + "/readyz", timeout=1).ok:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    print((work / "server.log").read_text()[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.2)
            time.sleep(1)  # the second worker
            g, r = grpc_client(target, image)(), rest_client(url, image)()
            assert g == r, f"gRPC says {g}, REST says {r}"
            print(f"model: {model_desc}; {args.clients} clients, {args.duration:g} s x {args.rounds} rounds")
            print(f"workers: {env['WEB_CONCURRENCY']}; cores: {os.cpu_count()}; same digit from both: {g}")
            makers = {"grpc": lambda: grpc_client(target, image), "rest": lambda: rest_client(url, image)}
            results: dict[str, list[dict[str, float]]] = {"grpc": [], "rest": []}
            for i in range(args.rounds):
                for kind in ("grpc", "rest") if i % 2 == 0 else ("rest", "grpc"):
                    res = run(makers[kind], args.clients, args.duration)
                    results[kind].append(res)
                    print(
                        f"round {i + 1} {kind:4}: {res['rps']:7.0f} req/s  p50 {res['p50']:6.2f} ms  "
                        f"p99 {res['p99']:6.2f} ms  errors {res['errors']}"
                    )
            print("\nmedians over rounds:")
            print("protocol      req/s    p50 ms   p99 ms")
            for kind, label in (("grpc", "gRPC"), ("rest", "REST V2")):
                rows = results[kind]
                med = {k: statistics.median(row[k] for row in rows) for k in ("rps", "p50", "p99")}
                print(f"{label:10} {med['rps']:8.0f} {med['p50']:9.2f} {med['p99']:8.2f}")
            ratio = statistics.median(g["rps"] for g in results["grpc"]) / statistics.median(
                r["rps"] for r in results["rest"]
            )
            print(f"gRPC / REST throughput: {ratio:.2f}")
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
