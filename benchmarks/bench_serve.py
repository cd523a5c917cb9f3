"""``cxr-search serve`` over HTTP: readiness, warm query latency, throughput under 8 clients, uploads, page load.

Usage:
    .venv/bin/python benchmarks/bench_serve.py --work /tmp/bench-serve [--images 100000] [--duration 60]
        [--clients 8] [--quick] [--rebuild] [--out benchmarks/results/serve-cpu-2core.json]

The index: a small real one (a synthetic PACS export of ``--real-studies`` studies, 512-pixel DICOM
with reports, built by ``index build`` with the ``cxr-clip-r50`` preset, random weights and a
WordPiece vocabulary trained in code; nothing is downloaded) padded in its store to ``--images``
embedded images (clustered synthetic vectors, ``index.ann.reference.clustered_unit_vectors``; 1.75
images a study, one report section a study, every padded image pointing at one of the real files so
thumbnails render) and synced to FAISS by ``IndexDir.sync`` (which picks its own factory: exact up to
100,000 vectors); see ``benchmarks/bench_serve_index.py``. The model is saved in the project's directory format, so the index records it and
``serve INDEX`` needs no ``--model``. The index is kept in ``--work`` and reused by later runs.

Measured against a ``cxr-search serve INDEX --port P`` subprocess on 127.0.0.1 (no tokens: an open
loopback server), with the CPU's vector flags and bf16 support recorded:

* start to ``/healthz`` 200 (process start, imports, model and FAISS load, warm-up);
* one client, ``POST /api/search/text`` (k=20) end to end over one keep-alive connection: p50/p99;
* ``--clients`` threads for ``--duration`` s, each its own connection: queries/s, p50/p99, errors;
* a DICOM upload ``POST /api/search/image`` (multipart; the server's image tower runs in fp32): a
  3000x2500 16-bit file and a 512-pixel one, ``return=images`` and ``return=reports``: p50/p99;
* the results page ``/?q=...`` in Debian's chromium driven by Playwright: time from navigation start
  to all 20 thumbnails loaded (``complete`` and ``naturalWidth > 0``), measured in the page with
  ``performance.now()``; first load of each query (thumbnails rendered, cache empty) and a reload (cached);
* after the server stopped, a cold ``cxr-search search text ... --index INDEX`` process (wall time),
  and the ratio warm server query p50 / cold CLI query.

The machine may be shared: for each phase ``cpu_of_others`` records the cores' worth of CPU that other
processes used meanwhile (``/proc/stat`` minus the server's and this process's own time), and
``quiet_machine`` is false when any phase had more than 0.25 of a core taken by others.

Targets (issue 19, this 2-core machine): warm text query p50 <= 60 ms; 8 clients >= 20 queries/s,
p99 <= 500 ms, 0 errors; DICOM upload p50 <= 300 ms; page with 20 thumbnails <= 1 s.
``--quick``: 5,000 images, 10 s of load, fewer repetitions (a smoke run, not the numbers to report).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from bench_serve_index import PRESET, full_size_dicom, prepare  # noqa: E402  (this script's folder)

from tests.helpers.serve import stop as stop_server  # noqa: E402  (SIGTERM by PID, then SIGKILL)

TARGETS = {"text_p50_ms": 60.0, "load_qps": 20.0, "load_p99_ms": 500.0, "load_errors": 0, "upload_p50_ms": 300.0,
           "page_ms": 1000.0}
_SHORT = ["large right pleural effusion with basal atelectasis", "no acute cardiopulmonary process",
          "enlarged cardiac silhouette", "left upper lobe pneumonia", "pneumothorax on the left",
          "endotracheal tube above the carina", "bilateral interstitial opacities", "healed rib fracture"]
_ALL_LOADED_JS = """(n) => new Promise((resolve, reject) => {
  const t0 = performance.now();
  const check = () => {
    const imgs = Array.from(document.querySelectorAll('article.card img'));
    if (imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0)) { resolve([performance.now(), imgs.length]); return; }
    if (performance.now() - t0 > 30000) { reject(new Error('thumbnails not loaded in 30 s')); return; }
    setTimeout(check, 5);
  };
  check();
})"""


# ---------------------------------------------------------------------------------------------- machine


def machine() -> Dict[str, Any]:
    """CPU, cores, torch and bf16 facts of this machine."""
    import torch

    from cxr_search.inference import cpu_has_fast_bf16
    from index.bench.speed import cpu_flags

    model_name = ""
    try:
        model_name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model_name or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_flags": cpu_flags(),
            "avx512_bf16": "avx512_bf16" in cpu_flags(), "native_bf16": cpu_has_fast_bf16(),
            "load_avg_at_start": list(os.getloadavg())}


class OtherLoad:
    """CPU time spent by processes other than the server and this benchmark during a phase (Linux /proc).

    The machine is shared: ``other_cores`` (cores' worth of CPU others used on average) tells whether a
    phase's numbers were measured on a quiet machine.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.t0 = time.perf_counter()
        self.busy0 = self._busy()
        self.ours0 = self._ours()

    @staticmethod
    def _busy() -> float:
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError):
            return 0.0
        return float(sum(f) - f[3] - (f[4] if len(f) > 4 else 0))  # all but idle and iowait

    def _ours(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
            except (OSError, ValueError, IndexError):
                pass
        return total

    def done(self) -> Dict[str, float]:
        """``other_cores`` and ``ours_cores`` since the start, and the 1-minute load average now."""
        hz = float(os.sysconf("SC_CLK_TCK"))
        wall = max(time.perf_counter() - self.t0, 1e-6)
        busy = (self._busy() - self.busy0) / hz
        ours = (self._ours() - self.ours0) / hz
        return {"other_cores": round(max(busy - ours, 0.0) / wall, 2), "ours_cores": round(ours / wall, 2),
                "loadavg_1min": round(os.getloadavg()[0], 2)}


def pct(values: Sequence[float], q: float) -> Optional[float]:
    """The ``q`` percentile of ``values`` rounded to 0.1 (None when empty)."""
    return round(float(np.percentile(np.asarray(values), q)), 1) if len(values) else None


def summary(values: Sequence[float]) -> Dict[str, Any]:
    """n, p50, p90, p99, max of latencies in ms."""
    return {"n": len(values), "p50_ms": pct(values, 50), "p90_ms": pct(values, 90), "p99_ms": pct(values, 99),
            "max_ms": round(max(values), 1) if len(values) else None}


# ---------------------------------------------------------------------------------------------- the server
def cli_command() -> List[str]:
    """How to run ``cxr-search``: the venv's console script, else ``python cli.py``."""
    exe = Path(sys.executable).parent / "cxr-search"
    return [str(exe)] if exe.is_file() else [sys.executable, str(REPO / "cli.py")]


def start_server(index_dir: Path, state_dir: Path, log_path: Path, timeout: float = 300.0
                 ) -> Tuple[subprocess.Popen, int, float]:
    """(process, port, seconds from process start to the first ``/healthz`` 200)."""
    from tests.helpers.ports import free_port

    port = free_port()
    cmd = [*cli_command(), "serve", str(index_dir), "--host", "127.0.0.1", "--port", str(port),
           "--state-dir", str(state_dir)]
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while True:  # bounded by the timeout
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            con = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            con.request("GET", "/healthz")
            resp = con.getresponse()
            body = resp.read()
            con.close()
            if resp.status == 200 and json.loads(body).get("status") == "ok":
                return proc, port, time.perf_counter() - t0
        except (OSError, http.client.HTTPException, ValueError):
            pass
        if time.perf_counter() - t0 > timeout:
            stop_server(proc)
            raise SystemExit(f"server not ready in {timeout} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)



def rss_mb(pid: int) -> Dict[str, Optional[float]]:
    """Resident and peak resident memory of a process in MB (Linux)."""
    out: Dict[str, Optional[float]] = {"rss_mb": None, "peak_rss_mb": None}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
            elif line.startswith("VmHWM:"):
                out["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, path: str, body: bytes, content_type: str) -> Tuple[int, bytes, float]:
        """(status, body, ms) of one POST; reconnects once when the server closed the connection."""
        for attempt in (0, 1):
            t0 = time.perf_counter()
            try:
                self.con.request("POST", path, body=body, headers={"Content-Type": content_type})
                resp = self.con.getresponse()
                data = resp.read()
                return resp.status, data, (time.perf_counter() - t0) * 1000
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.con.close()
                self.con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def text(self, query: str, k: int = 20) -> Tuple[int, Dict[str, Any], float]:
        """(status, JSON answer, ms) of a text query."""
        status, data, ms = self.post("/api/search/text", json.dumps({"query": query, "k": k}).encode(),
                                     "application/json")
        return status, (json.loads(data) if status == 200 else {"error": data[:300].decode(errors="replace")}), ms

    def close(self) -> None:
        """Close the connection."""
        self.con.close()


def multipart(fields: Dict[str, str], filename: str, data: bytes, content_type: str) -> Tuple[bytes, str]:
    """(body, Content-Type header) of a multipart/form-data upload with one ``file`` part."""
    boundary = "bench" + uuid.uuid4().hex
    parts = []
    for key, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------------------------------------- measurements
def queries(n: int) -> List[str]:
    """``n`` query texts: short findings and report-like sentences, alternating."""
    from index.bench.speed import synthetic_texts

    long = synthetic_texts(n)
    return [_SHORT[i % len(_SHORT)] if i % 2 else long[i] for i in range(n)]


def single_client(port: int, n: int) -> Dict[str, Any]:
    """p50/p99 of ``n`` sequential text queries (k=20) after 5 warm-up queries; server-side took_ms too."""
    c = Client(port)
    try:
        for q in queries(5):
            c.text(q)
        lat, took, errors = [], [], 0
        for q in queries(n):
            status, body, ms = c.text(q)
            if status != 200 or len(body.get("hits", [])) != 20:
                errors += 1
                continue
            lat.append(ms)
            took.append(float(body.get("took_ms", 0.0)))
    finally:
        c.close()
    return {**summary(lat), "errors": errors, "server_took_p50_ms": pct(took, 50), "k": 20}


def load(port: int, clients: int, duration: float) -> Dict[str, Any]:
    """``clients`` threads sending text queries back to back for ``duration`` s: throughput, latency, errors."""
    qs = queries(200)
    lat: List[List[float]] = [[] for _ in range(clients)]
    errors: List[List[str]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(w: int) -> None:
        c = Client(port)
        start.wait()
        i = w * 17
        try:
            while time.perf_counter() < stop_at[0]:  # bounded by the deadline
                try:
                    status, body, ms = c.text(qs[i % len(qs)])
                    if status == 200 and body.get("hits"):
                        lat[w].append(ms)
                    else:
                        errors[w].append(f"{status}: {str(body)[:120]}")
                except (OSError, http.client.HTTPException) as exc:
                    errors[w].append(f"{type(exc).__name__}: {exc}")
                i += 1
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + duration
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join(timeout=duration + 120)
    wall = time.perf_counter() - t0
    all_lat = [x for per in lat for x in per]
    all_err = [e for per in errors for e in per]
    return {"clients": clients, "duration_s": round(wall, 1), "queries": len(all_lat),
            "queries_per_s": round(len(all_lat) / wall, 1), **summary(all_lat), "errors": len(all_err),
            "error_examples": all_err[:5]}


def uploads(port: int, files: Dict[str, Path], n: int) -> Dict[str, Any]:
    """p50/p99 of DICOM uploads (multipart, k=20) per file and ``return``."""
    c = Client(port)
    out: Dict[str, Any] = {}
    try:
        for name, path in files.items():
            data = path.read_bytes()
            for returns in ("images", "reports"):
                body, ctype = multipart({"return": returns, "k": "20"}, path.name, data, "application/dicom")
                c.post("/api/search/image", body, ctype)  # warm-up (first decode of this size)
                lat, errors = [], []
                for _ in range(n):
                    status, resp, ms = c.post("/api/search/image", body, ctype)
                    if status == 200 and json.loads(resp).get("hits"):
                        lat.append(ms)
                    else:
                        errors.append(f"{status}: {resp[:160].decode(errors='replace')}")
                out[f"{name} return={returns}"] = {**summary(lat), "errors": len(errors), "error_examples": errors[:3],
                                                   "file_mb": round(len(data) / 1e6, 2)}
    finally:
        c.close()
    return out


def page_loads(base: str, n: int) -> Dict[str, Any]:
    """Results pages ``/?q=...`` in chromium: ms from navigation start to all 20 thumbnails loaded."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    first, again, cards = [], [], []
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base + "/?q=" + urllib.parse.quote_plus("warm up"))
            page.evaluate(_ALL_LOADED_JS, 20)
            for q in queries(n + 1)[1:]:
                for store in (first, again):
                    # A new navigation each time; the reload may take thumbnails from the browser's cache.
                    page.goto(base + "/?" + urllib.parse.urlencode({"q": q}), wait_until="commit")
                    ms, count = page.evaluate(_ALL_LOADED_JS, 20)
                    store.append(float(ms))
                    cards.append(int(count))
        finally:
            browser.close()
    return {"first_load": summary(first), "reload": summary(again), "thumbnails_per_page": sorted(set(cards)),
            "browser": chromium, "viewport": "1280x900"}


def cold_cli(index_dir: Path, runs: int) -> Dict[str, Any]:
    """Wall time of ``cxr-search search text QUERY --index INDEX`` processes (no server running)."""
    times = []
    for i in range(runs):
        cmd = [*cli_command(), "search", "text", _SHORT[i % len(_SHORT)], "--index", str(index_dir), "-k", "20",
               "--json"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
        times.append((time.perf_counter() - t0) * 1000)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr[-1000:]}")
    return {"runs": runs, "wall_ms": [round(t) for t in times], "median_ms": round(float(np.median(times))),
            "command": "cxr-search search text QUERY --index INDEX -k 20 --json"}


def verdict(r: Dict[str, Any]) -> Dict[str, Any]:
    """Each target with its measured value and whether it is met."""
    up = [v["p50_ms"] for k, v in r["upload"].items() if k.startswith("dicom-3000x2500") and v["p50_ms"] is not None]
    checks = {
        "text_p50_ms <= 60": (r["single_client"]["p50_ms"], r["single_client"]["p50_ms"] <= TARGETS["text_p50_ms"]),
        "load_qps >= 20": (r["load"]["queries_per_s"], r["load"]["queries_per_s"] >= TARGETS["load_qps"]),
        "load_p99_ms <= 500": (r["load"]["p99_ms"], (r["load"]["p99_ms"] or 1e9) <= TARGETS["load_p99_ms"]),
        "load_errors == 0": (r["load"]["errors"], r["load"]["errors"] == 0),
        "upload_p50_ms <= 300 (3000x2500 DICOM, worst return)": (max(up) if up else None,
                                                                 bool(up) and max(up) <= TARGETS["upload_p50_ms"]),
    }
    if "page" in r:
        p = r["page"]["first_load"]["p50_ms"]
        checks["page_first_load_p50_ms <= 1000"] = (p, p is not None and p <= TARGETS["page_ms"])
    return {k: {"value": v, "met": bool(ok)} for k, (v, ok) in checks.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="Folder for model, archive and index (kept, reused).")
    ap.add_argument("--images", type=int, default=None, help="Images in the index (default 100000; --quick 5000).")
    ap.add_argument("--real-studies", type=int, default=12, help="Studies of the real archive the index starts from.")
    ap.add_argument("--duration", type=float, default=None, help="Seconds of the concurrent load (default 60).")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--queries", type=int, default=None, help="Sequential text queries (default 200).")
    ap.add_argument("--uploads", type=int, default=None, help="Uploads per file and return (default 20).")
    ap.add_argument("--pages", type=int, default=None, help="Results pages loaded in the browser (default 10).")
    ap.add_argument("--cli-runs", type=int, default=None, help="Cold CLI processes (default 3).")
    ap.add_argument("--no-browser", action="store_true", help="Skip the page-load measurement.")
    ap.add_argument("--rebuild", action="store_true", help="Rebuild model, archive and index in --work.")
    ap.add_argument("--quick", action="store_true", help="A smoke run: small index, short load, few repetitions.")
    ap.add_argument("--out", type=Path, default=None, help="Also write the JSON result here.")
    args = ap.parse_args()
    q = args.quick
    images = args.images or (5000 if q else 100_000)
    duration = args.duration or (10.0 if q else 60.0)
    n_queries = args.queries or (30 if q else 200)
    n_uploads = args.uploads or (3 if q else 20)
    n_pages = args.pages or (2 if q else 10)
    cli_runs = args.cli_runs or (1 if q else 3)
    work = args.work or Path(tempfile.gettempdir()) / "bench-serve"
    work.mkdir(parents=True, exist_ok=True)

    t_all = time.perf_counter()
    result: Dict[str, Any] = {"preset": PRESET, "weights": "random (speed only)", "quick": q, "images": images,
                              "machine": machine(), "targets": TARGETS}
    index_dir, archive, result["index"] = prepare(work, images, args.real_studies, args.rebuild)
    small = sorted(archive.rglob("*.dcm"))[0]
    files = {"dicom-3000x2500": full_size_dicom(work / "queries"), "dicom-512": small}

    state = work / f"state-{time.strftime('%Y%m%d-%H%M%S')}"  # empty: thumbnails are rendered on first view
    log_path = work / "server.log"
    proc, port, ready_s = start_server(index_dir, state, log_path)
    base = f"http://127.0.0.1:{port}"
    cpu: Dict[str, Any] = {}
    result["cpu_of_others"] = cpu
    result["start_to_healthz_200_s"] = round(ready_s, 2)
    print(f"server ready in {ready_s:.1f} s at {base}", flush=True)
    try:
        result["healthz"] = get_json(base + "/healthz")
        pids = [proc.pid, os.getpid()]
        meter = OtherLoad(pids)
        result["single_client"] = single_client(port, n_queries)
        cpu["single_client"] = meter.done()
        print(f"single client: {result['single_client']} {cpu['single_client']}", flush=True)
        meter = OtherLoad(pids)
        result["load"] = load(port, args.clients, duration)
        cpu["load"] = meter.done()
        print(f"{args.clients} clients: {result['load']} {cpu['load']}", flush=True)
        meter = OtherLoad(pids)
        result["upload"] = uploads(port, files, n_uploads)
        cpu["upload"] = meter.done()
        print(f"uploads: {json.dumps(result['upload'])} {cpu['upload']}", flush=True)
        if not args.no_browser:
            meter = OtherLoad(pids)  # chromium is a child of this process: counted as ours once it exits
            result["page"] = page_loads(base, n_pages)
            cpu["page"] = meter.done()
            print(f"page: {result['page']} {cpu['page']}", flush=True)
        result["server_memory"] = rss_mb(proc.pid)
    finally:
        result["server_exit_code"] = stop_server(proc)
        shutil.rmtree(state, ignore_errors=True)
    meter = OtherLoad([os.getpid()])  # the CLI processes are children: counted as ours once they exit
    result["cold_cli"] = cold_cli(index_dir, cli_runs)
    cpu["cold_cli"] = meter.done()
    result["warm_over_cold"] = round(result["single_client"]["p50_ms"] / result["cold_cli"]["median_ms"], 4)
    result["cold_over_warm"] = round(result["cold_cli"]["median_ms"] / result["single_client"]["p50_ms"], 1)
    result["verdict"] = verdict(result)
    # Numbers taken while other jobs used the cores are not this machine's: say so in the result.
    busiest = max((v["other_cores"] for v in cpu.values()), default=0.0)
    result["quiet_machine"] = busiest < 0.25
    if not result["quiet_machine"]:
        print(f"warning: other processes used up to {busiest} cores during the measurements (see cpu_of_others)",
              file=sys.stderr)
    result["bench_wall_s"] = round(time.perf_counter() - t_all, 1)
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from cxr_search.fileio import write_json_atomic

        write_json_atomic(args.out, result)


def get_json(url: str) -> Any:
    """The JSON body of a GET."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


if __name__ == "__main__":
    main()
