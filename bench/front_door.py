"""Serving through the front door, as `docker compose up` runs it, and where the CPU goes.

    python -m bench.front_door [--models-dir DIR] [--rounds 3] [--duration 5] [--replicas 2]
                               [--keep-up] [--port 18000] [--against-nginx FILE]

Brings the compose stack up under a project of its own (`docker compose up
--build --wait`, the settings of docker-compose.yml plus `HOST_MODELS_DIR` and
`HOST_PORT`), then alternates four ways to reach the same replicas with wrk (one
thread, PNG POST /predict), at 8 and 64 connections:

- `published`: the published port on 127.0.0.1, through Docker's port proxy
  and nginx: what a user on the same machine measures;
- `published-nat`: the same port at the host's own address on the compose
  network (its gateway). Docker's port proxy only carries connections to
  127.0.0.1; these are rewritten by the kernel (iptables DNAT), as the
  connections of clients on other machines are;
- `in-network`: nginx's own port from inside nginx's network namespace
  (`nsenter -t PID -n`), so the port proxy is out of the path;
- `direct`: each replica's port on its compose-network address, one wrk per
  replica at the same time, connections split evenly: the replicas with no
  proxy at all. Its req/s is the sum, its p50 the mean and its p99 the worst.

For every run it also reads the CPU time of each part (nginx's and each
api replica's container cgroup, docker-proxy, dockerd, containerd-shim and
wrk itself) and prints CPU seconds per 1,000 requests: the decomposition of a
request's cost across processes. Last, 256 connections through the published
port give the shed rate (503 + Retry-After) beyond the in-flight cap.

Medians over the rounds are printed, with the front door's cost against the
replicas reached directly: 1 - published req/s / direct req/s.

`--against-nginx FILE` measures a change to nginx's settings in the same
run: nginx then reads a copy of deploy/nginx/nginx.conf, and in every round
the three paths through nginx run once with it and once with FILE written
over it in place (`nginx -s reload` between them, then a short warm-up).
FILE's rows carry a trailing `*`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.serve_load import free_port, model_dir, png_predict_script, wrk

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
HOST_PROCESSES = ("docker-proxy", "dockerd", "containerd-shim")


def compose(project: str, env: dict[str, str], *args: str, timeout: float = 900) -> str:
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


@dataclass
class Container:
    name: str  # nginx, api-1, api-2, ...
    id: str
    pid: int
    address: str  # on the compose network
    gateway: str  # the host's address on that network


def containers(project: str) -> list[Container]:
    ids = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    found = []
    for info in json.loads(
        subprocess.run(["docker", "inspect", *ids], capture_output=True, check=True).stdout
    ):
        labels = info["Config"]["Labels"]
        service, number = labels["com.docker.compose.service"], labels["com.docker.compose.container-number"]
        network = next(iter(info["NetworkSettings"]["Networks"].values()))
        name = service if service == "nginx" else f"{service}-{number}"
        found.append(
            Container(name, info["Id"], info["State"]["Pid"], network["IPAddress"], network["Gateway"])
        )
    return sorted(found, key=lambda c: c.name)


def container_cpu(container: Container) -> float:
    """CPU seconds of every process in the container, from its cgroup (v2, else v1's cpuacct)."""
    for path, read in (
        (f"/sys/fs/cgroup/system.slice/docker-{container.id}.scope/cpu.stat", _usage_usec),
        (f"/sys/fs/cgroup/docker/{container.id}/cpu.stat", _usage_usec),
        (f"/sys/fs/cgroup/cpuacct/docker/{container.id}/cpuacct.usage", lambda t: int(t) / 1e9),
    ):
        if os.path.exists(path):
            return read(Path(path).read_text())
    raise RuntimeError(f"no cgroup CPU accounting found for container {container.id[:12]}")


def _usage_usec(text: str) -> float:
    return int(re.search(r"^usage_usec (\d+)", text, re.M).group(1)) / 1e6


def host_cpu(names: tuple[str, ...] = HOST_PROCESSES) -> dict[str, float]:
    """CPU seconds of the host's Docker plumbing, summed by process name (read from /proc)."""
    totals = dict.fromkeys(names, 0.0)
    for proc in _processes():
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        name = next((n for n in names if comm.startswith(n[:15])), None)
        if name:
            fields = stat[stat.rindex(")") + 2 :].split()
            totals[name] += (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    return totals


def userland_proxy(port: int) -> bool:
    """Whether Docker's userland proxy carries the published port (dockerd's default), or the
    kernel's NAT does (`"userland-proxy": false` in daemon.json)."""
    for proc in _processes():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args[0].endswith(b"docker-proxy") and str(port).encode() in args:
            return True
    return False


def _processes() -> list[Path]:
    return [Path(e.path) for e in os.scandir("/proc") if e.name.isdigit()]


def cpu_snapshot(parts: list[Container]) -> dict[str, float]:
    snap = {c.name: container_cpu(c) for c in parts}
    snap.update(host_cpu())
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the wrk runs, once they have exited
    snap["wrk"] = usage.ru_utime + usage.ru_stime
    return snap


def measured(parts: list[Container], run, duration: float) -> dict:
    """Runs `run()` (wrk for `duration` s, returning its result dict) and adds CPU seconds per
    1,000 requests, by process."""
    before = cpu_snapshot(parts)
    result = run()
    after = cpu_snapshot(parts)
    requests_done = max(1.0, result["rps"] * duration)
    result["cpu_per_1k"] = {k: (after[k] - before[k]) * 1000 / requests_done for k in before}
    return result


def wrk_in(pid: int, url: str, script: Path, conns: int, duration: float) -> dict:
    """wrk inside another process's network namespace (root, nsenter from util-linux)."""
    return wrk(url, script, conns, duration, prefix=["nsenter", "-t", str(pid), "-n"])


def wrk_each(urls: list[str], script: Path, conns: int, duration: float) -> dict:
    """One wrk per URL at once, connections split evenly; summed req/s, mean p50, worst p99."""
    results: list[dict] = [{}] * len(urls)

    def one(i: int, url: str) -> None:
        results[i] = wrk(url, script, max(1, conns // len(urls)), duration)

    threads = [threading.Thread(target=one, args=(i, u)) for i, u in enumerate(urls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "rps": sum(r["rps"] for r in results),
        "p50": statistics.mean(r["p50"] for r in results),
        "p99": max(r["p99"] for r in results),
        "non2xx": sum(r["non2xx"] for r in results),
        "socket_errors": "; ".join(r["socket_errors"] for r in results if r["socket_errors"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", help="model repository (default: ./models)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", str(ROOT / "data")))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--replicas", type=int, default=int(os.environ.get("API_REPLICAS", "2")))
    parser.add_argument("--port", type=int, default=0, help="published port (default: a free one)")
    parser.add_argument("--keep-up", action="store_true", help="leave the stack running (e.g. for the peers)")
    parser.add_argument("--json", help="also write the medians to this file")
    parser.add_argument(
        "--against-nginx", metavar="FILE", help="a second nginx.conf, alternated with the shipped one"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="front-door-bench-"))
    models, model_desc = model_dir(args.models_dir, work)
    script = png_predict_script(work, Path(args.data_dir))

    project = f"mnist-bench-{os.getpid()}"
    port = args.port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env.update(
        HOST_PORT=str(port), HOST_GRPC_PORT=str(free_port()), HOST_MODELS_DIR=str(Path(models).resolve()),
        API_REPLICAS=str(args.replicas),
    )  # fmt: skip
    published = f"http://127.0.0.1:{port}"
    shipped_conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
    confs = {"": shipped_conf}
    files: list[str] = []
    if args.against_nginx:
        try:
            confs["*"] = Path(args.against_nginx).read_text()
        except OSError as e:
            parser.error(f"--against-nginx: {e}")
        conf = work / "nginx.conf"
        conf.write_text(shipped_conf)
        conf.chmod(0o644)  # nginx's uid reads it
        override = work / "compose.nginx.yml"
        override.write_text(f"services:\n  nginx:\n    volumes:\n      - {conf}:/etc/nginx/nginx.conf:ro\n")
        files = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(override)]
    finished = False  # a failed run takes its stack down even with --keep-up
    try:
        compose(project, env, *files, "up", "-d", "--build", "--wait")
        wait_ready(published)
        proxied = userland_proxy(port)
        parts = containers(project)
        nginx = next(c for c in parts if c.name == "nginx")
        replicas = [c for c in parts if c.name.startswith("api-")]
        targets = {
            "published": lambda c: wrk(published + "/predict", script, c, args.duration),
            "published-nat": lambda c: wrk(
                f"http://{nginx.gateway}:{port}/predict", script, c, args.duration
            ),
            "in-network": lambda c: wrk_in(
                nginx.pid, "http://127.0.0.1:8080/predict", script, c, args.duration
            ),
            "direct": lambda c: wrk_each(
                [f"http://{r.address}:8000/predict" for r in replicas], script, c, args.duration
            ),
        }

        def use_conf(mark: str) -> None:
            if len(confs) > 1:
                conf.write_text(confs[mark])  # in place: the bind mount keeps the same file
                for step in (["-t"], ["-s", "reload"]):  # a file nginx rejects stops the run
                    done = subprocess.run(
                        ["docker", "exec", nginx.id, "nginx", *step], capture_output=True, text=True
                    )
                    if done.returncode != 0:
                        raise RuntimeError(f"nginx {' '.join(step)}: {done.stderr[-2000:]}")
                time.sleep(1.0)  # the old workers hand over; then the kept connections refill
                targets["in-network"](8)

        for run in targets.values():  # warm-up
            run(8)
        runs: dict[tuple[str, int], list[dict]] = {}
        for i in range(args.rounds):
            for conns in (8, 64):
                for mark in confs:
                    use_conf(mark)
                    for name, run in targets.items():
                        if name == "direct" and mark:
                            continue  # no nginx in the path
                        result = measured(parts, lambda run=run, conns=conns: run(conns), args.duration)
                        runs.setdefault((name + mark, conns), []).append(result)
            line = "  ".join(f"{n} c{c} {r[-1]['rps']:5.0f}" for (n, c), r in runs.items())
            print(f"round {i + 1}: {line} req/s", flush=True)
        use_conf("")  # the shed runs and whatever follows (--keep-up) see the shipped settings
        shed = [
            measured(parts, lambda: targets["published"](256), args.duration)
            for _ in range(args.rounds)
        ]  # fmt: skip
        report = summarise(runs, shed, args, model_desc, proxied)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        if args.keep_up:
            print(f"\nthe stack stays up on {published} (docker compose -p {project} down -v to stop it)")
        finished = True
        return 0
    finally:
        if not (args.keep_up and finished):
            subprocess.run(
                ["docker", "compose", "-p", project, "down", "-v", "--remove-orphans", "--timeout", "10"],
                cwd=ROOT, env=env, capture_output=True, timeout=300,
            )  # fmt: skip


def summarise(runs: dict, shed: list[dict], args: argparse.Namespace, model_desc: str, proxied: bool) -> dict:
    parts = list(next(iter(runs.values()))[0]["cpu_per_1k"])
    print(f"\nmodel: {model_desc}; {args.replicas} replicas behind nginx; {os.cpu_count()} CPUs")
    print(f"wrk: 1 thread, {args.duration:g} s x {args.rounds} rounds, PNG POST /predict; medians")
    carrier = "Docker's userland proxy (docker-proxy)" if proxied else "the kernel's NAT"
    print(f"the published port on 127.0.0.1 is carried by {carrier}")
    print("CPU seconds per 1,000 requests, by process:")
    header = f"{'target':14} {'conns':>5} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7}"
    print(header + "".join(f" {p[:12]:>12}" for p in parts))
    report: dict = {"runs": {}}
    for (name, conns), rs in [*runs.items(), (("published", 256), shed)]:
        med = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
        cpu = {p: statistics.median(r["cpu_per_1k"][p] for r in rs) for p in parts}
        bad = sum(r["non2xx"] for r in rs)
        report["runs"][f"{name} c{conns}"] = {**med, "non2xx": bad, "cpu_per_1k": cpu}
        row = f"{name:14} {conns:5} {med['rps']:7.0f} {med['p50']:7.2f} {med['p99']:7.2f} {bad:7}"
        print(row + "".join(f" {cpu[p]:12.3f}" for p in parts))
    rates = [r["non2xx"] / max(1.0, r["rps"] * args.duration) for r in shed]
    print(f"shed rate at 256 connections (503 + Retry-After): {statistics.median(rates):.0%}")
    errors = [r["socket_errors"] for rs in [*runs.values(), shed] for r in rs if r["socket_errors"]]
    if errors:
        print(f"!! socket errors: {errors}")
    for path in [name for name in dict.fromkeys(n for n, _ in runs) if name != "direct"]:
        for conns in (8, 64):
            cost = [
                1 - f["rps"] / d["rps"]
                for f, d in zip(runs[(path, conns)], runs[("direct", conns)], strict=True)
            ]
            report[f"cost_{path}_c{conns}"] = statistics.median(cost)
            print(f"the door's cost, {path}, c{conns}: {statistics.median(cost):.0%} (target <= 15%)")
    return report


if __name__ == "__main__":
    sys.exit(main())
