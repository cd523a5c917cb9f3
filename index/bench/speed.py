"""Speed benchmarks (``cxr-search bench speed``): encoder throughput, text-query latency, search latency.

* **Encoders**: images/s and texts/s of the public inference API (``embed_images`` on in-memory 8-bit
  images, so preprocessing is included and file decoding is not; ``embed_texts`` on report-like
  sentences) after one warm-up batch. Used by ``benchmarks/bench_encoders.py`` too.
* **Text queries**: p50/p99 latency of one query, ``embedder.embed_texts([q])``, with the int8 text encoder
  (the CPU default of interactive search) and in fp32, and the smallest cosine between the two.
* **Search**: on ``n`` seeded clustered unit vectors of the model's embedding size
  (:func:`index.ann.reference.clustered_unit_vectors`, nearest-neighbour cosine ~0.9 like image
  embeddings) and held-out queries from the same clusters: build time, p50/p99 latency of single-query
  searches, and 10-recall@10 against a brute-force numpy search (:func:`index.ann.reference.exact_search`)
  of an exact ``Flat`` index, of the engine's automatic choice for ``n`` (:func:`index.ann.build.build_index`
  with ``factory=None``: ``Flat`` up to 100,000 vectors) and, when that is ``Flat``, of the ANN index the
  engine would choose beyond the exact threshold, sized for ``n`` (IVF lists for ``n``, tuned the same way).

Weights are random (speed does not depend on their values) and nothing is downloaded: presets that need
an external tokenizer get a WordPiece vocabulary trained in code (:func:`bench_tokenizer`).
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from cxr_search.errors import ConfigError
from cxr_search.inference import Embedder, resolve_precision
from cxr_search.model import CXRClip, create_model

logger = logging.getLogger(__name__)

_SENTENCES = [
    "There is a moderate right pleural effusion with adjacent basilar atelectasis.",
    "Heart size is mildly enlarged. No pulmonary edema.",
    "No focal consolidation, pleural effusion or pneumothorax is seen.",
    "Endotracheal tube terminates 4 cm above the carina. Right internal jugular line tip in the SVC.",
    "Patchy opacity in the left lower lobe may reflect atelectasis, though pneumonia cannot be excluded.",
    "The lungs are clear. The cardiomediastinal silhouette is within normal limits.",
]
_QUERIES = [
    "right pleural effusion", "cardiomegaly without edema", "left lower lobe pneumonia", "pneumothorax",
    "endotracheal tube in good position", "no acute cardiopulmonary process", "bibasilar atelectasis",
    "pulmonary nodule in the right upper lobe", "interstitial edema", "rib fracture",
]


@dataclass
class EncoderSpeed:
    """One encoder benchmark row."""

    preset: str
    precision: str
    images_per_s: float
    texts_per_s: float
    threads: int
    batch_size: int
    n_images: int
    n_texts: int


#: The CPU flags that decide int8 / bf16 speed, recorded by every benchmark (machines differ between runs).
SPEED_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile",
                         "avx_vnni"})


def cpu_flags() -> List[str]:
    """The CPU's vector flags of :data:`SPEED_FLAGS` (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f in SPEED_FLAGS)


