"""The syntax of model names and versions, with no dependency beyond the standard library.

They become path components (`models/<name>/<version>/`), so only a safe
alphabet is allowed. The checks live here rather than in core.modelstore,
which imports numpy, so that core.settings can check MODEL_NAME,
MODEL_NAMES and MODEL_VERSION before numpy is imported (the trainer pins
numpy's BLAS threads from a setting, which only works before that import).
"""

from __future__ import annotations

import re

# fullmatch, not match with `$`: `$` also matches before a final newline ("2\n").
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")


def check_name(name: str) -> str:
    """Model names become path components, so only a safe alphabet is allowed."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.'")
    return name


def parse_version(text: str | int) -> int:
    """A version is a positive integer; anything else (e.g. '../x') is refused."""
    s = str(text)
    if not VERSION_RE.fullmatch(s):
        raise ValueError(f"invalid version {text!r}: expected a positive integer")
    return int(s)
