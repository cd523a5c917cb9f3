"""The demo's example queries and its one-page HTML gallery.

Text -> image queries carry the finding they ask for, so each hit can be checked against the
generator's ground truth ("relevant" = the hit's study has that finding); image queries use a
held-out DICOM, whose own study and patient the searcher excludes.
"""

from __future__ import annotations

import html
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from cxr_search.fileio import write_text_atomic
from index.demo.data import Truth, relative
from index.filters import parse_filters
from index.html import thumbnail_data_uri
from index.search import Hit, Searcher

logger = logging.getLogger(__name__)

#: (query, ground-truth finding that makes a hit relevant; "normal" = no primary finding)
TEXT_QUERIES: Sequence[Tuple[str, str]] = (
    ("large right pleural effusion", "pleural_effusion"),
    ("no acute cardiopulmonary process", "normal"),
    ("the cardiac silhouette is markedly enlarged", "cardiomegaly"),
    ("moderate pulmonary edema", "edema"),
    ("right lower lobe consolidation", "consolidation"),
    ("right upper lobe mass", "lung_lesion"),
    ("left-sided pacemaker", "support_devices"),
)
#: Text queries look at frontal films, as a radiologist would (the filter runs inside FAISS).
TEXT_FILTERS: Sequence[str] = ("view=PA,AP",)


DIRECTIONS = {"image_to_text": "image → text", "text_to_image": "text → image"}


