"""A throw-away PostgreSQL server for the store and engine tests, and a fresh database per test.

The server is Debian's ``postgresql`` (``initdb`` and ``postgres`` from ``/usr/lib/postgresql/N/bin``): a
cluster is initialised in a new temporary folder and ``postgres`` listens on 127.0.0.1 on a free port (no
Unix socket), with trust authentication for its superuser ``postgres`` and durability off (``fsync``,
``synchronous_commit``, ``full_page_writes``: a crash loses a test database, nothing else). PostgreSQL
refuses to run as root, and the tests run as root in CI: then the cluster belongs to ``nobody`` and both
programs run as ``nobody`` (``subprocess``'s ``user=``/``group=``), in a folder made with ``tempfile``
(on the ``/dev/shm`` RAM disk when it has room; pytest's own temporary folders are private to root). The server is stopped by its PID and its folder
removed at the end of the session (``tests/index/conftest.py``) or, failing that, at exit.

One server serves the whole session, started on first use, so a test run that selects no PostgreSQL test
starts none. Each test takes its own database (:func:`new_database`, optionally a copy of another), as
with an external server.

``CXR_SEARCH_TEST_DB_URL`` (e.g. ``postgresql+psycopg://user@db-host/cxr_test``) points the tests at an
existing server instead: its user needs the CREATEDB privilege, and the databases made are dropped at exit.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import List, Optional, Sequence

from tests.helpers.ports import free_port
from tests.helpers.system import need_module, need_program

logger = logging.getLogger(__name__)

EXTERNAL_URL_ENV = "CXR_SEARCH_TEST_DB_URL"
#: The unprivileged account the server runs as when the tests run as root (Debian always has it).
RUN_AS = "nobody"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
SHM_NEEDED = 2 << 30  # bytes free on /dev/shm to put the cluster there
_SETTINGS = (
    "listen_addresses=127.0.0.1",
    "unix_socket_directories=",  # TCP only: no socket file in /var/run/postgresql, no path-length limit
    "fsync=off", "synchronous_commit=off", "full_page_writes=off",  # throw-away data: speed over durability
    "wal_level=minimal", "max_wal_senders=0", "max_wal_size=256MB",  # no replication; a bounded WAL in RAM
    "max_connections=200",
    "log_min_messages=warning",
)


def _version_key(path: str) -> tuple:
    """Sort key of ``/usr/lib/postgresql/<N>/bin/postgres`` paths: newest major version first."""
    m = re.search(r"/postgresql/(\d+)/", path)
    return (-int(m.group(1)) if m else 0, path)


def candidates() -> tuple:
    """Where Debian puts ``postgres`` (outside PATH), one folder per major version, newest first."""
    return tuple(sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_version_key))


def _scratch_dir() -> Optional[str]:
    """``/dev/shm`` when it has room (a RAM disk: a session's databases are a few hundred MB in some 10,000
    files, which a busy disk takes many seconds to delete), else the default temporary folder."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) and shutil.disk_usage(shm).free >= SHM_NEEDED:
            return str(shm)
    except OSError:
        pass
    return None


