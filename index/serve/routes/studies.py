"""``GET /api/studies/{study_uid}`` and ``GET /api/images/{image_id}/thumbnail|preview`` (ids, never paths)."""

from __future__ import annotations

from typing import Annotated, Any, Dict

from fastapi import APIRouter, Path, Request, Response

from cxr_search.errors import InputFileError
from index.serve import service
from index.serve.auth import Principal
from index.serve.config import PREVIEW_SIZE, THUMB_SIZE, ServeConfig
from index.serve.deps import ApiCaller, ConfigDep, EngineDep, GenerationDep, ThumbsDep, client_of, get_audit
from index.serve.engine import Engine, Generation, ThumbnailCache
from index.serve.models import ErrorOut, StudyOut

router = APIRouter(prefix="/api", tags=["studies"])


def study_record(engine: Engine, gen: Generation, config: ServeConfig, caller: service.Caller,
                 study_uid: str) -> Dict[str, Any]:
    """A study with its images and report, audited as a view.

    Raises:
        ApiError: 404 when the study is not in the index.
    """
    study = engine.study(gen, study_uid)
    if study is None:
        caller.record("study.view", query={"study_uid": study_uid}, status=404, generation=gen.id)
        raise service.ApiError(404, "no such study in this index")
    study["viewer_url"] = config.viewer_url.format(study_uid=study_uid) if config.viewer_url else None
    study["index_generation"] = gen.id
    caller.record("study.view", query={"study_uid": study_uid}, ids=[im["image_id"] for im in study["images"]],
                  generation=gen.id)
    return study


@router.get("/studies/{study_uid}", response_model=StudyOut, responses={401: {"model": ErrorOut},
                                                                        404: {"model": ErrorOut}})
def get_study(request: Request, study_uid: Annotated[str, Path(max_length=128)], who: ApiCaller, engine: EngineDep,
              gen: GenerationDep, config: ConfigDep) -> Dict[str, Any]:
    """A study: metadata, its images (with thumbnail and preview URLs) and its report by section."""
    return study_record(engine, gen, config, service.Caller(who, client_of(request), get_audit(request)), study_uid)


def _image(request: Request, image_id: int, size: int, action: str, who: Principal, engine: Engine,
           gen: Generation, thumbs: ThumbnailCache) -> Response:
    caller = service.Caller(who, client_of(request), get_audit(request))
    found = engine.image_file(gen, image_id)
    if found is None:
        caller.record(action, query={"image_id": image_id}, status=404, generation=gen.id)
        raise service.ApiError(404, f"no image {image_id} in this index")
    path, sop_uid = found
    try:
        data = thumbs.get(path, sop_uid, size)
    except InputFileError:
        caller.record(action, query={"image_id": image_id}, status=503, generation=gen.id)
        raise service.ApiError(503, f"the file of image {image_id} cannot be read on the server now") from None
    caller.record(action, query={"image_id": image_id}, ids=[image_id], generation=gen.id)
    # Private: patient images may sit in the browser's cache, never in a shared proxy's.
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


_IMG = {"content": {"image/jpeg": {}}, "description": "A windowed, display-ready JPEG."}


@router.get("/images/{image_id}/thumbnail", response_class=Response,
            responses={200: _IMG, 401: {"model": ErrorOut}, 404: {"model": ErrorOut}})
def thumbnail(request: Request, image_id: Annotated[int, Path(ge=1)], who: ApiCaller, engine: EngineDep,
              gen: GenerationDep, thumbs: ThumbsDep) -> Response:
    """A 256-pixel JPEG of the image (VOI windowed, MONOCHROME1 inverted), cached."""
    return _image(request, image_id, THUMB_SIZE, "image.thumbnail", who, engine, gen, thumbs)


@router.get("/images/{image_id}/preview", response_class=Response,
            responses={200: _IMG, 401: {"model": ErrorOut}, 404: {"model": ErrorOut}})
def preview(request: Request, image_id: Annotated[int, Path(ge=1)], who: ApiCaller, engine: EngineDep,
            gen: GenerationDep, thumbs: ThumbsDep) -> Response:
    """A larger JPEG of the image (longer side 1024 pixels), cached."""
    return _image(request, image_id, PREVIEW_SIZE, "image.preview", who, engine, gen, thumbs)
