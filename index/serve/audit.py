"""The append-only audit log: who searched what, and which studies and images they looked at.

One JSON object per line in ``STATE_DIR/audit.jsonl`` (mode 0600): ``time`` (UTC), ``user`` (the
token's name), ``client`` (address), ``action`` (``search.text``, ``search.image``, ``study.view``,
``image.thumbnail``, ``image.preview``, ``auth.denied``...), ``query`` (the text, or the uploaded
image's SHA-256 and type; never the image), ``ids`` (what was returned or viewed), ``status`` and the
index ``generation``. Lines are written with ``O_APPEND`` under an exclusive ``flock``, so several
worker processes never interleave them. It is kept apart from the store because the index folder may
be read-only and shared, while an audit trail belongs to the server that answered.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence


def utc_now() -> str:
    """ISO-8601 UTC time with microseconds (sorts as text)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


class AuditLog:
    """Append and read the audit log.

    Args:
        path: ``audit.jsonl``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def record(self, *, user: str, client: str, action: str, query: Any = None, ids: Sequence[Any] = (),
               status: int = 200, generation: Optional[str] = None) -> None:
        """Append one row (durably: a search is not answered before its audit row is written).

        Raises:
            OSError: The log cannot be written (the request then fails: no unaudited answers).
        """
        row = {"time": utc_now(), "user": user, "client": client, "action": action, "query": query,
               "ids": list(ids), "status": status, "generation": generation}
        line = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)  # closing releases the lock

    def rows(self, *, since: Optional[str] = None) -> Iterator[Dict[str, Any]]:
        """Rows in order, those at or after ``since`` (an ISO date or time, UTC) when given."""
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by a full disk: skip it, keep the rest readable
                    continue
                if since is None or str(row.get("time", "")) >= since:
                    yield row

    def tail(self, n: int = 100) -> List[Dict[str, Any]]:
        """The last ``n`` rows."""
        out: List[Dict[str, Any]] = []
        for row in self.rows():
            out.append(row)
            if len(out) > n:
                out.pop(0)
        return out


__all__ = ["AuditLog", "utc_now"]
