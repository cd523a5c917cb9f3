"""``cxr-search search ...``: the Typer sub-app of text and image queries (mounted by ``cli.py``).

Every option and filter is checked before the model or the index is loaded (a bad value ends with exit
code 2 at once). The model defaults to the one the index records (:func:`index.model_ref.resolve_model`).
Hits go to stdout (one card per hit below 120 columns, a table with ``--wide`` or on wide terminals,
one JSON document with ``--json``); warnings about the query go to stderr and into the JSON.
Report, query and path text is printed literally (markup is off in :mod:`cxr_search.terminal`).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import typer
from rich.table import Table
from rich.text import Text

from cxr_search.cli_options import (
    DB_HELP,
    DEVICE_HELP,
    INDEX_HELP,
    JSON_HELP,
    MODEL_HELP,
    TOKENIZER_HELP,
    TOP_K_HELP,
    check_device,
    check_precision,
)
from cxr_search.errors import ConfigError, InputFileError
from cxr_search.fileio import emit_json
from cxr_search.terminal import err_console, out_console, styled
from index.filters import MAX_K, Filters, check_k, check_level, check_returns, parse_filters

search_app = typer.Typer(help="Search an index by text or by image.", no_args_is_help=True)

#: Longest query echoed in a title; longer ones are shortened there (never in --json).
TITLE_QUERY_CHARS = 100
#: Longest report text shown per hit (the JSON has all of it).
HIT_TEXT_CHARS = 600
#: Terminal width from which hits are shown as a table rather than as cards.
WIDE_COLUMNS = 120
CARD_INDENT = "    "
_FILTER_HELP = ("key=value, repeatable: view=PA (view=LAT: any lateral), sex=F, age=40-60, since=YYYY-MM-DD, "
                "until=YYYY-MM-DD, modality=DX. Repeated view/sex/modality filters add up.")
_MODEL_OPT_HELP = MODEL_HELP + " Default: the model the index was built with."


def _top_k(k: int, k_alias: Optional[int]) -> int:
    return check_k(k_alias if k_alias is not None else k)


def _query_title(kind: str, query: str) -> Text:
    """``kind: query``, the query on one line and shortened when long (with its length said)."""
    flat = " ".join(query.split())
    title = Text(f"{kind}: ", style="bold")
    if len(flat) <= TITLE_QUERY_CHARS:
        return title.append(flat)
    title.append(flat[: TITLE_QUERY_CHARS - 1] + "…")
    return title.append(f"  (query shortened here: {len(query)} characters)", style="dim")


def _hit_text(h: Any) -> str:
    text = h.section_text if h.section_text else h.report_excerpt
    text = (f"[{h.section_kind}] " if h.section_kind else "") + " ".join((text or "").split())
    return text if len(text) <= HIT_TEXT_CHARS else text[: HIT_TEXT_CHARS - 1] + "…"


def _who(h: Any) -> str:
    age = "" if h.age is None else f"{int(h.age)}"
    return f"{h.sex or ''} {age}".strip()


def _print_cards(hits: List[Any]) -> None:
    """One block per hit: rank, score, view, date, sex/age; then the study, the file and the report text."""
    width = max(out_console.width, 40)
    for h in hits:
        head = Text(f"#{h.rank}", style="bold").append(f"  {h.score:.3f}")
        for part in (h.view, h.study_date, _who(h)):
            if part:
                head.append(f"  {part}")
        out_console.print(head)
        # Wrapped here, not by rich: long UIDs and paths break anywhere, every line keeps the indent.
        body = [f"study {h.study_uid}"] + ([f"file {h.path}"] if h.path else []) + [_hit_text(h)]
        lines = [wrapped for line in body if line
                 for wrapped in textwrap.wrap(line, width=width - 1, initial_indent=CARD_INDENT,
                                              subsequent_indent=CARD_INDENT, break_long_words=True,
                                              break_on_hyphens=False)]
        out_console.print(Text("\n".join(lines)), overflow="fold")


def _print_table(title: Text, hits: List[Any]) -> None:
    t = Table(title=title, title_justify="left")
    for col in ("#", "score", "view", "date", "sex/age", "study", "report"):
        t.add_column(col, overflow="fold", ratio=4 if col == "report" else (2 if col == "study" else None),
                     no_wrap=col in ("#", "score"))
    for h in hits:
        t.add_row(str(h.rank), f"{h.score:.3f}", h.view or "", h.study_date or "", _who(h), h.study_uid, _hit_text(h))
    out_console.print(t)


def _finish(kind: str, query: str, result: Any, f: Filters, k: int, model: str, index: Path, *, json_out: bool,
            html_out: Optional[Path], wide: bool, query_image: Optional[Path] = None) -> None:
    hits = result.hits
    for w in result.warnings:
        err_console.print(styled("warning: ", "bold yellow"), w.message, sep="")
    if html_out is not None:
        from index.html import write_gallery

        write_gallery(html_out, f"cxr-search {kind} query", query, hits, query_image=query_image)
    if json_out:
        doc: Dict[str, Any] = {"query": query, "kind": kind, "index": str(index), "model": model, "k": k,
                               "filters": f.to_dict(), "query_warnings": [w.to_dict() for w in result.warnings],
                               "hits": [h.to_dict() for h in hits], "html": str(html_out) if html_out else None}
        emit_json(doc)
        return
    title = _query_title(kind, query)
    if f.describe():
        title.append(f"  [{f.describe()}]", style="dim")
    if not hits:
        out_console.print(title)
        out_console.print("no hits")
    elif wide or out_console.width >= WIDE_COLUMNS:
        _print_table(title, hits)
    else:
        out_console.print(title)
        _print_cards(hits)
    if html_out is not None:
        err_console.print(f"gallery: {html_out}")


# The options `search text` and `search image` share (one declaration, one help text each).
_INDEX_OPTION = typer.Option(..., "--index", "-i", help=INDEX_HELP)
_MODEL_OPTION = typer.Option(None, "--model", "-m", help=_MODEL_OPT_HELP)
_TOKENIZER_OPTION = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP)
_TOP_K_OPTION = typer.Option(10, "-k", "--top-k", help=TOP_K_HELP.format(max_k=MAX_K))
_K_ALIAS_OPTION = typer.Option(None, "--k", hidden=True, help="Old spelling of --top-k.")
_FILTER_OPTION = typer.Option([], "--filter", help=_FILTER_HELP)
_SINCE_OPTION = typer.Option(None, "--since", help="Only studies on or after this date (YYYY-MM-DD).")
_UNTIL_OPTION = typer.Option(None, "--until", help="Only studies on or before this date (YYYY-MM-DD).")
_DB_OPTION = typer.Option(None, "--db", help=DB_HELP)
_DEVICE_OPTION = typer.Option("auto", "--device", help=DEVICE_HELP)
_WIDE_OPTION = typer.Option(False, "--wide", help="One table row per hit, whatever the terminal width.")
_JSON_OPTION = typer.Option(False, "--json", help=JSON_HELP)
_HTML_OPTION = typer.Option(None, "--html", help="Also write a page with thumbnails of the hits.")


def _open_searcher(index: Path, model: Optional[str], tokenizer: Optional[Path], device: str, db: Optional[str],
                   *, need_text: bool, text_precision: str = "auto") -> Tuple[Any, str]:
    """(Searcher, model source): the index's model unless ``model``, on ``device``."""
    from cxr_search.checkpoints import load_model
    from cxr_search.inference import Embedder
    from index.model_ref import resolve_model
    from index.search import Searcher

    source = resolve_model(index, model)
    embedder = Embedder(load_model(source, tokenizer=tokenizer, require_tokenizer=need_text), device=device)
    return Searcher(index, embedder, db_url=db, text_precision=text_precision), source


