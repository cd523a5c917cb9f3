"""Settings of ``cxr-search serve`` and the secure defaults they start from.

Defaults, and why:

- The server binds ``127.0.0.1``. A non-loopback address is refused unless API tokens are configured:
  a hospital network must not reach an unauthenticated search over patient images.
- Once any token exists (``cxr-search serve tokens add NAME``), every request except ``/healthz`` and
  the static files needs one, on loopback too. With no token at all (loopback only), requests are
  served as the user ``local`` and audited as such.
- State (tokens, audit log, thumbnail cache) lives in ``--state-dir`` (default ``INDEX_DIR/serve``);
  the index folder itself is only read, so it may be read-only when ``--state-dir`` is elsewhere. The
  audit log is a SQLite database there unless ``--audit-db URL`` names another (e.g. PostgreSQL).
- No CORS headers unless origins are given; uploads are limited to 64 MB and never written to disk.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from cxr_search.errors import ConfigError
from index.serve.audit import default_audit_url

#: Most hits one request may ask for (``k``), and the deepest page (``offset + k``).
MAX_K = 100
MAX_DEPTH = 1000
DEFAULT_UPLOAD_MB = 64
#: Longer side of the rendered thumbnails and previews, in pixels.
THUMB_SIZE = 256
PREVIEW_SIZE = 1024


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1`` or ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tokens_file(state_dir: Path) -> Path:
    """The hashed API tokens of a state folder."""
    return Path(state_dir) / "tokens.json"


def default_state_dir(index_dir: Path) -> Path:
    """``INDEX_DIR/serve``: where tokens, the audit log and cached thumbnails go unless told otherwise."""
    return Path(index_dir).expanduser() / "serve"


@dataclass(frozen=True)
class ServeConfig:
    """What the app needs to know besides the engine.

    Attributes:
        state_dir: Folder of ``tokens.json``, ``audit.sqlite`` and the thumbnail cache (created 0700).
        host: Address the server binds (decides whether running without tokens is allowed).
        max_upload_bytes: Largest accepted query image.
        cors_origins: Origins allowed by CORS (none: no CORS headers at all).
        viewer_url: PACS viewer link template per study, with ``{study_uid}`` (e.g. an OHIF
            ``https://pacs/viewer?StudyInstanceUIDs={study_uid}``); empty for none.
        cache_thumbnails: Keep rendered thumbnails in ``state_dir/thumbs``.
        reload_check_s: Seconds between checks of the index folder for a new generation.
        audit_url: SQLAlchemy URL of the audit database; empty for ``STATE_DIR/audit.sqlite``.
    """

    state_dir: Path
    host: str = "127.0.0.1"
    max_upload_bytes: int = DEFAULT_UPLOAD_MB * 1024 * 1024
    cors_origins: Tuple[str, ...] = field(default_factory=tuple)
    viewer_url: str = ""
    cache_thumbnails: bool = True
    reload_check_s: float = 0.5
    audit_url: str = ""

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1024:
            raise ConfigError(f"upload limit {self.max_upload_bytes} bytes is too small; give at least 1 (MB)")
        if self.viewer_url and "{study_uid}" not in self.viewer_url:
            raise ConfigError("--viewer-url must contain {study_uid}, e.g. https://pacs/viewer?StudyInstanceUIDs={study_uid}")

    @property
    def tokens_file(self) -> Path:
        """The hashed API tokens."""
        return tokens_file(self.state_dir)

    @property
    def audit_db(self) -> str:
        """URL of the append-only audit log's database."""
        return self.audit_url or default_audit_url(self.state_dir)

    @property
    def thumbs_dir(self) -> Path:
        """The rendered-thumbnail cache."""
        return self.state_dir / "thumbs"


def prepare_state_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700: it holds the audit log and image thumbnails) and check it is writable.

    Raises:
        ConfigError: It cannot be created or written (a read-only index folder: give ``--state-dir``).
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the server's state folder ({exc.strerror}); "
                          "give a writable one with --state-dir") from exc
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{path}: the server's state folder is not writable; give a writable one with --state-dir")
    return path


def check_bind(host: str, have_tokens: bool) -> Optional[str]:
    """Refuse a non-loopback bind without tokens; returns a warning to print, if any.

    Raises:
        ConfigError: ``host`` is not loopback and no API token is configured.
    """
    if is_loopback(host):
        return None if have_tokens else (
            "no API tokens configured: anyone who can open a connection on this machine can search; "
            "add one with `cxr-search serve tokens add NAME` to require it")
    if not have_tokens:
        raise ConfigError(
            f"refusing to listen on {host} without API tokens: the index holds patient images and reports. "
            "Create a token first (cxr-search serve tokens add NAME --index INDEX_DIR), or bind 127.0.0.1")
    return f"listening on {host}: reachable from the network; every request needs a bearer token"


__all__ = ["DEFAULT_UPLOAD_MB", "MAX_DEPTH", "MAX_K", "PREVIEW_SIZE", "THUMB_SIZE", "ServeConfig", "check_bind",
           "default_state_dir", "is_loopback", "prepare_state_dir", "tokens_file"]
