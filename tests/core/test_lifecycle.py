"""The promotion policy on crafted accuracies, labels.json parsing and writing, and the release CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import labels, release
from core.labels import InvalidLabels, Labels
from core.promotion import decide
from tests.helpers import publish, random_net

SHIPPED, QUICK = 0.9916, 0.966

# --- the policy ----------------------------------------------------------------------------------


def test_gate_holds_a_worse_version_with_the_reason():
    d = decide({2: SHIPPED, 3: QUICK}, Labels())
    assert d.stable == 2 and set(d.held) == {3}
    assert d.held[3].startswith("test accuracy 96.60% < MIN_ACCURACY 98.00%")


def test_gate_holds_a_version_within_min_accuracy_but_below_the_tolerance():
    d = decide({2: SHIPPED, 3: 0.9900}, Labels())
    assert d.stable == 2 and d.held[3] == "test accuracy 99.00% < serving 99.16% − 0.10 (version 2)"


@pytest.mark.parametrize("accuracy", [0.9906, 0.9916, 0.9950])
def test_gate_promotes_a_version_inside_the_tolerance(accuracy):
    assert decide({2: SHIPPED, 3: accuracy}, Labels()).stable == 3


def test_gate_compares_with_the_last_promoted_version_not_the_first():
    d = decide({1: 0.98, 2: 0.99, 3: 0.9885, 4: 0.991}, Labels())
    assert d.stable == 4 and set(d.held) == {3}


def test_the_first_version_serves_whatever_its_accuracy():
    # mnist-seed's only version is ≈95%: nothing to compare it with, so it serves.
    assert decide({1: 0.9519}, Labels()).stable == 1
    d = decide({1: 0.9519, 2: 0.96}, Labels())
    assert d.stable == 1 and "MIN_ACCURACY" in d.held[2]


def test_a_version_without_recorded_accuracy_is_held_by_the_gate():
    d = decide({1: 0.99, 2: None}, Labels())
    assert d.stable == 1 and "no recorded test accuracy" in d.held[2]


def test_latest_serves_the_newest_and_manual_holds_everything_new():
    assert decide({2: SHIPPED, 3: QUICK}, Labels(), "latest").stable == 3
    d = decide({2: SHIPPED, 3: 0.999}, Labels(), "manual")
    assert d.stable == 2 and "manual" in d.held[3]


def test_labels_override_and_cover_older_versions():
    # Promoted by hand: served although the gate would hold it.
    assert decide({2: SHIPPED, 3: QUICK}, Labels(stable=3, previous_stable=2)).stable == 3
    # Rolled back: version 3 is covered by the decision and not promoted again, even by `latest`.
    rolled = Labels(stable=2, previous_stable=3)
    assert decide({2: SHIPPED, 3: 0.999}, rolled).stable == 2
    assert decide({2: SHIPPED, 3: 0.999}, rolled, "latest").stable == 2
    # A newer version than every label is gated against the labelled stable.
    assert decide({2: SHIPPED, 3: QUICK, 4: 0.992}, rolled).stable == 4


def test_canary_and_a_stable_label_that_is_not_valid():
    d = decide({2: SHIPPED, 3: QUICK}, Labels(stable=2, canary=3, canary_percent=10))
    assert (d.stable, d.canary, d.canary_percent, d.held) == (2, 3, 10.0, {})
    # Labels naming versions that are gone: the first valid version serves, no canary.
    d = decide({2: SHIPPED}, Labels(stable=7, canary=9, canary_percent=50))
    assert (d.stable, d.canary, d.canary_percent) == (2, None, 0.0)


def test_no_valid_version_decides_nothing_and_unknown_policy_is_refused():
    assert decide({}, Labels()).stable is None
    with pytest.raises(ValueError, match="policy"):
        decide({1: 0.99}, Labels(), "newest")


# --- labels.json ---------------------------------------------------------------------------------


def test_labels_parse_and_round_trip(tmp_path):
    text = '{"stable": 2, "previous_stable": 1, "canary": 3, "canary_percent": 12.5}'
    parsed = labels.parse(text)
    assert parsed == Labels(2, 1, 3, 12.5)
    (tmp_path / "mnist").mkdir()
    labels.write(tmp_path, "mnist", parsed)
    assert labels.read(tmp_path, "mnist") == parsed
    assert [p.name for p in (tmp_path / "mnist").iterdir()] == ["labels.json"]  # no temp file left
    assert labels.read(tmp_path, "other") == Labels()  # no file: nothing decided


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"stable": 2', "not valid JSON"),
        ("[2]", "JSON object"),
        ('{"stable": "2"}', "stable must be a positive integer"),
        ('{"stable": true}', "stable must be a positive integer"),
        ('{"stable": 0}', "stable must be a positive integer"),
        ('{"canary": 3}', "canary percent"),
        ('{"canary": 3, "canary_percent": 101}', "canary percent"),
        ('{"canary": 3, "canary_percent": -1}', "canary percent"),
        ('{"stabel": 2}', "unknown keys"),
    ],
)
def test_broken_labels_are_refused_with_a_reason(text, message):
    with pytest.raises(InvalidLabels, match=message):
        labels.parse(text)


# --- the release CLI -----------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """mnist versions 1 (99.16%) and 2 (96.6%, held by the gate); the CLI's env pointed at them."""
    d = tmp_path / "models"
    publish(d, random_net(1), accuracy=SHIPPED)
    publish(d, random_net(2), accuracy=QUICK)
    monkeypatch.setenv("MODELS_DIR", str(d))
    monkeypatch.setenv("MODEL_NAME", "mnist")
    for key in ("PROMOTION", "MIN_ACCURACY", "PROMOTION_TOLERANCE"):
        monkeypatch.delenv(key, raising=False)
    return d


