"""Helpers of the engine tests: ground truth, archive and index copies, and the store backends to test.

The fixtures (the synthetic PACS export and the tiny model) are in ``tests/index/conftest.py``.

Set ``CXR_SEARCH_TEST_DB_URL`` (e.g. ``postgresql+psycopg://user@localhost/cxr_test``) to run the
store-backed tests against that database as well as SQLite; its tables are dropped and recreated
before each test that uses it.
"""

from __future__ import annotations

import atexit
import csv
import os
import shutil
import uuid
from pathlib import Path
from typing import Dict, List, Optional

PG_URL = os.environ.get("CXR_SEARCH_TEST_DB_URL")
DB_PARAMS = ["sqlite"] + (["external"] if PG_URL else [])


def ground_truth(root: Path) -> List[Dict[str, str]]:
    """Rows of the archive's ``ground_truth.csv``."""
    with open(root / "ground_truth.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def new_external_db(template: Optional[str] = None) -> str:
    """A new, empty database on the external server (a copy of ``template``'s database when given).

    Each test gets its own database, so tests that change an index never share a store. The user of
    ``CXR_SEARCH_TEST_DB_URL`` needs the CREATEDB privilege; the databases are dropped at exit.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    assert PG_URL
    base = make_url(PG_URL)
    name = f"{base.database}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as con:
        if template is not None:
            con.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{make_url(template).database}"'))
        else:
            con.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = base.set(database=name).render_as_string(hide_password=False)
    _CREATED.append(url)
    return url


def _drop_created() -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    if not _CREATED:
        return
    admin = create_engine(make_url(PG_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as con:
        for url in _CREATED:
            con.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


_CREATED: List[str] = []
atexit.register(_drop_created)


def db_url_for(param: str, template: Optional[str] = None) -> Optional[str]:
    """None (the index folder's own SQLite file) or a new external database (copied from ``template``)."""
    return new_external_db(template) if param == "external" else None


def copy_index(src: Path, dst: Path, db_url: Optional[str]) -> Optional[str]:
    """Copy an index folder; with an external store, copy its database too. Returns the copy's URL."""
    shutil.copytree(src, dst)
    if db_url is None:
        return None
    from index.store import Store

    Store(db_url).close()  # no open connections may remain on a template database
    import gc

    gc.collect()
    return new_external_db(db_url)


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
