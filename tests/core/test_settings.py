"""core/settings.py: one declaration of every setting, read the same way by every reader."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from core import promotion, release
from core.settings import ACCESS_LOG_CHOICES, Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]


def test_the_defaults_pass_their_own_checks_and_an_empty_environment_means_them():
    assert Settings.from_env({}) == Settings()
    # compose passes `${MAX_BATCH:-}`: an empty value is the default, not an error
    assert Settings.from_env(dict.fromkeys(Settings.names(), "")) == Settings()


def test_values_are_typed():
    s = Settings.from_env(
        {"MAX_BATCH": "8", "MODEL_POLL_SECONDS": "0.5", "MODEL_NAMES": "a, b,", "MODEL_VERSION": "3"}
        | {"LOG_LEVEL": "WARNING", "MNIST_DOWNLOAD": "no", "GUNICORN_WORKER_CONNECTIONS": "7"}
    )
    assert (s.max_batch, s.model_poll_seconds, s.model_names, s.model_version) == (8, 0.5, ("a", "b"), 3)
    assert (s.log_level, s.mnist_download, s.gunicorn_worker_connections) == ("warning", False, 7)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("MIN_ACCURACY", "98", "MIN_ACCURACY='98': expected a positive fraction from 0 to 1"),
        ("PROMOTION_TOLERANCE", "-0.1", "PROMOTION_TOLERANCE='-0.1'"),
        ("PROMOTION", "newest", "PROMOTION must be one of gate, latest, manual"),
        ("MAX_BATCH", "many", "MAX_BATCH='many': expected an integer >= 1"),
        ("MAX_BATCH", "0", "MAX_BATCH='0'"),
        ("MODEL_POLL_SECONDS", "nan", "MODEL_POLL_SECONDS"),
        ("MODEL_VERSION", "../1", "MODEL_VERSION: invalid version"),
        ("MODEL_NAME", "../x", "MODEL_NAME: invalid model name"),
        ("MODEL_NAMES", "mnist,../x", "MODEL_NAMES: invalid model name"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT must be one of json, text"),
        ("ACCESS_LOG", "sometimes", "ACCESS_LOG must be one of"),
        ("GRPC_PORT", "-1", "GRPC_PORT='-1': expected an integer >= 0"),
        ("MNIST_DOWNLOAD", "maybe", "MNIST_DOWNLOAD"),
        ("TRAINER_THREADS", "0", "TRAINER_THREADS"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(name, value, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env({name: value})


def test_overrides_are_checked_like_the_environment():
    s = Settings.from_env({"MAX_BATCH": "8"}, {"MAX_BATCH": 3, "FEEDBACK_DIR": None})
    assert s.max_batch == 3 and s.feedback_dir is None
    with pytest.raises(SettingsError, match="MAX_BATCH"):
        Settings.from_env({}, {"MAX_BATCH": 0})
    with pytest.raises(SettingsError, match="MODEL_DIR: no such setting"):
        Settings.from_env({}, {"MODEL_DIR": "/x"})  # a typo is an error, not ignored
    with pytest.raises(SettingsError, match="MIN_ACCURACY"):
        dataclasses.replace(Settings(), min_accuracy=98)


def test_names_are_the_fields_upper_cased_and_unique():
    names = Settings.names()
    assert len(set(names)) == len(names)
    assert set(Settings().as_env()) == set(names)


def test_every_setting_has_a_doc_and_a_group():
    for f in dataclasses.fields(Settings):
        assert f.metadata["doc"].strip(), f.name
        assert "|" not in f.metadata["doc"], f"{f.name}: a | would break the docs' table"


def test_the_promotion_defaults_are_the_settings_own():
    """Once written four times, in four files; now only in core/settings.py."""
    defaults = Settings()
    params = inspect.signature(promotion.decide).parameters
    assert params["policy"].default == defaults.promotion
    assert params["min_accuracy"].default == defaults.min_accuracy
    assert params["tolerance"].default == defaults.promotion_tolerance
    from service.models import ModelManager

    params = inspect.signature(ModelManager).parameters
    assert (params["policy"].default, params["min_accuracy"].default, params["tolerance"].default) == (
        defaults.promotion,
        defaults.min_accuracy,
        defaults.promotion_tolerance,
    )
    assert set(promotion.POLICIES) == {"gate", "latest", "manual"}


def test_the_access_log_modes_are_the_settings_choices():
    from service.logs import ACCESS_LOG_MODES

    assert set(ACCESS_LOG_MODES) == set(ACCESS_LOG_CHOICES)


def test_the_release_cli_refuses_what_the_service_refuses(monkeypatch, capsys):
    """MIN_ACCURACY is a fraction everywhere: 98 stops `make promote` as it stops the service."""
    monkeypatch.setenv("MIN_ACCURACY", "98")
    assert release.main(["show"]) == 2
    assert "MIN_ACCURACY='98'" in capsys.readouterr().err


def test_the_trainer_cli_refuses_a_bad_setting(monkeypatch, capsys):
    from trainer.cli import main

    monkeypatch.setenv("MODEL_NAME", "../x")
    assert main(["evaluate"]) == 2
    assert "MODEL_NAME: invalid model name" in capsys.readouterr().err


def test_reading_the_settings_does_not_import_numpy():
    """The trainer reads TRAINER_THREADS before numpy is imported: numpy fixes its BLAS threads at
    import, so core.settings must not pull numpy in (core.modelstore would)."""
    code = (
        "import sys; from core.settings import Settings; "
        "Settings.from_env({'MODEL_NAMES': 'a,b', 'MODEL_VERSION': '2'}); print('numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_bad_trainer_threads_stops_python_m_trainer_with_one_line():
    env = {"TRAINER_THREADS": "zero", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "trainer", "--help"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "TRAINER_THREADS='zero'" in out.stderr and "Traceback" not in out.stderr