def synthetic_images(n: int, size: int = 512, seed: int = 0) -> List[Image.Image]:
    """Smooth radiograph-like 8-bit images (shorter side ``size``, as the cached archives store)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0 : int(size * 1.2)].astype(np.float32)
    out = []
    for _ in range(n):
        a, b = rng.uniform(10, 40, 2)
        img = 120 + 50 * np.sin(xx / a) * np.cos(yy / b) + rng.normal(0, 8, xx.shape)
        out.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L"))
    return out


def synthetic_texts(n: int) -> List[str]:
    """Report-like texts of 1-3 sentences."""
    return [" ".join(_SENTENCES[(i + j) % len(_SENTENCES)] for j in range(1 + i % 3)) for i in range(n)]


def _rate(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def encoder_embedder(model: CXRClip, *, precision: str, batch_size: int) -> Embedder:
    """The CPU Embedder the encoder benchmark measures: ``batch_size`` images or texts per forward pass."""
    return Embedder(model, device="cpu", precision=precision, batch_size=batch_size, text_batch_size=batch_size)


def measure_encoder(
    embedder: Embedder,
    preset: str,
    images: Sequence[Image.Image],
    texts: Sequence[str],
) -> "tuple[EncoderSpeed, np.ndarray, np.ndarray]":
    """Throughput of one Embedder (see :func:`encoder_embedder`); returns the row and the embeddings."""
    batch_size = embedder.batch_size
    embedder.embed_images(list(images[:batch_size]))  # warm-up (oneDNN primitives)
    embedder.embed_texts(list(texts[:batch_size]))
    img_emb: Dict[str, np.ndarray] = {}
    txt_emb: Dict[str, np.ndarray] = {}
    ips = _rate(lambda: img_emb.setdefault("x", embedder.embed_images(list(images))), len(images))
    tps = _rate(lambda: txt_emb.setdefault("x", embedder.embed_texts(list(texts))), len(texts))
    row = EncoderSpeed(preset, embedder.precision, round(ips, 2), round(tps, 2), torch.get_num_threads(), batch_size,
                       len(images), len(texts))
    return row, img_emb["x"], txt_emb["x"]


def bench_tokenizer(preset: str) -> Any:
    """A Bio_ClinicalBERT-sized WordPiece vocabulary built in code (benchmarks download nothing).

    Returns None for presets with the built-in ``basic`` tokenizer.
    """
    from cxr_search.config import get_model_config
    from cxr_search.tokenizer import TextTokenizer

    cfg = get_model_config(preset)
    if cfg.tokenizer.kind == "basic":
        return None
    corpus = synthetic_texts(200)
    return TextTokenizer.train(corpus, vocab_size=min(4000, cfg.text.bert_config["vocab_size"]),
                               max_length=cfg.tokenizer.max_length)




def bench_model(preset: str, seed: int = 0) -> CXRClip:
    """A randomly initialised model of ``preset`` (seeded) with a tokenizer, in eval mode on CPU.

    Raises:
        ConfigError: Unknown preset.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(preset, tokenizer=bench_tokenizer(preset))


def encoder_benchmark(
    presets: Sequence[str] = ("cxr-clip-r50", "cxr-clip-swint"),
    precisions: Sequence[str] = ("fp32", "bf16"),
    *,
    n_images: int = 64,
    n_texts: int = 64,
    batch_size: int = 32,
) -> Dict[str, object]:
    """Run the encoder benchmark; returns rows and the minimum bf16-vs-fp32 cosine per preset."""
    images = synthetic_images(n_images)
    texts = synthetic_texts(n_texts)
    rows: List[Dict[str, object]] = []
    agreement: Dict[str, Dict[str, float]] = {}
    for preset in presets:
        model = create_model(preset, tokenizer=bench_tokenizer(preset))
        embs = {}
        for precision in precisions:
            row, ie, te = measure_encoder(encoder_embedder(model, precision=precision, batch_size=batch_size), preset,
                                          images, texts)
            logger.info("%s", row)
            rows.append(asdict(row))
            embs[precision] = (ie, te)
        if "fp32" in embs and "bf16" in embs:
            agreement[preset] = {
                "min_image_cosine": float((embs["fp32"][0] * embs["bf16"][0]).sum(1).min()),
                "min_text_cosine": float((embs["fp32"][1] * embs["bf16"][1]).sum(1).min()),
            }
        del model
    return {"rows": rows, "bf16_vs_fp32": agreement}


