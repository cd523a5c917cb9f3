"""Helpers of the engine tests: ground truth, archive and index copies, and the store backends to test.

The fixtures (the synthetic PACS export and the tiny model) are in ``tests/index/conftest.py``.

The store-backed tests run on SQLite and on PostgreSQL: a server the tests start themselves
(``tests/helpers/postgres.py``; skipped without Debian's ``postgresql``, a failure in CI), or the one
``CXR_SEARCH_TEST_DB_URL`` names. Each test gets its own database.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from tests.helpers.postgres import new_database

DB_PARAMS = ["sqlite", "postgresql"]


def ground_truth(root: Path) -> List[Dict[str, str]]:
    """Rows of the archive's ``ground_truth.csv``."""
    with open(root / "ground_truth.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def db_url_for(param: str, template: Optional[str] = None) -> Optional[str]:
    """None (the index folder's own SQLite file) or a new PostgreSQL database (copied from ``template``)."""
    return new_database(template) if param == "postgresql" else None


def copy_index(src: Path, dst: Path, db_url: Optional[str]) -> Optional[str]:
    """Copy an index folder; with an external store, copy its database too. Returns the copy's URL."""
    shutil.copytree(src, dst)
    if db_url is None:
        return None
    from index.store import Store

    Store(db_url).close()  # no open connections may remain on a template database
    import gc

    gc.collect()
    return new_database(db_url)


def copy_archive(src: Path, dst: Path, keep: Optional[set] = None) -> Path:
    """Copy an archive, optionally only the files whose relative path is in ``keep`` (plus reports.csv)."""
    for p in sorted(src.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(src).as_posix()
        if keep is not None and rel not in keep and rel != "reports.csv":
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst / rel)
    return dst


def store_dump(index_dir: Path, db_url: Optional[str] = None, *, readonly: bool = False) -> bytes:
    """Every row of every table as text (any backend), plus the raw bytes of the SQLite files when local (free
    pages and write-ahead log included): what a search for a name, id or path in the store must not find.

    Args:
        readonly: Open the index for reading only (the files are then read exactly as a writer left them).
    """
    from sqlalchemy import text

    from index.index_dir import IndexDir
    from index.store import Base

    idx = IndexDir.open(index_dir, db_url=db_url, readonly=readonly)
    parts: List[str] = []
    try:
        with idx.store.engine.connect() as con:
            for table in Base.metadata.sorted_tables:
                parts.extend(repr(tuple(r)) for r in con.execute(text(f"SELECT * FROM {table.name}")))
    finally:
        idx.close()
    return "\n".join(parts).encode() + b"".join(p.read_bytes() for p in sorted(Path(index_dir).glob("store.sqlite*")))
