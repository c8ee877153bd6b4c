"""Serving through the front door (nginx + api replicas, as `docker compose up` runs them) and
straight to one replica, in one run.

    python -m bench.front_door [--models-dir DIR] [--rounds 5] [--duration 5] [--replicas 2]

Brings the compose stack up under a project of its own on a free port, with
`MODELS_DIR` as its model repository, plus one more api container started by
`docker compose run` with its port published: the same image and settings,
but without the service's DNS alias, so nginx never routes to it. Rounds
alternate front door and direct at 8 and 64 connections (wrk, PNG /predict);
then 256 connections through the front door give the shed rate, the share of
answers that were 503 + Retry-After. Medians over the rounds are printed, with
the proxy's cost at 8 connections: 1 - front door req/s / direct req/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image

from bench.serve_load import LUA, free_port, model_dir, sample_digit, wrk

ROOT = Path(__file__).resolve().parent.parent


def compose(project: str, env: dict[str, str], *args: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        ["docker", "compose", "-p", project, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"docker compose {' '.join(args)}: {proc.stderr[-3000:]}")
    return proc.stdout


def wait_ready(url: str, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready within {within:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", help="model repository (default: ./models)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", str(ROOT / "data")))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--replicas", type=int, default=int(os.environ.get("API_REPLICAS", "2")))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="front-door-bench-"))
    models, model_desc = model_dir(args.models_dir, work)
    png = work / "digit.png"
    Image.fromarray(sample_digit(Path(args.data_dir))[0]).save(png)
    script = work / "predict.lua"
    script.write_text(LUA.format(method="POST", content_type="image/png", body=png))

    project = f"mnist-bench-{os.getpid()}"
    port, direct_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env.update(PORT=str(port), MODELS_DIR=str(Path(models).resolve()), API_REPLICAS=str(args.replicas))
    front, direct = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{direct_port}"
    try:
        compose(project, env, "up", "-d", "--build", "--wait", timeout=900)
        compose(project, env, "run", "-d", "--no-deps", "-p", f"127.0.0.1:{direct_port}:8000", "api")
        wait_ready(front)
        wait_ready(direct)
        for url in (front, direct):  # warm-up
            wrk(url + "/predict", script, 8, 2)
        runs: dict[tuple[str, int], list[dict]] = {}
        for i in range(args.rounds):
            for conns in (8, 64):
                for name, url in (("front door", front), ("direct", direct)):
                    runs.setdefault((name, conns), []).append(
                        wrk(url + "/predict", script, conns, args.duration)
                    )
            line = "  ".join(f"{n} c{c} {r[-1]['rps']:6.0f}" for (n, c), r in runs.items())
            print(f"round {i + 1}: {line} req/s", flush=True)
        shed = [wrk(front + "/predict", script, 256, args.duration) for _ in range(args.rounds)]

        print(f"\nmodel: {model_desc}; {args.replicas} replicas behind nginx; {os.cpu_count()} CPUs")
        print(f"wrk: 1 thread, {args.duration:g} s x {args.rounds} rounds, PNG POST /predict; medians")
        print(f"{'target':12} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
        for (name, conns), rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
            bad = sum(r["non2xx"] for r in rs)
            print(f"{name:12} {conns:5} {med['rps']:8.0f} {med['p50']:8.2f} {med['p99']:8.2f} {bad:8}")
        rates = [r["non2xx"] / max(1.0, r["rps"] * args.duration) for r in shed]
        med = {k: statistics.median(r[k] for r in shed) for k in ("rps", "p50", "p99")}
        print(
            f"{'front door':12} {256:5} {med['rps']:8.0f} {med['p50']:8.2f} {med['p99']:8.2f}"
            f"   shed rate (503) {statistics.median(rates):.0%}"
        )
        errors = [r["socket_errors"] for rs in [*runs.values(), shed] for r in rs if r["socket_errors"]]
        if errors:
            print(f"!! socket errors: {errors}")
        cost = [
            1 - f["rps"] / d["rps"] for f, d in zip(runs[("front door", 8)], runs[("direct", 8)], strict=True)
        ]
        print(f"proxy cost at 8 connections: median {statistics.median(cost):.0%} (target <= 15%)")
        return 0
    finally:
        subprocess.run(
            ["docker", "compose", "-p", project, "down", "-v", "--remove-orphans", "--timeout", "10"],
            cwd=ROOT, env=env, capture_output=True, timeout=300,
        )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