class PostgresServer:
    """One ``postgres`` process on 127.0.0.1 over a cluster in its own temporary folder.

    Args:
        bindir: Folder holding ``initdb`` and ``postgres``.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = Path(bindir)
        self.root = Path(tempfile.mkdtemp(prefix="cxr-search-pg-", dir=_scratch_dir()))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self._as_other = os.geteuid() == 0
        if self._as_other:
            pw = pwd.getpwnam(RUN_AS)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        else:
            self._user = {}

    # ------------------------------------------------------------------------------ life cycle
    def _run_env(self) -> dict:
        # A clean environment: no PG* variables of the caller, and the C locale initdb was given.
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}

    def start(self, attempts: int = 3) -> "PostgresServer":
        """initdb, then start the server and wait until it accepts connections.

        Raises:
            RuntimeError: initdb failed, or the server did not come up (the message holds its log's tail).
        """
        initdb = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-locale",
             "-E", "UTF8", "--no-sync", "--no-instructions"],
            cwd=self.root, env=self._run_env(), capture_output=True, text=True, timeout=120, **self._user,
        )
        if initdb.returncode != 0:
            self.stop()
            raise RuntimeError(f"initdb failed ({initdb.returncode}) in {self.data}: {initdb.stderr[-2000:]}")
        for attempt in range(attempts):
            # The port was free a moment ago; another program may take it first: then try another.
            self.port = free_port()
            cmd = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
            for setting in _SETTINGS:
                cmd += ["-c", setting]
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(cmd, cwd=self.root, env=self._run_env(), stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **self._user)
            if self._wait_ready():
                logger.info("PostgreSQL on 127.0.0.1:%d (pid %d, %s)", self.port, self.proc.pid, self.data)
                return self
            if attempt + 1 == attempts or self.proc.poll() is None:
                break
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""
        self.stop()
        raise RuntimeError(f"PostgreSQL did not start on 127.0.0.1 (log tail):\n{tail}")

    def _wait_ready(self) -> bool:
        """True once a connection succeeds; False when the process exits or the time is up."""
        import psycopg

        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2) as con:
                    row = con.execute("SHOW data_directory").fetchone()
                # Another server that took the port after free_port() would answer too: it must be ours.
                return row is not None and Path(row[0]).resolve() == self.data.resolve()
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Immediate shutdown by PID (SIGQUIT: no checkpoint, the data is thrown away), SIGKILL if it lingers,
        then remove the cluster's folder."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------------------ databases
    def dsn(self, database: str) -> str:
        """libpq connection string of ``database`` (for psycopg directly)."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` (the form ``--db`` takes)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"


_SERVER: Optional[PostgresServer] = None
_START_ERROR: Optional[str] = None
_EXTERNAL_CREATED: List[str] = []


def server() -> PostgresServer:
    """The session's server, started on first use.

    Skips the test (fails it in CI, ``CXR_SEARCH_REQUIRE_SYSTEM=1``) when PostgreSQL or psycopg is missing;
    a server that failed to start fails every test that needs it, with the first failure's reason.
    """
    global _SERVER, _START_ERROR
    postgres = need_program("postgres", "postgresql", candidates=candidates())
    need_module("psycopg", "postgres")
    if _SERVER is not None and _SERVER.running:
        return _SERVER
    if _START_ERROR is not None:
        raise RuntimeError(f"the test PostgreSQL server could not start earlier in this session: {_START_ERROR}")
    srv = PostgresServer(Path(postgres).resolve().parent)
    try:
        _SERVER = srv.start()
    except Exception as exc:
        _START_ERROR = str(exc)
        raise
    return _SERVER


def stop_server() -> None:
    """Stop the session's server, if one was started (idempotent)."""
    global _SERVER
    srv, _SERVER = _SERVER, None
    if srv is not None:
        srv.stop()


def _admin_url() -> str:
    """URL of a database to issue CREATE/DROP DATABASE from: the external one, or the local server's."""
    external = os.environ.get(EXTERNAL_URL_ENV)
    if external:
        need_module("psycopg", "postgres")
        return external
    return server().url("postgres")


def _execute(admin_url: str, statements: Sequence[str]) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as con:
            for sql in statements:
                con.execute(text(sql))
    finally:
        engine.dispose()


def new_database(template: Optional[str] = None) -> str:
    """URL of a new, empty database (a copy of ``template``'s database, a URL, when given).

    Copying needs the template database free of connections: close its engines first.
    """
    from sqlalchemy.engine import make_url

    admin = _admin_url()
    base = make_url(admin)
    external = bool(os.environ.get(EXTERNAL_URL_ENV))
    name = f"{base.database if external else 'cxr_test'}_{uuid.uuid4().hex[:12]}"
    source = f' TEMPLATE "{make_url(template).database}"' if template else ""
    _execute(admin, [f'CREATE DATABASE "{name}"{source}'])
    url = base.set(database=name).render_as_string(hide_password=False)
    if external:
        _EXTERNAL_CREATED.append(name)
    return url


def _drop_external() -> None:
    external = os.environ.get(EXTERNAL_URL_ENV)
    if not (_EXTERNAL_CREATED and external):
        return
    _execute(external, [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in _EXTERNAL_CREATED])
    _EXTERNAL_CREATED.clear()


atexit.register(_drop_external)
atexit.register(stop_server)
