"""Atomic file writes (a reader, or a run killed mid-write, never sees a half-written file) and the
JSON every command prints with ``--json``."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

#: The process umask, read once (``os.umask`` can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_write(path: Union[str, Path], mode: str = "wb", *, permissions: Optional[int] = None,
                 **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit fsync it and rename it over ``path``.

    A reader, or a run killed mid-write, sees the old file or the new one, never half of one. On an
    exception the temporary file is removed and ``path`` is left as it was.

    Args:
        path: Destination; parent folders are created.
        mode: ``"wb"`` or ``"w"`` (text; ``open_kwargs`` such as ``encoding`` and ``newline`` apply).
        permissions: Mode bits of the new file; default ``0o666`` less the umask, as ``open`` would
            give (``mkstemp`` alone makes every file 0600).
        **open_kwargs: Passed to :func:`os.fdopen`.

    Yields:
        The open file.

    Raises:
        OSError: The folder or the file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            os.fchmod(fh.fileno(), (0o666 & ~_UMASK) if permissions is None else permissions)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; some file systems cannot fsync a folder
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """Write ``text`` (UTF-8) with :func:`atomic_write`."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_json_atomic(path: Union[str, Path], data: Any, **dumps_kwargs: Any) -> None:
    """Write ``data`` as indented JSON (plus a newline) with :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(data, indent=2, **dumps_kwargs) + "\n")


def emit_json(data: Any) -> None:
    """Write ``data`` as indented JSON on stdout: the ``--json`` output of every CLI command.

    Values JSON cannot encode (paths, dates) are written as their ``str``.
    """
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


__all__ = ["atomic_write", "emit_json", "write_json_atomic", "write_text_atomic"]
