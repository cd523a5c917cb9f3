"""``--html``: one self-contained page of hits, with thumbnails and report excerpts.

Thumbnails are rendered through the same photometric chain as the model input (DICOM VOI LUT and
MONOCHROME1 inversion) and embedded as base64 JPEG, so the page opens anywhere, offline, with no
link back to the archive's file paths.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from cxr_search.config import PreprocessConfig
from cxr_search.fileio import write_text_atomic
from cxr_search.images import load_image

logger = logging.getLogger(__name__)
THUMB = 256

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;background:#111;color:#eee}
h1{font-size:20px} .q{color:#9cf}
.grid{display:flex;flex-wrap:wrap;gap:16px}
.hit{width:280px;background:#1d1d1d;border-radius:8px;padding:10px}
.hit img{width:256px;height:256px;object-fit:contain;background:#000;display:block;margin:auto}
.meta{font-size:12px;color:#aaa;margin:6px 0} .rep{font-size:13px;line-height:1.35}
.noimg{width:256px;height:256px;display:flex;align-items:center;justify-content:center;background:#000;color:#777}
"""


def thumbnail_data_uri(path: Union[str, Path], size: int = THUMB) -> Optional[str]:
    """A base64 JPEG data URI of an image file (DICOM or PNG/JPEG), or None when unreadable."""
    try:
        img = load_image(str(path), PreprocessConfig(dicom_shorter_side=size))
    except Exception as exc:  # a thumbnail must never fail a search
        logger.warning("%s: no thumbnail (%s)", path, exc)
        return None
    img = img.convert("L")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _card(hit: Any) -> str:
    uri = thumbnail_data_uri(hit.path) if hit.path else None
    img = f'<img alt="hit {hit.rank}" src="{uri}">' if uri else '<div class="noimg">no image</div>'
    bits = [f"#{hit.rank}", f"score {hit.score:.3f}", hit.view or "", hit.study_date or "",
            f"{hit.sex or ''} {'' if hit.age is None else int(hit.age)}".strip()]
    meta = " · ".join(html.escape(str(b)) for b in bits if b)
    text = hit.section_text if hit.section_text else hit.report_excerpt
    label = f"<b>{html.escape(hit.section_kind)}:</b> " if hit.section_kind else ""
    return (f'<div class="hit">{img}<div class="meta">{meta}</div>'
            f'<div class="rep">{label}{html.escape(text or "(no report)")}</div></div>')


def write_gallery(out: Union[str, Path], title: str, query: str, hits: Sequence[Any],
                  query_image: Optional[Union[str, Path]] = None) -> Path:
    """Write the page (atomically) and return its path."""
    head = ""
    if query_image is not None:
        uri = thumbnail_data_uri(query_image)
        head = f'<div class="hit"><div class="meta">query image</div>{f"<img src={uri!r}>" if uri else ""}</div>'
    cards = "\n".join(_card(h) for h in hits) or "<p>no hits</p>"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}: <span class='q'>{html.escape(query)}</span>"
            f"</h1>{head}<div class='grid'>{cards}</div></body></html>\n")
    write_text_atomic(out, page)
    return Path(out)