def _percentiles_ms(seconds: Sequence[float]) -> Dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def text_query_latency(embedder: Embedder, n_queries: int = 20, precisions: Sequence[str] = ("int8", "fp32")
                       ) -> Dict[str, Any]:
    """Single-query ``embed_texts([q], precision=...)`` latency of a CPU Embedder, after one warm-up query each.

    Returns:
        ``{precision: {p50_ms, p99_ms, mean_ms}, "queries": n, "min_cosine_int8_vs_fp32": c}``.
    """
    queries = [_QUERIES[i % len(_QUERIES)] + ("" if i < len(_QUERIES) else f" {i}") for i in range(n_queries)]
    out: Dict[str, Any] = {"queries": n_queries}
    embs: Dict[str, np.ndarray] = {}
    for precision in precisions:
        embedder.embed_texts([queries[0]], precision=precision)  # warm-up (int8: quantises once)
        times, rows = [], []
        for q in queries:
            t0 = time.perf_counter()
            rows.append(embedder.embed_texts([q], precision=precision)[0])
            times.append(time.perf_counter() - t0)
        out[precision] = _percentiles_ms(times)
        embs[precision] = np.stack(rows)
    if "int8" in embs and "fp32" in embs:
        out["min_cosine_int8_vs_fp32"] = round(float((embs["int8"] * embs["fp32"]).sum(1).min()), 6)
    return out


def _query_latency(index: Any, queries: np.ndarray, k: int) -> "tuple[Dict[str, float], np.ndarray]":
    index.search(queries[:1], k)  # warm-up
    times, ids = [], []
    for q in queries:
        t0 = time.perf_counter()
        ids.append(index.search(q[None, :], k)[1][0])
        times.append(time.perf_counter() - t0)
    return _percentiles_ms(times), np.stack(ids)


