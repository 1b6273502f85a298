"""Output paths checked before long work starts, so a run does not fail after hours of training
(or a full evaluation) because it cannot write its result."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_output_dir(path: str | Path, option: str) -> Path:
    """``path`` as a directory this process can write into, created if missing; otherwise a
    one-line SystemExit naming ``option`` (the command-line argument) and the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"error: {option} {path} is a file; expected a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Permission bits do not tell the whole story (read-only mounts, ACLs, root): try a write.
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise SystemExit(f"error: {option} {path} is not a writable directory ({err.strerror or err})") from None
    return path


def check_output_file(path: str | Path, option: str) -> Path:
    """``path`` as a file this process can create or replace (its directory is created if missing)."""
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"error: {option} {path} is a directory; expected a file name")
    check_output_dir(path.parent, f"{option} {path}: the directory")
    return path
