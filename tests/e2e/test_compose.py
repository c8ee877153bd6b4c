"""The containerized service end to end, through the front door, in the order a user meets it.

1. the shipped model answers real MNIST PNGs exactly as offline evaluation does;
2. the containers keep their promises (non-root, read-only, no torch, an init; only nginx published);
3. hostile inputs get 4xx JSON, the oversized body nginx's own 413, and every container stays healthy;
4. the trainer container's 1-epoch version is held by the promotion gate, then promoted by
   hand (python -m core.release promote) and taken up live by every replica.

The tests share one stack (tests/e2e/conftest.py) and run in file order:
step 4 needs the model of step 1 to have been the shipped one. What the front
door adds (slow clients, overload, crashes, rollouts) is in test_front_door.py.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image

from tests.e2e.conftest import Stack, Timer, mnist_test_sample
from tests.helpers import SHIPPED_MODEL, SHIPPED_VERSION
from tests.load import Load, rest

N_IMAGES = 1000  # enough for the accuracy check to mean something (> 98 %)
MAX_CONTENT_LENGTH = 4 * 1024 * 1024  # the service's default (service/app.py) = nginx's client_max_body_size
SWITCH_MARGIN = 2.0  # seconds beyond the poll interval for a worker to validate and swap

pytestmark = pytest.mark.timeout(1800)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def post_png(url: str, body: bytes, timeout: float = 30) -> requests.Response:
    return requests.post(f"{url}/predict", data=body, headers={"Content-Type": "image/png"}, timeout=timeout)


@pytest.fixture(scope="module")
def test_set(stack: Stack) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random sample of the MNIST test split, from the clone's ./data."""
    return mnist_test_sample(stack.repo, N_IMAGES)


