"""bench.feature_cost's variants leave out the part they name, and all answer the same digit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import feature_cost
from service import api

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT.parent / "shared" / "peers"

pytestmark = pytest.mark.skipif(not (PEERS / "flask_app.py").exists(), reason="needs ../shared/peers")


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> dict:
    models = tmp_path_factory.mktemp("models")
    feature_cost.publish_peers_model(PEERS, models)
    return feature_cost.variants(models, PEERS)


def answer(app, png: bytes) -> tuple[dict, dict]:
    seen: dict = {}

    def start_response(status: str, headers: list, exc_info: object = None) -> None:
        seen.update(status=status, headers=dict(headers))

    body = b"".join(app(feature_cost.environ(png), start_response))
    assert seen["status"].startswith("200")
    return json.loads(body), seen["headers"]


def test_each_variant_leaves_out_its_part(apps, monkeypatch: pytest.MonkeyPatch):
    png = (PEERS / "digit.png").read_bytes()
    decoded: list[int] = []
    real = api._read_images
    monkeypatch.setattr(api, "_read_images", lambda *a, **k: decoded.append(1) or real(*a, **k))
    full, headers = answer(apps["service"], png)
    assert set(full) == {"digit", "confidence", "probabilities", "model"} and "X-Request-ID" in headers
    assert decoded == [1]

    for name in ("decode", "forward", "answer", "hooks", "all", "bare app"):
        body, headers = answer(apps[name], png)
        assert body["digit"] == full["digit"], name
        if name in ("answer", "all", "bare app"):
            assert body == {"digit": full["digit"]}, name
        else:
            assert body["probabilities"] == pytest.approx(full["probabilities"], abs=1e-6), name
        assert ("X-Request-ID" in headers) == (name in ("decode", "forward", "answer")), name
    assert decoded == [1, 1, 1, 1]  # service, then forward, answer and hooks: the others skip it
