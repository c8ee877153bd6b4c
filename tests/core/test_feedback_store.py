"""The feedback store (core/feedback.py): every record exactly once, every line valid, nothing torn.

Real processes, real files, real fsyncs; failures the disk would cause (a full disk mid-write,
a read-only folder) are injected where the kernel would report them, at os.write / os.open,
and, when not running as root, the read-only folder is a real one too.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator, FormatChecker

from core import feedback
from tests.helpers import ROOT

SCHEMA = json.loads((ROOT / "schemas" / "feedback-record.v1.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=FormatChecker())


def record(digit: int = 3, version: int = 2, correct: bool = True, salt: int = 0) -> dict:
    """A valid event, as the service makes it (service/feedback.py), with a distinct input."""
    image = np.zeros((28, 28), np.uint8)
    image[salt % 28, (salt // 28) % 28] = 255
    probs = [0.0] * 10
    probs[digit if correct else (digit + 1) % 10] = 1.0
    data = {
        "schema_version": 1,
        "request_id": f"req-{salt}",
        "feedback_request_id": f"fb-{salt}",
        "model": {"name": "mnist", "version": version},
        "digit": digit,
        "predicted": None,
        "scored": {"digit": digit if correct else (digit + 1) % 10, "probabilities": probs},
        "correct": correct,
        "preprocess": "auto",
        "input": feedback.pixels_json(image),
        "image": feedback.image_field("image/png", b"\x89PNG fake", 1024),
    }
    return feedback.make_event(data, f"mnist/{version}")


def lines(directory: Path) -> list[bytes]:
    out = []
    for path in feedback.feedback_files(directory):
        data = path.read_bytes()
        assert data.endswith(b"\n"), f"{path.name} ends in a partial line"
        out.extend(data.splitlines())
    return out


def test_the_schema_accepts_a_record_and_refuses_broken_ones():
    good = record()
    VALIDATOR.validate(good)
    for path, value in [
        (("data", "digit"), 10),
        (("data", "digit"), True),
        (("type",), "org.kubeflow.serving.inference.request"),
        (("data", "model", "version"), 0),
        (("time",), "yesterday"),
    ]:
        bad = json.loads(json.dumps(good))
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert list(VALIDATOR.iter_errors(bad)), f"{path}={value!r} passed the schema"
    bad = json.loads(json.dumps(good))
    bad["data"]["input"] = bad["data"]["input"][:27]
    assert list(VALIDATOR.iter_errors(bad))


def _writer_process(directory: str, n: int, rotate: int, queue) -> None:
    writer = feedback.FeedbackWriter(directory, max_bytes=1 << 30, rotate_bytes=rotate)
    ids = []
    for i in range(n):
        event = record(digit=i % 10, correct=i % 3 != 0, salt=i)
        writer.append(event)
        ids.append(event["id"])
    writer.close()
    queue.put(ids)


def test_four_writer_processes_give_every_record_exactly_once(tmp_path):
    """4 processes x 300 records into one folder, rotating every ~100 records: each record is
    one complete line in exactly one file, each line valid against the schema."""
    n, procs = 300, 4
    rotate = 100 * len(json.dumps(record()))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [
        ctx.Process(target=_writer_process, args=(str(tmp_path), n, rotate, queue)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    sent = [i for _ in workers for i in queue.get(timeout=120)]
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert len(set(sent)) == n * procs
    stored = lines(tmp_path)
    events = [json.loads(line) for line in stored]
    for event in events:
        VALIDATOR.validate(event)
    got = [e["id"] for e in events]
    assert sorted(got) == sorted(sent)  # every record, exactly once
    files = feedback.feedback_files(tmp_path)
    sources = {json.loads(p.read_bytes().splitlines()[0])["source"] for p in files}
    assert len(sources) == procs  # every file has one writer
    for path in files:
        assert len({json.loads(line)["source"] for line in path.read_bytes().splitlines()}) == 1
    assert len(files) >= procs * 3  # rotated
    assert [e["id"] for e in feedback.read_events(tmp_path)] == got


def test_the_size_cap_refuses_without_writing(tmp_path):
    one = len(json.dumps(record(), separators=(",", ":"))) + 1
    writer = feedback.FeedbackWriter(tmp_path, max_bytes=int(2.5 * one), rotate_bytes=1 << 20)
    writer.append(record(salt=1))
    writer.append(record(salt=2))
    before = lines(tmp_path)
    with pytest.raises(feedback.FeedbackError) as e:
        writer.append(record(salt=3))
    assert (e.value.status, e.value.code) == (507, "feedback_full")
    assert "FEEDBACK_MAX_BYTES" in e.value.message
    assert lines(tmp_path) == before


def test_a_full_disk_mid_write_leaves_no_partial_line(tmp_path, monkeypatch):
    """The kernel writes half the line, then reports no space: the half is cut off, and the next
    record (once there is space) lands after the last complete line."""
    writer = feedback.FeedbackWriter(tmp_path, max_bytes=1 << 30, rotate_bytes=1 << 20)
    first = record(salt=1)
    writer.append(first)
    real_write = os.write

    def half(fd, data):
        real_write(fd, data[: len(data) // 2])
        return len(data) // 2

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(feedback.FeedbackError) as e:
        writer.append(record(salt=2))
    assert (e.value.status, e.value.code) == (507, "disk_full")
    monkeypatch.setattr(os, "write", real_write)
    assert [json.loads(line)["id"] for line in lines(tmp_path)] == [first["id"]]
    third = record(salt=3)
    writer.append(third)
    assert [json.loads(line)["id"] for line in lines(tmp_path)] == [first["id"], third["id"]]


def test_when_even_the_cut_fails_the_file_is_abandoned_and_readers_skip_its_torn_tail(tmp_path, monkeypatch):
    writer = feedback.FeedbackWriter(tmp_path, max_bytes=1 << 30, rotate_bytes=1 << 20)
    first = record(salt=1)
    writer.append(first)
    torn = writer.path
    real_write = os.write

    def half(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_truncate(fd, length):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "write", half)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(feedback.FeedbackError):
        writer.append(record(salt=2))
    monkeypatch.undo()
    assert not torn.read_bytes().endswith(b"\n")  # the torn tail is there ...
    third = record(salt=3)
    writer.append(third)
    assert writer.path != torn  # ... and nothing is ever appended after it
    assert [e["id"] for e in feedback.read_events(tmp_path)] == [first["id"], third["id"]]
    tally = feedback.LiveTally(tmp_path).counts()
    assert tally == {("mnist", 2): (2, 2)}


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_an_unwritable_folder_is_a_clear_error(tmp_path, monkeypatch, err):
    def refuse(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "open", refuse)
    writer = feedback.FeedbackWriter(tmp_path / "fb", max_bytes=1 << 30, rotate_bytes=1 << 20)
    with pytest.raises(feedback.FeedbackError) as e:
        writer.append(record())
    assert (e.value.status, e.value.code) == (503, "feedback_unwritable")
    assert str(tmp_path / "fb") in e.value.message


def _append_as(uid: int | None, directory: str, queue) -> None:
    if uid is not None:
        os.setuid(uid)  # root writes anywhere: drop to an ordinary user, as the api runs (uid 10001)
    writer = feedback.FeedbackWriter(directory, max_bytes=1 << 30, rotate_bytes=1 << 20)
    try:
        writer.append(record())
        queue.put(None)
    except feedback.FeedbackError as e:
        queue.put((e.status, e.code, e.message))


def test_a_real_unwritable_folder_is_a_clear_error(tmp_path):
    """A folder the writer's user may not write (mode 0555; as root, a root-owned 0755 folder
    written as nobody): the kernel's EACCES becomes 503 feedback_unwritable, and no file appears."""
    folder = tmp_path / "fb"
    folder.mkdir(mode=0o555 if os.geteuid() != 0 else 0o755)
    folder.chmod(0o555 if os.geteuid() != 0 else 0o755)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_append_as, args=(65534 if os.geteuid() == 0 else None, str(folder), queue))
    child.start()
    result = queue.get(timeout=60)
    child.join(30)
    folder.chmod(0o755)
    assert result is not None and result[:2] == (503, "feedback_unwritable"), result
    assert "Permission denied" in result[2] and str(folder) in result[2]
    assert list(folder.iterdir()) == []


