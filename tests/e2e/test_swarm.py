"""The Swarm stack (deploy/swarm/stack.yml) on a real engine: deployed with `make swarm-up`,
operated under load, every client outcome counted.

A single-node swarm on this machine, made by the test when the engine is not
in one already (and then left again). The kernel has no IPVS, so this is the
stack as shipped: dnsrr api tasks, nginx published in host mode, re-resolving
`api` per request. What is checked, in file order on one stack:

1. real MNIST PNGs through nginx are answered 200 with the right digits;
2. a forced rolling update (start-first) replaces every api task: 0 failed requests;
3. scaling the api 2 -> 4 -> 2: 0 failed requests;
4. `docker kill` of one task's container: Swarm replaces it, 0 failed requests;
5. an update whose tasks never get healthy (MODEL_VERSION=999): it rolls back by
   itself, the broken task is never in the `api` DNS answer, 0 failed requests;
6. a new version published into the models folder reaches every task.

Load is on 127.0.0.1 only; update delays and monitors are shortened with
`docker service update` flags so the file runs in a few minutes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.e2e.conftest import ROOT, SHARED, Timer, fill_mnist, free_port, mnist_test_sample
from tests.helpers import SHIPPED_VERSION
from tests.load import Load, rest

pytestmark = pytest.mark.timeout(900)

API_REPLICAS = 2  # stack.yml's default
N_IMAGES = 300
POLL_SECONDS = 2.0  # MODEL_POLL_SECONDS of the api under test
SWITCH_MARGIN = 3.0  # seconds beyond the poll interval for every task to take a new version up
CONVERGE_WITHIN = 120.0
# Fast updates for the tests; stack.yml's own values (delay 5 s, monitor 15 s) are for real use.
FAST_UPDATE = [
    "--update-delay",
    "1s",
    "--update-monitor",
    "5s",
    "--rollback-delay",
    "0s",
    "--rollback-monitor",
    "5s",
]
READYZ_VERSION = (
    "import json, urllib.request as u\n"
    "try:\n"
    "    ready = json.load(u.urlopen('http://127.0.0.1:8000/readyz', timeout=5))\n"
    "    print(ready.get('model', {}).get('version'))\n"
    "except Exception as e:\n"
    "    print(type(e).__name__)\n"
)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """`docker ...`; a failure fails the test with the command's output."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        command = " ".join(args)
        pytest.fail(
            f"`docker {command}` exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@dataclass
class Swarm:
    """One stack deployed from a fresh clone; names and helpers to operate and observe it."""

    repo: Path
    stack: str
    port: int
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.stack}_api"

    @property
    def models(self) -> Path:
        return self.repo / "models"

    def make(self, target: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """A Makefile target in the clone, as a user runs it."""
        proc = subprocess.run(
            ["make", "--no-print-directory", target],
            cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if proc.returncode != 0:
            pytest.fail(
                f"make {target} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def containers(self, service: str = "api") -> list[str]:
        """Ids of the running containers of one of the stack's services."""
        label = f"label=com.docker.swarm.service.name={self.stack}_{service}"
        return docker("ps", "-q", "--no-trunc", "--filter", label).stdout.split()

    def inspect(self, *ids: str) -> list[dict]:
        out = docker("inspect", *ids, check=False)
        return json.loads(out.stdout) if out.returncode == 0 else []

    def health(self) -> dict[str, str]:
        """Short container id -> health of every running api container."""
        ids = self.containers()
        return (
            {i["Id"][:12]: i["State"].get("Health", {}).get("Status", "none") for i in self.inspect(*ids)}
            if ids
            else {}
        )

    def logs(self) -> str:
        return (
            "".join(
                docker(
                    "service", "logs", "--tail", "40", "--no-task-ids", f"{self.stack}_{s}", check=False
                ).stderr[-3000:]
                for s in ("api", "nginx")
            )
            + docker("service", "ps", "--no-trunc", self.api, check=False).stdout[-3000:]
        )

    def wait_converged(self, replicas: int = API_REPLICAS, within: float = CONVERGE_WITHIN) -> None:
        """Until exactly `replicas` api containers run, all healthy, nginx too, and nginx answers /readyz."""
        deadline = time.monotonic() + within
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.health()
            nginx = self.containers("nginx")
            if len(states) == replicas and set(states.values()) == {"healthy"} and len(nginx) == 1:
                nginx_ok = self.inspect(*nginx)[0]["State"].get("Health", {}).get("Status") == "healthy"
                try:
                    ready = requests.get(f"{self.url}/readyz", timeout=5).status_code == 200
                except requests.RequestException:
                    ready = False
                if nginx_ok and ready:
                    return
            time.sleep(0.5)
        pytest.fail(
            f"not converged to {replicas} healthy api tasks within {within:.0f} s: {states}\n{self.logs()}"
        )

    def update_state(self) -> str:
        out = docker(
            "service", "inspect", self.api, "--format", "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}"
        )
        return out.stdout.strip()

    def update(self, *flags: str, until: set[str], within: float = 180) -> str:
        """`docker service update` of the api, detached; waits until its UpdateStatus is one of `until`."""
        docker("service", "update", "--detach", *flags, self.api)
        deadline = time.monotonic() + within
        state = ""
        while time.monotonic() < deadline:
            state = self.update_state()
            if state in until:
                return state
            if state in {"paused", "rollback_paused"}:
                break
            time.sleep(0.5)
        pytest.fail(f"update {flags} ended {state!r}, not in {until}\n{self.logs()}")

    def replica_versions(self) -> dict[str, int | str | None]:
        """The version each api task serves, asked of the task itself (not through nginx)."""
        versions: dict[str, int | str | None] = {}
        for cid in self.containers():
            out = docker("exec", cid, "python", "-c", READYZ_VERSION, check=False, timeout=60).stdout.strip()
            versions[cid[:12]] = int(out) if out.isdigit() else (out or None)
        return versions

    def dns_answer(self) -> set[str]:
        """The addresses `api` resolves to, asked where nginx asks (Docker's DNS, in nginx's container)."""
        nginx = self.containers("nginx")
        if not nginx:
            return set()
        out = docker("exec", nginx[0], "getent", "ahostsv4", "api", check=False, timeout=30).stdout
        return {line.split()[0] for line in out.splitlines() if line.strip()}

    def address(self, cid: str) -> str | None:
        info = self.inspect(cid)
        networks = info[0]["NetworkSettings"]["Networks"] if info else {}
        net = networks.get(f"{self.stack}_default", {})
        return net.get("IPAddress") or None


def swarm_state() -> str:
    return docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()


def leftovers(stack: str) -> dict[str, list[str]]:
    label = f"label=com.docker.stack.namespace={stack}"
    return {
        kind: docker(*cmd, "--filter", label, check=False).stdout.split()
        for kind, cmd in {
            "containers": ("ps", "-aq"),
            "networks": ("network", "ls", "-q"),
            "services": ("service", "ls", "-q"),
            "configs": ("config", "ls", "-q"),
        }.items()
        if kind in ("containers", "networks") or swarm_state() == "active"
    }


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, timer: Timer) -> Iterator[Swarm]:
    """The stack deployed by `make swarm-up` from a fresh clone, converged; removed (and the
    swarm left, if this fixture made it) whatever the tests did."""
    setup = SHARED / "tools" / "docker-setup"
    with timer.step("docker-setup"):
        if setup.exists():
            subprocess.run([str(setup)], check=True, timeout=900, capture_output=True)
        elif shutil.which("docker") is None:
            pytest.fail(f"no docker and no {setup}")

    repo = tmp_path_factory.mktemp("swarm") / "repo"
    with timer.step("git clone + MNIST into ./data"):
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True, timeout=120)
        fill_mnist(repo / "data")

    stack = f"mnist-e2e-{os.getpid()}"
    image = f"mnist-swarm-e2e-{os.getpid()}"
    env = {
        k: v
        for k, v in os.environ.items()
        # the developer's shell must not configure the stack under test
        if k
        not in (
            "MODEL_NAME",
            "MODEL_VERSION",
            "MODELS_DIR",
            "HOST_MODELS_DIR",
            "WEB_CONCURRENCY",
            "API_REPLICAS",
            "STACK",
        )
    }
    env.update(
        STACK=stack, API_IMAGE=image, HOST_PORT=str(free_port()), MODELS_DIR=str(repo / "models"),
        API_REPLICAS=str(API_REPLICAS), MODEL_POLL_SECONDS=str(POLL_SECONDS),
    )  # fmt: skip
    s = Swarm(repo, stack, int(env["HOST_PORT"]), env)

    made_swarm = False
    # `swarm init` creates docker_gwbridge and `swarm leave` keeps it: removed again if it was ours.
    had_gwbridge = docker("network", "inspect", "docker_gwbridge", check=False).returncode == 0
    try:
        if swarm_state() != "active":
            with timer.step("docker swarm init"):
                docker("swarm", "init", "--advertise-addr", "127.0.0.1")
                made_swarm = True
        with timer.step("make swarm-up (build + stack deploy)"):
            s.make("swarm-up", timeout=900)
        with timer.step("deploy -> converged"):
            s.wait_converged()
        yield s
    finally:
        with timer.step("make swarm-down, wait for containers and networks to go"):
            subprocess.run(
                ["make", "--no-print-directory", "swarm-down"],
                cwd=repo, env=env, capture_output=True, timeout=300,
            )  # fmt: skip
            deadline = time.monotonic() + 120
            while any(leftovers(stack).values()) and time.monotonic() < deadline:
                time.sleep(1)
            left = leftovers(stack)
        if made_swarm:
            with timer.step("docker swarm leave --force"):
                docker("swarm", "leave", "--force", check=False)
                if not had_gwbridge:
                    docker("network", "rm", "docker_gwbridge", check=False)
        tags = docker("images", "--format", "{{.Repository}}:{{.Tag}}", image, check=False).stdout.split()
        if tags:
            docker("rmi", *tags, check=False)
        shutil.rmtree(repo, ignore_errors=True)
        assert not any(left.values()), f"left behind by stack {stack}: {left}"


@pytest.fixture(scope="module")
def test_set(swarm: Swarm) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random sample of the MNIST test split, from the clone's ./data."""
    return mnist_test_sample(swarm.repo, N_IMAGES)


@pytest.fixture(scope="module")
def digit_png(test_set: tuple[np.ndarray, np.ndarray]) -> bytes:
    return png(test_set[0][0])


def under_load(swarm: Swarm, body: bytes) -> Load:
    """4 clients posting back to back, as in test_front_door.py."""
    return Load(rest(swarm.url, body), n=4, pause=0.01)


def report(timer: Timer, what: str, clients: Load) -> list:
    failures = clients.failures
    timer.note(
        f"{what}: {len(clients.outcomes)} requests, {len(failures)} failed, "
        f"slowest {max(o.seconds for o in clients.outcomes) * 1000:.0f} ms"
    )
    return failures


# --- 1. deploy ---------------------------------------------------------------------------------


def test_deployed_stack_answers_mnist_pngs(swarm: Swarm, test_set, timer: Timer) -> None:
    images, labels = test_set
    answers = []
    with timer.step(f"POST {N_IMAGES} MNIST PNGs through the swarm's nginx"), requests.Session() as http:
        for image in images:
            r = http.post(
                f"{swarm.url}/predict", data=png(image), headers={"Content-Type": "image/png"}, timeout=30
            )
            assert r.status_code == 200, r.text
            answers.append(r.json())
    assert {a["model"]["version"] for a in answers} == {SHIPPED_VERSION}
    digits = np.array([a["digit"] for a in answers])
    accuracy = float(np.mean(digits == labels))
    timer.note(f"swarm: accuracy of version {SHIPPED_VERSION} on {N_IMAGES} test PNGs: {accuracy:.4f}")
    assert accuracy > 0.98
    # What the stack file promises: dnsrr, host-mode port, nginx.conf as a config, read-only models.
    spec = json.loads(docker("service", "inspect", swarm.api).stdout)[0]["Spec"]
    assert spec["EndpointSpec"]["Mode"] == "dnsrr"
    assert (
        spec["UpdateConfig"]["Order"] == "start-first" and spec["UpdateConfig"]["FailureAction"] == "rollback"
    )
    mounts = {m["Target"]: m for m in spec["TaskTemplate"]["ContainerSpec"]["Mounts"]}
    assert mounts["/models"]["Source"] == str(swarm.models) and mounts["/models"]["ReadOnly"]
    nginx = json.loads(docker("service", "inspect", f"{swarm.stack}_nginx").stdout)[0]["Spec"]
    assert [p["PublishMode"] for p in nginx["EndpointSpec"]["Ports"]] == ["host"]
    assert [c["File"]["Name"] for c in nginx["TaskTemplate"]["ContainerSpec"]["Configs"]] == [
        "/etc/nginx/nginx.conf"
    ]


# --- 2. rolling update -------------------------------------------------------------------------


def test_rolling_update_under_load_fails_no_request(swarm: Swarm, digit_png: bytes, timer: Timer) -> None:
    before = set(swarm.containers())
    with under_load(swarm, digit_png) as clients:
        clients.wait_for(20)
        with timer.step("docker service update --force (start-first, one task at a time)"):
            swarm.update("--force", *FAST_UPDATE, until={"completed"})
        swarm.wait_converged()
        n = len(clients.outcomes)
        clients.wait_for(n + 20)
    after = set(swarm.containers())
    assert len(after) == API_REPLICAS and not after & before, (before, after)
    failures = report(timer, "rolling update", clients)
    assert not failures, f"{len(failures)} failed requests: {failures[:5]}"


# --- 3. scale ----------------------------------------------------------------------------------


def test_scaling_2_4_2_under_load_fails_no_request(swarm: Swarm, digit_png: bytes, timer: Timer) -> None:
    with under_load(swarm, digit_png) as clients:
        clients.wait_for(20)
        with timer.step("scale api 2 -> 4"):
            docker("service", "scale", "--detach", f"{swarm.api}=4")
            swarm.wait_converged(replicas=4)
        assert len(swarm.dns_answer()) == 4, "nginx's DNS does not see the 4 tasks"
        n = len(clients.outcomes)
        clients.wait_for(n + 20)
        with timer.step("scale api 4 -> 2"):
            docker("service", "scale", "--detach", f"{swarm.api}={API_REPLICAS}")
            swarm.wait_converged(replicas=API_REPLICAS)
        n = len(clients.outcomes)
        clients.wait_for(n + 20)
    failures = report(timer, "scale 2 -> 4 -> 2", clients)
    assert not failures, f"{len(failures)} failed requests: {failures[:5]}"


# --- 4. kill -----------------------------------------------------------------------------------


def test_a_killed_task_is_replaced_and_costs_no_request(swarm: Swarm, digit_png: bytes, timer: Timer) -> None:
    victim = sorted(swarm.containers())[0]
    with under_load(swarm, digit_png) as clients:
        clients.wait_for(20)
        with timer.step("docker kill one api task -> replaced and healthy"):
            docker("kill", victim)
            deadline = time.monotonic() + 10
            while victim in swarm.containers() and time.monotonic() < deadline:
                time.sleep(0.2)
            swarm.wait_converged()
        n = len(clients.outcomes)
        clients.wait_for(n + 20)
    assert victim not in swarm.containers()
    assert len(swarm.containers()) == API_REPLICAS
    failed = docker(
        "service", "ps", swarm.api, "--filter", "desired-state=shutdown", "--format", "{{.Error}}"
    ).stdout
    assert "137" in failed, f"the killed task is not in the service's history: {failed}"
    failures = report(timer, "docker kill of one api task", clients)
    assert not failures, f"{len(failures)} failed requests: {failures[:5]}"


# --- 5. broken update --------------------------------------------------------------------------


def test_an_update_that_never_gets_healthy_rolls_back_by_itself(
    swarm: Swarm, digit_png: bytes, timer: Timer
) -> None:
    """MODEL_VERSION=999 does not exist: the new task's /readyz answers 503 forever, so it never
    gets healthy; the update must fail and roll back, and the broken task never gets traffic."""
    before = set(swarm.containers())
    broken_seen: set[str] = set()
    in_dns: set[str] = set()
    with under_load(swarm, digit_png) as clients:
        clients.wait_for(20)
        with timer.step("update to MODEL_VERSION=999 -> rolled back by itself"):
            docker("service", "update", "--detach", "--env-add", "MODEL_VERSION=999", *FAST_UPDATE, swarm.api)
            deadline = time.monotonic() + 180
            state = ""
            while time.monotonic() < deadline:
                state = swarm.update_state()
                if state in {"rollback_completed", "rollback_paused", "paused", "completed"}:
                    break
                for cid in set(swarm.containers()) - before:
                    if (address := swarm.address(cid)) is not None:
                        broken_seen.add(address)
                in_dns |= swarm.dns_answer() & broken_seen
                time.sleep(0.3)
        assert state == "rollback_completed", f"update ended {state!r}\n{swarm.logs()}"
        swarm.wait_converged()
        n = len(clients.outcomes)
        clients.wait_for(n + 20)
    env = json.loads(docker("service", "inspect", swarm.api).stdout)[0]["Spec"]["TaskTemplate"][
        "ContainerSpec"
    ]["Env"]
    assert "MODEL_VERSION=999" not in env, env
    # start-first: the old tasks served throughout. The rollback itself may start a fresh task of
    # the old spec in the broken task's slot and retire either of that slot's old-spec tasks
    # (Swarm picks one), so what must hold is: as many tasks as before, none of the broken spec,
    # and every old task that is gone replaced by an old-spec one (no request failed, below).
    now = set(swarm.containers())
    assert len(now) == len(before), (before, now)
    for info in swarm.inspect(*(now - before)) if now - before else []:
        assert "MODEL_VERSION=999" not in info["Config"]["Env"], info["Config"]["Env"]
    assert len(now & before) >= len(before) - 1, "the rollback replaced more than the broken slot"
    assert set(swarm.replica_versions().values()) == {SHIPPED_VERSION}
    assert broken_seen, "the broken task was never seen running"
    assert not in_dns, f"the never-healthy task was in the api DNS answer: {in_dns}"
    failures = report(timer, "broken update, rolled back", clients)
    assert not failures, f"{len(failures)} failed requests: {failures[:5]}"


# --- 6. new model version ----------------------------------------------------------------------


def test_a_new_version_in_the_models_volume_reaches_every_task(
    swarm: Swarm, digit_png: bytes, timer: Timer
) -> None:
    """A copy of the served version published as the next one, as the trainer does it (a complete
    folder renamed into place): every task must serve it within the poll interval."""
    root = swarm.models / "mnist"
    old = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
    new = old + 1
    with under_load(swarm, digit_png) as clients:
        clients.wait_for(20)
        tmp = root / f".tmp-e2e-{new}"
        shutil.copytree(root / str(old), tmp)
        tmp.rename(root / str(new))
        published = time.time()  # wall clock, as the clients' outcomes
        # Every worker of every task rescans within the poll interval; `replica_versions` asks one
        # worker per task, so answers are judged after the deadline, when all of them must be new.
        deadline = published + POLL_SECONDS + SWITCH_MARGIN
        versions = swarm.replica_versions()
        while set(versions.values()) != {new} and time.time() < deadline + 10:
            time.sleep(0.2)
            versions = swarm.replica_versions()
        switched = time.time() - published
        time.sleep(max(0.0, deadline - time.time()) + 1)
        n = len(clients.outcomes)
        clients.wait_for(n + 20)
    assert set(versions.values()) == {new} and len(versions) == API_REPLICAS, versions
    answered = {o.version for o in clients.outcomes if o.status == 200 and o.started > deadline}
    assert answered == {new}, f"nginx still answers from {answered} after the poll interval"
    failures = report(timer, f"new version {old} -> {new} on every task within {switched:.1f} s", clients)
    assert not failures, f"{len(failures)} failed requests: {failures[:5]}"
    assert switched <= POLL_SECONDS + SWITCH_MARGIN, f"{switched:.1f} s to reach every task"
