"""Ingestion throughput vs model-only throughput, and warm end-to-end text-query latency.

Usage:
    .venv/bin/python benchmarks/bench_index.py --work /tmp/bench-index [--images 5000] [--preset cxr-clip-r50]
        [--workers 1] [--batch-size 32] [--queries 200] [--out RESULT.json]

(c) Ingestion: a synthetic PACS export (DICOM, mixed transfer syntaxes incl. RLE, JPEG-LS and
JPEG 2000, shorter side 512) of about ``--images`` files is indexed with ``index build`` (header
scan, decode in DataLoader workers, model, store commits, FAISS); throughput = embedded images /
wall time of the whole build. Model-only throughput = ``embed_images`` of in-memory 8-bit images of
the same size (preprocessing included, file decoding not), the figure of ``bench_encoders.py``.
Target: ingestion >= 0.8x model-only.

(b) Query: with the index warm (model loaded, FAISS files and store open), each of ``--queries``
report-like texts is searched with ``Searcher.search_text`` (tokenise, encode with the preset's text
tower, FAISS search, fetch hit metadata from the store) one at a time; p50 / p99 latency in ms.
Target for cxr-clip-r50: p50 <= 50 ms.

Random weights (speed does not depend on their values); the tokenizer is a WordPiece vocabulary
trained in code (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxr_search.checkpoints import model_fingerprint  # noqa: E402
from cxr_search.model import create_model  # noqa: E402
from cxr_search.synth import synthesize  # noqa: E402
from index.engine import BuildOptions, build  # noqa: E402
from index.search import Searcher  # noqa: E402
from index.speed import _bench_tokenizer, measure_encoder, synthetic_images, synthetic_texts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder for the archive and the index (reused).")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--preset", default="cxr-clip-r50")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--workers", type=int, default=1, help="Decoding worker processes of the build.")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    archive = args.work / f"pacs-{args.images}"
    if not (archive / "ground_truth.csv").is_file():
        t0 = time.perf_counter()
        # Most studies have a PA and a lateral film: about 1.9 images per study.
        synthesize(archive, studies=max(1, round(args.images / 1.9)), seed=5, layout="pacs", broken=8, image_size=512)
        print(f"archive written in {time.perf_counter() - t0:.0f} s", flush=True)

    model = create_model(args.preset, tokenizer=_bench_tokenizer(args.preset))
    model.provenance = {"source": f"preset:{args.preset} (random weights)", "fingerprint": model_fingerprint(model)}
    images = synthetic_images(2 * args.batch_size, size=512)
    row, _, _ = measure_encoder(model, args.preset, images, synthetic_texts(8), precision=args.precision,
                                batch_size=args.batch_size)
    model_only = row.images_per_s
    print(f"model-only: {model_only:.2f} images/s", flush=True)

    index_dir = args.work / f"index-{args.preset}-{args.images}"
    if index_dir.exists():
        import shutil

        shutil.rmtree(index_dir)
    t0 = time.perf_counter()
    summary = build(archive, index_dir, model, BuildOptions(reports_csv=archive / "reports.csv", batch_size=args.batch_size,
                                                            num_workers=args.workers, precision=args.precision,
                                                            device="cpu"))
    wall = time.perf_counter() - t0
    embedded = summary["embedding"]["images"]["embedded"]
    ingest = embedded / wall
    print(f"ingestion: {embedded} images in {wall:.1f} s = {ingest:.2f} images/s ({ingest / model_only:.2f}x model-only)",
          flush=True)

    searcher = Searcher(index_dir, model, device="cpu")
    texts = synthetic_texts(args.queries)
    short = ["large right pleural effusion with basal atelectasis", "no acute cardiopulmonary process",
             "enlarged cardiac silhouette", "left upper lobe pneumonia"]
    queries = [short[i % len(short)] if i % 2 else texts[i] for i in range(args.queries)]
    for q in queries[:5]:
        searcher.search_text(q, k=10)  # warm-up
    lat = []
    for q in queries:
        t = time.perf_counter()
        hits = searcher.search_text(q, k=10)
        lat.append((time.perf_counter() - t) * 1000)
        assert len(hits) == 10
    searcher.close()
    lat_arr = np.asarray(lat)
    result = {
        "preset": args.preset, "precision": args.precision, "workers": args.workers, "batch_size": args.batch_size,
        "images_requested": args.images, "images_embedded": embedded, "build_wall_s": round(wall, 1),
        "ingest_images_per_s": round(ingest, 2), "model_only_images_per_s": model_only,
        "ingest_vs_model_only": round(ingest / model_only, 3),
        "build_timings": summary["timings"], "embedding": summary["embedding"], "totals": summary["totals"],
        "query_ms_p50": round(float(np.percentile(lat_arr, 50)), 2),
        "query_ms_p99": round(float(np.percentile(lat_arr, 99)), 2), "queries": len(lat),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "command": " ".join(sys.argv),
    }
    print(f"warm text query: p50 {result['query_ms_p50']} ms, p99 {result['query_ms_p99']} ms")
    doc = json.dumps(result, indent=2)
    print(doc)
    if args.out:
        args.out.write_text(doc + "\n")


if __name__ == "__main__":
    main()