def test_the_holdout_is_decided_by_the_id_alone():
    ids = [feedback.new_id() for _ in range(5000)]
    first = [feedback.in_holdout(i) for i in ids]
    assert first == [feedback.in_holdout(i) for i in ids]
    assert 0.17 < np.mean(first) < 0.23  # HOLDOUT_PERCENT = 20
    assert feedback.in_holdout("0" * 32) == feedback.in_holdout("0" * 32)


def test_the_tally_reads_incrementally_and_starts_again_after_a_deletion(tmp_path):
    writer = feedback.FeedbackWriter(tmp_path, max_bytes=1 << 30, rotate_bytes=1 << 20)
    tally = feedback.LiveTally(tmp_path)
    assert tally.counts() == {}
    for i in range(6):
        writer.append(record(version=2, correct=i < 4, salt=i))
    writer.append(record(version=3, correct=False, salt=9))
    assert tally.counts() == {("mnist", 2): (6, 4), ("mnist", 3): (1, 0)}
    writer.append(record(version=3, correct=True, salt=10))
    assert tally.counts() == {("mnist", 2): (6, 4), ("mnist", 3): (2, 1)}
    writer.close()
    for path in feedback.feedback_files(tmp_path):
        path.unlink()  # "delete everything" (docs/feedback.md)
    assert tally.counts() == {}


