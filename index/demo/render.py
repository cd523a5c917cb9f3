"""The demo's terminal report: timings, archive and index, failures, example queries, Recall@K tables.

Data text (reports, paths, failure reasons) is escaped before it reaches rich, so it prints literally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def print_demo_tables(result: Any) -> None:
    """Print a demo result (:class:`index.demo.run.DemoResult` or alike with ``to_dict()``) as tables on stdout."""
    con = Console()
    r = result.to_dict()
    t = Table(title=f"cxr-search demo -> {r['out_dir']}")
    for col in ("stage", "seconds", ""):
        t.add_column(col, justify="right" if col == "seconds" else "left")
    for stage, secs in r["timings_s"].items():
        t.add_row(stage, f"{secs:.1f}", "reused" if r["reused"].get(stage) else "")
    con.print(t)
    split = r["split"]["splits"]
    t = Table(title="archive, hold-out and index", show_header=False)
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
    t = Table(title=f"not indexed: {b['recorded']} of the {b['mixed_in']} broken files mixed in recorded as failures"
                    + (f", {len(b['report_objects'])} pixel-less SR used as report source"
                       if b["report_objects"] else "")
                    + (f"; NOT recorded: {', '.join(b['not_recorded'])}" if b["not_recorded"] else ""))
    for col in ("file", "stage", "reason"):
        t.add_column(col, overflow="fold")
    for f in r["failures"]:
        reason = f["reason"] if len(f["reason"]) <= 110 else f["reason"][:109] + "…"
        t.add_row(escape(f["path"]), f["stage"], escape(reason))
    con.print(t)
    for q in r["queries"]:
        score = f" ({q['relevant']}/{len(q['hits'])} relevant)" if q["relevant"] is not None else ""
        query = f"held-out DICOM …/{Path(q['query']).name}" if q["query_image"] else repr(q["query"])
        filt = f" [{' '.join(q['filters'])}]" if q["filters"] else ""
        t = Table(title=escape(f"{q['kind']}{filt}: {query}{score}"))
        if q["query_image"]:
            t.caption = escape(f"query study's truth: {q['query_truth']}; its own patient is excluded")
        for col in ("#", "score", "view", "truth", "report"):
            t.add_column(col, overflow="fold")
        for h in q["hits"]:
            mark = {True: "[green]", False: "[red]"}.get(h["relevant"], "")
            text = (f"[{h['section']}] " if h["section"] else "") + str(h["text"] or "")
            t.add_row(str(h["rank"]), f"{h['score']:.3f}", h["view"] or "", f"{mark}{escape(h['truth'] or '')}",
                      escape(text[:140]))
        con.print(t)
    ret = r["retrieval"]
    t = Table(title=f"retrieval benchmark on the held-out split ({ret['protocol']} protocol: {ret['studies']} studies, "
                    f"{ret['images']} images, {ret['unique_texts']} distinct texts)")
    for col in ("level", "direction", "R@1", "R@5", "R@10", "R@10 95% CI", "mean rank"):
        t.add_column(col, justify="left" if col in ("level", "direction") else "right")
    for level, key in (("image", "image_level"), ("study", "study_level")):
        for direction, m in (ret.get(key) or {}).get("dedup", {}).items():
            ci = m.get("ci95", {}).get("R@10")
            t.add_row(level, direction.replace("_to_", " → "), *(f"{m[k]:.3f}" for k in ("R@1", "R@5", "R@10")),
                      f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "", f"{m['mean_rank']:.1f}")
    con.print(t)
    con.print(f"gallery: {r['gallery']}   (summary: {Path(r['out_dir']) / 'summary.json'})")
