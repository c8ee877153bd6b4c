"""core.modelstore: round trip, verification, and atomic publishing under races and crashes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core import modelstore as ms
from core.network import new_network

ROOT = Path(__file__).resolve().parents[2]


def _net(seed: int = 0):
    return new_network([784, 8, 10], ["relu", "softmax"], "cross_entropy", np.random.default_rng(seed), "he")


def test_round_trip_keeps_arrays_metadata_and_numbers_versions(tmp_path):
    net = _net()
    v1 = ms.publish(tmp_path, "mnist", net, {"metrics": {"test_accuracy": 0.5}}, {ms.REPORT_FILE: b"png"})
    v2 = ms.publish(tmp_path, "mnist", _net(1), {})
    assert (v1, v2) == (1, 2)
    assert ms.list_versions(tmp_path, "mnist") == [1, 2]
    m = ms.load(tmp_path, "mnist", 1)
    for a, b in zip(m.net.weights + m.net.biases, net.weights + net.biases, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert m.metadata["metrics"]["test_accuracy"] == 0.5
    assert m.metadata["architecture"]["sizes"] == [784, 8, 10]
    assert (m.path / ms.REPORT_FILE).read_bytes() == b"png"
    # plain arrays, loadable without pickle
    with np.load(m.path / ms.WEIGHTS_FILE, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["W1", "W2", "b1", "b2"]
    assert m.metadata["files"][ms.WEIGHTS_FILE]["sha256"] == ms.sha256_file(m.path / ms.WEIGHTS_FILE)


def test_tampered_weights_are_rejected(tmp_path):
    ms.publish(tmp_path, "mnist", _net(), {})
    path = tmp_path / "mnist" / "1" / ms.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ms.InvalidModel, match="sha256"):
        ms.load(tmp_path, "mnist", 1)


def _rewrite_weights(version_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    """Replace weights.npz and fix the checksum, so only the shape check can catch it."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (version_dir / ms.WEIGHTS_FILE).write_bytes(buf.getvalue())
    meta = json.loads((version_dir / ms.METADATA_FILE).read_text())
    meta["files"][ms.WEIGHTS_FILE]["sha256"] = ms.sha256_bytes(buf.getvalue())
    (version_dir / ms.METADATA_FILE).write_text(json.dumps(meta))


def test_wrong_shapes_missing_arrays_and_nan_are_rejected(tmp_path):
    net = _net()
    good = {"W1": net.weights[0], "b1": net.biases[0], "W2": net.weights[1], "b2": net.biases[1]}
    cases = [
        ({**good, "W2": np.zeros((10, 7), np.float32)}, "shape"),
        ({k: v for k, v in good.items() if k != "b2"}, "no array b2"),
        ({**good, "W1": np.full((8, 784), np.nan, np.float32)}, "finite"),
        ({**good, "extra": np.zeros(1)}, "unexpected"),
    ]
    for arrays, reason in cases:
        version = ms.publish(tmp_path, "mnist", net, {})
        _rewrite_weights(tmp_path / "mnist" / str(version), arrays)
        with pytest.raises(ms.InvalidModel, match=reason):
            ms.load(tmp_path, "mnist", version)


def test_bad_or_missing_model_json_is_rejected(tmp_path):
    ms.publish(tmp_path, "mnist", _net(), {})
    meta_path = tmp_path / "mnist" / "1" / ms.METADATA_FILE
    good = meta_path.read_text()
    meta_path.write_text("{not json")
    with pytest.raises(ms.InvalidModel, match="not valid JSON"):
        ms.load(tmp_path, "mnist", 1)
    meta_path.write_text(good.replace('"relu"', '"swish"'))
    with pytest.raises(ms.InvalidModel, match="architecture"):
        ms.load(tmp_path, "mnist", 1)
    meta_path.write_text(good.replace(ms.FORMAT, "other/9"))
    with pytest.raises(ms.InvalidModel, match="format"):
        ms.load(tmp_path, "mnist", 1)
    meta_path.unlink()
    with pytest.raises(ms.InvalidModel, match="missing"):
        ms.load(tmp_path, "mnist", 1)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
        (lambda p: p.write_text(p.read_text().replace('"sizes": [', '"sizes": [1e999, ')), "overflows"),
        (lambda p: p.write_text(p.read_text().replace('"sizes": [', '"sizes": [NaN, ')), "NaN"),
        (lambda p: p.write_bytes(b" " * (ms.MAX_JSON_BYTES + 1)), "larger than"),
        (lambda p: (p.unlink(), os.mkfifo(p)), "not a regular file"),
        (lambda p: (p.unlink(), p.symlink_to(p.name)), "symbolic links"),
        (lambda p: p.write_text('{"format": "mlp-npz/1", "architecture": {"sizes": 7}}'), "architecture"),
    ],
    ids=["nested", "overflow", "nan", "huge", "fifo", "symlink-loop", "not-a-list"],
)
def test_pathological_model_json_is_an_invalid_model(tmp_path, damage, reason):
    """Whatever model.json holds, reading it costs little and ends in InvalidModel with a reason."""
    ms.publish(tmp_path, "mnist", _net(), {})
    damage(tmp_path / "mnist" / "1" / ms.METADATA_FILE)
    with pytest.raises(ms.InvalidModel, match=reason):
        ms.load(tmp_path, "mnist", 1)


