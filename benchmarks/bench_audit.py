"""The audit log's cost per answered request: ``AuditLog.record`` latency, one process and several at once.

Usage:
    .venv/bin/python benchmarks/bench_audit.py --work /tmp/bench-audit [--rows 500] [--processes 2]
        [--url postgresql+psycopg://...] [--out benchmarks/results/audit.json]

Every search and view of ``cxr-search serve`` commits one row before it is answered, so this latency is
added to each request. Measured on the default database (SQLite ``STATE_DIR/audit.sqlite``, WAL, full
sync) in ``--work``, and on ``--url`` when given; the rows are what a 20-hit text search writes. Then
``--processes`` processes append ``--rows`` rows each at once (``serve --workers N``): rows/s in all.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from index.bench.speed import cpu_flags  # noqa: E402
from index.serve.audit import AuditLog, default_audit_url  # noqa: E402

_IDS = [{"image_id": i, "study_uid": f"1.2.826.0.1.3680043.8.498.{i}", "score": 0.42} for i in range(20)]


def _append(url: str, rows: int, user: str) -> Tuple[float, float, List[float]]:
    """(wall-clock start, end, per-row milliseconds) of appending ``rows`` rows."""
    log = AuditLog(url)
    out = []
    start = time.time()
    try:
        for i in range(rows):
            t0 = time.perf_counter()
            log.record(user=user, client="127.0.0.1", action="search.text", ids=_IDS, generation="bench",
                       query={"text": f"large right pleural effusion {i}", "k": 20, "level": "image"})
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        log.close()
    return start, time.time(), out


def _stats(ms: List[float]) -> Dict[str, float]:
    ms = sorted(ms)
    return {"n": len(ms), "p50_ms": round(ms[len(ms) // 2], 3), "p99_ms": round(ms[int(len(ms) * 0.99)], 3),
            "max_ms": round(ms[-1], 3)}


def _parallel(url: str, rows: int, processes: int) -> Dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        runs = pool.starmap(_append, [(url, rows, f"worker{i}") for i in range(processes)])
    wall = max(r[1] for r in runs) - min(r[0] for r in runs)  # from the first row to the last, process starts left out
    return {"processes": processes, "rows": rows * processes, "rows_per_s": round(rows * processes / wall, 1),
            **_stats([x for r in runs for x in r[2]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder of the SQLite audit databases (made anew).")
    ap.add_argument("--rows", type=int, default=500, help="Rows per process.")
    ap.add_argument("--processes", type=int, default=2, help="Processes appending at once.")
    ap.add_argument("--url", default="", help="Also measure this database (e.g. PostgreSQL).")
    ap.add_argument("--out", type=Path, help="Write the results here as JSON.")
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    targets = {"sqlite": default_audit_url(args.work / f"single-{stamp}"),
               "sqlite_parallel": default_audit_url(args.work / f"parallel-{stamp}")}
    result: Dict[str, Any] = {"machine": {"cpu_flags": cpu_flags(), "cores": multiprocessing.cpu_count()},
                              "sqlite": {"one_process": _stats(_append(targets["sqlite"], args.rows, "alone")[2]),
                                         "parallel": _parallel(targets["sqlite_parallel"], args.rows, args.processes)}}
    if args.url:
        result["url"] = {"one_process": _stats(_append(args.url, args.rows, "alone")[2]),
                         "parallel": _parallel(args.url, args.rows, args.processes)}
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
