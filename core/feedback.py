"""Corrections people send (`POST /feedback`): how they are stored, read back and split.

Shared by the service (which writes), the trainer (which learns from them)
and the export command, so a record means the same thing everywhere.

Storage (docs/feedback.md): `FEEDBACK_DIR` holds JSON Lines files,
append-only, one file per writer process (`feedback-<start>-<host>-<pid>-
<token>-<seq>.jsonl`), so workers and replicas sharing the folder never
write into the same file and never interleave. A record is one line, written
with a single `write` on an `O_APPEND` descriptor and then `fdatasync`ed:
the caller only answers 201 after that. A write that fails part-way (a full
disk) is cut back to where the line began; if even that fails the file is
abandoned and never appended to again, so at worst a file ends in a partial
line without its newline, which every reader here skips. A file deleted (or
replaced) under a writer is noticed before the next record, which goes to a
new file rather than to an unlinked one. The writer rotates
to a new file past `rotate_bytes`, and refuses (not truncates) past
`max_bytes` for the whole folder.

Each line is a CloudEvents 1.0 event (structured mode) of type
`org.kubeflow.serving.inference.feedback`, after KServe's payload logger's
`org.kubeflow.serving.inference.request|response`; `data` is described by
`schemas/feedback-record.v1.json`.

The holdout is decided by the record id alone (`in_holdout`): the same record
is in it for every training run and every evaluation, so it is never trained on.
"""

from __future__ import annotations

import base64
import datetime as dt
import errno
import hashlib
import json
import os
import secrets
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import fsync_dir, write_atomic
from core.preprocess import IMAGE_SIDE

SPEC_VERSION = "1.0"
EVENT_TYPE = "org.kubeflow.serving.inference.feedback"
DATA_SCHEMA = "urn:mnist-serving:feedback-record:1"
SCHEMA_VERSION = 1
FILE_PREFIX = "feedback-"
FILE_SUFFIX = ".jsonl"
HOLDOUT_PERCENT = 20  # of the records, chosen by id, never trained on


class FeedbackError(Exception):
    """A record that could not be made durable; `status`/`code` say why, for an HTTP answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def new_id() -> str:
    """A record id: random, so ids from many processes never collide and the holdout is unbiased."""
    return uuid.uuid4().hex


def in_holdout(record_id: str, percent: int = HOLDOUT_PERCENT) -> bool:
    """Whether a record belongs to the holdout: a hash of its id, so the answer never changes."""
    h = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big")
    return h % 100 < percent


def pixels_json(image: np.ndarray) -> list[list[int | float]]:
    """A 28×28 image (values 0..255) as JSON rows: integers when the values are, else floats,
    so that `core.preprocess.to_vectors` of the stored rows gives the network's input exactly."""
    a = np.asarray(image, dtype=np.float64).reshape(IMAGE_SIDE, IMAGE_SIDE)
    if np.all(a == np.rint(a)):
        return a.astype(np.int64).tolist()
    return a.tolist()


def make_event(
    data: dict[str, Any], subject: str, record_id: str | None = None, now: dt.datetime | None = None
) -> dict[str, Any]:
    """The CloudEvents envelope around one record's `data`."""
    now = now or dt.datetime.now(dt.UTC)
    return {
        "specversion": SPEC_VERSION,
        "id": record_id or new_id(),
        "source": f"/mnist-serving/{socket.gethostname()}/{os.getpid()}",
        "type": EVENT_TYPE,
        "time": now.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "subject": subject,
        "datacontenttype": "application/json",
        "dataschema": DATA_SCHEMA,
        "data": data,
    }


def image_field(media_type: str | None, raw: bytes | None, max_bytes: int) -> dict[str, Any] | None:
    """The original upload as sent: its bytes in base64 up to `max_bytes`, else only its size and
    hash. None for a JSON body, whose numbers are the image (and are in `input`)."""
    if raw is None:
        return None
    kept = len(raw) <= max_bytes
    return {
        "media_type": media_type or "application/octet-stream",
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "base64": base64.b64encode(raw).decode("ascii") if kept else None,
    }


def _classify(e: OSError, directory: Path) -> FeedbackError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return FeedbackError(507, "disk_full", f"no space left for feedback in {directory}")
    return FeedbackError(
        503, "feedback_unwritable", f"cannot write feedback to {directory}: {e.strerror or e}"
    )


