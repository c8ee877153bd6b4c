"""Every place that names a setting agrees with core/settings.py, the one declaration.

The settings are written down in several files besides the class: the
documentation (docs/settings.md, the README's short table), `.env.example`,
docker-compose.yml, the Swarm stack and the Kubernetes manifests. These tests
hold each to the class, so none drifts alone:

- names: every variable any of them sets is a setting, or a deploy variable
  documented in docs/settings.md (the host side: HOST_PORT, ...);
- defaults: a default written in a file is the class's, or a deliberate one
  listed here with its reason;
- passing: the settings marked ✓ (`deploy=True`) reach the containers in
  compose, Swarm and Kubernetes alike, and only names listed here with a
  reason are set by one target and not another;
- docs: docs/settings.md's table is the one the class generates.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import Settings, default_text, markdown_table, render_doc
from tests.deploy.test_k8s import BASE, KSERVE, _build, _container, _one

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {f.name.upper(): f for f in dataclasses.fields(Settings)}
DEFAULTS = {name: default_text(f) for name, f in FIELDS.items()}
# The settings the trainer reads (trainer/cli.py, trainer/data.py, trainer/__main__.py).
TRAINER_READS = {"MODELS_DIR", "MODEL_NAME", "DATA_DIR", "MNIST_DOWNLOAD", "TRAINER_THREADS", "TQDM_DISABLE"}
# Marked ✓: passed from .env into the api containers, or into the trainer's.
API_PASSED = {n for n, f in FIELDS.items() if f.metadata["deploy"] and f.metadata["group"] != "Trainer"}
TRAINER_PASSED = {n for n, f in FIELDS.items() if f.metadata["deploy"]} & TRAINER_READS

# Values every api target sets itself, whatever .env says (docs/settings.md, "What the
# deployments set themselves").
FIXED = {
    "MODELS_DIR": "/models",  # the container's mount of the model repository
    "TRUSTED_PROXIES": "1",  # one proxy in front: nginx, or ingress-nginx
    "GUNICORN_TMP_DIR": "/run/gunicorn",  # tmpfs: the root filesystem is read-only
    "PROMETHEUS_MULTIPROC_DIR": "/tmp/prometheus",  # tmpfs too
}
# Compose's and Swarm's defaults that differ from the class's, on purpose.
BEHIND_NGINX = {
    # one worker a replica, which nginx balances (docs/deploy.md); one thread should it be gthread
    "WEB_CONCURRENCY": "1",
    "GUNICORN_THREADS": "1",
    # nginx writes one access line per request already
    "ACCESS_LOG": "errors",
}
# Names compose's api sets that another target deliberately does not, each with its reason.
NOT_PASSED = {
    "swarm": {"FEEDBACK_DIR": "the stack has no writable folder for corrections shared by the nodes"},
    "k8s": {"FEEDBACK_DIR": "the base manifests have no writable claim for corrections"},
}
# Names only the Kubernetes Deployment sets, each with its reason.
K8S_ONLY = {
    "PORT": "spelled out beside the containerPort its probes and Service use",
    "GUNICORN_GRACEFUL_TIMEOUT": "spelled out beside terminationGracePeriodSeconds, which must cover it",
}
# Variables of the InferenceService that KServe reads, not the code.
KSERVE_OWN = {"PROTOCOL", "STORAGE_URI"}

INTERPOLATION = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _yaml(path: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / path).read_text())


def _service_env(doc: dict[str, Any], service: str) -> dict[str, str]:
    env = doc["services"][service].get("environment") or {}
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _interpolated(value: str) -> tuple[str, str] | None:
    """(variable, default) when the whole value is `${VAR:-default}`, else None (a fixed value)."""
    match = INTERPOLATION.fullmatch(value)
    return (match.group(1), match.group(2) or "") if match else None


def _table(text: str, begin: str, end: str) -> dict[str, str]:
    """First cell -> second cell of a markdown table between two markers, names split at commas."""
    part = text.split(begin, 1)[1].split(end, 1)[0]
    rows = {}
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]) if line.startswith("|") else []
        defaults = [d.strip() for d in cells[1].split(",")] if len(cells) > 1 else []
        for i, name in enumerate(names):
            rows[name] = defaults[i] if len(defaults) == len(names) else cells[1]
    return rows


SETTINGS_DOC = (ROOT / "docs" / "settings.md").read_text()
DEPLOY_VARIABLES = _table(SETTINGS_DOC, "<!-- deploy variables -->", "<!-- end of deploy variables -->")
COMPOSE = _yaml("docker-compose.yml")
SWARM = _yaml("deploy/swarm/stack.yml")


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, str]]:
    base, kserve = _build(BASE), _build(KSERVE)
    return {
        "api": _k8s_env(_container(_one(base, "Deployment", "mnist-api")["spec"]["template"]["spec"], "api")),
        "trainer": _k8s_env(
            _container(_one(base, "Job", "mnist-trainer")["spec"]["template"]["spec"], "trainer")
        ),
        "kserve": _k8s_env(
            _container(_one(kserve, "InferenceService", "mnist")["spec"]["predictor"], "kserve-container")
        ),
    }


def _env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


# --- names --------------------------------------------------------------------------------------


def test_deploy_variables_are_not_settings_and_are_all_used() -> None:
    """The host side has names of its own: PORT, GRPC_PORT, MODELS_DIR and DATA_DIR mean the
    process's port or folder everywhere, never the host's."""
    assert set(DEPLOY_VARIABLES) & set(FIELDS) == set()
    used = {
        m.group(1)
        for path in ("docker-compose.yml", "deploy/swarm/stack.yml")
        for m in INTERPOLATION.finditer((ROOT / path).read_text())
    }
    assert used - set(FIELDS) - set(DEPLOY_VARIABLES) == set(), "undocumented in docs/settings.md"
    assert set(DEPLOY_VARIABLES) - used == set(), "documented but used by neither file"


def test_every_name_set_is_a_setting(k8s: dict[str, dict[str, str]]) -> None:
    """A misspelt variable (MODEL_DIR) would be silently ignored by the code."""
    for where, env in {
        "compose api": _service_env(COMPOSE, "api"),
        "compose trainer": _service_env(COMPOSE, "trainer"),
        "swarm api": _service_env(SWARM, "api"),
        "swarm trainer": _service_env(SWARM, "trainer"),
        "k8s api": k8s["api"],
        "k8s trainer": k8s["trainer"],
        "kserve": {k: v for k, v in k8s["kserve"].items() if k not in KSERVE_OWN},
    }.items():
        assert set(env) - set(FIELDS) == set(), where
    assert set(_env_example()) - set(FIELDS) - set(DEPLOY_VARIABLES) == set(), ".env.example"


# --- passing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("service, passed", [("api", API_PASSED), ("trainer", TRAINER_PASSED)])
def test_compose_and_swarm_pass_the_marked_settings_from_env(service: str, passed: set[str]) -> None:
    """Each ✓ setting is `NAME: ${NAME:-...}` in both files, and every setting either file takes
    from .env is marked ✓, so the docs' column says what the files do."""
    for name, doc in (("compose", COMPOSE), ("swarm", SWARM)):
        env = _service_env(doc, service)
        from_env = {k for k, v in env.items() if (i := _interpolated(v)) and i[0] == k}
        assert from_env == passed, f"{name} {service}: from .env {sorted(from_env)}, ✓ {sorted(passed)}"
        assert all(_interpolated(v) is None or _interpolated(v)[0] == k for k, v in env.items()), name