def saved(repo: Path) -> dict:
    return json.loads((repo / "mnist" / "labels.json").read_text())


def test_promote_canary_rollback_print_what_changed(repo, capsys):
    assert release.main(["canary", "2", "--percent", "10"]) == 0
    assert saved(repo) == {"stable": 1, "canary": 2, "canary_percent": 10.0}
    assert "canary: - -> 2   (changed)" in capsys.readouterr().out
    assert release.main(["promote", "2"]) == 0
    assert saved(repo) == {"stable": 2, "previous_stable": 1}
    assert "stable: 1 -> 2   (changed)" in capsys.readouterr().out
    assert release.main(["rollback"]) == 0
    assert saved(repo) == {"stable": 1, "previous_stable": 2}
    assert "stable: 2 -> 1   (changed)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["promote", "9"], "has no version 9"),
        (["promote", "x"], "invalid version"),
        (["promote", "../1"], "invalid version"),
        (["canary", "2", "--percent", "101"], "percent"),
        (["canary", "2", "--percent", "nan"], "percent"),
        (["canary", "1"], "already stable"),
        (["rollback"], "no previous stable"),
        (["--name", "../x", "promote", "1"], "invalid model name"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(repo, capsys, argv, message):
    assert release.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (repo / "mnist" / "labels.json").exists()


def test_an_invalid_version_cannot_be_promoted(repo, capsys):
    (repo / "mnist" / "2" / "weights.npz").write_bytes(b"tampered")
    assert release.main(["promote", "2"]) == 2
    assert "version 2 is invalid" in capsys.readouterr().err
    assert not (repo / "mnist" / "labels.json").exists()


def test_a_broken_labels_file_is_not_overwritten(repo, capsys):
    (repo / "mnist" / "labels.json").write_text("{broken")
    assert release.main(["promote", "2"]) == 2
    assert "fix or delete it" in capsys.readouterr().err
    assert (repo / "mnist" / "labels.json").read_text() == "{broken"