def folder_bytes(directory: Path) -> int:
    """Bytes in the folder's feedback files (every writer's): what FEEDBACK_MAX_BYTES bounds."""
    total = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for e in entries:
        if e.name.startswith(FILE_PREFIX) and e.name.endswith(FILE_SUFFIX):
            try:
                total += e.stat().st_size
            except FileNotFoundError:
                continue
    return total


class FeedbackWriter:
    """This process's append-only feedback file in `directory`; thread-safe; re-opened after a fork."""

    def __init__(self, directory: Path | str, max_bytes: int, rotate_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.rotate_bytes = rotate_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        self._offset = 0
        self._seq = 0
        self._stem = ""
        self.path: Path | None = None

    def append(self, event: dict[str, Any]) -> Path:
        """Write one record as one line and fdatasync it; the file it is in. FeedbackError if not
        durable: then no complete line of it exists, and no partial one that is not the last."""
        line = json.dumps(event, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
        with self._lock:
            try:
                used = folder_bytes(self.directory)
            except OSError as e:
                raise _classify(e, self.directory) from None
            if used + len(line) > self.max_bytes:
                raise FeedbackError(
                    507,
                    "feedback_full",
                    f"the feedback folder holds {used} bytes; FEEDBACK_MAX_BYTES={self.max_bytes} is reached",
                )
            fd = self._file_for(len(line))
            start = self._offset
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, "short write (disk full?)")
                os.fdatasync(fd)
            except OSError as e:
                self._undo(fd, start)
                raise _classify(e, self.directory) from None
            self._offset = start + written
            assert self.path is not None
            return self.path

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def _undo(self, fd: int, start: int) -> None:
        """Cut a failed write back to the line's start; if that fails too, never use the file again."""
        try:
            os.ftruncate(fd, start)
            os.fdatasync(fd)
        except OSError:
            self._close()

    def _file_for(self, size: int) -> int:
        if self._pid != os.getpid():  # a fork: the parent's descriptor and name are not ours
            self._fd, self._pid, self._seq, self._stem = None, os.getpid(), 0, ""
        if self._fd is not None and self._offset > 0 and self._offset + size > self.rotate_bytes:
            self._close()
        if self._fd is not None and not self._still_named():
            self._close()  # deleted or replaced (docs/feedback.md): a record written there would be lost
        if self._fd is None:
            self._open_next()
        assert self._fd is not None
        return self._fd

    def _still_named(self) -> bool:
        """Whether our open file is still the one at our path (one stat per record)."""
        assert self._fd is not None and self.path is not None
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    def _open_next(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _classify(e, self.directory) from None
        while True:
            if not self._stem:
                started = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
                host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
                self._stem = f"{FILE_PREFIX}{started}-{host}-{os.getpid()}-{secrets.token_hex(3)}"
            self._seq += 1
            path = self.directory / f"{self._stem}-{self._seq:04d}{FILE_SUFFIX}"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            except FileExistsError:
                self._stem = ""
                continue
            except OSError as e:
                raise _classify(e, self.directory) from None
            try:
                fsync_dir(self.directory)  # the new name itself must survive a crash
            except OSError as e:
                os.close(fd)
                raise _classify(e, self.directory) from None
            self._fd, self._offset, self.path = fd, 0, path
            return


def feedback_files(directory: Path | str) -> list[Path]:
    """The folder's feedback files, oldest name first."""
    try:
        names = sorted(
            e.name
            for e in os.scandir(directory)
            if e.name.startswith(FILE_PREFIX) and e.name.endswith(FILE_SUFFIX) and e.is_file()
        )
    except FileNotFoundError:
        return []
    return [Path(directory) / n for n in names]


def complete_lines(data: bytes) -> tuple[list[bytes], int]:
    """The newline-terminated lines of `data` and how many bytes they span: a torn tail is left."""
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(), end


def read_events(directory: Path | str) -> Iterator[dict[str, Any]]:
    """Every complete, parseable record in the folder, each id once (the first seen)."""
    seen: set[str] = set()
    for path in feedback_files(directory):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        for line in complete_lines(data)[0]:
            event = parse_line(line)
            if event is not None and event["id"] not in seen:
                seen.add(event["id"])
                yield event


def parse_line(line: bytes) -> dict[str, Any] | None:
    """One line as an event of our type, or None (a blank or foreign line is skipped, not fatal)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") != EVENT_TYPE or not isinstance(event.get("id"), str):
        return None
    data = event.get("data")
    return event if isinstance(data, dict) else None


@dataclass(frozen=True)
class Corrections:
    """The stored records as arrays: what the trainer, `make evaluate` and the export read."""

    images: np.ndarray  # (m, 28, 28) float32, values 0..255: the input as the network saw it
    labels: np.ndarray  # (m,) int64: the true digit the person gave
    ids: np.ndarray  # (m,) str
    holdout: np.ndarray  # (m,) bool: never trained on
    scored: np.ndarray  # (m,) int64: what the answering version predicted when the record was made
    models: np.ndarray  # (m,) str: "name/version" that answered
    skipped: int = 0  # lines of our type whose data is not a usable record (hand-edited, say)

    def __len__(self) -> int:
        return len(self.labels)

    def train_part(self) -> tuple[np.ndarray, np.ndarray]:
        keep = ~self.holdout
        return self.images[keep], self.labels[keep]

    def holdout_part(self) -> tuple[np.ndarray, np.ndarray]:
        return self.images[self.holdout], self.labels[self.holdout]


def load_corrections(directory: Path | str, model: str | None = None) -> Corrections:
    """Every record in the folder (of `model` only, if given), split by id into train and holdout."""
    images, labels, ids, scored, models = [], [], [], [], []
    skipped = 0
    for event in read_events(directory):
        d = event["data"]
        try:
            name = str(d["model"]["name"])
            image = np.asarray(d["input"], dtype=np.float32)
            label, served = int(d["digit"]), int(d["scored"]["digit"])
            ref = f"{name}/{int(d['model']['version'])}"
            if image.shape != (IMAGE_SIDE, IMAGE_SIDE) or not 0 <= label <= 9 or not np.isfinite(image).all():
                raise ValueError("not a 28x28 image with a digit")
        except (KeyError, TypeError, ValueError):
            skipped += 1
            continue
        if model is not None and name != model:
            continue
        images.append(image)
        labels.append(label)
        ids.append(event["id"])
        scored.append(served)
        models.append(ref)
    n = len(labels)
    return Corrections(
        images=np.stack(images) if n else np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        ids=np.asarray(ids, dtype=str),
        holdout=np.asarray([in_holdout(i) for i in ids], dtype=bool),
        scored=np.asarray(scored, dtype=np.int64),
        models=np.asarray(models, dtype=str),
        skipped=skipped,
    )


def export_npz(directory: Path | str, out: Path | str, model: str | None = None) -> Corrections:
    """Write the corrections as an .npz anyone can load with `np.load(path)`: images (m, 28, 28)
    uint8 (MNIST's layout; a JSON body's fractional values are rounded), labels, holdout, ids,
    scored (the answering version's digit) and model ("name/version")."""
    c = load_corrections(directory, model)
    images = np.clip(np.rint(c.images), 0, 255).astype(np.uint8)
    arrays = {
        "images": images,
        "labels": c.labels,
        "holdout": c.holdout,
        "ids": c.ids,
        "scored": c.scored,
        "model": c.models,
    }
    write_atomic(out, lambda f: np.savez_compressed(f, **arrays))
    return c


class LiveTally:
    """Right and wrong answers per (model, version) over every record in the folder, all writers'.

    Read incrementally: each file is read from where the last call stopped, up to its last
    complete line, so a call costs what was appended since. A file that shrank or vanished
    (records deleted, docs/feedback.md) makes the next call count everything again.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._offsets: dict[Path, int] = {}
        self._counts: dict[tuple[str, int], list[int]] = {}
        self._seen: set[str] = set()

    def counts(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(model, version) -> (records, correct)."""
        with self._lock:
            files = feedback_files(self.directory)
            gone = set(self._offsets) - set(files)
            if gone or any(_size(p) < self._offsets.get(p, 0) for p in files):
                self._offsets, self._counts, self._seen = {}, {}, set()
            for path in files:
                self._read_new(path)
            return {k: (v[0], v[1]) for k, v in self._counts.items()}

    def _read_new(self, path: Path) -> None:
        start = self._offsets.get(path, 0)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
        except FileNotFoundError:
            return
        lines, used = complete_lines(data)
        self._offsets[path] = start + used
        for line in lines:
            event = parse_line(line)
            if event is None or event["id"] in self._seen:
                continue
            self._seen.add(event["id"])
            try:
                d = event["data"]
                key = (str(d["model"]["name"]), int(d["model"]["version"]))
                correct = bool(d["correct"])
            except (KeyError, TypeError, ValueError):
                continue
            tally = self._counts.setdefault(key, [0, 0])
            tally[0] += 1
            tally[1] += int(correct)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
