"""Queries as the API and the web page both run them: validate, search one generation, audit, answer.

Every search is written to the audit log before its answer leaves (a failed one too, with its
status), with who asked, from where, the query text or the upload's hash, and the ids returned.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

from pydantic import ValidationError

from cxr_search.errors import ConfigError, InputFileError
from index.serve.audit import AuditLog
from index.serve.auth import Principal
from index.serve.engine import Engine, Generation, filters_from
from index.serve.models import FiltersIn, ImageQuery, TextQuery
from index.serve.uploads import QueryImage, UploadError, decoded


class ApiError(Exception):
    """An answer other than 200: ``status`` and a one-line ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class Caller:
    """Who asks, from where, and where their requests are audited."""

    principal: Principal
    client: str
    audit: AuditLog

    def record(self, action: str, *, query: Any = None, ids: Any = (), status: int = 200,
               generation: Optional[str] = None) -> None:
        """Write one audit row."""
        self.audit.record(user=self.principal.name, client=self.client, action=action, query=query, ids=ids,
                          status=status, generation=generation)


def _filters(f: FiltersIn) -> Any:
    try:
        return filters_from(f.view, f.sex, f.age, f.since.isoformat() if f.since else None,
                            f.until.isoformat() if f.until else None, f.modality)
    except ConfigError as exc:
        raise ApiError(422, str(exc)) from None


def _check_generation(gen: Generation, wanted: Optional[str], offset: int) -> None:
    if wanted and offset > 0 and wanted != gen.id:
        raise ApiError(409, f"the index changed (generation {wanted} -> {gen.id}) since the first page; "
                            "start again from offset 0")


def _hit_ids(hits: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [{"kind": h["kind"], "id": h["id"], "study_uid": h["study_uid"], "image_id": h.get("image_id")}
            for h in hits]


def _answer(hits: List[Dict[str, Any]], warnings: List[Dict[str, Any]], t0: float, gen: Generation, k: int,
            offset: int, sha: Optional[str] = None) -> Dict[str, Any]:
    return {"hits": hits, "query_warnings": warnings, "took_ms": round((time.perf_counter() - t0) * 1000, 2),
            "index_generation": gen.id, "k": k, "offset": offset, "query_sha256": sha}


@contextlib.contextmanager
def _audited(caller: Caller, action: str, audit_q: Dict[str, Any], gen: Generation,
             image: Optional[QueryImage] = None) -> Iterator[None]:
    """Turn the errors of a query into API errors, auditing each refusal with its status (the caller audits
    the answer itself, with the ids it returned)."""
    try:
        yield
    except UploadError as exc:
        caller.record(action, query=audit_q, status=exc.status, generation=gen.id)
        raise ApiError(exc.status, exc.message) from None
    except InputFileError as exc:  # the reason only: the "path" is the in-memory file
        caller.record(action, query=audit_q, status=422, generation=gen.id)
        kind = image.kind.upper() if image is not None else "query"
        raise ApiError(422, f"the {kind} image cannot be read: {exc.reason}") from None
    except ConfigError as exc:
        caller.record(action, query=audit_q, status=422, generation=gen.id)
        raise ApiError(422, str(exc)) from None
    except ApiError as exc:
        caller.record(action, query=audit_q, status=exc.status, generation=gen.id)
        raise


def text_search(engine: Engine, gen: Generation, caller: Caller, q: TextQuery) -> Dict[str, Any]:
    """Run and audit a text query.

    Raises:
        ApiError: 409 for a page of another generation, 422 for a bad query or filter.
    """
    t0 = time.perf_counter()
    audit_q = {"text": q.query, "level": q.level, "k": q.k, "offset": q.offset,
               "filters": q.filters.model_dump(exclude_none=True, mode="json")}
    with _audited(caller, "search.text", audit_q, gen):
        _check_generation(gen, q.generation, q.offset)
        hits, warnings = engine.search_text(gen, q.query, k=q.k, offset=q.offset, level=q.level, filters=_filters(q.filters))
    caller.record("search.text", query=audit_q, ids=_hit_ids(hits), generation=gen.id)
    return _answer(hits, warnings, t0, gen, q.k, q.offset)


def like_search(engine: Engine, gen: Generation, caller: Caller, q: ImageQuery) -> Dict[str, Any]:
    """Run and audit "more like this" on an indexed image.

    Raises:
        ApiError: 404 for an id not in the index, 409, 422.
    """
    t0 = time.perf_counter()
    audit_q = {"image_id": q.image_id, "return": q.returns, "k": q.k, "offset": q.offset,
               "include_same_patient": q.include_same_patient,
               "filters": q.filters.model_dump(exclude_none=True, mode="json")}
    with _audited(caller, "search.image", audit_q, gen):
        _check_generation(gen, q.generation, q.offset)
        found = engine.search_like(gen, q.image_id, k=q.k, offset=q.offset, returns=q.returns,
                                   filters=_filters(q.filters), include_same_patient=q.include_same_patient)
        if found is None:
            raise ApiError(404, f"no image {q.image_id} in this index")
        hits, warnings = found
    caller.record("search.image", query=audit_q, ids=_hit_ids(hits), generation=gen.id)
    return _answer(hits, warnings, t0, gen, q.k, q.offset)


def upload_search(engine: Engine, gen: Generation, caller: Caller, img: QueryImage, q: ImageQuery) -> Dict[str, Any]:
    """Run and audit a query by an uploaded image (``q.image_id`` is ignored).

    Raises:
        ApiError: 409, 422 (undecodable image, bad filter).
    """
    t0 = time.perf_counter()
    audit_q = {**img.audit, "return": q.returns, "k": q.k, "offset": q.offset,
               "include_same_patient": q.include_same_patient,
               "filters": q.filters.model_dump(exclude_none=True, mode="json")}
    with _audited(caller, "search.image", audit_q, gen, image=img):
        _check_generation(gen, q.generation, q.offset)
        filters = _filters(q.filters)
        with decoded(img) as item:
            hits, warnings = engine.search_image(gen, item, k=q.k, offset=q.offset, returns=q.returns, filters=filters,
                                                 include_same_patient=q.include_same_patient)
    caller.record("search.image", query=audit_q, ids=_hit_ids(hits), generation=gen.id)
    return _answer(hits, warnings, t0, gen, q.k, q.offset, sha=img.sha256)


def image_query_from_fields(fields: Dict[str, str]) -> ImageQuery:
    """The options of a multipart image query (``filters`` is a JSON object); ``image_id`` is not used.

    Raises:
        ApiError: 422 for a bad field.
    """
    data: Dict[str, Any] = {"image_id": 1}
    for key in ("k", "offset", "return", "include_same_patient", "generation"):
        if fields.get(key, "") != "":
            data[key] = fields[key]
    if fields.get("filters"):
        try:
            data["filters"] = json.loads(fields["filters"])
        except ValueError:
            raise ApiError(422, "field filters: not a JSON object") from None
    try:
        return ImageQuery.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, one_line(exc)) from None


def one_line(exc: ValidationError) -> str:
    """A pydantic error as one line: ``field: message; ...``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


__all__ = ["ApiError", "Caller", "image_query_from_fields", "like_search", "one_line", "text_search", "upload_search"]
