"""Atomic file writes (a reader, or a run killed mid-write, never sees a half-written file) and the
JSON every command prints with ``--json``."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Union


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """Write ``text`` through a temporary file in the same folder, fsync it, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Union[str, Path], data: Any, **dumps_kwargs: Any) -> None:
    """Write ``data`` as indented JSON (plus a newline) with :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(data, indent=2, **dumps_kwargs) + "\n")


def emit_json(data: Any) -> None:
    """Write ``data`` as indented JSON on stdout: the ``--json`` output of every CLI command.

    Values JSON cannot encode (paths, dates) are written as their ``str``.
    """
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


__all__ = ["emit_json", "write_json_atomic", "write_text_atomic"]