@search_app.command("text")
def search_text(
    query: str = typer.Argument(..., help="A description, e.g. 'large right pleural effusion'."),
    index: Path = _INDEX_OPTION,
    model: Optional[str] = _MODEL_OPTION,
    tokenizer: Optional[Path] = _TOKENIZER_OPTION,
    k: int = _TOP_K_OPTION,
    k_alias: Optional[int] = _K_ALIAS_OPTION,
    level: str = typer.Option("image", "--level", help="image (one hit per image) or study (one per study)."),
    filters: List[str] = _FILTER_OPTION,
    since: Optional[str] = _SINCE_OPTION,
    until: Optional[str] = _UNTIL_OPTION,
    db: Optional[str] = _DB_OPTION,
    device: str = _DEVICE_OPTION,
    query_precision: str = typer.Option("auto", "--query-precision",
                                        help="Query text encoder: auto (int8 on CPU), int8, fp32, bf16, fp16."),
    wide: bool = _WIDE_OPTION,
    json_out: bool = _JSON_OPTION,
    html_out: Optional[Path] = _HTML_OPTION,
) -> None:
    """Images (or studies) that match a description.

    Example: cxr-search search text "large right pleural effusion" -i /indices/chest -k 5 --filter view=PA
    """
    f = parse_filters(filters, since=since, until=until)
    top_k = _top_k(k, k_alias)
    check_level(level)
    check_device(device)
    check_precision(query_precision, text=True, option="--query-precision")
    if not query.strip():
        raise ConfigError("empty query; type a description such as 'large right pleural effusion'")
    searcher, source = _open_searcher(index, model, tokenizer, device, db, need_text=True,
                                      text_precision=query_precision)
    try:
        result = searcher.query_text(query, k=top_k, level=level, filters=f)
    finally:
        searcher.close()
    _finish("text", query, result, f, top_k, source, index, json_out=json_out, html_out=html_out, wide=wide)


