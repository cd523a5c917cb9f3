"""``cxr-search search ...``: the Typer sub-app of text and image queries (mounted by ``cli.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from cxr_search.errors import ConfigError
from cxr_search.fileio import emit_json
from cxr_search.terminal import err_console as console
from cxr_search.terminal import out_console
from index.commands import _DB_HELP, _MODEL_HELP, _load

search_app = typer.Typer(help="Search an index by text or by image.", no_args_is_help=True)


def _print_hits(title: str, hits: List[Any]) -> None:
    t = Table(title=title)
    for col in ("#", "score", "view", "date", "sex/age", "study", "report"):
        t.add_column(col, overflow="fold")
    for h in hits:
        text = h.section_text if h.section_text else h.report_excerpt
        age = "" if h.age is None else str(int(h.age))
        t.add_row(str(h.rank), f"{h.score:.3f}", h.view or "", h.study_date or "", f"{h.sex or ''} {age}".strip(),
                  h.study_uid[-16:], (f"[{h.section_kind}] " if h.section_kind else "") + (text or "")[:160])
    out_console.print(t)


def _finish(kind: str, query: str, hits: List[Any], json_out: bool, html_out: Optional[Path],
            query_image: Optional[Path] = None) -> None:
    if html_out is not None:
        from index.html import write_gallery

        write_gallery(html_out, f"cxr-search {kind} query", query, hits, query_image=query_image)
    if json_out:
        emit_json({"query": query, "kind": kind, "hits": [h.to_dict() for h in hits],
                    "html": str(html_out) if html_out else None})
    else:
        _print_hits(f"{kind}: {query}", hits)
        if html_out is not None:
            console.print(f"gallery: {html_out}")


@search_app.command("text")
def search_text(
    query: str = typer.Argument(..., help="A description, e.g. 'large right pleural effusion'."),
    index: Path = typer.Option(..., "--index", "-i", help="Index folder."),
    model: str = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer"),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of hits."),
    level: str = typer.Option("image", "--level", help="image or study."),
    filters: List[str] = typer.Option([], "--filter", help="view=PA, sex=F, age=40-60, since=DATE, until=DATE, modality=DX."),
    since: Optional[str] = typer.Option(None, "--since", help="Only studies on or after this date (YYYY-MM-DD)."),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    device: str = typer.Option("auto", "--device"),
    query_precision: str = typer.Option("auto", "--query-precision", help="Query text encoder: auto (int8 on CPU), int8, fp32, bf16, fp16."),
    json_out: bool = typer.Option(False, "--json"),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write a page with thumbnails of the hits."),
) -> None:
    """Images (or studies) that match a description."""
    from cxr_search.inference import Embedder
    from index.search import Searcher, parse_filters

    f = parse_filters(filters, since=since)
    if not query.strip():
        raise ConfigError("empty query; type a description such as 'large right pleural effusion'")
    embedder = Embedder(_load(model, tokenizer, need_text=True), device=device)
    searcher = Searcher(index, embedder, db_url=db, text_precision=query_precision)
    try:
        hits = searcher.search_text(query, k=k, level=level, filters=f)
    finally:
        searcher.close()
    _finish("text", query, hits, json_out, html_out)


@search_app.command("image")
def search_image(
    image: Path = typer.Argument(..., help="Query image: DICOM (any name) or PNG/JPEG."),
    index: Path = typer.Option(..., "--index", "-i", help="Index folder."),
    model: str = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer"),
    k: int = typer.Option(10, "-k", "--k", min=1),
    returns: str = typer.Option("reports", "--return", help="reports (report sections), images or studies."),
    filters: List[str] = typer.Option([], "--filter", help="view=PA, sex=F, age=40-60, since=DATE, until=DATE."),
    since: Optional[str] = typer.Option(None, "--since"),
    include_same_patient: bool = typer.Option(False, "--include-same-patient", help="Do not exclude the query's own patient and study."),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    device: str = typer.Option("auto", "--device"),
    json_out: bool = typer.Option(False, "--json"),
    html_out: Optional[Path] = typer.Option(None, "--html"),
) -> None:
    """Report sections, similar images or similar studies for an image."""
    from cxr_search.inference import Embedder
    from index.search import Searcher, parse_filters

    f = parse_filters(filters, since=since)
    searcher = Searcher(index, Embedder(_load(model, tokenizer, need_text=False), device=device), db_url=db)
    try:
        hits = searcher.search_image(image, k=k, returns=returns, filters=f, include_same_patient=include_same_patient)
    finally:
        searcher.close()
    _finish(f"image→{returns}", str(image), hits, json_out, html_out, query_image=image)


__all__ = ["search_app"]
