"""The writer lock: one writer at a time per index, a busy index named in the error (exit 7), ``--wait``,
the lock of a ``kill -9``-ed writer taken over, shard runs side by side, searches never blocked."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

import cli
from cxr_search.synth import synthesize
from index.lock import LOCK_FILE, IndexLockedError, read_holders, writer_lock
from index.verify import verify

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# Holds the lock until its stdin is closed (or it is killed), after printing "held".
_HOLDER = """
import sys
from index.lock import writer_lock
with writer_lock(sys.argv[1], sys.argv[2], shared=sys.argv[3] == "shared"):
    print("held", flush=True)
    sys.stdin.read()
"""


def _start_holder(root: Path, command: str = "index build", shared: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root), command, "shared" if shared else "exclusive"],
                            cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready and proc.stdout.readline().strip() == "held", proc.stderr.read() if proc.poll() is not None else ""
    return proc


@pytest.fixture
def holders() -> Iterator[List[subprocess.Popen]]:
    """Holder processes a test starts; any still running at the end are killed by their PID."""
    procs: List[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


@pytest.fixture
def index_copy(small_index: Tuple[Path, Path], tmp_path: Path) -> Tuple[Path, Path]:
    archive, index = small_index
    shutil.copytree(index, tmp_path / "index")
    return archive, tmp_path / "index"


def test_second_writer_fails_at_once_naming_the_holder(index_copy, holders, capsys) -> None:
    archive, index = index_copy
    holder = _start_holder(index, "index build")
    holders.append(holder)
    t0 = time.monotonic()
    rc = cli.main(["index", "add", str(archive), "-i", str(index), "--json"])
    err = capsys.readouterr().err
    assert rc == 7
    assert time.monotonic() - t0 < 30  # refused before any model is loaded or file read
    assert f"pid {holder.pid}" in err and "index build" in err and "--wait" in err
    assert cli.main(["index", "remove", str(index), "--study", "1.2.3.4"]) == 7
    # Readers are never blocked by a writer.
    assert cli.main(["index", "stats", str(index), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert [w["pid"] for w in stats["writers"]] == [holder.pid]
    holder.stdin.close()
    holder.wait(timeout=30)
    assert cli.main(["index", "remove", str(index), "--study", "1.2.3.4"]) == 0
    assert read_holders(index) == []  # released cleanly: no record left to mistake for a killed writer



def test_a_new_index_being_created_is_not_taken_for_other_files(tmp_path: Path, holders, capsys) -> None:
    """A second writer on a new folder that the first is still creating is told about the writer, not "not empty"."""
    archive = tmp_path / "archive"
    synthesize(archive, studies=1, seed=3, layout="pacs", broken=0, image_size=32)
    root = tmp_path / "new"
    root.mkdir()
    holder = _start_holder(root, "index build")
    holders.append(holder)
    (root / "images.faiss").write_bytes(b"half written")  # the first writer's files, before its index.json
    rc = cli.main(["index", "build", str(archive), "-m", "tiny", "-i", str(root)])
    err = capsys.readouterr().err
    assert rc == 7 and "being changed by another writer" in err and f"pid {holder.pid}" in err
    assert "not empty" not in err
    holder.kill()  # killed before it wrote index.json: what it left is not an index
    holder.wait(timeout=30)
    assert cli.main(["index", "build", str(archive), "-m", "tiny", "-i", str(root)]) == 7
    assert "folder is not empty and holds no index" in capsys.readouterr().err

def test_wait_takes_the_lock_once_the_holder_is_done(tmp_path: Path, holders) -> None:
    holder = _start_holder(tmp_path, "index add")
    holders.append(holder)
    threading.Timer(1.5, holder.stdin.close).start()
    said: List[str] = []
    t0 = time.monotonic()
    with writer_lock(tmp_path, "index remove", wait=60, say=said.append) as lock:
        waited = time.monotonic() - t0
        assert lock.took_over is None  # released, not killed
        assert [h.pid for h in read_holders(tmp_path)] == [os.getpid()]
    assert waited >= 1.0
    assert len(said) == 1 and f"pid {holder.pid}" in said[0] and "index add" in said[0]


def test_wait_gives_up_with_the_holder_named(tmp_path: Path, holders) -> None:
    holder = _start_holder(tmp_path, "index add")
    holders.append(holder)
    t0 = time.monotonic()
    with pytest.raises(IndexLockedError, match=f"pid {holder.pid}") as exc:
        writer_lock(tmp_path, "index remove", wait=1.0, say=lambda _msg: None).acquire()
    assert 1.0 <= time.monotonic() - t0 < 20
    assert exc.value.exit_code == 7


def test_lock_of_a_killed_writer_is_taken_over(index_copy, holders, capsys) -> None:
    _, index = index_copy
    holder = _start_holder(index, "index add")
    holders.append(holder)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert [h.pid for h in read_holders(index)] == [holder.pid]  # its record is left behind ...
    with writer_lock(index, "index remove") as lock:  # ... but the kernel released its lock
        assert lock.took_over is not None and lock.took_over.pid == holder.pid
    # The CLI's writers go on as well, and the index is intact.
    assert cli.main(["index", "remove", str(index), "--study", "1.2.3.4"]) == 0
    assert verify(index)["ok"]


def test_shard_runs_share_the_lock_and_exclude_other_writers(tmp_path: Path, holders) -> None:
    holders.append(_start_holder(tmp_path, "index build --shard", shared=True))
    with writer_lock(tmp_path, "index build --shard", shared=True):
        with pytest.raises(IndexLockedError, match="index build --shard"):
            writer_lock(tmp_path, "index add").acquire()
    with pytest.raises(IndexLockedError):
        writer_lock(tmp_path, "index add").acquire()


def test_lock_is_reentrant_in_one_thread_and_exclusive_across_threads(tmp_path: Path) -> None:
    errors: List[BaseException] = []

    def other_thread() -> None:
        try:
            writer_lock(tmp_path, "other").acquire()
        except IndexLockedError as exc:
            errors.append(exc)

    with writer_lock(tmp_path, "outer"):
        with writer_lock(tmp_path, "inner"):  # e.g. the CLI around build(): no self-deadlock
            pass
        t = threading.Thread(target=other_thread)
        t.start()
        t.join(timeout=30)
        assert len(errors) == 1
    with writer_lock(tmp_path, "after"):  # released by the outermost holder only, and then really
        pass
    assert (tmp_path / LOCK_FILE).read_text() == ""


@pytest.mark.slow
def test_two_concurrent_index_add_processes(index_copy, tmp_path: Path) -> None:
    """Two `index add` runs at once: the second is turned away with exit 7 (or waits with --wait); the
    index ends complete and consistent, each new image indexed once."""
    archive, index = index_copy
    extra = tmp_path / "extra"
    summary = synthesize(extra, studies=3, seed=99, layout="pacs", broken=0, image_size=64)
    before = json.loads(subprocess.run([sys.executable, "-m", "cli", "index", "stats", str(index), "--json"],
                                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120).stdout)
    add = [sys.executable, "-m", "cli", "index", "add", str(extra), "-i", str(index), "--reports",
           str(extra / "reports.csv"), "--json"]
    first = subprocess.Popen(add, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiting = None
    try:
        deadline = time.monotonic() + 120
        while first.pid not in [h.pid for h in read_holders(index)] and first.poll() is None:
            assert time.monotonic() < deadline, "the first add never took the lock"
            time.sleep(0.05)
        waiting = subprocess.Popen(add + ["--wait", "300"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        second = subprocess.run(add, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        out1, err1 = first.communicate(timeout=600)
        out3, err3 = waiting.communicate(timeout=600)
    finally:
        for p in (first, waiting):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    assert first.returncode == 0, err1[-2000:]
    if second.returncode == 7:
        assert f"pid {first.pid}" in second.stderr and "index add" in second.stderr
    else:  # it can only have run after the first had finished
        assert second.returncode == 0, second.stderr[-2000:]
    assert waiting.returncode == 0, err3[-2000:]
    s1, s3 = json.loads(out1), json.loads(out3)
    assert s1["added"]["images"] == summary.images
    assert s3["added"]["images"] == 0 and s3["totals"] == s1["totals"]
    assert s1["totals"]["images"] == before["totals"]["images"] + summary.images
    report = verify(index)
    assert report["ok"], report["problems"]
