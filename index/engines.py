"""SQLAlchemy engines of the store: one for writers, one for readers that creates and changes nothing.

Writers (build, add, remove) use SQLite in WAL mode: readers never block the writer, and a ``kill -9``
loses at most the open transaction. Readers (search, ``index stats``, ``verify``, ``failures``) must work
on a read-only index folder and must leave the folder exactly as they found it; :func:`reader_engine`
says how each case is opened. The schema check on top of either is :func:`index.store.open_engine`.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import QueuePool

from cxr_search.errors import SearchIndexError


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers (searches) never block the writer (ingestion) and a kill -9 loses at most the
    # open transaction; NORMAL sync is durable at every checkpoint and crash-safe in WAL mode.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_query_only(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA query_only=ON")  # a reader's connection refuses every write, whatever the caller does
    cur.close()


def sqlite_file(url: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URL (None for other backends, in-memory and URI forms)."""
    try:
        u = make_url(url)
    except Exception:  # a malformed URL fails in create_engine, with SQLAlchemy's own message
        return None
    db = u.database
    if u.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def writable(path: Path) -> bool:
    """Whether this process may write the database file and create files beside it (its journal)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def writer_engine(url: str) -> Engine:
    """The engine of a writer (SQLite: WAL journal, normal sync, foreign keys)."""
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def reader_engine(url: str) -> Engine:
    """An engine that cannot write and, once disposed, has left nothing behind where the store lies.

    - SQLite in a folder this process may write: an ordinary connection with ``PRAGMA query_only``. It
      reads next to a running writer, and the ``-wal``/``-shm`` files it shares with the writer are
      removed when the last connection closes. (A ``mode=ro`` connection there would create both files
      and leave them behind: measured with SQLite 3.40.)
    - SQLite in a folder or file this process may not write (a read-only deployment): ``mode=ro``, and
      ``immutable=1`` when there is no ``-wal`` file, so that SQLite takes no lock and needs no ``-shm``
      file. Immutable means the reader does not see later changes: a folder that is read-only to the
      searching user but written by another one (a nightly ``index add`` under the owner's account)
      must leave the searching user write access, or be searched from a snapshot.
    - Other backends: read-only transactions (``postgresql_readonly`` on PostgreSQL).

    Raises:
        SearchIndexError: A SQLite store file that does not exist (it is not created).
    """
    path = sqlite_file(url)
    if path is None:
        if url.startswith("postgresql"):
            return create_engine(url, future=True, execution_options={"postgresql_readonly": True})
        return create_engine(url, future=True)
    if not path.is_file():
        raise SearchIndexError(f"{path}: the store is missing; build the index (cxr-search index build) or give "
                               "the store it was built with (--db)")
    if writable(path):
        engine = create_engine(url, future=True)
        event.listen(engine, "connect", _sqlite_query_only)
        return engine
    wal = path.with_name(path.name + "-wal")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro" + ("" if wal.exists() else "&immutable=1")

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, check_same_thread=False)

    return create_engine("sqlite://", creator=connect, poolclass=QueuePool, future=True)


__all__ = ["reader_engine", "sqlite_file", "writable", "writer_engine"]
