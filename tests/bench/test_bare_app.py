"""The bare replicas (bench/bare_replicas.yml) answer as the project's do, on the same model.

Their figure through the front door stands for "the project's replicas without
their features" only if the two serve the same weights and the same digit, and
if the compose override still points at files that exist.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench import feature_cost
from tests.helpers import make_client, png_bytes

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT.parent / "shared" / "peers"
OVERRIDE = ROOT / "bench" / "bare_replicas.yml"

pytestmark = pytest.mark.skipif(not (PEERS / "flask_app.py").exists(), reason="needs ../shared/peers")


@pytest.fixture(scope="module")
def bare():
    """bench/bare_app.py imported as the container does: a top-level module beside flask_app.
    (Not as `bench.bare_app`: the peers' folder has a bench.py, which would shadow the package.)"""
    sys.path.append(str(PEERS))
    try:
        spec = importlib.util.spec_from_file_location("bare_app", ROOT / "bench" / "bare_app.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module.app.test_client()
    finally:
        sys.path.remove(str(PEERS))


def test_readyz_answers_as_the_healthcheck_and_the_harness_expect(bare):
    r = bare.get("/readyz")
    assert r.status_code == 200
    assert r.get_json() == {"status": "ready"}


def test_the_same_digit_as_the_project_on_the_same_model(bare, tmp_path: Path):
    feature_cost.publish_peers_model(PEERS, tmp_path)
    project = make_client(tmp_path)
    rng = np.random.default_rng(0)
    # The peers' PNG, and dark 28x28 images (the project inverts light ones; the bare app does not).
    bodies = [(PEERS / "digit.png").read_bytes()]
    bodies += [png_bytes((rng.random((28, 28)) ** 4 * 255).astype(np.uint8)) for _ in range(8)]
    for body in bodies:
        ours = project.post("/predict", data=body, content_type="image/png")
        theirs = bare.post("/predict", data=body, content_type="image/png")
        assert ours.status_code == theirs.status_code == 200
        assert theirs.get_json() == {"digit": ours.get_json()["digit"]}


def test_the_override_serves_the_bare_app_from_files_that_exist():
    api = yaml.safe_load(OVERRIDE.read_text())["services"]["api"]
    assert api["command"][-1] == "bare_app:app"
    mounts = dict(v.removesuffix(":ro").split(":") for v in api["volumes"])
    assert mounts == {"./bench/bare_app.py": "/bench/bare_app.py", "../shared/peers": "/peers"}
    for host in mounts:
        assert (ROOT / host).exists(), host  # compose resolves them from the project's root
    # The two mounted folders, so that bare_app imports the peers' flask_app.
    assert api["environment"]["PYTHONPATH"] == "/bench:/peers"
    assert api["environment"]["MODEL_NPZ"] == "/peers/ref_model.npz"