def search_benchmark(n: int, dim: int, *, n_queries: int = 200, k: int = 10, seed: int = 0,
                     extra_ann: bool = True) -> Dict[str, Any]:
    """Build time, single-query latency and recall@k of exact and automatically chosen indexes.

    Args:
        n: Vectors in the index.
        dim: Their dimension (the model's embedding size).
        n_queries: Held-out queries (latency and recall).
        k: Hits per query.
        seed: Seed of the vectors.
        extra_ann: When the automatic choice for ``n`` is exact, also measure the ANN index the engine
            would choose beyond :data:`index.ann.factory.EXACT_THRESHOLD` (with IVF lists sized for ``n``).

    Returns:
        ``{"n", "dim", "queries", "k", "data", "rows": [{name, factory, build_s, p50_ms, p99_ms, mean_ms,
        recall_at_10, bytes_per_vector, search_params}, ...]}``.

    Raises:
        ConfigError: ``n`` < ``k`` or ``n_queries`` < 1.
    """
    from index.ann.build import build_index
    from index.ann.factory import EXACT_THRESHOLD, choose_factory, choose_nlist, with_nlist
    from index.ann.reference import clustered_unit_vectors, exact_search, k_recall_at_k
    from index.ann.vector_index import VectorIndex

    if k < 1 or n < k or n_queries < 1:
        raise ConfigError(f"the search benchmark needs --index-size >= {k} and >= 1 query, got {n} and {n_queries}")
    n_clusters = max(1, n // 100)
    t0 = time.perf_counter()
    x = clustered_unit_vectors(n, dim, n_clusters=n_clusters, seed=seed)
    q = clustered_unit_vectors(n_queries, dim, n_clusters=n_clusters, seed=seed, stream=1)
    ids = np.arange(n, dtype=np.int64) * 7 + 3  # store ids are not row numbers
    _, truth = exact_search(x, ids, q, k)
    nn_cos = float(np.mean(exact_search(x, ids, q, 1)[0][:, 0]))
    logger.info("search benchmark data: %d x %d in %.1f s", n, dim, time.perf_counter() - t0)

    rows: List[Dict[str, Any]] = []

    def measure(name: str, build: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        index = build()
        build_s = time.perf_counter() - t
        lat, got = _query_latency(index, q, k)
        row = {"name": name, "factory": index.factory, "build_s": round(build_s, 3), **lat,
               f"recall_at_{k}": round(k_recall_at_k(got, truth, k), 4),
               "bytes_per_vector": round(index.serialized_size() / n, 2), "search_params": index.search_params}
        logger.info("%s", row)
        rows.append(row)
        return index

    def flat() -> Any:
        index = VectorIndex.create(dim, "Flat")
        index.add(x, ids)
        return index

    def built(factory: Optional[str]) -> Any:
        # build_index warns when an ANN index misses its recall target and suggests index-build options; here
        # the recall is the measurement itself, so keep the log quiet while building.
        quiet = logging.getLogger("index.ann.factory")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            return build_index(x, ids, factory=factory, seed=seed)[0]
        finally:
            quiet.setLevel(level)

    measure("exact", flat)
    ann = measure("auto", lambda: built(None))
    if extra_ann and ann.kind == "flat" and n >= 1000:
        ann = measure("ann", lambda: built(with_nlist(choose_factory(EXACT_THRESHOLD + 1, dim), choose_nlist(n))))
        rows[-1]["note"] = f"the engine's choice beyond {EXACT_THRESHOLD:,} vectors, IVF lists sized for n"
    if ann.kind == "ivf":
        # The engine's query path re-scores the top DEFAULT_RERANK_K candidates with the full vectors (the
        # Searcher reads them from its store; here they come from memory, so this is a lower bound).
        from index.ann.parts import DEFAULT_RERANK_K

        order = np.argsort(ids)
        fetch = lambda want: x[order[np.searchsorted(ids, want, sorter=order)]]  # noqa: E731
        lat, got = _query_latency(_Reranked(ann, fetch, DEFAULT_RERANK_K), q, k)
        rows.append({**rows[-1], "name": rows[-1]["name"] + " + re-rank", **lat,
                     f"recall_at_{k}": round(k_recall_at_k(got, truth, k), 4),
                     "note": f"top {DEFAULT_RERANK_K} re-scored with full vectors held in memory"})
    return {"n": n, "dim": dim, "queries": n_queries, "k": k, "rows": rows,
            "data": f"clustered_unit_vectors(seed={seed}, n_clusters={n_clusters}); held-out queries' mean "
                    f"nearest-neighbour cosine {nn_cos:.3f}"}


class _Reranked:
    """``search`` of an IVF index with exact re-ranking, for :func:`_query_latency`."""

    def __init__(self, index: Any, fetch: Callable[[np.ndarray], np.ndarray], rerank_k: int) -> None:
        self.index, self.fetch, self.rerank_k = index, fetch, rerank_k

    def search(self, queries: np.ndarray, k: int) -> Any:
        return self.index.search(queries, k, rerank=self.fetch, rerank_k=self.rerank_k)


def speed_benchmark(
    presets: Sequence[str] = ("cxr-clip-r50",),
    *,
    n_images: int = 16,
    n_texts: int = 16,
    batch_size: int = 8,
    precision: str = "auto",
    index_size: int = 20_000,
    n_queries: int = 200,
    text_queries: int = 20,
    seed: int = 0,
    threads: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Everything ``cxr-search bench speed`` reports, on CPU.

    Args:
        presets: Model presets (random weights).
        n_images: Images per throughput measurement.
        n_texts: Texts per throughput measurement.
        batch_size: Batch size of the throughput measurements.
        precision: Encoder precision: ``fp32``, ``bf16`` or ``auto`` (resolved for this CPU).
        index_size: Vectors in the search benchmark (0 skips it).
        n_queries: Queries of the search benchmark.
        text_queries: Single text queries per precision (0 skips the text-query benchmark).
        seed: Seed of weights, images and vectors.
        threads: Threads of torch and FAISS (0: leave the libraries' defaults). On a machine whose cores
            other processes also use, 1 can be many times faster than the default: OpenMP threads that
            wait for a busy core spin (measured under load on 2 cores: a BERT-base query took 845 ms with
            2 threads, 74 ms with 1).
        progress: Called with a short message before each stage (the CLI prints it on stderr).

    Returns:
        ``{"machine", "encoders": [rows], "text_query": {preset: ...}, "search": [per dimension]}``.

    Raises:
        ConfigError: Unknown preset or precision, or sizes out of range.
    """
    if precision not in ("fp32", "bf16", "auto"):
        raise ConfigError(f"unknown precision {precision!r}; choose fp32, bf16 or auto")
    if n_images < 1 or n_texts < 1 or batch_size < 1 or index_size < 0 or text_queries < 0:
        raise ConfigError("--images, --texts and --batch-size must be >= 1; --index-size and --text-queries >= 0")
    say = progress or (lambda msg: None)
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = library default), got {threads}")
    if threads:
        import faiss

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    resolved = resolve_precision(precision, torch.device("cpu"))
    images, texts = synthetic_images(n_images, seed=seed), synthetic_texts(n_texts)
    result: Dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": "cpu"},
        "precision": {"requested": precision, "used": resolved},
        "encoders": [], "text_query": {}, "search": [],
    }
    dims: List[int] = []
    for preset in presets:
        say(f"{preset}: building the model (random weights)")
        model = bench_model(preset, seed)
        say(f"{preset}: encoder throughput ({n_images} images, {n_texts} texts, {resolved})")
        embedder = encoder_embedder(model, precision=resolved, batch_size=batch_size)
        row, _, _ = measure_encoder(embedder, preset, images, texts)
        result["encoders"].append({**asdict(row), "embed_dim": model.config.embed_dim})
        if text_queries:
            say(f"{preset}: text-query latency ({text_queries} queries, int8 and fp32)")
            result["text_query"][preset] = text_query_latency(embedder, text_queries)
        if model.config.embed_dim not in dims:
            dims.append(model.config.embed_dim)
        del model, embedder  # the Embedder holds the model too: free both before the next preset
    if index_size:
        import faiss

        result["machine"]["faiss_threads"] = faiss.omp_get_max_threads()
        for dim in dims:
            say(f"search: {index_size:,} vectors of dimension {dim}, {n_queries} queries")
            result["search"].append(search_benchmark(index_size, dim, n_queries=n_queries, seed=seed))
    return result


def render_speed(result: Dict[str, Any]) -> List[Any]:
    """Rich tables of a :func:`speed_benchmark` result."""
    from rich.table import Table

    out = []
    enc = Table(title=f"encoders ({result['precision']['used']}, {result['machine']['torch_threads']} threads, CPU)")
    for col in ("preset", "dim", "images/s", "texts/s", "text query int8 p50/p99 ms", "fp32 p50/p99 ms"):
        enc.add_column(col, justify="left" if col == "preset" else "right")
    for row in result["encoders"]:
        tq = result["text_query"].get(row["preset"], {})
        fmt = lambda p, tq=tq: f"{tq[p]['p50_ms']:.1f} / {tq[p]['p99_ms']:.1f}" if p in tq else ""  # noqa: E731
        enc.add_row(row["preset"], str(row["embed_dim"]), f"{row['images_per_s']:.2f}", f"{row['texts_per_s']:.2f}",
                    fmt("int8"), fmt("fp32"))
    out.append(enc)
    for s in result["search"]:
        t = Table(title=f"search: {s['n']:,} x {s['dim']} vectors, {s['queries']} single queries, k={s['k']}")
        for col in ("index", "factory", "build s", "p50 ms", "p99 ms", f"recall@{s['k']}", "B/vector"):
            t.add_column(col, justify="left" if col in ("index", "factory") else "right")
        recall_key = f"recall_at_{s['k']}"
        for r in s["rows"]:
            t.add_row(r["name"], r["factory"], f"{r['build_s']:.2f}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                      f"{r[recall_key]:.4f}", f"{r['bytes_per_vector']:.1f}")
        notes = [f"{r['name']}: {r['note']}" for r in s["rows"] if r.get("note")]
        t.caption = "; ".join(notes + [s["data"]])
        out.append(t)
    return out


__all__ = [
    "EncoderSpeed", "bench_model", "bench_tokenizer", "encoder_benchmark", "encoder_embedder", "measure_encoder",
    "render_speed", "search_benchmark", "speed_benchmark", "synthetic_images", "synthetic_texts", "text_query_latency",
]
