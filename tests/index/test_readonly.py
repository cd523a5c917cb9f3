"""Read-only serving: search, ``index stats``, ``verify`` and ``failures`` create and change nothing in the
index folder, and work on a folder the searching user cannot write (``chmod -R a-w``)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
from sqlalchemy import delete
from sqlalchemy.exc import DBAPIError, OperationalError

import cli
from cxr_search.errors import SearchIndexError
from index import engines
from index.index_dir import IndexDir
from index.store import Failure, Meta, Store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

READERS = (
    ["index", "stats", "{i}", "--json"],
    ["index", "verify", "{i}", "--json"],
    ["index", "failures", "{i}", "--json"],
    ["search", "text", "right pleural effusion", "-i", "{i}", "-m", "tiny", "-k", "3", "--json"],
)


def _snapshot(folder: Path) -> Dict[str, Tuple[int, int, str]]:
    """name -> (size, mtime in ns, SHA-256) of every file in the folder."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


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
    before = _snapshot(index_copy)
    assert not any(name.endswith(("-wal", "-shm")) for name in before)
    _run_readers(index_copy, capsys)
    assert _snapshot(index_copy) == before  # no file created, changed or touched; no -wal / -shm left


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
    before = _snapshot(index_copy)
    _run_readers(index_copy, capsys)
    assert _snapshot(index_copy) == before
    assert opened and all(u.endswith("?mode=ro&immutable=1") for u in opened)


def test_a_missing_store_is_not_created(index_copy: Path) -> None:
    (index_copy / "store.sqlite").unlink()
    with pytest.raises(SearchIndexError, match="store is missing"):
        IndexDir.open(index_copy, readonly=True)
    assert not (index_copy / "store.sqlite").exists()


@pytest.fixture
def nobody_index(small_index: Tuple[Path, Path]) -> Iterator[Path]:
    """A copy of the index owned by ``nobody`` and made read-only (``chmod -R a-w``), in a folder that
    ``nobody`` can reach (pytest's own temporary folders are private to root); removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the copy to another user (the read-only case then runs as that user)")
    base = Path(tempfile.mkdtemp(prefix="cxr-ro-"))
    try:
        base.chmod(0o755)
        index = base / "index"
        shutil.copytree(small_index[1], index)
        user = pwd.getpwnam("nobody")
        for p in [index, *index.iterdir()]:
            os.chown(p, user.pw_uid, user.pw_gid)
        subprocess.run(["chmod", "-R", "a-w", str(index)], check=True)
        yield index
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def _as_nobody(argvs: List[List[str]], timeout_s: float = 180) -> List[Tuple[int, str, str]]:
    """(exit code, stdout, stderr) of ``cli.main(argv)`` for each argv, run in a child process as ``nobody``.

    The child is forked from this process and drops root with ``setuid`` (the interpreter may live under
    ``/root``, which ``nobody`` cannot enter, so it cannot be started as ``nobody``); every module the
    commands need is imported by the caller first. The child is killed by its PID after ``timeout_s``.
    """
    user = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            import torch

            torch.set_num_threads(1)  # the parent's OpenMP thread pool does not survive fork(): no parallel region
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            results = []
            for argv in argvs:
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    rc = cli.main(argv)
                results.append((rc, out.getvalue(), err.getvalue()))
            os.write(w, json.dumps(results).encode())
            code = 0
        except BaseException:
            os.write(w, json.dumps([(-1, "", traceback.format_exc())]).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks: List[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], 1.0)
            if ready:
                data = os.read(r, 1 << 16)
                if not data:
                    break
                chunks.append(data)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the reader run as nobody did not finish in {timeout_s} s")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return [tuple(x) for x in json.loads(b"".join(chunks))]


def test_readers_work_on_a_read_only_folder_as_another_user(nobody_index: Path, index_copy: Path, capsys) -> None:
    index = nobody_index
    before = _snapshot(index)
    _run_readers(index_copy, capsys)  # every module the commands import is loaded before the fork
    argvs = [[a.format(i=index) for a in argv] for argv in READERS]
    # A writer as that user is refused with the reason, not a traceback.
    argvs.append(["index", "remove", str(index), "--study", "1.2"])
    results = _as_nobody(argvs)
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
    assert _snapshot(index) == before
