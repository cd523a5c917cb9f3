"""The append-only audit log: who searched what, and which studies and images they looked at.

One row per request in the table ``serve_audit`` of an SQL database: ``time`` (UTC, ISO-8601),
``user`` (the token's name), ``client`` (address), ``action`` (``search.text``, ``search.image``,
``study.view``, ``image.thumbnail``, ``image.preview``, ``auth.denied``...), ``query`` (the text, or the
uploaded image's SHA-256 and type; never the image), ``ids`` (what was returned or viewed), ``status``
and the index ``generation``.

Where: by default a SQLite file ``STATE_DIR/audit.sqlite`` (mode 0600); ``--audit-db URL`` puts it in
another database, e.g. the PostgreSQL database that holds the index's store. It is not a table of the
index's own store because that store may be read-only (a read-only deployment) and must keep no trace
of a patient removed by ``index remove`` (issue 18), while the audit trail of who looked at that
patient's images must survive the removal.

Append-only is enforced by the database, not only by this code: triggers refuse every UPDATE and
DELETE (and TRUNCATE on PostgreSQL). A database owner can still drop the triggers; give the server's
database role INSERT and SELECT only where that matters. Every row is committed (SQLite: full sync)
before the request is answered: no unaudited answers.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from cxr_search.errors import ConfigError
from index.engines import sqlite_file
from index.store import safe_url

TABLE = "serve_audit"
_metadata = MetaData()
audit_table = Table(
    TABLE, _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", String(40), nullable=False, index=True),
    Column("user", String(200), nullable=False),
    Column("client", String(200), nullable=False),
    Column("action", String(60), nullable=False),
    Column("query", Text),
    Column("ids", Text, nullable=False),
    Column("status", Integer, nullable=False),
    Column("generation", String(100)),
)

_REFUSAL = "the audit log is append-only"
_SQLITE_TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS {TABLE}_no_{op.lower()} BEFORE {op} ON {TABLE} "
    f"BEGIN SELECT RAISE(ABORT, '{_REFUSAL}'); END"
    for op in ("UPDATE", "DELETE")
]
_PG_TRIGGERS = [
    f"CREATE OR REPLACE FUNCTION {TABLE}_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    f"$$ BEGIN RAISE EXCEPTION '{_REFUSAL}'; END $$",
    f"CREATE OR REPLACE TRIGGER {TABLE}_no_change BEFORE UPDATE OR DELETE ON {TABLE} "
    f"FOR EACH ROW EXECUTE FUNCTION {TABLE}_append_only()",
    f"CREATE OR REPLACE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE} "
    f"FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_append_only()",
]


def utc_now() -> str:
    """ISO-8601 UTC time with microseconds (sorts as text)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def default_audit_url(state_dir: Path) -> str:
    """``sqlite:///STATE_DIR/audit.sqlite``: the audit database unless ``--audit-db`` names another."""
    return f"sqlite:///{(Path(state_dir).expanduser() / 'audit.sqlite').resolve()}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")  # several worker processes append to one file: wait, never fail
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut, not only a crash
    cur.close()


class AuditLog:
    """Append and read the audit log.

    Args:
        url: SQLAlchemy URL of the audit database (see :func:`default_audit_url`).
        create: Create the database (a SQLite file, mode 0600) and the table when missing. Readers pass
            False: a log that does not exist yet reads as empty and nothing is created.

    Raises:
        ConfigError: The database cannot be opened or prepared (the message names it, without password).
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._engine: Optional[Engine] = None
        path = sqlite_file(url)
        if path is not None and not path.is_file():
            if not create:
                return  # nothing audited yet
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # SQLite gives its -wal/-shm the same mode
            except OSError as exc:
                raise ConfigError(f"{path}: cannot create the audit log ({exc.strerror}); give a writable "
                                  "--state-dir or --audit-db") from exc
        try:
            engine = create_engine(url, future=True)
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", _sqlite_pragmas)
            if create:
                self._prepare(engine)
            elif not inspect(engine).has_table(TABLE):
                engine.dispose()
                return  # nothing audited yet
        except SQLAlchemyError as exc:
            raise ConfigError(f"{safe_url(url)}: cannot open the audit log: {exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0]}; give a writable database with --audit-db") from exc
        self._engine = engine

    @staticmethod
    def _prepare(engine: Engine) -> None:
        # Several worker processes start together: the table and its triggers are created idempotently,
        # and a race lost to another process is simply tried again.
        triggers = _PG_TRIGGERS if engine.dialect.name == "postgresql" else _SQLITE_TRIGGERS
        for attempt in range(5):
            try:
                with engine.begin() as conn:
                    if engine.dialect.name == "postgresql":  # one process at a time creates the schema
                        conn.execute(text("SELECT pg_advisory_xact_lock(7391255)"))
                    _metadata.create_all(conn)
                    for statement in triggers:
                        conn.execute(text(statement))
                return
            except SQLAlchemyError:
                if attempt == 4:
                    raise

    def record(self, *, user: str, client: str, action: str, query: Any = None, ids: Sequence[Any] = (),
               status: int = 200, generation: Optional[str] = None) -> None:
        """Append one row, committed before this returns (a search is not answered before it is audited).

        Raises:
            SQLAlchemyError: The row could not be written (the request then fails: no unaudited answers).
        """
        if self._engine is None:
            raise ConfigError(f"{safe_url(self.url)}: the audit log was opened for reading only")
        row = {"time": utc_now(), "user": user, "client": client, "action": action,
               "query": None if query is None else json.dumps(query, ensure_ascii=False, default=str),
               "ids": json.dumps(list(ids), default=str), "status": int(status), "generation": generation}
        with self._lock, self._engine.begin() as conn:
            conn.execute(insert(audit_table).values(**row))

    def _select(self, *, since: Optional[str], newest: Optional[int]) -> List[Dict[str, Any]]:
        if self._engine is None:
            return []
        q = select(audit_table)
        if since is not None:
            q = q.where(audit_table.c.time >= since)
        if newest is not None:
            q = q.order_by(audit_table.c.id.desc()).limit(newest)
        else:
            q = q.order_by(audit_table.c.id)
        with self._engine.connect() as conn:
            rows = [self._as_dict(r._mapping) for r in conn.execute(q)]
        return rows[::-1] if newest is not None else rows

    @staticmethod
    def _as_dict(m: Any) -> Dict[str, Any]:
        return {"time": m["time"], "user": m["user"], "client": m["client"], "action": m["action"],
                "query": None if m["query"] is None else json.loads(m["query"]), "ids": json.loads(m["ids"]),
                "status": m["status"], "generation": m["generation"]}

    def rows(self, *, since: Optional[str] = None) -> Iterator[Dict[str, Any]]:
        """Rows in the order they were written; those at or after ``since`` (an ISO date or time, UTC) when given."""
        yield from self._select(since=since, newest=None)

    def tail(self, n: int = 100, *, since: Optional[str] = None) -> List[Dict[str, Any]]:
        """The last ``n`` rows (at or after ``since`` when given), oldest first."""
        return self._select(since=since, newest=n)

    def close(self) -> None:
        """Release the database connections."""
        if self._engine is not None:
            self._engine.dispose()


__all__ = ["TABLE", "AuditLog", "audit_table", "default_audit_url", "utc_now"]
