"""The app factory: routers, security headers, a PHI-free access log, metrics and error answers.

Every answer carries ``Content-Security-Policy`` (scripts, styles and images from this server only;
no inline script), ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
``Referrer-Policy: no-referrer`` and, except for images, ``Cache-Control: no-store``. CORS headers
are sent only for configured origins. The access log names the route template (``/api/studies/{study_uid}``),
never the concrete path or the query string, so no identifier or query text reaches the ordinary logs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from cxr_search import __version__
from index.serve.audit import AuditLog
from index.serve.auth import TokenStore
from index.serve.config import ServeConfig
from index.serve.deps import LoginRequired
from index.serve.engine import Engine, ThumbnailCache
from index.serve.routes import health, pages, search, studies
from index.serve.service import ApiError
from index.serve.uploads import UploadError

access_logger = logging.getLogger("cxr_search.serve.access")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@dataclass
class Metrics:
    """Prometheus collectors of one app (its own registry, so several apps in one process do not clash)."""

    registry: Any
    requests: Any
    latency: Any
    index_size: Any
    generation: Any

    @classmethod
    def create(cls) -> "Metrics":
        """New collectors in a new registry."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        reg = CollectorRegistry()
        return cls(
            registry=reg,
            requests=Counter("cxr_search_requests", "HTTP requests", ["method", "route", "status"], registry=reg),
            latency=Histogram("cxr_search_request_seconds", "Request latency", ["route"], registry=reg,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
            index_size=Gauge("cxr_search_index_size", "Index totals", ["kind"], registry=reg),
            generation=Info("cxr_search_index_generation", "The index generation answering", registry=reg),
        )


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # SIGTERM: uvicorn finishes the requests in flight, then this runs (and then re-raises the signal, so this
    # is the last moment to stop the DICOM node of `serve --node-port` gracefully).
    node = app.state.node
    if node is not None:
        logging.getLogger(__name__).info("DICOM node stopping (the inbox is on disk: a restart finishes it)")
        node.stop()
    app.state.engine.close()
    app.state.audit.close()


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The ASGI app over a warm engine.

    Args:
        engine: The loaded model and index (the app closes it at shutdown).
        config: Settings (state folder, CORS origins, upload limit, viewer link).
    """
    app = FastAPI(title="cxr-search", version=__version__,
                  description="Search a chest X-ray archive by text or by image. Every request except /healthz "
                              "needs `Authorization: Bearer TOKEN` once tokens are configured.",
                  docs_url=None, redoc_url=None,  # the docs pages load scripts from a CDN
                  lifespan=_lifespan)
    app.state.engine = engine
    app.state.config = config
    app.state.tokens = TokenStore(config.tokens_file)
    app.state.audit = AuditLog(config.audit_db)
    app.state.thumbs = ThumbnailCache(config.thumbs_dir if config.cache_thumbnails else None)
    app.state.metrics = Metrics.create()
    app.state.node = None  # the DICOM node of `serve --node-port`, stopped at shutdown
    engine.reload_check_s = config.reload_check_s

    for r in (health.router, search.router, studies.router, pages.router):
        app.include_router(r)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.mount("/static", StaticFiles(directory=str(Path(__file__).resolve().parent / "static")), name="static")
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.middleware("http")
    async def _headers_log_metrics(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if not response.headers.get("content-type", "").startswith("image/") \
                and not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        route = getattr(request.scope.get("route"), "path", None) or (
            "/static" if request.url.path.startswith("/static/") else "unmatched")
        dt = time.perf_counter() - t0
        m: Metrics = app.state.metrics
        m.requests.labels(request.method, route, str(response.status_code)).inc()
        m.latency.labels(route).observe(dt)
        access_logger.info("%s %s %d %.1f ms", request.method, route, response.status_code, dt * 1000)
        return response

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> Response:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(UploadError)
    async def _upload_error(_request: Request, exc: UploadError) -> Response:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            loc = list(err.get("loc", ()))
            where = ".".join(str(p) for p in (loc[1:] if loc[:1] in (["body"], ["path"], ["query"]) else loc))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(LoginRequired)
    async def _login(_request: Request, _exc: LoginRequired) -> Response:
        return RedirectResponse("/login", status_code=303)

    return app


def _openapi(app: FastAPI) -> Dict[str, Any]:
    """The generated schema plus ImageQuery, which the image route reads itself (JSON or multipart)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from index.serve.models import ImageQuery

        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        extra = ImageQuery.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
        schemas.update(extra.pop("$defs", {}))
        schemas["ImageQuery"] = extra
        app.openapi_schema = spec
    return app.openapi_schema


def configure_logging(json_logs: bool, level: int = logging.INFO) -> Optional[dict]:
    """uvicorn's ``log_config``: plain lines, or one JSON object per line with ``json_logs``."""
    fmt = ({"()": "index.serve.app.JsonFormatter"} if json_logs
           else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"})
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"default": fmt},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}},
        "loggers": {"": {"handlers": ["default"], "level": level},
                    "uvicorn": {"handlers": [], "level": level, "propagate": True},
                    "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
                    "uvicorn.access": {"handlers": [], "level": logging.WARNING, "propagate": False}},
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


__all__ = ["CSP", "JsonFormatter", "Metrics", "configure_logging", "create_app"]