def test_weights_that_are_not_a_regular_file_are_an_invalid_model(tmp_path):
    """A FIFO in place of weights.npz would block the reader for good: it is refused at once."""
    ms.publish(tmp_path, "mnist", _net(), {})
    weights = tmp_path / "mnist" / "1" / ms.WEIGHTS_FILE
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(ms.InvalidModel, match="not a regular file"):
        ms.load(tmp_path, "mnist", 1)


def test_a_version_folder_that_is_a_symlink_loop_is_listed_not_fatal(tmp_path):
    """list_versions lists a version it cannot stat (its loader then rejects it) and the others."""
    ms.publish(tmp_path, "mnist", _net(), {})
    (tmp_path / "mnist" / "2").symlink_to("2")
    assert ms.list_versions(tmp_path, "mnist") == [1, 2]
    with pytest.raises(ms.InvalidModel, match="symbolic links"):
        ms.load(tmp_path, "mnist", 2)
    assert ms.load(tmp_path, "mnist", 1).version == 1


@pytest.mark.parametrize("bad", ["../1", "0", "01", "-1", "1/..", "", "1.0", "99999999999", "2\n"])
def test_versions_are_positive_integers_only(bad):
    with pytest.raises(ValueError):
        ms.parse_version(bad)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x" * 65, "mnist\n"])
def test_names_are_safe_path_components(bad):
    with pytest.raises(ValueError):
        ms.check_name(bad)


PUBLISHER = """
import sys, time
import numpy as np
from core import modelstore as ms
from core.network import new_network
rng = np.random.default_rng(int(sys.argv[2]))
net = new_network([784, 8, 10], ["relu", "softmax"], "cross_entropy", rng, "he")
start = float(sys.argv[3])
while time.time() < start:
    pass
print(ms.publish(sys.argv[1], "mnist", net, {"writer": int(sys.argv[2])}))
"""


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    n = 6
    start = time.time() + 2.0  # all processes are importing numpy by then, and race for the same number
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(tmp_path), str(i), str(start)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    versions = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(versions) == list(range(1, n + 1))
    writers = set()
    for v in versions:
        m = ms.load(tmp_path, "mnist", v)
        writers.add(m.metadata["writer"])
    assert writers == set(range(n))
    assert not [p for p in (tmp_path / "mnist").iterdir() if p.name.startswith(ms.TEMP_PREFIX)]


def test_exception_midway_leaves_no_version_and_no_temp(tmp_path):
    with pytest.raises(TypeError):
        # the second extra file is not bytes: the write fails after weights.npz and report were written
        ms.publish(tmp_path, "mnist", _net(), {}, {"report.png": b"x", "bad": object()})  # type: ignore[dict-item]
    assert ms.list_versions(tmp_path, "mnist") == []
    assert list((tmp_path / "mnist").iterdir()) == []


KILLED = """
import os, sys, time
import numpy as np
from core import modelstore as ms
from core.network import new_network
real = ms.write_synced
def slow(path, data):
    real(path, data)
    if path.name == ms.WEIGHTS_FILE:
        print("written", flush=True)
        time.sleep(60)  # killed here: weights are on disk, model.json is not, no rename yet
ms.write_synced = slow
net = new_network([784, 8, 10], ["relu", "softmax"], "cross_entropy", np.random.default_rng(0), "he")
ms.publish(sys.argv[1], "mnist", net, {})
"""


def test_sigkill_midway_leaves_nothing_that_looks_like_a_version(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    leftovers = list((tmp_path / "mnist").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(ms.TEMP_PREFIX)
    assert (leftovers[0] / ms.WEIGHTS_FILE).exists()
    assert ms.list_versions(tmp_path, "mnist") == []
    with pytest.raises(ms.InvalidModel):
        ms.load(tmp_path, "mnist", 1)
    # the next publisher is unaffected by the debris and gets version 1
    assert ms.publish(tmp_path, "mnist", _net(), {}) == 1
    assert ms.load(tmp_path, "mnist", 1).version == 1


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"metrics": {"test_accuracy": 0.9916}}, 0.9916),
        ({"metrics": {"test_accuracy": 1}}, 1.0),
        ({"metrics": {"test_accuracy": 0}}, 0.0),
        ({"metrics": {"test_accuracy": True}}, None),  # JSON true is an int to Python, not an accuracy
        ({"metrics": {"test_accuracy": float("nan")}}, None),
        ({"metrics": {"test_accuracy": float("inf")}}, None),
        ({"metrics": {"test_accuracy": 99.16}}, None),  # a percentage, not a fraction
        ({"metrics": {"test_accuracy": -0.1}}, None),
        ({"metrics": {"test_accuracy": "0.99"}}, None),
        ({"metrics": "0.99"}, None),
        ({}, None),
    ],
)
def test_recorded_accuracy_is_a_number_in_0_1_or_none(meta, expected):
    got = ms.recorded_accuracy(meta)
    assert got == expected and (got is None or type(got) is float)
