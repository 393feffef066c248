"""Atomic file writes: a temporary name in the same directory, flushed and fsynced, then renamed.

A crash at any moment leaves the old file or the new one under the real name, never half of one.
Used for checkpoints, the `latest` pointer, config.yaml, metrics.jsonl rewrites and the exit-status file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Any], None], before_rename: Callable[[], None] | None = None) -> None:
    """Call `write(binary_file)` on a temporary file, then rename it to `path` (`before_rename` runs
    between the two: the tests kill the process there)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