def offline(stack: Stack, version: int, images: np.ndarray) -> np.ndarray:
    """(m, 10) probabilities from core.modelstore.load + core.network on the host, in the clone."""
    path = stack.repo / "offline-images.npy"
    np.save(path, images)
    code = (
        "import sys, json, numpy as np\n"
        "from core import modelstore\n"
        "from core.network import probabilities\n"
        "from core.preprocess import to_vectors\n"
        "m = modelstore.load('models', 'mnist', int(sys.argv[2]))\n"
        "print(json.dumps(probabilities(m.net, to_vectors(np.load(sys.argv[1]))).tolist()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(version)],
        cwd=stack.repo,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return np.array(json.loads(out.stdout))


def started(stack: Stack) -> list[tuple[str, str, int]]:
    """(container id, StartedAt, RestartCount) of every api replica: all stay put when nothing
    restarted."""
    infos = [stack.inspect(cid) for cid in sorted(stack.containers("api"))]
    return [(i["Id"], i["State"]["StartedAt"], i["RestartCount"]) for i in infos]


def served_version(stack: Stack) -> int | None:
    current = requests.get(f"{stack.url}/readyz", timeout=10).json().get("model") or {}
    return current.get("version")


def test_predictions_match_offline_evaluation(stack: Stack, test_set, timer: Timer) -> None:
    images, labels = test_set
    bodies = [png(im) for im in images]
    answers = []
    with timer.step(f"POST {N_IMAGES} MNIST PNGs to /predict"), requests.Session() as http:
        for body in bodies:
            r = http.post(
                f"{stack.url}/predict", data=body, headers={"Content-Type": "image/png"}, timeout=30
            )
            assert r.status_code == 200, r.text
            answers.append(r.json())
    versions = {a["model"]["version"] for a in answers}
    assert versions == {SHIPPED_VERSION}, f"a fresh clone must serve {SHIPPED_MODEL}, got {versions}"

    served = np.array([a["probabilities"] for a in answers])
    digits = np.array([a["digit"] for a in answers])
    with timer.step("offline evaluation on the host"):
        expected = offline(stack, SHIPPED_VERSION, images)
    np.testing.assert_array_equal(digits, expected.argmax(axis=1))
    np.testing.assert_allclose(served, expected, atol=1e-5)
    accuracy = float(np.mean(digits == labels))
    page = requests.get(f"{stack.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    timer.note(
        f"accuracy of version {SHIPPED_VERSION} through the container on {N_IMAGES} test images: "
        f"{accuracy:.4f}"
    )
    assert accuracy > 0.98


def test_api_container_is_non_root_read_only_torch_free_and_under_an_init(stack: Stack) -> None:
    """What service/Dockerfile and docker-compose.yml promise, checked inside the running container."""
    code = r"""
import importlib.util, json, os
procs = {}
for p in filter(str.isdigit, os.listdir('/proc')):
    try:
        argv = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\0')
        ppid = int(open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError):
        continue
    procs[int(p)] = (ppid, [a.decode(errors='replace') for a in argv if a])
try:
    open('/app/probe', 'w')
    rootfs = 'writable'
except OSError as e:
    rootfs = e.strerror
print(json.dumps({'uid': os.getuid(), 'torch': importlib.util.find_spec('torch') is not None,
                  'rootfs': rootfs, 'heartbeat_dir_writable': os.access('/run/gunicorn', os.W_OK),
                  'procs': procs}))
"""
    facts = json.loads(stack.compose("exec", "-T", "api", "python", "-c", code).stdout)
    assert facts["uid"] != 0
    assert facts["torch"] is False, "the inference image must not carry torch"
    assert facts["rootfs"] == "Read-only file system"
    assert facts["heartbeat_dir_writable"]
    procs = {int(pid): (ppid, argv) for pid, (ppid, argv) in facts["procs"].items()}
    assert procs[1][1][0].endswith("docker-init"), procs[1]
    gunicorn = {pid for pid, (_, argv) in procs.items() if "service.wsgi:app" in argv and pid != 1}
    masters = [pid for pid in gunicorn if procs[pid][0] == 1]
    assert len(masters) == 1, f"gunicorn master should be PID 1's child: {procs}"
    workers = [pid for pid in gunicorn if procs[pid][0] == masters[0]]
    assert workers, f"no gunicorn workers under the master: {procs}"


def test_only_nginx_is_published_and_it_runs_non_root_read_only(stack: Stack) -> None:
    for cid in stack.containers("api"):
        ports = stack.inspect(cid)["NetworkSettings"]["Ports"] or {}
        assert not any(ports.values()), f"an api replica publishes a port: {ports}"
    (nginx,) = stack.containers("nginx")
    ports = stack.inspect(nginx)["NetworkSettings"]["Ports"]
    assert [b["HostPort"] for b in ports["8080/tcp"] or []][:1] == [str(stack.port)], ports
    probe = stack.compose("exec", "-T", "nginx", "sh", "-c", "id -u; touch /etc/nginx/probe 2>&1 || true")
    uid, touch = probe.stdout.split("\n", 1)
    assert uid.strip() != "0"
    assert "Read-only file system" in touch, touch


def test_one_request_id_and_the_client_address_follow_a_request_through_both_logs(stack: Stack) -> None:
    """nginx writes one line per request; the api (ACCESS_LOG=errors) adds its own for failures."""
    ok, failed = (f"e2e-trace-{kind}-{time.time_ns()}" for kind in ("ok", "failed"))
    r = requests.get(f"{stack.url}/readyz", headers={"X-Request-ID": ok}, timeout=10)
    assert r.status_code == 200 and r.headers["X-Request-ID"] == ok
    r = requests.post(
        f"{stack.url}/predict",
        data=b"not an image",
        headers={"Content-Type": "image/png", "X-Request-ID": failed},
        timeout=10,
    )
    assert 400 <= r.status_code < 500 and r.headers["X-Request-ID"] == failed, r.text
    fresh = requests.get(f"{stack.url}/healthz", timeout=10).headers["X-Request-ID"]
    assert len(fresh) == 32, "nginx makes an id when the client sends none"
    time.sleep(1.5)  # nginx flushes its buffered access log every second
    lines: dict[str, dict[str, dict]] = {ok: {}, failed: {}}
    for line in stack.logs(tail=500).splitlines():
        service, _, text = line.partition("|")
        for rid, found in lines.items():
            if rid in text and text.strip().startswith("{"):
                found[service.split("-")[0].strip()] = json.loads(text)
    assert set(lines[ok]) == {"nginx"}, lines[ok]
    assert set(lines[failed]) == {"nginx", "api"}, lines[failed]
    assert lines[failed]["api"]["status"] == lines[failed]["nginx"]["status"] == r.status_code
    # The api saw nginx's X-Forwarded-For (TRUSTED_PROXIES=1): the client's address, not nginx's.
    assert lines[failed]["api"]["remote"] == lines[failed]["nginx"]["remote"], lines[failed]


def test_hostile_inputs_get_4xx_and_every_container_stays_healthy(stack: Stack, test_set) -> None:
    before = started(stack)
    oversized = b"\x89PNG\r\n\x1a\n" + os.urandom(MAX_CONTENT_LENGTH)
    rid = f"e2e-oversized-{time.time_ns()}"
    r = requests.post(
        f"{stack.url}/predict",
        data=oversized,
        headers={"Content-Type": "image/png", "X-Request-ID": rid},
        timeout=30,
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    assert r.headers["X-Request-ID"] == rid
    r = requests.post(f"{stack.url}/v2/models/mnist/infer", data=oversized, timeout=30)
    assert r.status_code == 413 and isinstance(r.json()["error"], str), r.text

    good = png(test_set[0][0])
    garbage = {
        "random bytes": os.urandom(3000),
        "truncated png": good[: len(good) // 2],
        "text": b"definitely not an image",
    }
    for what, body in garbage.items():
        r = post_png(stack.url, body)
        assert r.status_code == 400, f"{what}: {r.status_code} {r.text}"
        assert r.json()["error"]["message"], what
    r = requests.post(
        f"{stack.url}/predict",
        data=b'{"image": [[1, 2], ',
        timeout=10,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    r = requests.post(f"{stack.url}/predict", data=b"x", headers={"Content-Type": "text/csv"}, timeout=10)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    r = requests.get(f"{stack.url}/no/such/route", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text

    assert post_png(stack.url, good).status_code == 200
    assert requests.get(f"{stack.url}/readyz", timeout=10).status_code == 200
    # Docker's own healthchecks still pass, and nothing restarted a container.
    time.sleep(4)  # > the compose healthcheck interval: a fresh probe ran after the abuse
    assert {stack.health(cid) for cid in stack.containers()} == {"healthy"}
    assert started(stack) == before
    # The 413 was nginx's own: no replica saw that request, nginx logged it without an upstream.
    logs = stack.logs(tail=2000)
    lines = [line for line in logs.splitlines() if rid in line]
    assert lines and all(line.startswith("nginx") for line in lines), lines
    assert '"status":413' in lines[0] and '"upstream":""' in lines[0], lines[0]


def _raw_request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `head` as is (no client library would send it) and read the whole answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    ("what", "head", "status"),
    [
        ("a 5 KB request line", b"GET /healthz?" + b"a" * 5000 + b" HTTP/1.1\r\n", 414),
        ("a 5 KB header", b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 5000 + b"\r\n", 431),
        ("24 KB of headers", b"GET /healthz HTTP/1.1\r\n" + b"X-A: 12345\r\n" * 2000, 431),
        # Over gunicorn's default of 100 headers, within nginx's limits: served, not gunicorn's 400.
        ("500 small headers", b"GET /healthz HTTP/1.1\r\n" + b"X-A: 1\r\n" * 500, 200),
        ("a 4000-byte request line", b"GET /healthz?" + b"a" * 3960 + b" HTTP/1.1\r\n", 200),
    ],
)
def test_request_line_and_header_limits_answer_json_at_the_door(stack: Stack, what, head, status) -> None:
    """nginx's limits sit below gunicorn's (gunicorn.conf.py), so whatever passes nginx passes
    gunicorn, and every refusal is nginx's JSON, never gunicorn's plain-text 400."""
    code, headers, body = _raw_request(stack.port, head + b"Host: e2e\r\nConnection: close\r\n\r\n")
    assert code == status, f"{what}: {code} {body[:200]!r}"
    assert headers.get("content-type", "").startswith("application/json"), f"{what}: {headers}"
    doc = json.loads(body)
    assert ("error" in doc) if status >= 400 else (doc["status"] == "ok"), f"{what}: {doc}"


def test_deeply_nested_json_gets_the_v2_400_through_nginx(stack: Stack) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    for url in (f"{stack.url}/v2/models/mnist/infer", f"{stack.url}/v2/repository/index"):
        r = requests.post(url, data=nested, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400, (url, r.status_code, r.text[:200])
        assert isinstance(r.json()["error"], str), r.text[:200]
    r = requests.post(
        f"{stack.url}/predict", data=nested, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["code"], r.text[:200]


def test_the_api_image_carries_no_pip_and_its_containers_no_capabilities(stack: Stack) -> None:
    # The venv's python and the base image's own (the official image's or a Debian one).
    probe = (
        "for p in /opt/venv/bin/python /usr/local/bin/python3 /usr/bin/python3; do"
        ' [ -x $p ] && { $p -c "import pip" 2>/dev/null && echo "$p has pip" || echo "$p: none"; }; done'
    )
    for cid in stack.containers("api"):
        out = subprocess.run(
            ["docker", "exec", cid, "sh", "-c", probe], capture_output=True, text=True, timeout=60
        )
        lines = out.stdout.split("\n")
        assert "/opt/venv/bin/python: none" in lines and "has pip" not in out.stdout, out
    for cid in stack.containers():
        config = stack.inspect(cid)["HostConfig"]
        assert config["CapDrop"] == ["ALL"] and not config["CapAdd"], (config["CapDrop"], config["CapAdd"])
        assert "no-new-privileges:true" in (config["SecurityOpt"] or []), config["SecurityOpt"]
        assert config["PidsLimit"] and config["Memory"], (config["PidsLimit"], config["Memory"])


def test_trainer_container_publishes_a_version_held_then_promoted(
    stack: Stack, test_set, timer: Timer
) -> None:
    old = served_version(stack)
    assert old is not None
    before = started(stack)
    with timer.step("build the trainer image"):
        stack.compose("--profile", "train", "build", "trainer", timeout=1800)

    with Load(rest(stack.url, png(test_set[0][0])), n=1, pause=0.1) as client:
        client.wait_for(5)
        with timer.step("trainer container: train --epochs 1 on the full data"):
            run = stack.compose(
                "--profile", "train", "run", "--rm", "-T", "-e", "TQDM_DISABLE=1", "trainer",
                "train", "--preset", "best", "--epochs", "1",
                timeout=1200,
            )  # fmt: skip
        new = old + 1
        version_dir = stack.repo / "models" / "mnist" / str(new)
        assert version_dir.is_dir(), f"the trainer did not publish version {new}\n{run.stdout[-3000:]}"
        # Publishing renames the finished folder into models/mnist/: that is the parent's mtime.
        published = version_dir.parent.stat().st_mtime
        # One epoch is below the shipped model's accuracy: the gate (PROMOTION=gate) holds it.
        with timer.step("wait past the poll interval: the 1-epoch version must be held"):
            time.sleep(max(0.0, published + stack.poll_seconds + SWITCH_MARGIN - time.time()) + 2)
        status = requests.get(f"{stack.url}/models", timeout=10).json()
        held = {v["version"]: v for v in status["versions"]}[new]
        assert status["serving"] == old and held["state"] == "held", status
        assert "test accuracy" in held["reason"], held
        assert set(stack.replica_versions().values()) == {old}, "a replica took the held version"
        r = requests.post(
            f"{stack.url}/predict?version={new}", data=png(test_set[0][0]),
            headers={"Content-Type": "image/png"}, timeout=30,
        )  # fmt: skip
        assert r.status_code == 200 and r.json()["model"]["version"] == new  # held, yet reachable
        early_new = [o for o in client.outcomes if o.version == new]
        assert not early_new, f"unpinned answers from the held version {new}: {early_new[:5]}"

        # Promoted by hand on the host: the CLI writes ./models/mnist/labels.json, every replica follows.
        with timer.step("promote the held version (python -m core.release promote)"):
            promote = subprocess.run(
                [sys.executable, "-m", "core.release", "promote", str(new)],
                cwd=stack.repo, env={**stack.env, "MODELS_DIR": "models", "MODEL_NAME": "mnist"},
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
        assert promote.returncode == 0, promote.stderr
        assert f"stable: {old} -> {new}" in promote.stdout, promote.stdout
        promoted = (stack.repo / "models" / "mnist" / "labels.json").stat().st_mtime
        deadline = promoted + stack.poll_seconds + SWITCH_MARGIN
        with timer.step("wait for /readyz to report the promoted version"):
            while served_version(stack) != new and time.time() < deadline + 10:
                time.sleep(0.2)
        time.sleep(max(0.0, deadline - time.time()) + 2)  # answers after the deadline must all be new

    status = requests.get(f"{stack.url}/models", timeout=10).json()
    assert status["serving"] == new and status["labels"]["stable"] == new, status
    assert set(stack.replica_versions().values()) == {new}, "a replica did not switch"
    failures = [o for o in client.outcomes if o.status != 200]
    assert not failures, f"{len(failures)} failed requests during the switch: {failures[:5]}"
    late_old = [o for o in client.outcomes if o.started > deadline and o.version != new]
    assert not late_old, f"answers from version {old} after the poll interval: {late_old[:5]}"
    first_new = min(o.started for o in client.outcomes if o.version == new)
    assert first_new > promoted - 1, "the held version answered unpinned requests before its promotion"
    assert started(stack) == before, "an api container restarted"
    timer.note(
        f"{len(client.outcomes)} requests while training, holding and promoting, 0 failed; first answer "
        f"from version {new} {first_new - promoted:.1f} s after it was promoted (poll interval "
        f"{stack.poll_seconds} s), same container"
    )

    # The files belong to the host user and the api's non-root user can read them.
    assert version_dir.stat().st_uid == os.getuid()
    for f in [version_dir, *version_dir.iterdir()]:
        assert f.stat().st_mode & 0o004, f"{f} is not world-readable"
    r = post_png(stack.url, png(test_set[0][0]))
    assert r.status_code == 200 and r.json()["model"]["version"] == new

    # Roll back: the shipped version serves again on every replica (and the front-door tests,
    # which publish a copy of the served version, start from the shipped model's accuracy).
    back = subprocess.run(
        [sys.executable, "-m", "core.release", "rollback"],
        cwd=stack.repo, env={**stack.env, "MODELS_DIR": "models", "MODEL_NAME": "mnist"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert back.returncode == 0 and f"stable: {new} -> {old}" in back.stdout, back.stdout + back.stderr
    # Every worker rescans within the poll interval; asking a replica reaches one of its workers,
    # so the verdict waits for the interval rather than for the first replies.
    time.sleep(stack.poll_seconds + SWITCH_MARGIN)
    assert set(stack.replica_versions().values()) == {old}, "a replica did not roll back"
