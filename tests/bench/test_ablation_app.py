"""The benchmark's ablation routes leave out exactly the part they name, and nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import ablation_app
from tests.helpers import png_bytes, publish, random_net

GARBAGE = b"not an image"


@pytest.fixture
def app(tmp_path: Path):
    publish(tmp_path / "models", random_net(3))
    return ablation_app.create_ablation_app({"MODELS_DIR": str(tmp_path / "models"), "MODEL_POLL_SECONDS": 0})


@pytest.fixture
def forward_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = ablation_app.classify

    def counted(model, images):
        calls.append(len(images))
        return real(model, images)

    monkeypatch.setattr(ablation_app, "classify", counted)
    return calls


def post(app, path: str, body: bytes):
    return app.test_client().post(path, data=body, content_type="image/png")


def test_no_decode_is_predict_on_a_fixed_digit_without_reading_the_body(app, forward_calls):
    digit = ablation_app._fixed_digit()[0]
    expected = post(app, "/predict", png_bytes(digit)).get_json()
    for _ in range(2):
        r = post(app, "/ablation/no-decode", GARBAGE)  # the body is never decoded
        assert r.status_code == 200
        assert r.get_json() == expected  # the same forward pass and JSON, bit for bit
    assert forward_calls == [1, 1]  # one forward pass per request


def test_no_forward_decodes_every_body_but_runs_the_forward_pass_once(app, forward_calls):
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 10:14] = 200
    for _ in range(3):
        r = post(app, "/ablation/no-forward", png_bytes(digit))
        assert r.status_code == 200
        body = r.get_json()
        assert set(body) == {"digit", "confidence", "probabilities", "model"}
        assert len(body["probabilities"]) == 10 and body["model"] == {"name": "mnist", "version": 1}
    assert forward_calls == [1]
    r = post(app, "/ablation/no-forward", GARBAGE)
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_image"


def test_noop_does_nothing_but_answer(app, forward_calls):
    r = post(app, "/ablation/noop", GARBAGE)
    assert r.status_code == 200 and r.get_json() == {"status": "ok"}
    assert forward_calls == []
