"""Read-only serving: search, ``index stats``, ``verify`` and ``failures`` create and change nothing in the
index folder, and work on a folder the searching user cannot write (``chmod -R a-w``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator, Tuple

import pytest
from sqlalchemy import delete
from sqlalchemy.exc import DBAPIError, OperationalError

import cli
from cxr_search.errors import SearchIndexError
from index import engines
from index.index_dir import IndexDir
from index.store import Failure, Meta, Store
from tests.helpers.as_user import cli_as_nobody, folder_snapshot, nobody_read_only_copy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

READERS = (
    ["index", "stats", "{i}", "--json"],
    ["index", "verify", "{i}", "--json"],
    ["index", "failures", "{i}", "--json"],
    ["search", "text", "right pleural effusion", "-i", "{i}", "-m", "tiny", "-k", "3", "--json"],
)


@pytest.fixture
def index_copy(small_index: Tuple[Path, Path], tmp_path: Path) -> Path:
    shutil.copytree(small_index[1], tmp_path / "index")
    return tmp_path / "index"


def _run_readers(index: Path, capsys) -> None:
    for argv in READERS:
        rc = cli.main([a.format(i=index) for a in argv])
        out = capsys.readouterr().out
        assert rc == 0, argv
        json.loads(out)


def test_readers_leave_the_folder_as_they_found_it(index_copy: Path, capsys) -> None:
    before = folder_snapshot(index_copy)
    assert not any(name.endswith(("-wal", "-shm")) for name in before)
    _run_readers(index_copy, capsys)
    assert folder_snapshot(index_copy) == before  # no file created, changed or touched; no -wal / -shm left


def test_a_reader_store_refuses_writes(index_copy: Path) -> None:
    idx = IndexDir.open(index_copy, readonly=True)
    try:
        with pytest.raises(OperationalError, match="readonly"):
            with idx.store.session() as s:
                s.execute(delete(Failure))
    finally:
        idx.close()


def test_reader_stores_refuse_writes_on_every_backend(store_url: str) -> None:
    Store(store_url, create=True).close()
    reader = Store(store_url, readonly=True)
    try:
        with pytest.raises(DBAPIError, match="(?i)read-?only"):
            with reader.session() as s:
                s.add(Meta(key="written", value="by a reader"))
        assert reader.counts()["images"] == 0  # and it reads
    finally:
        reader.close()


def test_immutable_mode_when_the_folder_is_not_writable(index_copy: Path, capsys,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, chmod does not stop writes: the not-writable case is taken by telling the opener so."""
    monkeypatch.setattr(engines, "writable", lambda _path: False)
    opened = []
    real_connect = engines.sqlite3.connect
    monkeypatch.setattr(engines.sqlite3, "connect", lambda db, *a, **kw: opened.append(db) or real_connect(db, *a, **kw))
    before = folder_snapshot(index_copy)
    _run_readers(index_copy, capsys)
    assert folder_snapshot(index_copy) == before
    assert opened and all(u.endswith("?mode=ro&immutable=1") for u in opened)


def test_a_missing_store_is_not_created(index_copy: Path) -> None:
    (index_copy / "store.sqlite").unlink()
    with pytest.raises(SearchIndexError, match="store is missing"):
        IndexDir.open(index_copy, readonly=True)
    assert not (index_copy / "store.sqlite").exists()


@pytest.fixture
def nobody_index(small_index: Tuple[Path, Path]) -> Iterator[Path]:
    """A read-only copy of the index owned by ``nobody`` (:func:`tests.helpers.as_user.nobody_read_only_copy`)."""
    with nobody_read_only_copy(small_index[1]) as index:
        yield index


def test_readers_work_on_a_read_only_folder_as_another_user(nobody_index: Path, index_copy: Path, capsys) -> None:
    index = nobody_index
    before = folder_snapshot(index)
    _run_readers(index_copy, capsys)  # every module the commands import is loaded before the fork
    argvs = [[a.format(i=index) for a in argv] for argv in READERS]
    # A writer as that user is refused with the reason, not a traceback.
    argvs.append(["index", "remove", str(index), "--study", "1.2"])
    results = cli_as_nobody(argvs)
    assert len(results) == len(argvs), results
    for argv, (rc, out, err) in zip(argvs[:-1], results[:-1], strict=True):
        if argv[:2] == ["index", "verify"]:
            # The archive lies in root's private temporary folder: nobody cannot read the image files, and
            # verify says exactly that (exit 1); the store and FAISS checks themselves ran.
            report = json.loads(out)
            assert rc == 1 and {p["problem"] for p in report["problems"]} == {"file missing or unreadable"}, err
            assert report["checked"]["image"]["store"] == report["checked"]["image"]["faiss"] > 0
            continue
        assert rc == 0, (argv, err[-2000:])
        json.loads(out)
    rc, _, err = results[-1]
    assert rc == 7 and "writer lock" in err and "write access" in err, err[-2000:]
    assert folder_snapshot(index) == before
