"""``POST /api/search/text`` and ``POST /api/search/image`` (JSON "more like this", or a multipart upload)."""

from __future__ import annotations

from typing import Any, Dict

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from index.serve import service
from index.serve.deps import ApiCaller, ConfigDep, EngineDep, GenerationDep, client_of, get_audit
from index.serve.models import ErrorOut, ImageQuery, SearchResponse, TextQuery
from index.serve.uploads import UploadError, parse_multipart, query_image, read_body

router = APIRouter(prefix="/api/search", tags=["search"])
_ERRORS: Dict[int | str, Dict[str, Any]] = {c: {"model": ErrorOut} for c in (401, 404, 409, 413, 415, 422)}


@router.post("/text", response_model=SearchResponse, responses=_ERRORS)
def search_text(q: TextQuery, request: Request, who: ApiCaller,
                engine: EngineDep, gen: GenerationDep) -> Dict[str, Any]:
    """Images (or studies, ``level=study``) matching a description."""
    return service.text_search(engine, gen, service.Caller(who, client_of(request), get_audit(request)), q)


_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ImageQuery"}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "One DICOM, PNG or JPEG file."},
                    "return": {"type": "string", "enum": ["reports", "images", "studies"]},
                    "k": {"type": "integer"}, "offset": {"type": "integer"},
                    "include_same_patient": {"type": "boolean"}, "generation": {"type": "string"},
                    "filters": {"type": "string", "description": "A JSON object as in ImageQuery.filters."}}}},
        },
    }
}


@router.post("/image", response_model=SearchResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY)
async def search_image(request: Request, who: ApiCaller,
                       engine: EngineDep, gen: GenerationDep,
                       config: ConfigDep) -> Dict[str, Any]:
    """Report sections, images or studies like an image: an uploaded file (multipart; the query's own
    patient is excluded when its DICOM header names it) or ``{"image_id": N}`` ("more like this";
    its patient is excluded) unless ``include_same_patient``."""
    caller = service.Caller(who, client_of(request), get_audit(request))
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        body = await read_body(request, config.max_upload_bytes)
        if ctype == "application/json":
            try:
                q = ImageQuery.model_validate_json(body)
            except ValidationError as exc:
                raise service.ApiError(422, service.one_line(exc)) from None
            return await run_in_threadpool(service.like_search, engine, gen, caller, q)
        if ctype != "multipart/form-data":
            raise service.ApiError(415, "send JSON {\"image_id\": N} or a multipart/form-data upload with a file part")
        fields, data = await parse_multipart(request, body)
        if data is None:
            raise service.ApiError(400, "no file in the upload: send the image in a part named file")
        q = service.image_query_from_fields(fields)
        img = query_image(data)
    except UploadError as exc:
        caller.record("search.image", query={"upload": "refused"}, status=exc.status, generation=gen.id)
        raise service.ApiError(exc.status, exc.message) from None
    return await run_in_threadpool(service.upload_search, engine, gen, caller, img, q)
