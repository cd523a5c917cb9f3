"""Run code as the unprivileged user ``nobody`` (tests of read-only deployments), and make read-only copies of
an index that ``nobody`` owns. Both need root; callers skip without it."""

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
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest


def folder_snapshot(folder: Path) -> Dict[str, Tuple[int, int, str]]:
    """name -> (size, mtime in ns, SHA-256) of every file in the folder: equal snapshots, nothing written."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


@contextlib.contextmanager
def nobody_read_only_copy(src: Path, *, writable: Tuple[str, ...] = ()) -> Iterator[Path]:
    """A copy of the index folder ``src`` owned by ``nobody`` and made read-only (``chmod -R a-w``), in a folder
    that ``nobody`` can reach (pytest's own temporary folders are private to root); removed afterwards.

    Args:
        writable: Names of empty folders made beside the copy, owned by ``nobody`` and writable (a server's
            state folder, for instance); they are ``copy.parent / name``.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the copy to another user (the read-only case then runs as that user)")
    base = Path(tempfile.mkdtemp(prefix="cxr-ro-"))
    try:
        base.chmod(0o755)
        index = base / "index"
        shutil.copytree(src, index)
        user = pwd.getpwnam("nobody")
        for p in [index, *index.iterdir()]:
            os.chown(p, user.pw_uid, user.pw_gid)
        subprocess.run(["chmod", "-R", "a-w", str(index)], check=True)
        for name in writable:
            (base / name).mkdir(mode=0o700)
            os.chown(base / name, user.pw_uid, user.pw_gid)
        yield index
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(fn: Callable[[], Any], timeout_s: float = 180) -> Any:
    """The JSON-serialisable result of ``fn()`` run in a child process as ``nobody``.

    The child is forked from this process and drops root with ``setuid`` (the interpreter may live under
    ``/root``, which ``nobody`` cannot enter, so it cannot be started as ``nobody``); every module ``fn``
    needs must be imported by the caller first. The child is killed by its PID after ``timeout_s``; an
    exception in the child fails the test with the child's traceback.
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
            os.write(w, json.dumps({"result": fn()}).encode())
            code = 0
        except BaseException:
            os.write(w, json.dumps({"error": traceback.format_exc()}).encode())
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
            pytest.fail(f"the code run as nobody did not finish in {timeout_s} s")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    answer = json.loads(b"".join(chunks))
    if "error" in answer:
        pytest.fail(f"as nobody:\n{answer['error']}")
    return answer["result"]


def cli_as_nobody(argvs: List[List[str]], timeout_s: float = 180) -> List[Tuple[int, str, str]]:
    """(exit code, stdout, stderr) of ``cli.main(argv)`` for each argv, run as ``nobody`` (:func:`as_nobody`)."""
    import cli

    def run() -> List[Tuple[int, str, str]]:
        results = []
        for argv in argvs:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli.main(argv)
            results.append((rc, out.getvalue(), err.getvalue()))
        return results

    return [tuple(x) for x in as_nobody(run, timeout_s)]
