"""``cxr-search serve ...``: run the server, manage its API tokens, read its audit log.

``cxr-search serve INDEX_DIR`` is short for ``cxr-search serve start INDEX_DIR`` (the group runs
``start`` when its first word is not one of its commands).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table
from typer.core import TyperGroup

from cxr_search.errors import ConfigError
from cxr_search.fileio import emit_json
from cxr_search.terminal import err_console, out_console, styled
from index.node import commands as node_options
from index.serve.config import (
    DEFAULT_UPLOAD_MB,
    ServeConfig,
    check_bind,
    default_state_dir,
    prepare_state_dir,
    tokens_file,
)

logger = logging.getLogger(__name__)
_SETTINGS_ENV = "CXR_SEARCH_SERVE_SETTINGS"


class _StartByDefault(TyperGroup):
    """A group whose first argument, when not a command name, starts the server (``serve INDEX_DIR``)."""

    def parse_args(self, ctx: Any, args: List[str]) -> List[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


serve_app = typer.Typer(cls=_StartByDefault, no_args_is_help=True,
                        help="Serve an index: web page for radiologists and JSON API (cxr-search serve INDEX_DIR).")
tokens_app = typer.Typer(help="API tokens (shown once, stored hashed).", no_args_is_help=True)
serve_app.add_typer(tokens_app, name="tokens")

_STATE_HELP = "Folder of tokens, audit log and thumbnail cache (default INDEX_DIR/serve; needed for a read-only index)."
# The folder options of the token and audit commands (which find the state folder from either).
_SERVED_INDEX_OPTION = typer.Option(None, "--index", "-i", help="Index folder the server serves.")
_STATE_DIR_OPTION = typer.Option(None, "--state-dir", help=_STATE_HELP)
_AUDIT_HELP = "Audit log database URL (default: SQLite STATE_DIR/audit.sqlite), e.g. postgresql+psycopg://host/db."


def _state(index: Optional[Path], state_dir: Optional[Path]) -> Path:
    if state_dir is not None:
        return state_dir.expanduser()
    if index is None:
        raise ConfigError("give the index folder (--index INDEX_DIR) or the server's --state-dir")
    return default_state_dir(index)


def _settings(index_dir: Path, model: Optional[str], tokenizer: Optional[Path], db: Optional[str], device: str,
              query_precision: str) -> dict:
    return {"index_dir": str(index_dir), "model": model, "tokenizer": str(tokenizer) if tokenizer else None,
            "db": db, "device": device, "query_precision": query_precision}


def build_engine(settings: dict, model: Any = None) -> Any:
    """The warm engine of ``settings`` (model resolved from the index unless given).

    Args:
        settings: What ``serve start`` was given (see ``_settings``).
        model: An already loaded model to use instead of loading one.

    Raises:
        CxrSearchError: The index or model cannot be loaded, or they do not match.
    """
    from cxr_search.checkpoints import load_model
    from cxr_search.inference import Embedder
    from index.model_ref import resolve_model
    from index.serve.engine import Engine

    if model is None:
        source = resolve_model(settings["index_dir"], settings.get("model"))
        model = load_model(source, tokenizer=settings.get("tokenizer"), require_tokenizer=True)
    embedder = Embedder(model, device=settings.get("device") or "auto")
    return Engine(settings["index_dir"], embedder, db_url=settings.get("db"),
                  text_precision=settings.get("query_precision") or "auto")


def _node_config(node_port: Optional[int], node_host: str, ae_title: str, allow: List[str], workers: int,
                 hl7_port: Optional[int], allow_any: bool) -> Any:
    """The checked DICOM side of ``serve --node-port`` (None without it).

    Raises:
        ConfigError: Node options without ``--node-port``, ``--workers`` above 1, or a bad AE title or allow-list.
    """
    if node_port is None:
        if allow or hl7_port is not None:
            raise ConfigError("--allow and --hl7-port configure the DICOM node: give --node-port too")
        return None
    if workers != 1:
        raise ConfigError("--node-port runs the DICOM node inside the server process, which needs --workers 1; "
                          "for more workers run `cxr-search node INDEX_DIR` beside the server")
    from index.node.runtime import node_config

    return node_config(ae_title, node_host, node_port, allow, allow_any=allow_any)


def _create_node_index(index_dir: Path, settings: dict) -> Any:
    """Create the empty index of ``serve --node-port --model M`` on a new folder; returns the loaded model."""
    from cxr_search.checkpoints import load_model
    from index.node.worker import ensure_index

    model = load_model(settings["model"], tokenizer=settings.get("tokenizer"), require_tokenizer=True)
    ensure_index(index_dir, model, db_url=settings.get("db"))
    return model


def _start_node(index_dir: Path, engine: Any, config: Any, *, allow_any: bool, quiet: float,
                hl7_port: Optional[int], hl7_allow: List[str], db: Optional[str]) -> Any:
    """Start the DICOM node of ``serve --node-port`` on the engine's model (shared: it is only read) and device."""
    from index.build import BuildOptions
    from index.node.runtime import Node
    from index.node.worker import WorkerOptions

    opts = WorkerOptions(quiet_s=quiet, build=BuildOptions(device=str(engine.embedder.device), db_url=db))
    node = Node(index_dir, engine.embedder.model, config, opts, hl7_port=hl7_port, hl7_allowed=frozenset(hl7_allow),
                allow_any=allow_any)
    try:
        node.start()
    except OSError as exc:
        node.stop()
        raise ConfigError(f"the DICOM node cannot listen on {config.host}:{config.port} (or the HL7 port): "
                          f"{exc.strerror or exc}; choose another --node-port / --hl7-port") from exc
    err_console.print(node.describe())
    return node


