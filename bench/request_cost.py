"""CPU microseconds per PNG /predict, over real HTTP, for variants of the service's settings.

    python -m bench.request_cost [--models-dir DIR] [--rounds 5] [--duration 4] [--connections 4]
                                 [--variant NAME=ENV,ENV ...]

Each variant is one gunicorn (gunicorn.conf.py, one worker, gRPC off) started
with extra environment variables; wrk drives it with a PNG POST /predict, and
the worker's own CPU time (utime + stime from /proc) divided by the requests
it answered gives the cost of one request in microseconds. Rounds alternate
the variants, so noise from other processes hits all of them, and medians are
printed with each variant's difference from the first one. CPU per request,
unlike req/s, hardly depends on what else the machine is doing.

Default variants: the service as shipped, and without the app's access line
(ACCESS_LOG=0). Add others with --variant, e.g. `--variant sync=GUNICORN_WORKER_CLASS=sync`.
Two names are not passed to gunicorn: `ROOT=DIR` serves another checkout of the
project (`git worktree add /tmp/before HEAD~3`: before and after a change, in
one run), and `APP=module:app` serves another WSGI app under the same
gunicorn.conf.py, e.g. the peers' bare Flask app:
`--variant flask=APP=flask_app:app,PYTHONPATH=../shared/peers` (it has no
/readyz, so readiness is its first 200 or 404 on /).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.serve_load import free_port, model_dir, png_predict_script, wrk

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_VARIANTS = ("shipped=", "no-access-line=ACCESS_LOG=0")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants (read from /proc)."""
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / TICKS
        stack.extend(int(c) for c in children)
    return total


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition("=")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    return name, env


def start(models: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(env)
    root, app = Path(env.pop("ROOT", ROOT)).resolve(), env.pop("APP", "service.wsgi:app")
    if "PYTHONPATH" in env:
        env["PYTHONPATH"] = str(Path(env["PYTHONPATH"]).resolve())
    full = {
        **os.environ,
        "PORT": str(port), "GRPC_PORT": "0", "WEB_CONCURRENCY": "1", "MODELS_DIR": str(models),
        "MODEL_POLL_SECONDS": "0", **env,
    }  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", app],
        cwd=root, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    ready, ok = ("/readyz", (200,)) if app == "service.wsgi:app" else ("/", (200, 404))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + ready, timeout=1).status_code in ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"gunicorn with {env} not ready within 60 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", help="model repository (default: ./models)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", str(ROOT / "data")))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--variant", action="append", help="NAME=VAR=VALUE,VAR=VALUE (repeatable)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="request-cost-"))
    models, model_desc = model_dir(args.models_dir, work)
    script = png_predict_script(work, Path(args.data_dir))

    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    servers = {}
    try:
        for name, env in variants:
            servers[name] = start(models, env)
            wrk(servers[name][1] + "/predict", script, args.connections, 1)  # warm-up
        costs: dict[str, list[float]] = {name: [] for name, _ in variants}
        rates: dict[str, list[float]] = {name: [] for name, _ in variants}
        for i in range(args.rounds):
            for name, (proc, url) in servers.items():
                before = tree_cpu(proc.pid)
                result = wrk(url + "/predict", script, args.connections, args.duration)
                used = tree_cpu(proc.pid) - before
                costs[name].append(used / (result["rps"] * args.duration) * 1e6)
                rates[name].append(result["rps"])
            print(f"round {i + 1}: " + "  ".join(f"{n} {c[-1]:.0f} us" for n, c in costs.items()), flush=True)
    finally:
        for proc, _ in servers.values():
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)

    print(f"\nmodel: {model_desc}; one worker; wrk -c{args.connections}, {args.rounds} x {args.duration:g} s")
    print(f"{'variant':24} {'us CPU/request':>15} {'vs first':>9} {'req/s':>7}  environment")
    first = statistics.median(costs[variants[0][0]])
    for name, env in variants:
        med = statistics.median(costs[name])
        print(
            f"{name:24} {med:15.0f} {med - first:+9.0f} {statistics.median(rates[name]):7.0f}  "
            + (",".join(f"{k}={v}" for k, v in env.items()) or "(as shipped)")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
