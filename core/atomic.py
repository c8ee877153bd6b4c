"""Files that survive a crash whole or not at all: the one place the project fsyncs.

A reader of the repository (every worker, every replica) must see a file's old
content or its new one, never half of it, and a power cut must not leave a
name pointing at an empty file. The recipe is the same for model versions
(core.modelstore), labels.json (core.labels) and exported corrections
(core.feedback): write a temporary file in the same folder, fsync it, rename
it over the target (atomic within one filesystem), then fsync the folder so
the rename itself is on disk.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"  # hidden, and never a valid model or version name, so no scan takes it


def write_synced(path: Path | str, data: bytes) -> None:
    """Write `data` to a new file `path` and fsync it (its folder is the caller's to fsync)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path | str) -> None:
    """Make a folder's entries (a new or renamed file in it) survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: Path | str, data: bytes | Callable[[BinaryIO], object], mode: int = 0o644) -> Path:
    """Replace `target` with `data` atomically; `data` is bytes, or a function that writes to the
    open file (np.savez_compressed, say, without building the whole archive in memory first).

    The file gets `mode` (mkstemp's 0o600 would hide it from a service running as another user).
    On any error the temporary file is removed and the target is left as it was.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target