@dataclass
class QueryResult:
    """One example query and its hits (JSON-ready through :meth:`to_dict`)."""

    kind: str  # "text->image", "image->reports", "image->images"
    query: str
    seconds: float
    target: Optional[str] = None  # the finding a relevant hit has (text queries)
    relevant: Optional[int] = None  # hits whose study has ``target``
    filters: List[str] = field(default_factory=list)
    query_image: Optional[str] = None  # path of the query DICOM (image queries)
    query_truth: Optional[str] = None  # the query study's findings (image queries)
    query_report: Optional[str] = None
    hits: List[Dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _is_relevant(truth: Optional[Truth], target: Optional[str]) -> Optional[bool]:
    if truth is None or target is None:
        return None
    return not truth.findings if target == "normal" else target in truth.findings


def _hit_row(root: Path, hit: Hit, truth: Mapping[str, Truth], target: Optional[str]) -> Dict[str, Any]:
    t = truth.get(hit.study_uid)
    return {"rank": hit.rank, "score": round(float(hit.score), 4), "view": hit.view, "study_uid": hit.study_uid,
            "path": relative(root, hit.path), "abs_path": hit.path, "truth": t.label if t else None,
            "relevant": _is_relevant(t, target), "section": hit.section_kind,
            "text": (hit.section_text if hit.section_text else hit.report_excerpt or "").strip()}


def run_text_queries(searcher: Searcher, root: Path, truth: Mapping[str, Truth], *, k: int,
                     queries: Sequence[Tuple[str, str]] = TEXT_QUERIES,
                     filters: Sequence[str] = TEXT_FILTERS) -> List[QueryResult]:
    """Run each text -> image query (with ``filters``) and score its hits against the ground truth."""
    import time

    parsed = parse_filters(filters)
    out: List[QueryResult] = []
    for text, target in queries:
        t0 = time.perf_counter()
        hits = searcher.search_text(text, k=k, level="image", filters=parsed)
        secs = time.perf_counter() - t0
        rows = [_hit_row(root, h, truth, target) for h in hits]
        out.append(QueryResult("text->image", text, round(secs, 4), target=target,
                               relevant=sum(1 for r in rows if r["relevant"]), filters=list(filters), hits=rows))
    return out


def run_image_queries(searcher: Searcher, root: Path, truth: Mapping[str, Truth], image: str, study_uid: str,
                      report: str, *, k: int) -> List[QueryResult]:
    """Image -> report sections and image -> images for one held-out DICOM (its own patient excluded)."""
    import time

    qt = truth.get(study_uid)
    out: List[QueryResult] = []
    for returns in ("reports", "images"):
        t0 = time.perf_counter()
        hits = searcher.search_image(image, k=k, returns=returns)
        secs = time.perf_counter() - t0
        rows = [_hit_row(root, h, truth, None) for h in hits]
        for r in rows:  # relevant = the hit's study shares a finding with the query's (or both normal)
            t = truth.get(r["study_uid"])
            if t is not None and qt is not None:
                r["relevant"] = bool(t.findings & qt.findings) or (not t.findings and not qt.findings)
        out.append(QueryResult(f"image->{returns}", relative(root, image), round(secs, 4),
                               relevant=sum(1 for r in rows if r["relevant"]), query_image=image,
                               query_truth=qt.label if qt else None, query_report=report, hits=rows))
    return out


# ---------------------------------------------------------------------------------------- gallery
_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;background:#111;color:#eee}
h1{font-size:22px} h2{font-size:17px;margin-top:32px;border-top:1px solid #333;padding-top:16px}
.q{color:#9cf} .sub{color:#aaa;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #333;padding:4px 8px;text-align:right}
.grid{display:flex;flex-wrap:wrap;gap:14px}
.hit{width:220px;background:#1d1d1d;border-radius:8px;padding:8px;border:2px solid #1d1d1d}
.hit.yes{border-color:#2e7d32} .hit.no{border-color:#5d2a2a} .hit.query{border-color:#1565c0;width:300px}
.hit img{width:200px;height:200px;object-fit:contain;background:#000;display:block;margin:auto}
.hit.query img{width:280px;height:280px}
.meta{font-size:12px;color:#aaa;margin:6px 0} .truth{font-size:12px;color:#cfc} .rep{font-size:12px;line-height:1.35}
.noimg{width:200px;height:200px;display:flex;align-items:center;justify-content:center;background:#000;color:#777}
"""


def _thumb(path: Optional[str], thumbs: Dict[str, Optional[str]]) -> str:
    if path and path not in thumbs:
        thumbs[path] = thumbnail_data_uri(path)
    uri = thumbs.get(path) if path else None
    return f'<img alt="thumbnail" src="{uri}">' if uri else '<div class="noimg">no image</div>'


def _card(row: Mapping[str, Any], thumbs: Dict[str, Optional[str]]) -> str:
    cls = {True: " yes", False: " no"}.get(row.get("relevant"), "")
    bits = (f"#{row['rank']}", f"score {row['score']:.3f}", row.get("view") or "")
    meta = " · ".join(html.escape(str(b)) for b in bits if b)
    label = f"<b>{html.escape(row['section'])}:</b> " if row.get("section") else ""
    text = str(row.get("text") or "(no report)")
    text = text if len(text) <= 260 else text[:259] + "…"
    return (f'<div class="hit{cls}">{_thumb(row.get("abs_path"), thumbs)}<div class="meta">{meta}</div>'
            f'<div class="truth">truth: {html.escape(str(row.get("truth") or "?"))}</div>'
            f'<div class="rep">{label}{html.escape(text)}</div></div>')


def _section(q: QueryResult, thumbs: Dict[str, Optional[str]]) -> str:
    n = len(q.hits)
    score = f" — {q.relevant}/{n} hits relevant" if q.relevant is not None else ""
    what = ("(relevant: no finding in the ground truth)" if q.target == "normal" else
            f"(relevant: has {q.target.replace('_', ' ')})") if q.target else \
        "(relevant: shares a finding with the query study; the query's own patient is excluded)"
    label = f"held-out DICOM …/{Path(q.query).name}" if q.query_image else q.query
    filt = f" [{' '.join(q.filters)}]" if q.filters else ""
    head = f"<h2>{html.escape(q.kind + filt)}: <span class='q' title='{html.escape(q.query)}'>" \
           f"{html.escape(label)}</span>{score}</h2><div class='sub'>{html.escape(what)}</div>"
    cards = []
    if q.query_image:
        rep = html.escape((q.query_report or "")[:400])
        cards.append(f'<div class="hit query">{_thumb(q.query_image, thumbs)}<div class="meta">query image '
                     f'(held out)</div><div class="truth">truth: {html.escape(q.query_truth or "?")}</div>'
                     f'<div class="rep">{rep}</div></div>')
    cards.extend(_card(r, thumbs) for r in q.hits)
    return head + "<div class='grid'>" + ("\n".join(cards) or "<p>no hits</p>") + "</div>"


def _summary_table(summary: Mapping[str, Any]) -> str:
    ret = summary.get("retrieval") or {}
    rows = []
    for level, key in (("image", "headline"), ("study", "study_level_headline")):
        for name, block in (ret.get(key) or {}).items():
            cells = "".join(f"<td>{float(block[k]):.3f}</td>" for k in ("R@1", "R@5", "R@10"))
            rows.append(f"<tr><th>{level}</th><th>{DIRECTIONS.get(name, name)}</th>{cells}</tr>")
    recall = ("<table><tr><th colspan=2>held-out retrieval (full protocol)</th><th>R@1</th><th>R@5</th><th>R@10</th>"
              "</tr>" + "".join(rows) + "</table>") if rows else ""
    facts = html.escape(" · ".join(f"{k} {v}" for k, v in (summary.get("facts") or {}).items()))
    return f"<div class='sub'>{facts}</div>{recall}"


def write_demo_gallery(out: Path, queries: Sequence[QueryResult], summary: Mapping[str, Any]) -> Path:
    """Write every query's hits, with base64 thumbnails, to one self-contained page (atomically)."""
    thumbs: Dict[str, Optional[str]] = {}
    body = "\n".join(_section(q, thumbs) for q in queries)
    title = "cxr-search demo"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
            f"<body><h1>{title}: synthetic PACS archive, tiny-synth model</h1>{_summary_table(summary)}"
            f"{body}</body></html>\n")
    write_text_atomic(out, page)
    return out


__all__ = ["DIRECTIONS", "QueryResult", "TEXT_QUERIES", "run_image_queries", "run_text_queries", "write_demo_gallery"]
