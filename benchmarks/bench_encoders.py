"""Encoder throughput on this machine: images/s and texts/s per preset, fp32 and bf16 autocast.

Usage:
    .venv/bin/python benchmarks/bench_encoders.py [--presets cxr-clip-r50 cxr-clip-swint]
        [--n-images 64] [--n-texts 64] [--batch-size 32] [--json OUT.json]

Random weights (speed does not depend on their values); synthetic 8-bit images at shorter side 512
(what cached archives hold) and report-like texts. Prints a table and one JSON document.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cxr_search.fileio import emit_json, write_json_atomic  # noqa: E402
from cxr_search.inference import cpu_has_fast_bf16  # noqa: E402
from index.bench.speed import cpu_flags, encoder_benchmark  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["cxr-clip-r50", "cxr-clip-swint"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--n-texts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None, help="Also write the JSON result here.")
    args = ap.parse_args()
    result = encoder_benchmark(args.presets, args.precisions, n_images=args.n_images, n_texts=args.n_texts,
                               batch_size=args.batch_size)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__, "native_bf16": cpu_has_fast_bf16(), "cpu_flags": cpu_flags()}
    print(f"{'preset':<16}{'precision':<10}{'images/s':>10}{'texts/s':>10}")
    for row in result["rows"]:
        print(f"{row['preset']:<16}{row['precision']:<10}{row['images_per_s']:>10.2f}{row['texts_per_s']:>10.2f}")
    print(f"bf16 on this CPU: {'native' if cpu_has_fast_bf16() else 'emulated (no AVX-512 BF16 / AMX): slower than fp32'}")
    for preset, agree in result["bf16_vs_fp32"].items():
        print(f"{preset}: min bf16-vs-fp32 cosine images {agree['min_image_cosine']:.5f}, texts {agree['min_text_cosine']:.5f}")
    emit_json(result)
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
