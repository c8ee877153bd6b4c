"""Version labels: `models/<name>/labels.json`, the release decision every replica reads.

TensorFlow Serving names versions with labels; here the file sits next to the
versions, in the repository every worker, replica and node already mounts, so
they all read the same decision:

    {"stable": 2, "previous_stable": 1, "canary": 3, "canary_percent": 10}

`stable` is the version that answers unpinned requests, `canary` (optional)
answers `canary_percent` of them, `previous_stable` is where `rollback` goes.
The file is written atomically (temp file, fsync, rename), so a reader sees
the old decision or the new one, never half of one. A file that does not
parse is refused with a reason (`InvalidLabels`); the service then keeps its
last good decision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.atomic import write_atomic
from core.modelstore import check_name, read_json

LABELS_FILE = "labels.json"
LABELS = ("stable", "canary")
_KEYS = {"stable", "previous_stable", "canary", "canary_percent"}
MAX_LABELS_BYTES = 4096  # four small numbers


class InvalidLabels(Exception):
    """A labels.json that must not be followed; the message says why."""


@dataclass(frozen=True)
class Labels:
    """The release decision for one model; every field optional (no file = nothing decided)."""

    stable: int | None = None
    previous_stable: int | None = None
    canary: int | None = None
    canary_percent: float = 0.0

    def named(self) -> set[int]:
        """Versions a decision has covered: automatic promotion only looks past them."""
        return {v for v in (self.stable, self.previous_stable, self.canary) if v is not None}

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for key in ("stable", "previous_stable", "canary"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        if self.canary is not None:
            doc["canary_percent"] = self.canary_percent
        return doc


def _version(doc: dict, key: str) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    # bool is an int in Python; `true` is not a version.
    if type(value) is not int or value < 1:
        raise InvalidLabels(f"{key} must be a positive integer version, got {value!r}")
    return value


def check_percent(value: Any) -> float:
    """A traffic share 0..100; anything else (NaN, strings, booleans) is refused."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise ValueError(f"canary percent must be a number from 0 to 100, got {value!r}")
    return float(value)


def parse(text: str | bytes) -> Labels:
    """labels.json's content as Labels, or InvalidLabels saying what is wrong."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: deep nesting
        raise InvalidLabels(f"{LABELS_FILE} is not valid JSON: {type(e).__name__}: {e}") from None
    return _labels(doc)


def _labels(doc: Any) -> Labels:
    if not isinstance(doc, dict):
        raise InvalidLabels(f"{LABELS_FILE} must be a JSON object")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise InvalidLabels(f"{LABELS_FILE} has unknown keys {unknown}; allowed: {sorted(_KEYS)}")
    canary = _version(doc, "canary")
    percent = doc.get("canary_percent", 0.0 if canary is None else None)
    try:
        percent = check_percent(percent)
    except ValueError as e:
        raise InvalidLabels(str(e)) from None
    return Labels(_version(doc, "stable"), _version(doc, "previous_stable"), canary, percent)


def path(models_dir: Path | str, name: str) -> Path:
    return Path(models_dir) / check_name(name) / LABELS_FILE


def read(models_dir: Path | str, name: str) -> Labels:
    """The model's labels; empty Labels when there is no file; InvalidLabels when it is broken."""
    try:
        doc = read_json(path(models_dir, name), MAX_LABELS_BYTES)
    except FileNotFoundError:
        return Labels()
    except OSError as e:
        raise InvalidLabels(f"{LABELS_FILE} is unreadable: {e.strerror}") from None
    except ValueError as e:
        raise InvalidLabels(str(e)) from None
    return _labels(doc)


def write(models_dir: Path | str, name: str, labels: Labels) -> Path:
    """Replace labels.json atomically (core.atomic): a reader sees the old decision or the new one."""
    body = (json.dumps(labels.to_json(), indent=2) + "\n").encode()
    return write_atomic(path(models_dir, name), body)
