"""The web page: search (text, filters, image upload), results grid, study page, login.

Server-rendered with Jinja2 (autoescaped: report text is text, never markup). A text or "more like
this" search is a GET, so its state is in the URL and can be bookmarked or shared; the URL only
reaches the server (the access log keeps no query strings, and ``Referrer-Policy: no-referrer``
keeps it from the PACS viewer). An uploaded image is a POST: its results page cannot be bookmarked.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any, Dict, List, Optional

import jinja2
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from index.serve import service
from index.serve.deps import COOKIE, ConfigDep, EngineDep, GenerationDep, PageCaller, client_of, get_audit
from index.serve.models import FiltersIn, ImageQuery, TextQuery
from index.serve.routes.studies import study_record
from index.serve.uploads import UploadError, parse_multipart, query_image, read_body

router = APIRouter(include_in_schema=False)
VIEWS = ("PA", "AP", "LAT")
SEXES = ("F", "M")
PAGE_K = 20

templates = Jinja2Templates(env=jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent.parent / "templates")),
    autoescape=True, undefined=jinja2.StrictUndefined))


def _form_state(request: Request) -> Dict[str, Any]:
    qp = request.query_params
    return {"q": qp.get("q", ""), "level": qp.get("level", "image"), "view": qp.getlist("view"),
            "sex": qp.getlist("sex"), "age_min": qp.get("age_min", ""), "age_max": qp.get("age_max", ""),
            "since": qp.get("since", ""), "until": qp.get("until", ""), "like": qp.get("like", ""),
            "return": qp.get("return", "images")}


def _filters(state: Dict[str, Any]) -> FiltersIn:
    def num(v: str) -> Optional[float]:
        return float(v) if v.strip() else None

    try:
        age = (num(state["age_min"]), num(state["age_max"]))
        return FiltersIn.model_validate({
            "view": state["view"] or None, "sex": state["sex"] or None,
            "age": age if any(a is not None for a in age) else None,
            "since": state["since"] or None, "until": state["until"] or None})
    except ValueError as exc:  # ValidationError is a ValueError; so is a bad age number
        raise service.ApiError(422, service.one_line(exc) if isinstance(exc, ValidationError) else
                               f"age: {exc}") from None


def _render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
    base = {"who": context.pop("who"), "views": VIEWS, "sexes": SEXES, "error": None}
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=status)


def _error_page(request: Request, status: int, message: str, *, who: Any, state: Dict[str, Any]) -> Response:
    """The search page showing ``message`` instead of results."""
    return _render(request, "search.html", status, who=who, state=state, result=None, title="", error=message,
                   next_url=None, prev_url=None)


def _page_url(state: Dict[str, Any], **changes: Any) -> str:
    params: List[Any] = []
    for key, value in {**state, **changes}.items():
        for v in value if isinstance(value, list) else [value]:
            if v not in ("", None):
                params.append((key, v))
    return "/?" + urllib.parse.urlencode(params)


@router.get("/", response_class=HTMLResponse)
def search_page(request: Request, who: PageCaller, engine: EngineDep, gen: GenerationDep,
                offset: int = Query(0, ge=0, le=1000), generation: Optional[str] = None) -> Response:
    """The search page; with ``q`` (text) or ``like`` (an image id) in the URL, its results."""
    state = _form_state(request)
    caller = service.Caller(who, client_of(request), get_audit(request))
    result: Optional[Dict[str, Any]] = None
    title = ""
    try:
        filters = _filters(state)
        if state["like"]:
            try:
                image_id = int(state["like"])
            except ValueError:
                raise service.ApiError(422, "like: not an image id") from None
            q = ImageQuery.model_validate({"image_id": image_id, "k": PAGE_K, "offset": offset,
                                           "return": state["return"], "filters": filters, "generation": generation})
            result = service.like_search(engine, gen, caller, q)
            title = f"more like image {image_id} ({state['return']})"
        elif state["q"].strip():
            q2 = TextQuery.model_validate({"query": state["q"], "level": state["level"], "k": PAGE_K,
                                           "offset": offset, "filters": filters, "generation": generation})
            result = service.text_search(engine, gen, caller, q2)
            title = state["q"]
    except ValidationError as exc:
        return _error_page(request, 422, service.one_line(exc), who=who, state=state)
    except service.ApiError as exc:
        return _error_page(request, exc.status, exc.detail, who=who, state=state)
    next_url = prev_url = None
    if result is not None:
        if len(result["hits"]) == PAGE_K and offset + 2 * PAGE_K <= 1000:
            next_url = _page_url(state, offset=offset + PAGE_K, generation=result["index_generation"])
        if offset > 0:
            prev_url = _page_url(state, offset=max(0, offset - PAGE_K), generation=result["index_generation"])
    return _render(request, "search.html", who=who, state=state, result=result, title=title, next_url=next_url,
                   prev_url=prev_url)


@router.post("/search/image", response_class=HTMLResponse)
async def image_page(request: Request, who: PageCaller, engine: EngineDep,
                     gen: GenerationDep, config: ConfigDep) -> Response:
    """Results of an image dropped on (or picked in) the page."""
    caller = service.Caller(who, client_of(request), get_audit(request))
    state = {**_form_state(request), "q": ""}
    try:
        body = await read_body(request, config.max_upload_bytes)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            raise service.ApiError(415, "send the image as a form upload")
        fields, data = await parse_multipart(request, body)
        form_state = {"view": [v for v in VIEWS if fields.get(f"view_{v}")],
                      "sex": [s for s in SEXES if fields.get(f"sex_{s}")],
                      **{key: fields.get(key, "") for key in ("age_min", "age_max", "since", "until")}}
        state.update(form_state, **{"return": fields.get("return", "images")})
        if not data:
            raise service.ApiError(400, "choose or drop a DICOM, PNG or JPEG file")
        filters = _filters(state)
        q = ImageQuery.model_validate({"image_id": 1, "k": PAGE_K, "return": state["return"], "filters": filters})
        img = query_image(data)
        result = await run_in_threadpool(service.upload_search, engine, gen, caller, img, q)
    except UploadError as exc:
        caller.record("search.image", query={"upload": "refused"}, status=exc.status, generation=gen.id)
        return _error_page(request, exc.status, exc.message, who=who, state=state)
    except ValidationError as exc:
        return _error_page(request, 422, service.one_line(exc), who=who, state=state)
    except service.ApiError as exc:
        return _error_page(request, exc.status, exc.detail, who=who, state=state)
    title = f"uploaded {img.kind.upper()} image (sha256 {img.sha256[:12]}…), {state['return']}"
    return _render(request, "search.html", who=who, state=state, result=result, title=title, next_url=None,
                   prev_url=None)


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(request: Request, study_uid: str, who: PageCaller,
               engine: EngineDep, gen: GenerationDep,
               config: ConfigDep) -> Response:
    """A study: every view, the report by section, "more like this" per image, similar reports."""
    caller = service.Caller(who, client_of(request), get_audit(request))
    try:
        study = study_record(engine, gen, config, caller, study_uid[:128])
    except service.ApiError as exc:
        return _render(request, "study.html", exc.status, who=who, study=None, error=exc.detail)
    return _render(request, "study.html", who=who, study=study)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> Response:
    """Where the page sends a browser without a valid token."""
    return templates.TemplateResponse(request, "login.html", {"error": None, "who": None})


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check a pasted token and keep it in an HttpOnly, SameSite=Strict cookie."""
    body = await read_body(request, 4096)
    token = (urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0].strip()
    name = request.app.state.tokens.verify(token) if token else None
    get_audit(request).record(user=name or "-", client=client_of(request), action="auth.login",
                              status=200 if name else 401)
    if name is None:
        return templates.TemplateResponse(request, "login.html", {"error": "unknown token", "who": None},
                                          status_code=401)
    resp = RedirectResponse("/", status_code=303)
    resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                    max_age=12 * 3600)
    return resp


@router.post("/logout")
def logout() -> Response:
    """Forget the token cookie."""
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE)
    return resp


__all__ = ["router", "templates"]
