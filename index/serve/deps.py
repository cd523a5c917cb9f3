"""FastAPI dependencies: the warm engine, the request's generation, who is asking, and the audit log."""

from __future__ import annotations

from typing import Annotated, Any, Optional

from fastapi import Depends, HTTPException, Request

from index.serve.audit import AuditLog
from index.serve.auth import LOCAL_USER, Principal, TokenStore, bearer
from index.serve.config import ServeConfig
from index.serve.engine import Engine, Generation, ThumbnailCache

#: Cookie that carries the token for the web page (HttpOnly, SameSite=Strict).
COOKIE = "cxr_search_token"


class LoginRequired(Exception):
    """A page was requested without a valid token: the app answers with a redirect to ``/login``."""


def get_engine(request: Request) -> Engine:
    """The app's warm engine."""
    return request.app.state.engine


def get_config(request: Request) -> ServeConfig:
    """The server's settings."""
    return request.app.state.config


def get_audit(request: Request) -> AuditLog:
    """The audit log."""
    return request.app.state.audit


def get_thumbs(request: Request) -> ThumbnailCache:
    """The thumbnail cache."""
    return request.app.state.thumbs


def get_generation(engine: Annotated[Engine, Depends(get_engine)]) -> Generation:
    """The one generation this request answers from."""
    return engine.current()


def client_of(request: Request) -> str:
    """The peer address (what the audit log records)."""
    return request.client.host if request.client else "?"


def _principal(request: Request) -> Optional[Principal]:
    tokens: TokenStore = request.app.state.tokens
    if not tokens.configured():
        return Principal(LOCAL_USER, authenticated=False)
    token = bearer(request.headers.get("authorization")) or request.cookies.get(COOKIE)
    name = tokens.verify(token) if token else None
    if name is None:
        # Denials are audited too (who is knocking); the answer never says whether an id exists.
        request.app.state.audit.record(user="-", client=client_of(request), action="auth.denied",
                                       query={"route": _route(request)}, status=401)
        return None
    return Principal(name, authenticated=True)


def _route(request: Request) -> str:
    route: Any = request.scope.get("route")
    return getattr(route, "path", "?")


def get_principal(request: Request) -> Principal:
    """The caller of an API route; 401 without a valid bearer token (when tokens are configured)."""
    who = _principal(request)
    if who is None:
        raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
    return who


def page_principal(request: Request) -> Principal:
    """The caller of a web page; without a valid token cookie, a redirect to the login page."""
    who = _principal(request)
    if who is None:
        raise LoginRequired()
    return who




# Annotated dependencies (FastAPI's recommended form; no call in argument defaults).
EngineDep = Annotated[Engine, Depends(get_engine)]
GenerationDep = Annotated[Generation, Depends(get_generation)]
ConfigDep = Annotated[ServeConfig, Depends(get_config)]
ThumbsDep = Annotated[ThumbnailCache, Depends(get_thumbs)]
ApiCaller = Annotated[Principal, Depends(get_principal)]
PageCaller = Annotated[Principal, Depends(page_principal)]


__all__ = ["ApiCaller", "COOKIE", "ConfigDep", "EngineDep", "GenerationDep", "LoginRequired", "PageCaller", "ThumbsDep",
           "client_of", "get_audit", "get_config", "get_engine", "get_generation", "get_principal", "get_thumbs",
           "page_principal"]