def worker_app() -> Any:
    """App factory of each uvicorn worker process (``--workers N``): settings come in an environment variable."""
    from index.serve.app import create_app

    data = json.loads(os.environ[_SETTINGS_ENV])
    config = ServeConfig(state_dir=Path(data["config"]["state_dir"]), host=data["config"]["host"],
                         max_upload_bytes=data["config"]["max_upload_bytes"],
                         cors_origins=tuple(data["config"]["cors_origins"]), viewer_url=data["config"]["viewer_url"],
                         cache_thumbnails=data["config"]["cache_thumbnails"], audit_url=data["config"]["audit_url"])
    return create_app(build_engine(data["engine"]), config)


@serve_app.command("start")
def start(
    index_dir: Path = typer.Argument(..., help="Index folder (only read)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model; default: the one the index was built with."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder (released checkpoints)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; not loopback only with API tokens."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port to listen on (0: a free one)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Worker processes (each loads the model)."),
    state_dir: Optional[Path] = _STATE_DIR_OPTION,
    audit_db: str = typer.Option("", "--audit-db", help=_AUDIT_HELP),
    db: Optional[str] = typer.Option(None, "--db", help="Store URL when not the index's own."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    query_precision: str = typer.Option("auto", "--query-precision", help="auto (int8 on CPU), int8, fp32, bf16, fp16."),
    max_upload_mb: int = typer.Option(DEFAULT_UPLOAD_MB, "--max-upload-mb", min=1, help="Largest query image."),
    cors_origins: List[str] = typer.Option([], "--cors-origin", help="Allow this browser origin (repeatable); none by default."),
    viewer_url: str = typer.Option("", "--viewer-url", help="PACS viewer link per study, with {study_uid}."),
    thumbnail_cache: bool = typer.Option(True, "--thumbnail-cache/--no-thumbnail-cache",
                                         help="Keep rendered thumbnails in STATE_DIR/thumbs."),
    json_logs: bool = typer.Option(False, "--json-logs", help="Log one JSON object per line."),
    node_port: Optional[int] = typer.Option(None, "--node-port", min=0, max=65535, help="Also run the DICOM node "
                                            "(as cxr-search node) in this process, on this port."),
    node_host: str = typer.Option("127.0.0.1", "--node-host", help="Address the DICOM node listens on (with "
                                  "--node-port); not loopback only with --allow."),
    ae_title: str = node_options.AE_TITLE_OPTION,
    allow: List[str] = node_options.ALLOW_OPTION,
    allow_any: bool = node_options.ALLOW_ANY_OPTION,
    quiet: float = node_options.QUIET_OPTION,
    hl7_port: Optional[int] = node_options.HL7_PORT_OPTION,
    hl7_allow: List[str] = node_options.HL7_ALLOW_OPTION,
) -> None:
    """Serve INDEX_DIR: the web page at /, the JSON API under /api/ (OpenAPI at /openapi.json), /healthz, /metrics.

    With --node-port the same process also runs the DICOM node of INDEX_DIR (an empty index is created
    when INDEX_DIR has none and --model is given); studies it indexes are served without a restart.

    Example: cxr-search serve /indices/chest --port 8000 --workers 2
    Example: cxr-search serve /indices/chest --node-port 11112 --node-host 10.1.2.3 --allow PACS@10.1.2.9
    """
    import uvicorn

    from index.serve.app import configure_logging, create_app
    from index.serve.audit import AuditLog
    from index.serve.auth import TokenStore

    node_cfg = _node_config(node_port, node_host, ae_title, allow, workers, hl7_port, allow_any)
    if not (index_dir / "index.json").is_file() and not (node_cfg is not None and model):
        raise ConfigError(f"{index_dir}: not an index folder (no index.json); build one with cxr-search index build"
                          + ("" if node_cfg is None else ", or give --model to start an empty index for the node"))
    state = prepare_state_dir(_state(index_dir, state_dir))
    config = ServeConfig(state_dir=state, host=host, max_upload_bytes=max_upload_mb * 1024 * 1024,
                         cors_origins=tuple(cors_origins), viewer_url=viewer_url, cache_thumbnails=thumbnail_cache,
                         audit_url=audit_db)
    AuditLog(config.audit_db).close()  # an audit database that cannot be written stops the start, before the model loads
    warning = check_bind(host, TokenStore(config.tokens_file).configured())
    if warning:
        err_console.print(styled(f"warning: {warning}", "yellow"))
    settings = _settings(index_dir, model, tokenizer, db, device, query_precision)
    log_config = configure_logging(json_logs)
    common = dict(host=host, port=port, log_config=log_config, access_log=False, server_header=False,
                  timeout_graceful_shutdown=30)
    if workers == 1:
        preloaded = None
        if node_cfg is not None and not (index_dir / "index.json").is_file():
            preloaded = _create_node_index(index_dir, settings)
        engine = build_engine(settings, preloaded)  # errors (model mismatch...) end here, with one line and a code
        gen = engine.current()
        err_console.print(f"serving {index_dir} (generation {gen.id}, {gen.counts['images']} images, "
                          f"{gen.counts['studies']} studies) at http://{host}:{port}/ ; state in {state}")
        node = None
        if node_cfg is not None:
            node = _start_node(index_dir, engine, node_cfg, allow_any=allow_any, quiet=quiet, hl7_port=hl7_port,
                               hl7_allow=hl7_allow, db=db)
        app = create_app(engine, config)
        app.state.node = node
        try:
            uvicorn.run(app, **common)
        finally:
            if node is not None:  # uvicorn did not start (a port in use): the node stops here
                node.stop()
        return
    os.environ[_SETTINGS_ENV] = json.dumps({"engine": settings, "config": {
        "state_dir": str(state), "host": host, "max_upload_bytes": config.max_upload_bytes,
        "cors_origins": list(cors_origins), "viewer_url": viewer_url, "cache_thumbnails": thumbnail_cache,
        "audit_url": audit_db}})
    err_console.print(f"serving {index_dir} with {workers} workers at http://{host}:{port}/ ; state in {state}")
    uvicorn.run("index.serve.commands:worker_app", factory=True, workers=workers, **common)


@tokens_app.command("add")
def tokens_add(
    name: str = typer.Argument(..., help="Who or what uses the token (appears in the audit log)."),
    index: Optional[Path] = _SERVED_INDEX_OPTION,
    state_dir: Optional[Path] = _STATE_DIR_OPTION,
) -> None:
    """Create a token and print it once (only its hash is kept).

    Example: cxr-search serve tokens add ris-gateway -i /indices/chest
    """
    from index.serve.auth import TokenStore

    store = TokenStore(tokens_file(prepare_state_dir(_state(index, state_dir))))
    token = store.add(name)
    out_console.print(token)
    err_console.print(f"token {name!r} created; it is shown only now. Send it as 'Authorization: Bearer TOKEN', "
                      "or paste it on the page's login form. A running server picks it up at once.")


@tokens_app.command("list")
def tokens_list(
    index: Optional[Path] = _SERVED_INDEX_OPTION,
    state_dir: Optional[Path] = _STATE_DIR_OPTION,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Names and creation times of the tokens.

    Example: cxr-search serve tokens list -i /indices/chest --json
    """
    from index.serve.auth import TokenStore

    rows = TokenStore(tokens_file(_state(index, state_dir))).names()
    if json_out:
        emit_json({"tokens": rows})
        return
    t = Table(title="API tokens")
    t.add_column("name")
    t.add_column("created")
    for r in rows:
        t.add_row(r["name"], r["created"])
    out_console.print(t)


@tokens_app.command("revoke")
def tokens_revoke(
    name: str = typer.Argument(..., help="Name the token was added under."),
    index: Optional[Path] = _SERVED_INDEX_OPTION,
    state_dir: Optional[Path] = _STATE_DIR_OPTION,
) -> None:
    """Delete a token (a running server refuses it at once).

    Example: cxr-search serve tokens revoke ris-gateway -i /indices/chest
    """
    from index.serve.auth import TokenStore

    TokenStore(tokens_file(_state(index, state_dir))).revoke(name)
    err_console.print(f"token {name!r} revoked")


@serve_app.command("audit")
def audit(
    index: Optional[Path] = _SERVED_INDEX_OPTION,
    state_dir: Optional[Path] = _STATE_DIR_OPTION,
    audit_db: str = typer.Option("", "--audit-db", help=_AUDIT_HELP),
    since: Optional[str] = typer.Option(None, "--since", help="Rows from this UTC date or time (YYYY-MM-DD[THH:MM])."),
    limit: int = typer.Option(100, "--limit", min=1, help="At most this many rows (the latest)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Who searched what and viewed which studies (the server's audit log).

    Example: cxr-search serve audit -i /indices/chest --since 2026-12-01 --limit 50
    """
    from index.serve.audit import AuditLog, default_audit_url

    if since is not None:
        import datetime as _dt

        try:
            _dt.datetime.fromisoformat(since)
        except ValueError:
            raise ConfigError(f"--since {since!r}: write a date (YYYY-MM-DD) or a time (YYYY-MM-DDTHH:MM)") from None
    log = AuditLog(audit_db or default_audit_url(_state(index, state_dir)), create=False)
    try:
        rows = log.tail(limit, since=since)
    finally:
        log.close()
    if json_out:
        emit_json({"rows": rows})
        return
    t = Table(title="audit log")
    for col in ("time", "user", "client", "action", "status", "query", "ids"):
        t.add_column(col, overflow="fold")
    for r in rows:
        q = r.get("query")
        t.add_row(str(r.get("time", ""))[:19], str(r.get("user")), str(r.get("client")), str(r.get("action")),
                  str(r.get("status")), q if isinstance(q, str) else json.dumps(q, ensure_ascii=False),
                  str(len(r.get("ids") or [])))
    out_console.print(t)


__all__ = ["build_engine", "serve_app", "worker_app"]
