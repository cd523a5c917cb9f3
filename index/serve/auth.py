"""API tokens: random secrets shown once, stored only as SHA-256 hashes, checked in constant time.

A token is 32 random bytes (URL-safe base64), so a plain SHA-256 of it cannot be brute-forced and
needs no salt or slow hash. The file (``STATE_DIR/tokens.json``, mode 0600) is re-read when it
changes, so ``tokens add`` / ``tokens revoke`` take effect on a running server without a restart.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from cxr_search.errors import ConfigError
from cxr_search.fileio import atomic_write

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
#: The user of requests when no token is configured (loopback only; see :mod:`index.serve.config`).
LOCAL_USER = "local"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who made a request: a token's name, or :data:`LOCAL_USER` on an open loopback server."""

    name: str
    authenticated: bool


class TokenStore:
    """The hashed tokens of one state folder.

    Args:
        path: ``tokens.json`` (need not exist yet).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: Optional[Tuple[int, int]] = None
        self._hashes: Dict[str, str] = {}  # name -> sha256 hex

    # ------------------------------------------------------------------------------ reading
    def _entries(self) -> List[Dict[str, str]]:
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            entries = list(data["tokens"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.path}: unreadable tokens file ({exc}); fix or delete it and add tokens again") from exc
        return entries

    def _refresh(self) -> Dict[str, str]:
        try:
            st = self.path.stat()
            stamp: Optional[Tuple[int, int]] = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._hashes = {e["name"]: e["sha256"] for e in self._entries()}
                except ConfigError as exc:
                    # A damaged file must not open the server: keep refusing until it is fixed.
                    logger.error("%s", exc)
                    self._hashes = {"": "!"}
                self._stamp = stamp
            return self._hashes

    def configured(self) -> bool:
        """Whether any token exists (then every request must carry one)."""
        return bool(self._refresh())

    def verify(self, token: str) -> Optional[str]:
        """The name of ``token``, or None. Every stored hash is compared, in constant time."""
        want = _digest(token)
        found: Optional[str] = None
        for name, digest in self._refresh().items():
            if hmac.compare_digest(want, digest) and found is None:
                found = name
        return found

    def names(self) -> List[Dict[str, str]]:
        """Name and creation time of every token (never the hashes)."""
        return [{"name": e["name"], "created": e.get("created", "")} for e in self._entries()]

    # ------------------------------------------------------------------------------ changing
    def add(self, name: str) -> str:
        """Create a token called ``name`` and return it (the only time it is ever shown).

        Raises:
            ConfigError: A malformed name or one already in use.
        """
        if not _NAME.fullmatch(name):
            raise ConfigError(f"token name {name!r}: use letters, digits, '.', '_', '@' or '-' (at most 64)")
        entries = self._entries()
        if any(e["name"] == name for e in entries):
            raise ConfigError(f"a token called {name!r} exists; revoke it first (cxr-search serve tokens revoke {name})")
        token = secrets.token_urlsafe(32)
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._write(entries + [{"name": name, "sha256": _digest(token), "created": created}])
        return token

    def revoke(self, name: str) -> None:
        """Delete the token called ``name``.

        Raises:
            ConfigError: No such token.
        """
        entries = self._entries()
        kept = [e for e in entries if e["name"] != name]
        if len(kept) == len(entries):
            raise ConfigError(f"no token called {name!r}; list them with cxr-search serve tokens list")
        self._write(kept)

    def _write(self, entries: List[Dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_write(self.path, "w", encoding="utf-8", permissions=0o600) as fh:
            json.dump({"tokens": entries}, fh, indent=2)
            fh.write("\n")


def bearer(header: Optional[str]) -> Optional[str]:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


__all__ = ["LOCAL_USER", "Principal", "TokenStore", "bearer"]
