"""One writer at a time per index folder: the lock that ``index build``, ``add`` and ``remove`` hold.

Two writers on one index would collide (the same pending rows embedded twice, FAISS files written
over each other), so every writer holds this lock for its whole run, and a second writer waits for
it (``--wait SECONDS``) or is turned away at once with :class:`IndexLockedError` (exit code 7) and a
message naming the holder: command, process id, host, user and since when. Searches, ``index stats``,
``index verify`` and ``index failures`` never take it: they read while a writer works.

Mechanism: an OS lock (``flock``) on ``INDEX_DIR/writer.lock``. The kernel releases it when its process
ends in any way, ``kill -9`` and power loss included, so a lock can never be left stale: the lock of a
killed writer is simply free, and the next writer takes it over (and says whose run ended without
releasing it). The same file holds a JSON line per holder for the messages; that record only informs,
it is never the lock itself, so a stale record cannot block anyone.

What it covers: the index folder. Processes that write one store through the same folder (a local
folder, or one shared over NFS, where Linux implements ``flock`` with byte-range locks that the NFS
server arbitrates) take turns. Two *different* index folders given the same PostgreSQL store (``--db``)
are not serialised by it: give each index its own database. Sharded embedding runs (``--shard K/N``)
write disjoint rows and are meant to run at the same time: they take the lock *shared*, so they exclude
``build``, ``add`` and ``remove`` but not each other.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from cxr_search.errors import SearchIndexError

logger = logging.getLogger(__name__)

LOCK_FILE = "writer.lock"
_POLL_S = 0.25

try:  # POSIX: flock, per open file description, released by the kernel with the process
    import fcntl

    def _try_lock(fd: int, shared: bool) -> bool:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # pragma: no cover - Windows: one exclusive byte lock (shard runs take turns there)
    import msvcrt

    def _try_lock(fd: int, shared: bool) -> bool:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class IndexLockedError(SearchIndexError):
    """Another writer holds the index's writer lock (exit code 7, as every index error)."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) the lock: what the record in ``writer.lock`` says."""

    command: str
    pid: int
    host: str
    user: str
    since: str
    shared: bool = False

    def describe(self) -> str:
        """``index add (pid 123 on host h, user u, since 2026-01-01T02:00:00Z)``."""
        return f"{self.command} (pid {self.pid} on host {self.host}, user {self.user}, since {self.since})"

    def alive(self) -> Optional[bool]:
        """Whether the process still runs: known only on this host (None elsewhere)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, under another user
            return True
        return True


def _me(command: str, shared: bool) -> Holder:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers): the uid is still a name to go by
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    since = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Holder(command=command, pid=os.getpid(), host=socket.gethostname(), user=user, since=since, shared=shared)


def read_holders(root: Union[str, Path]) -> List[Holder]:
    """The holder records in ``root/writer.lock`` (empty when none; unreadable lines are ignored)."""
    try:
        text = (Path(root) / LOCK_FILE).read_text(encoding="utf-8")
    except OSError:
        return []
    out: List[Holder] = []
    for line in text.splitlines():
        try:
            d = json.loads(line)
            out.append(Holder(command=str(d["command"]), pid=int(d["pid"]), host=str(d["host"]),
                              user=str(d["user"]), since=str(d["since"]), shared=bool(d.get("shared"))))
        except (ValueError, KeyError, TypeError):
            continue  # a record being written at this very moment
    return out


def _locked_message(root: Path, holders: List[Holder], waited: float) -> str:
    live = [h for h in holders if h.alive() is not False]
    if live:
        who = "; ".join(h.describe() for h in live)
    else:  # the holder took the lock an instant ago and has not written its record yet
        who = "a writer that has not identified itself yet"
    waited_txt = f" (waited {waited:g} s)" if waited > 0 else ""
    return (f"{root}: the index is being changed by another writer{waited_txt}: {who}. Writers (index build, "
            "add, remove) take turns; searches are not affected. Run again when it has finished, or add "
            "--wait SECONDS to wait for it. A holder that was killed releases the lock with its process: "
            "if it no longer runs, just run again.")


#: (lock file, thread) -> held lock: a writer that already holds the lock may enter it again.
_HELD: Dict[Tuple[str, int], "WriterLock"] = {}
_HELD_GUARD = threading.Lock()


class WriterLock:
    """The writer lock of one index folder (a context manager; re-entrant within one thread).

    Args:
        root: The index folder (must exist).
        command: What the holder runs, for other writers' messages (e.g. ``"index add"``).
        shared: Take it shared (sharded embedding runs, which may run side by side).
        wait: Seconds to wait for a busy lock before giving up (0: fail at once).
        say: Where the one "waiting for ..." message goes (default: a logged warning).
    """

    def __init__(self, root: Union[str, Path], command: str, *, shared: bool = False, wait: float = 0.0,
                 say: Optional[Callable[[str], None]] = None) -> None:
        if wait < 0:
            raise ValueError("wait must be >= 0 seconds")
        self.root = Path(root).expanduser()
        self.path = self.root / LOCK_FILE
        self.command = command
        self.shared = shared
        self.wait = float(wait)
        self.say = say or logger.warning
        #: The record of a writer that ended without releasing the lock (killed), when taken over from one.
        self.took_over: Optional[Holder] = None
        self._fd: Optional[int] = None
        self._outer: Optional[WriterLock] = None
        self._depth = 0

    # ------------------------------------------------------------------------------ acquire / release
    def acquire(self) -> "WriterLock":
        """Take the lock, waiting up to ``wait`` seconds.

        Raises:
            IndexLockedError: Another writer holds it (the message names it and says what to do).
            SearchIndexError: The folder is missing or the lock file cannot be created (read-only folder).
        """
        key = (str(self.path.resolve()), threading.get_ident())
        with _HELD_GUARD:
            outer = _HELD.get(key)
        if outer is not None:  # this thread already holds it: a nested writer (the CLI around build())
            if outer.shared and not self.shared:
                raise IndexLockedError(f"{self.root}: {self.command} needs the writer lock alone, but this "
                                       f"process holds it shared ({outer.command})")
            self._outer = outer
            outer._depth += 1
            return self
        if not self.root.is_dir():
            raise SearchIndexError(f"{self.root}: no such index folder")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SearchIndexError(
                f"{self.path}: cannot take the writer lock ({exc.strerror}); writers (index build, add, remove) "
                "need write access to the index folder (searches, stats and verify do not)") from exc
        try:
            self._wait_for(fd)
            self._record(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._depth = 1
        with _HELD_GUARD:
            _HELD[key] = self
        return self

    def _wait_for(self, fd: int) -> None:
        start = time.monotonic()
        announced = False
        while not _try_lock(fd, self.shared):
            waited = time.monotonic() - start
            if waited >= self.wait:
                raise IndexLockedError(_locked_message(self.root, read_holders(self.root), round(waited, 1)))
            if not announced:
                holders = [h for h in read_holders(self.root) if h.alive() is not False]
                who = "; ".join(h.describe() for h in holders) or "another writer"
                self.say(f"{self.root}: waiting up to {self.wait:g} s for the writer lock held by {who}")
                announced = True
            time.sleep(min(_POLL_S, max(self.wait - waited, 0.01)))

    def _record(self, fd: int) -> None:
        me = _me(self.command, self.shared)
        line = (json.dumps(asdict(me), sort_keys=True) + "\n").encode("utf-8")
        if self.shared:
            # Shard runs add their line; lines of finished ones are told apart by their dead pids.
            afd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(afd, line)
            finally:
                os.close(afd)  # flock belongs to fd's open file description: closing afd keeps it
            return
        left = [h for h in read_holders(self.root) if not h.shared]
        if left:  # an exclusive holder that never released: its process ended (kill -9, crash, power loss)
            self.took_over = left[-1]
            logger.warning("%s: taking over the writer lock of %s, which ended without releasing it "
                           "(killed?); its work is resumed by this run", self.root, left[-1].describe())
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)
        try:
            os.fsync(fd)
        except OSError:  # some file systems cannot fsync; the record only informs
            pass

    def release(self) -> None:
        """Release the lock (the outermost holder of this thread releases it for real)."""
        if self._outer is not None:
            self._outer._depth -= 1
            self._outer = None
            return
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fd, self._fd = self._fd, None
        with _HELD_GUARD:
            _HELD.pop((str(self.path.resolve()), threading.get_ident()), None)
        try:
            # Clear the record so that the next writer does not think this one was killed. A shared
            # holder clears it only when it is the last one (it can then have the lock alone).
            if not self.shared or _try_lock(fd, False):
                os.ftruncate(fd, 0)
            _unlock(fd)
        except OSError as exc:  # the lock goes with the descriptor anyway
            logger.debug("releasing %s: %s", self.path, exc)
        finally:
            os.close(fd)

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def writer_lock(root: Union[str, Path], command: str, *, shared: bool = False, wait: float = 0.0,
                say: Optional[Callable[[str], None]] = None) -> WriterLock:
    """The writer lock of ``root`` as a context manager: ``with writer_lock(root, "index add"): ...``.

    See :class:`WriterLock` for the arguments and the errors raised on entering.
    """
    return WriterLock(root, command, shared=shared, wait=wait, say=say)


__all__ = ["Holder", "IndexLockedError", "LOCK_FILE", "WriterLock", "read_holders", "writer_lock"]