def test_export_writes_an_npz_loadable_in_one_line(tmp_path):
    writer = feedback.FeedbackWriter(tmp_path / "fb", max_bytes=1 << 30, rotate_bytes=1 << 20)
    events = [record(digit=i % 10, salt=i) for i in range(30)]
    for e in events:
        writer.append(e)
    feedback.export_npz(tmp_path / "fb", tmp_path / "c.npz")
    d = np.load(tmp_path / "c.npz")
    assert d["images"].shape == (30, 28, 28) and d["images"].dtype == np.uint8
    assert d["labels"].tolist() == [i % 10 for i in range(30)]
    assert d["ids"].tolist() == [e["id"] for e in events]
    assert d["holdout"].tolist() == [feedback.in_holdout(e["id"]) for e in events]
    for i, e in enumerate(events):
        np.testing.assert_array_equal(d["images"][i], np.asarray(e["data"]["input"]))


def test_a_file_deleted_under_the_writer_is_not_written_to_again(tmp_path):
    """Deleting the files while the service runs (docs/feedback.md) loses no later record."""
    writer = feedback.FeedbackWriter(tmp_path, max_bytes=1 << 30, rotate_bytes=1 << 20)
    writer.append(record(salt=1))
    for path in feedback.feedback_files(tmp_path):
        path.unlink()
    later = record(salt=2)
    writer.append(later)
    assert [e["id"] for e in feedback.read_events(tmp_path)] == [later["id"]]


def test_unusable_lines_are_skipped_and_counted(tmp_path):
    """A hand-edited line must not stop a training run: it is skipped, and the trainer says so."""
    writer = feedback.FeedbackWriter(tmp_path, max_bytes=1 << 30, rotate_bytes=1 << 20)
    good = record(salt=1)
    writer.append(good)
    for broken in ({"input": [[0] * 28] * 27}, {"digit": 12}, {"model": None}):
        event = record(salt=2)
        event["data"].update(broken)
        writer.append(event)
    writer.close()
    with open(feedback.feedback_files(tmp_path)[0], "ab") as f:
        f.write(b'{"not": "ours"}\n\n')
    c = feedback.load_corrections(tmp_path)
    assert c.ids.tolist() == [good["id"]] and c.skipped == 3