@search_app.command("image")
def search_image(
    image: Path = typer.Argument(..., help="Query image file: DICOM (any name) or PNG/JPEG."),
    index: Path = _INDEX_OPTION,
    model: Optional[str] = _MODEL_OPTION,
    tokenizer: Optional[Path] = _TOKENIZER_OPTION,
    k: int = _TOP_K_OPTION,
    k_alias: Optional[int] = _K_ALIAS_OPTION,
    returns: str = typer.Option("reports", "--return", help="reports (report sections), images or studies."),
    filters: List[str] = _FILTER_OPTION,
    since: Optional[str] = _SINCE_OPTION,
    until: Optional[str] = _UNTIL_OPTION,
    include_same_patient: bool = typer.Option(False, "--include-same-patient",
                                              help="Do not exclude the query's own patient and study."),
    db: Optional[str] = _DB_OPTION,
    device: str = _DEVICE_OPTION,
    wide: bool = _WIDE_OPTION,
    json_out: bool = _JSON_OPTION,
    html_out: Optional[Path] = _HTML_OPTION,
) -> None:
    """Report sections, similar images or similar studies for an image.

    Example: cxr-search search image new_film.dcm -i /indices/chest --return studies -k 5
    """
    f = parse_filters(filters, since=since, until=until)
    top_k = _top_k(k, k_alias)
    check_returns(returns)
    check_device(device)
    if image.is_dir():
        raise InputFileError(str(image), "is a directory; give one image file (DICOM, PNG or JPEG)")
    if not image.is_file():
        raise InputFileError(str(image), "no such file; give one image file (DICOM, PNG or JPEG)")
    searcher, source = _open_searcher(index, model, tokenizer, device, db, need_text=False)
    try:
        result = searcher.query_image(image, k=top_k, returns=returns, filters=f,
                                      include_same_patient=include_same_patient)
    finally:
        searcher.close()
    _finish(f"image→{returns}", str(image), result, f, top_k, source, index, json_out=json_out, html_out=html_out,
            wide=wide, query_image=image)


__all__ = ["search_app"]
