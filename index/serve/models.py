"""The JSON API's typed request and response bodies (they make ``/openapi.json``)."""

from __future__ import annotations

import datetime as _dt
from typing import Dict, List, Literal, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from index.serve.config import MAX_DEPTH, MAX_K


class FiltersIn(BaseModel):
    """Search filters; a missing key does not filter."""

    model_config = ConfigDict(extra="forbid")

    view: Optional[List[str]] = Field(None, description="Views, e.g. [\"PA\", \"AP\", \"LAT\"] (LAT: any lateral).")
    sex: Optional[List[str]] = Field(None, description="M, F or O.")
    age: Optional[Tuple[Optional[float], Optional[float]]] = Field(None, description="[min, max] years; null: open.")
    since: Optional[_dt.date] = Field(None, description="Studies on or after this date (YYYY-MM-DD).")
    until: Optional[_dt.date] = Field(None, description="Studies on or before this date.")
    modality: Optional[List[str]] = Field(None, description="e.g. [\"DX\", \"CR\"].")


class _Paged(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    k: int = Field(10, ge=1, le=MAX_K, description=f"Hits per page (at most {MAX_K}).")
    offset: int = Field(0, ge=0, description=f"Hits to skip; offset + k is at most {MAX_DEPTH}.")
    filters: FiltersIn = Field(default_factory=FiltersIn)
    generation: Optional[str] = Field(
        None, description="The index_generation of the first page: a later page of another generation is refused "
                          "with 409 (start again from offset 0), so pages never mix two states of the index.")

    @model_validator(mode="after")
    def _depth(self) -> "_Paged":
        if self.offset + self.k > MAX_DEPTH:
            raise ValueError(f"offset + k must be at most {MAX_DEPTH}")
        return self


class TextQuery(_Paged):
    """``POST /api/search/text``."""

    query: str = Field(..., min_length=1, max_length=2000, description="A description, e.g. 'right pleural effusion'.")
    level: Literal["image", "study"] = "image"


class ImageQuery(_Paged):
    """``POST /api/search/image`` as JSON: "more like this" on an indexed image.

    An uploaded image is sent as ``multipart/form-data`` instead: a ``file`` part plus these fields as
    form fields (``filters`` as a JSON object).
    """

    image_id: int = Field(..., ge=1, description="An image id from a previous answer.")
    returns: Literal["reports", "images", "studies"] = Field("images", alias="return")
    include_same_patient: bool = Field(False, description="Keep the query's own patient and study in the hits.")


class ImageRef(BaseModel):
    """An image of a study hit."""

    image_id: int
    sop_uid: str
    view: Optional[str] = None
    thumbnail_url: str


class HitOut(BaseModel):
    """One hit. ``kind`` is ``image``, ``study`` or ``section`` (a report section, for ``return=reports``)."""

    rank: int
    score: float
    kind: str
    image_id: Optional[int] = None
    study_uid: str
    series_uid: Optional[str] = None
    sop_uid: Optional[str] = None
    view: Optional[str] = None
    modality: Optional[str] = None
    study_date: Optional[str] = None
    age: Optional[float] = None
    sex: Optional[str] = None
    patient_key: Optional[str] = Field(None, description="Keyed pseudonym of the patient (no PHI), for grouping.")
    report_excerpt: str = ""
    section_kind: Optional[str] = None
    section_text: Optional[str] = None
    images: List[ImageRef] = Field(default_factory=list)
    thumbnail_url: Optional[str] = None
    study_url: str


class QueryWarningOut(BaseModel):
    """Something the hits cannot show (``unknown_words``, ``truncated``, ``query_in_index``, ``no_match``)."""

    code: str
    message: str


class SearchResponse(BaseModel):
    """Hits of one page, and the index generation they came from."""

    hits: List[HitOut]
    query_warnings: List[QueryWarningOut] = Field(default_factory=list)
    took_ms: float
    index_generation: str
    k: int
    offset: int
    query_sha256: Optional[str] = Field(None, description="SHA-256 of an uploaded query image.")


class SectionOut(BaseModel):
    """A report section (``findings``, ``impression`` or the whole ``report``)."""

    kind: str
    text: str


class ReportOut(BaseModel):
    """A study's report."""

    source: str
    text: str
    sections: List[SectionOut]


class StudyImage(BaseModel):
    """An image of a study."""

    image_id: int
    sop_uid: str
    series_uid: Optional[str] = None
    view: Optional[str] = None
    modality: Optional[str] = None
    rows: Optional[int] = None
    columns: Optional[int] = None
    thumbnail_url: str
    preview_url: str


class StudyOut(BaseModel):
    """``GET /api/studies/{study_uid}``."""

    study_uid: str
    study_date: Optional[str] = None
    age: Optional[float] = None
    sex: Optional[str] = None
    patient_key: Optional[str] = None
    images: List[StudyImage]
    report: Optional[ReportOut] = None
    viewer_url: Optional[str] = None
    index_generation: str


class HealthOut(BaseModel):
    """``GET /healthz``."""

    status: Literal["ok"]
    index_generation: str
    counts: Dict[str, int]
    model_sha256: str
    model_source: str
    reloads: int


class ErrorOut(BaseModel):
    """Every 4xx/5xx answer: one line saying what is wrong."""

    detail: str


__all__ = ["ErrorOut", "FiltersIn", "HealthOut", "HitOut", "ImageQuery", "ImageRef", "QueryWarningOut", "ReportOut", "SearchResponse",
           "SectionOut", "StudyImage", "StudyOut", "TextQuery"]