def test_compose_swarm_and_k8s_set_the_same_api_settings(k8s: dict[str, dict[str, str]]) -> None:
    compose = _service_env(COMPOSE, "api")
    swarm = _service_env(SWARM, "api")
    assert set(swarm) == set(compose) - set(NOT_PASSED["swarm"])
    assert set(k8s["api"]) == set(compose) - set(NOT_PASSED["k8s"]) | set(K8S_ONLY)
    for name, value in FIXED.items():
        assert compose[name] == swarm[name] == k8s["api"][name] == value, name


def test_trainers_get_the_marked_settings(k8s: dict[str, dict[str, str]]) -> None:
    assert set(k8s["trainer"]) >= TRAINER_PASSED
    assert {"MODEL_NAME", "MNIST_DOWNLOAD"} == TRAINER_PASSED  # what docs/settings.md promises


def test_env_example_lists_every_marked_setting() -> None:
    settings = set(_env_example()) & set(FIELDS)
    assert settings == API_PASSED | TRAINER_PASSED


# --- defaults -----------------------------------------------------------------------------------


def _compose_default(name: str) -> str:
    """The value compose gives `name` when .env and the shell say nothing."""
    for service in ("api", "trainer"):
        value = _service_env(COMPOSE, service).get(name)
        if value is not None:
            found = _interpolated(value)
            return (found[1] if found else value) or DEFAULTS[name]
    raise AssertionError(f"compose does not set {name}")


