"""The demo's terminal report: timings, archive and index, failures, example queries, Recall@K tables.

Tables go to stdout through :data:`cxr_search.terminal.out_console`, whose markup is off: reports, paths
and failure reasons print literally; the report's own colours (relevant hits green) are
:class:`rich.text.Text` styles. Every column folds long values (paths, UIDs, CIs) instead of cutting them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from cxr_search.terminal import out_console, styled

#: Longest failure reason and hit text shown (the summary JSON has them whole).
_REASON_CHARS = 110
_HIT_CHARS = 140


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(title: str, *columns: str, right: tuple = (), **kwargs: Any) -> Table:
    t = Table(title=Text(title), **kwargs)
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left", overflow="fold")
    return t


def print_demo_tables(result: Any) -> None:
    """Print a demo result (:class:`index.demo.run.DemoResult` or alike with ``to_dict()``) as tables on stdout."""
    con = out_console
    r = result.to_dict()
    t = _table(f"cxr-search demo -> {r['out_dir']}", "stage", "seconds", "", right=("seconds",))
    for stage, secs in r["timings_s"].items():
        t.add_row(stage, f"{secs:.1f}", "reused" if r["reused"].get(stage) else "")
    con.print(t)
    split = r["split"]["splits"]
    t = _table("archive, hold-out and index", "", "", show_header=False)
    t.add_row("archive", f"{r['archive']['studies']} studies, {r['archive']['images']} images, "
                         f"{r['archive']['patients']} patients, {len(r['archive']['broken_files'])} broken files")
    for name, c in split.items():
        t.add_row(f"split {name}", f"{c['patients']} patients, {c['studies']} studies, {c['images']} images")
    totals = r["index"]["totals"]
    t.add_row("index", f"{totals['images']} images, {totals['studies']} studies, {totals['sections']} report sections, "
                       f"{totals['failed']} failures")
    t.add_row("training", f"{r['training'].get('steps')} steps, {r['training'].get('epochs')} epochs, "
                          f"{r['training'].get('seconds')} s")
    t.add_row("model", f"{r['model_dir']} ({r['model_fingerprint'][:12]})")
    con.print(t)
    b = r["broken_files"]
    t = _table(f"not indexed: {b['recorded']} of the {b['mixed_in']} broken files mixed in recorded as failures"
               + (f", {len(b['report_objects'])} pixel-less SR used as report source" if b["report_objects"] else "")
               + (f"; NOT recorded: {', '.join(b['not_recorded'])}" if b["not_recorded"] else ""),
               "file", "stage", "reason")
    for f in r["failures"]:
        t.add_row(f["path"], f["stage"], _short(f["reason"], _REASON_CHARS))
    con.print(t)
    for q in r["queries"]:
        score = f" ({q['relevant']}/{len(q['hits'])} relevant)" if q["relevant"] is not None else ""
        query = f"held-out DICOM …/{Path(q['query']).name}" if q["query_image"] else repr(q["query"])
        filt = f" [{' '.join(q['filters'])}]" if q["filters"] else ""
        t = _table(f"{q['kind']}{filt}: {query}{score}", "#", "score", "view", "truth", "report")
        if q["query_image"]:
            t.caption = Text(f"query study's truth: {q['query_truth']}; its own patient is excluded")
        for h in q["hits"]:
            truth = styled(h["truth"] or "", {True: "green", False: "red"}.get(h["relevant"], ""))
            text = (f"[{h['section']}] " if h["section"] else "") + str(h["text"] or "")
            t.add_row(str(h["rank"]), f"{h['score']:.3f}", h["view"] or "", truth, _short(text, _HIT_CHARS))
        con.print(t)
    ret = r["retrieval"]
    t = _table(f"retrieval benchmark on the held-out split ({ret['protocol']} protocol: {ret['studies']} studies, "
               f"{ret['images']} images, {ret['unique_texts']} distinct texts)",
               "level", "direction", "R@1", "R@5", "R@10", "R@10 95% CI", "mean rank",
               right=("R@1", "R@5", "R@10", "R@10 95% CI", "mean rank"))
    for level, key in (("image", "image_level"), ("study", "study_level")):
        for direction, m in (ret.get(key) or {}).get("dedup", {}).items():
            ci = m.get("ci95", {}).get("R@10")
            t.add_row(level, direction.replace("_to_", " → "), *(f"{m[k]:.3f}" for k in ("R@1", "R@5", "R@10")),
                      f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "", f"{m['mean_rank']:.1f}")
    con.print(t)
    con.print(f"gallery: {r['gallery']}   (summary: {Path(r['out_dir']) / 'summary.json'})")
    if r.get("serve_command"):
        # Last, on a line of its own, so it can be copied: the web page and JSON API over the demo index.
        con.print("search the demo index in a browser (http://127.0.0.1:8000/) with:")
        con.print(r["serve_command"], soft_wrap=True)
