"""Helpers of the server tests: a ``cxr-search serve`` subprocess on a free loopback port (stopped by its PID,
SIGTERM then SIGKILL), and the hostile report text the escaping tests plant."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, List, Tuple

from tests.helpers.ports import free_port

REPO = Path(__file__).resolve().parents[2]
#: Markup planted in a report: every page that shows it must show it as text.
XSS = '<script>alert("xss")</script><b>bold</b> & <img src=x onerror=alert(1)>'


@contextlib.contextmanager
def serve(index: Path, state_dir: Path, *extra: str, timeout: float = 180.0) -> Iterator[Tuple[str, subprocess.Popen]]:
    """Start the server over ``index``; yields (base URL, process) once ``/healthz`` answers 200.

    The process log goes to ``state_dir/../server.log`` (shown in the assertion when it does not start).
    """
    port = free_port()
    log_path = state_dir.parent / f"server-{port}.log"
    cmd: List[str] = [sys.executable, str(REPO / "cli.py"), "serve", str(index), "--host", "127.0.0.1",
                      "--port", str(port), "--state-dir", str(state_dir), *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:  # bounded by the deadline
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                    if r.status == 200 and json.load(r)["status"] == "ok":
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready in {timeout} s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield base, proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 30.0) -> int:
    """SIGTERM the process by its PID, SIGKILL it after ``grace`` seconds; returns its exit code."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return int(proc.returncode)