def test_compose_and_swarm_defaults_are_the_class_s() -> None:
    for doc in (COMPOSE, SWARM):
        for service in ("api", "trainer"):
            for name, value in _service_env(doc, service).items():
                found = _interpolated(value)
                if found and found[1]:
                    assert found[1] in (DEFAULTS[name], BEHIND_NGINX.get(name)), (service, name, value)
    assert _service_env(COMPOSE, "api") | _service_env(COMPOSE, "trainer") == (
        _service_env(SWARM, "api") | _service_env(SWARM, "trainer") | {"FEEDBACK_DIR": "/feedback"}
    ), "compose and swarm pass the same values"


def test_env_example_shows_compose_s_defaults() -> None:
    for name, value in _env_example().items():
        if name in FIELDS:
            assert value in ("", _compose_default(name)), name
        else:
            assert value == DEPLOY_VARIABLES[name].strip("`"), name


def test_k8s_values_are_the_class_s(k8s: dict[str, dict[str, str]]) -> None:
    """The Deployment spells the settings out: each is the class's default ("" = the default),
    or one of the values every target sets itself."""
    for name, value in k8s["api"].items():
        assert value in ("", DEFAULTS[name], FIXED.get(name)), (name, value)
    for name, value in k8s["kserve"].items():
        if name not in KSERVE_OWN | {"MODELS_DIR"}:  # KServe mounts the claim at /mnt/models
            assert value == k8s["api"][name], name


def test_fixed_values_are_what_docs_say() -> None:
    """docs/settings.md's table of what the deployments set themselves names the same values."""
    part = SETTINGS_DOC.split("## What the deployments set themselves", 1)[1].split("\n## ", 1)[0]
    for name, value in FIXED.items():
        row = next(ln for ln in part.splitlines() if ln.startswith(f"| `{name}`") or f"`{name}` |" in ln)
        assert f"`{value}`" in row, (name, row)


# --- docs ---------------------------------------------------------------------------------------


def test_settings_doc_table_is_generated_from_the_class() -> None:
    assert render_doc(SETTINGS_DOC) == SETTINGS_DOC, (
        "docs/settings.md differs from core/settings.py: run `make settings-doc`. Expected table:\n"
        + markdown_table()
    )


def test_readme_table_agrees_with_the_class_and_links_the_full_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/settings.md)" in readme
    rows = _table(readme, "## Configuration", "\n## ")
    assert rows, "no settings table in the README's Configuration section"
    for name, shown in rows.items():
        if name in FIELDS:
            expected = f"`{DEFAULTS[name]}`" if DEFAULTS[name] else None
            assert shown == expected if expected else not shown.startswith("`"), (name, shown)
        else:
            assert shown == DEPLOY_VARIABLES[name], (name, shown)


UNITS = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def test_other_docs_tables_state_the_class_s_defaults() -> None:
    """A topic's page may repeat a setting's default in its own table (docs/feedback.md,
    docs/api.md's limits): the value stated there is the class's."""
    checked = 0
    for path in sorted((ROOT / "docs").glob("*.md")):
        if path.name == "settings.md":
            continue
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            name = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", cells[0]) if line.startswith("|") else None
            if not name or name.group(1) not in FIELDS or len(cells) < 2:
                continue
            expected, stated = DEFAULTS[name.group(1)], cells[1]
            number = re.match(r"([\d,]+)\s*(KiB|MiB|GiB)?\b", stated)
            if number:
                value = int(number.group(1).replace(",", "")) * UNITS[number.group(2) or ""]
                assert str(value) == expected, f"{path.name}: {line}"
            else:
                assert stated == "unset" and expected == "", f"{path.name}: {line}"
            checked += 1
    assert checked >= 8  # docs/api.md's limits and docs/feedback.md's settings at least


def test_a_replica_holds_every_connection_nginx_keeps_to_it() -> None:
    """nginx holds at most `max_conns` requests in flight to a replica, plus `keepalive` idle
    connections per nginx worker; a gevent replica (compose's and Swarm's) holds at most
    GEVENT_CONNECTIONS. Were nginx's budget the larger, a full replica would stop accepting
    and nginx's connects would time out, instead of nginx shedding at once with its 503."""
    conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
    workers = int(re.search(r"^worker_processes (\d+);", conf, re.M).group(1))
    upstream = re.search(r"upstream api_http \{(.*?)\}", conf, re.S).group(1)
    in_flight = int(re.search(r"server api:8000 resolve max_conns=(\d+)", upstream).group(1))
    idle = int(re.search(r"^\s*keepalive (\d+);", upstream, re.M).group(1))
    gunicorn_conf = (ROOT / "gunicorn.conf.py").read_text()
    held = int(re.search(r"^GEVENT_CONNECTIONS = (\d+)$", gunicorn_conf, re.M).group(1))
    assert in_flight + idle * workers <= held, (in_flight, idle, workers, held)
