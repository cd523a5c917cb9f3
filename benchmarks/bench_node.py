"""The DICOM node: C-STORE instances/s over loopback, and the time from a study's last instance to searchable.

Receive rate: dcmtk's storescu sends N uncompressed 16-bit DX files over one association to an
in-process node (durable writes: temp file, fsync, rename, folder fsync); the clock runs from the
start of storescu to its exit. Latency: a node with a model (default the ``tiny`` preset, the
architecture of tiny-synth) and quiet time Q; a study of two 512 px images is sent, and the time from
storescu's exit to the end of the batch that indexed it (FAISS files written) is measured; minus Q
that is the processing time.

    .venv/bin/python benchmarks/bench_node.py --n-small 200 --n-full 10 --studies 3 --json benchmarks/results/node.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from index.build import BuildOptions  # noqa: E402
from index.node.inbox import Inbox  # noqa: E402
from index.node.scp import NodeConfig, StorageNode  # noqa: E402
from tests.helpers.dicom_files import make_ds, radiograph, save  # noqa: E402


def _files(folder: Path, n: int, rows: int, cols: int, study_uid: str = "") -> list:
    folder.mkdir(parents=True, exist_ok=True)
    base = radiograph(rows, cols, seed=1)
    out = []
    for i in range(n):
        attrs = {"BodyPartExamined": "CHEST", "ViewPosition": "PA", "PatientID": f"P{i}"}
        if study_uid:
            attrs["StudyInstanceUID"] = study_uid
        ds = make_ds(np.roll(base, i, axis=1), **attrs)
        out.append(save(ds, folder / f"{i:05d}.dcm"))
    return out


def _send(port: int, files: list) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(["storescu", "-aec", "CXRSEARCH", "127.0.0.1", str(port), *map(str, files)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"storescu failed: {res.stderr[-500:]}")
    return time.perf_counter() - t0


def receive_rate(work: Path, n: int, rows: int, cols: int) -> dict:
    files = _files(work / f"send-{rows}", n, rows, cols)
    inbox = Inbox(work / f"index-{rows}")
    inbox.prepare()
    node = StorageNode(inbox, NodeConfig(port=0))
    node.start()
    try:
        seconds = _send(node.port, files)
    finally:
        node.stop()
    mb = sum(f.stat().st_size for f in files) / 1e6
    assert node.counts["stored"] == n
    return {"size": f"{rows}x{cols}", "instances": n, "seconds": round(seconds, 3),
            "instances_per_s": round(n / seconds, 1), "MB_per_s": round(mb / seconds, 1)}


def latency(work: Path, model_name: str, quiet: float, studies: int) -> dict:
    from pydicom.uid import generate_uid

    from cxr_search.checkpoints import load_model
    from index.node.runtime import Node
    from index.node.worker import WorkerOptions

    model = load_model(model_name)
    node = Node(work / "index-latency", model, NodeConfig(port=0),
                WorkerOptions(quiet_s=quiet, poll_s=0.1, build=BuildOptions(batch_size=8, device="cpu")))
    node.start()
    times = []
    try:
        for k in range(studies):
            files = _files(work / f"study{k}", 2, 512, 512, study_uid=generate_uid())
            before = len(node.worker.processed)
            _send(node.scp.port, files)
            t_last = time.perf_counter()
            while len(node.worker.processed) == before:
                if time.perf_counter() - t_last > 120:
                    raise SystemExit("study not indexed within 120 s")
                time.sleep(0.02)
            times.append(time.perf_counter() - t_last)
    finally:
        node.stop()
    return {"model": model_name, "quiet_s": quiet, "last_instance_to_searchable_s": [round(t, 2) for t in times],
            "after_quiet_s": [round(t - quiet, 2) for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-small", type=int, default=200)
    ap.add_argument("--n-full", type=int, default=10)
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--quiet", type=float, default=2.0)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-node-"))
    try:
        result = {"receive": [receive_rate(work, args.n_small, 512, 512)]}
        if args.n_full:
            result["receive"].append(receive_rate(work, args.n_full, 3000, 2500))
        if args.studies:
            result["latency"] = latency(work, args.model, args.quiet, args.studies)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
