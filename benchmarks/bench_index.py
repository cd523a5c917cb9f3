"""Ingestion throughput vs model-only throughput, and warm end-to-end text-query latency.

Usage:
    .venv/bin/python benchmarks/bench_index.py --work /tmp/bench-index [--images 5000] [--preset cxr-clip-r50]
        [--workers 1] [--batch-size 32] [--queries 200] [--skip-build | --images-only] [--out RESULT.json]

(c) Ingestion: a synthetic PACS export (DICOM, mixed transfer syntaxes incl. RLE, JPEG-LS and
JPEG 2000, shorter side 512) of about ``--images`` files is indexed with ``index build``; image-path
throughput = embedded images / (header scan + decode in DataLoader workers + model + store commits
+ FAISS), and the whole build's wall time, which adds the report sections (text tower), is printed too. Model-only throughput = ``embed_images`` of in-memory 8-bit images of
the same size (preprocessing included, file decoding not), the figure of ``bench_encoders.py``,
measured right before and right after the build in the same process (the ratio uses their mean).
``--images-only`` runs just the image path (report sections stay pending). Target: ingestion >= 0.8x
model-only.

(b) Query: with the index warm (model loaded, FAISS files and store open), each of ``--queries``
report-like texts is searched with ``Searcher.search_text`` (tokenise, encode with the preset's text
tower, FAISS search, fetch hit metadata from the store) one at a time; p50 / p99 latency in ms, with
the query encoder in int8 (the CPU default) and in fp32, and the overlap of their top-10 hits.
Target for cxr-clip-r50: p50 <= 50 ms.

Random weights (speed does not depend on their values); the tokenizer is a WordPiece vocabulary
trained in code (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxr_search.checkpoints import model_fingerprint  # noqa: E402
from cxr_search.fileio import emit_json, write_json_atomic  # noqa: E402
from cxr_search.inference import Embedder  # noqa: E402
from cxr_search.model import create_model  # noqa: E402
from cxr_search.synth import synthesize  # noqa: E402
from index.bench.speed import (  # noqa: E402
    bench_tokenizer,
    encoder_embedder,
    measure_encoder,
    synthetic_images,
    synthetic_texts,
)
from index.build import BuildOptions, build  # noqa: E402
from index.search import Searcher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder for the archive and the index (reused).")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--preset", default="cxr-clip-r50")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--workers", type=int, default=1, help="Decoding worker processes of the build.")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--skip-build", action="store_true", help="Reuse the index of an earlier run (query benchmark only).")
    ap.add_argument("--images-only", action="store_true",
                    help="Ingestion benchmark of the image path only: catalogue, embed images, write FAISS; no report "
                         "sections, no query benchmark.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    archive = args.work / f"pacs-{args.images}"
    if not (archive / "ground_truth.csv").is_file():
        t0 = time.perf_counter()
        # Most studies have a PA and a lateral film, portable ones one AP: 1.76 images per study (measured).
        synthesize(archive, studies=max(1, round(args.images / 1.76)), seed=5, layout="pacs", broken=8, image_size=512)
        print(f"archive written in {time.perf_counter() - t0:.0f} s", flush=True)

    torch.manual_seed(0)  # the same random weights every run, so --skip-build can reuse the index
    model = create_model(args.preset, tokenizer=bench_tokenizer(args.preset))
    model.provenance = {"source": f"preset:{args.preset} (random weights)", "fingerprint": model_fingerprint(model)}
    images = synthetic_images(3 * args.batch_size, size=512)
    embedder = encoder_embedder(model, precision=args.precision, batch_size=args.batch_size)

    def model_only_rate() -> float:
        row, _, _ = measure_encoder(embedder, args.preset, images, synthetic_texts(8))
        return row.images_per_s

    # Model-only throughput drifts by +-10 % over minutes on a shared VM, so it is measured right before
    # and right after the build, in the same process, and the ratio uses their mean.
    model_only_before = model_only_rate()
    model_only = model_only_before
    print(f"model-only: {model_only:.2f} images/s", flush=True)

    index_dir = args.work / f"index-{args.preset}-{args.images}"
    ingest_result: dict = {}
    if not args.skip_build:
        if index_dir.exists():
            import shutil

            shutil.rmtree(index_dir)
        t0 = time.perf_counter()
        opts = BuildOptions(reports_csv=archive / "reports.csv", batch_size=args.batch_size, num_workers=args.workers,
                            precision=args.precision, device="cpu")
        if args.images_only:
            summary = images_only_build(archive, index_dir, model, opts)
        else:
            summary = build(archive, index_dir, model, opts)
        wall = time.perf_counter() - t0
        model_only_after = model_only_rate()
        model_only = (model_only_before + model_only_after) / 2
        print(f"model-only after the build: {model_only_after:.2f} images/s", flush=True)
        img = summary["embedding"]["images"]
        embedded = img["embedded"]
        # The image path: header scan, decode in workers, model, store commits, FAISS; report sections
        # are text-tower work (BERT-base), reported apart.
        image_wall = summary["timings"]["catalogue_s"] + img["read_s"] + img["model_s"] + img["write_s"] \
            + summary["timings"]["faiss_s"]
        ingest = embedded / image_wall
        print(f"ingestion (image path): {embedded} images in {image_wall:.1f} s = {ingest:.2f} images/s "
              f"({ingest / model_only:.2f}x model-only); whole build incl. "
              f"{summary['embedding']['sections']['embedded']} report sections {wall:.1f} s", flush=True)
        ingest_result = {
            "images_embedded": embedded, "image_path_s": round(image_wall, 1), "build_wall_s": round(wall, 1),
            "ingest_images_per_s": round(ingest, 2), "model_only_images_per_s": round(model_only, 2),
            "model_only_before_after": [model_only_before, model_only_after],
            "ingest_vs_model_only": round(ingest / model_only, 3),
            "whole_build_images_per_s": round(embedded / wall, 2),
            "build_timings": summary["timings"], "embedding": summary["embedding"], "totals": summary["totals"],
        }

    if args.images_only:
        finish({"preset": args.preset, "precision": args.precision, "workers": args.workers,
                "batch_size": args.batch_size, "images_requested": args.images, **ingest_result}, args.out)
        return
    texts = synthetic_texts(args.queries)
    short = ["large right pleural effusion with basal atelectasis", "no acute cardiopulmonary process",
             "enlarged cardiac silhouette", "left upper lobe pneumonia"]
    queries = [short[i % len(short)] if i % 2 else texts[i] for i in range(args.queries)]
    query_result, hits_of = {}, {}
    for text_precision in ("int8", "fp32"):
        searcher = Searcher(index_dir, embedder, text_precision=text_precision)
        for q in queries[:5]:
            searcher.search_text(q, k=10)  # warm-up
        lat, got = [], []
        for q in queries:
            t = time.perf_counter()
            hits = searcher.search_text(q, k=10)
            lat.append((time.perf_counter() - t) * 1000)
            assert len(hits) == 10
            got.append([h.id for h in hits])
        searcher.close()
        hits_of[text_precision] = got
        lat_arr = np.asarray(lat)
        query_result[text_precision] = {"p50_ms": round(float(np.percentile(lat_arr, 50)), 2),
                                        "p99_ms": round(float(np.percentile(lat_arr, 99)), 2)}
        print(f"warm text query ({text_precision}): p50 {query_result[text_precision]['p50_ms']} ms, "
              f"p99 {query_result[text_precision]['p99_ms']} ms", flush=True)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hits_of["int8"], hits_of["fp32"], strict=False)])
    query_result["int8_top10_overlap_with_fp32"] = round(float(overlap), 4)
    print(f"int8 query top-10 overlap with fp32: {overlap:.3f}")
    result = {
        "preset": args.preset, "precision": args.precision, "workers": args.workers, "batch_size": args.batch_size,
        "images_requested": args.images, **ingest_result, "query": query_result, "queries": len(queries),
    }
    finish(result, args.out)


def finish(result: dict, out: Path | None) -> None:
    """Add the machine and command, print the JSON, write it to ``out``."""
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__}
    result["command"] = " ".join(sys.argv)
    emit_json(result)
    if out:
        write_json_atomic(out, result)


def images_only_build(archive: Path, index_dir: Path, model, opts: BuildOptions) -> dict:
    """The image path of ``index build``: catalogue, embed images, write FAISS (report sections left pending)."""
    from dataclasses import replace

    from index.embed import embed_pending_images
    from index.index_dir import IndexDir

    t0 = time.perf_counter()
    summary = build(archive, index_dir, model, replace(opts, catalogue_only=True))
    catalogue_s = time.perf_counter() - t0
    idx = IndexDir.open(index_dir)
    try:
        embedder = Embedder(model, device=opts.device, precision=opts.precision, batch_size=opts.batch_size,
                            num_workers=opts.num_workers)
        images = embed_pending_images(idx.store, idx.secret, embedder)
        t1 = time.perf_counter()
        idx.sync()  # sections stay pending: nothing to add for them
        faiss_s = time.perf_counter() - t1
        totals = idx.store.counts()
    finally:
        idx.close()
    return {"timings": {"catalogue_s": round(catalogue_s, 3), "faiss_s": round(faiss_s, 3)},
            "embedding": {"images": images.to_dict(), "sections": {"embedded": 0}}, "totals": totals,
            "catalogue": summary["catalogue"]}


if __name__ == "__main__":
    main()
