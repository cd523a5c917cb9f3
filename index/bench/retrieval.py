"""Retrieval benchmark: the CXR-CLIP reference protocol and a fuller protocol beside it.

``cxr-clip`` (``docs/compatibility.md`` section 5) — image -> text only. One query per study that has a
text: a frontal image (PA before AP, then by image id; studies without one are left out and counted;
a manifest without view information falls back to the first image by id, with a warning), see
:func:`cxr_search.evaluation.retrieval_protocol.select_queries`. The study's text follows the text rule:
``longer`` (the longer of findings and impression, the authors' stated rule, default) or
``reference-max`` (Python's ``max()`` of the two strings, what the reference code computes); CheXpert
5x200 uses its "Report Impression". The candidate pool is the evaluated texts de-duplicated by exact
string; an image's positive is its own text's string. Recall@1/5/10 and mean rank.

``full`` — both directions, at image level (every image of an evaluated study is a query / a
candidate) and at study level (a study's images fused into one vector: the normalised mean, as the
index's ``studies.faiss``), each with and without de-duplication of the texts, with percentile
bootstrap 95 % confidence intervals over the queries. Without de-duplication every study's text is its
own candidate and only the query's own study counts, so an identical text of another study ties with
the positive and ranks above it (ties are pessimistic everywhere).

Ties: a candidate scoring within :data:`cxr_search.evaluation.retrieval_metrics.TIE_TOL` of the best
positive ranks above it (pessimistic). Each direction records ``ties``: how many queries had such a tie
and the metrics with ties resolved in the positive's favour (optimistic), so the effect is visible; an
evaluator that leaves ties to its sort order (the reference's ``argsort``) lands between the two.

Every ranking goes through the index engine: the candidates are put in an exact (``Flat``)
:class:`index.ann.vector_index.VectorIndex` and each query searches all of them; the positive's rank is read
from the returned scores (:func:`cxr_search.evaluation.retrieval_metrics.rank_bounds_from_scores`). A test
shows this equals the full in-memory similarity matrix.

The result dict is deterministic (no timings, floats rounded) so a rerun gives identical JSON, and
:func:`cxr_search.evaluation.retrieval_protocol.evaluated_ids` lists the evaluated images so anyone can
rerun the same split (``--ids``); the result's ``provenance`` holds that list's SHA-256.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from cxr_search.datasets.manifest import ManifestRow
from cxr_search.errors import DatasetError
from cxr_search.evaluation.provenance import bench_provenance, model_provenance
from cxr_search.evaluation.retrieval_metrics import (
    TIE_TOL,
    bootstrap_recall,
    dedup_exact,
    rank_bounds_from_scores,
    recall_at_k,
)
from cxr_search.evaluation.retrieval_protocol import (
    PROTOCOLS,
    EvalStudy,
    RetrievalPlan,
    check_protocol,
    evaluated_ids,
    ids_sha256,
    plan_retrieval,
    select_queries,
)
from index.ann.vector_index import VectorIndex

logger = logging.getLogger(__name__)

__all__ = ["PROTOCOLS", "engine_rank_bounds", "engine_ranks", "evaluate", "protocol_options", "run_retrieval"]

KS = (1, 5, 10)
_SEARCH_BATCH = 256
_DIGITS = 6


def engine_rank_bounds(queries: np.ndarray, candidates: np.ndarray,
                       positives: Sequence[Set[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """Pessimistic and optimistic rank of each query's best positive, computed by the index engine.

    The candidates go into an exact ``Flat`` :class:`VectorIndex` under ids ``0..C-1`` (the ids of
    the evaluation items; there is no store here) and every query searches all ``C`` of them.

    Args:
        queries: ``[Q, D]`` L2-normalised.
        candidates: ``[C, D]`` L2-normalised.
        positives: For each query, the candidate ids that count as its match.

    Returns:
        ``(pessimistic, optimistic)`` int64 ``[Q]`` ranks, 1-based (ties against / for the positive).
    """
    index = VectorIndex.create(candidates.shape[1], "Flat")
    index.add(np.ascontiguousarray(candidates, dtype=np.float32), np.arange(len(candidates), dtype=np.int64))
    pessimistic = np.empty(len(queries), dtype=np.int64)
    optimistic = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), _SEARCH_BATCH):
        stop = min(start + _SEARCH_BATCH, len(queries))
        scores, ids = index.search(queries[start:stop], len(candidates))  # [B, C] each
        pessimistic[start:stop], optimistic[start:stop] = rank_bounds_from_scores(scores, ids, positives[start:stop])
    return pessimistic, optimistic


def engine_ranks(queries: np.ndarray, candidates: np.ndarray, positives: Sequence[Set[int]]) -> np.ndarray:
    """Rank of each query's best positive among ``candidates`` (pessimistic on ties), by the index engine."""
    return engine_rank_bounds(queries, candidates, positives)[0]


def _round(x: float) -> float:
    return round(float(x), _DIGITS)


def _score(ranks: np.ndarray, optimistic: np.ndarray, n_candidates: int, bootstrap: int, seed: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {k: _round(v) for k, v in recall_at_k(ranks, KS).items()}
    out["median_rank"] = _round(np.median(ranks))
    out["n_queries"] = int(len(ranks))
    out["n_candidates"] = int(n_candidates)
    out["ties"] = {"queries_with_tie": int(np.count_nonzero(ranks != optimistic)),
                   "optimistic": {k: _round(v) for k, v in recall_at_k(optimistic, KS).items()}}
    if bootstrap > 0:
        out["ci95"] = {k: [_round(lo), _round(hi)] for k, (lo, hi) in
                       bootstrap_recall(ranks, KS, resamples=bootstrap, seed=seed).items()}
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass
class _Embedded:
    studies: List[EvalStudy]
    image_study: np.ndarray  # [N] study position of each embedded image
    images: np.ndarray  # [N, D]
    texts: np.ndarray  # [S, D], one per study (duplicates embedded once)


def _embed(studies: List[EvalStudy], embedder: Any, progress: bool) -> _Embedded:
    paths: List[str] = []
    owner: List[int] = []
    for s, study in enumerate(studies):
        for row in study.rows:
            paths.append(row.image_path)
            owner.append(s)
    logger.info("embedding %d images and %d texts", len(paths), len(studies))
    images = embedder.embed_images(paths, progress=progress)  # [N, D]
    unique, where = dedup_exact([s.text for s in studies])
    texts = embedder.embed_texts(unique)[where]  # [S, D]
    return _Embedded(studies, np.asarray(owner, dtype=np.int64), np.asarray(images, np.float32),
                     np.asarray(texts, np.float32))


def _directions(image_vecs: np.ndarray, image_study: np.ndarray, texts: List[str], text_vecs_all: np.ndarray, *,
                dedup: bool, bootstrap: int, seed: int,
                image_to_text_only: bool = False) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """Both directions at one level.

    Args:
        image_vecs: ``[N, D]`` image-side vectors (images, or fused studies).
        image_study: ``[N]`` study position of each image-side vector.
        texts: One text per study.
        text_vecs_all: ``[S, D]`` one text vector per study.
        dedup: Candidate / query texts de-duplicated by exact string (positives: the same string)
            or one per study (positive: the study's own).
    """
    if dedup:
        _, text_of = dedup_exact(texts)  # study -> distinct text id
        text_vecs = text_vecs_all[np.unique(text_of, return_index=True)[1]]  # [U, D]
    else:
        text_of = np.arange(len(texts), dtype=np.int64)
        text_vecs = text_vecs_all  # [S, D]
    bounds = {"image_to_text": engine_rank_bounds(image_vecs, text_vecs, [{int(text_of[s])} for s in image_study])}
    if not image_to_text_only:
        members: Dict[int, Set[int]] = {}
        for c, s in enumerate(image_study):
            members.setdefault(int(text_of[s]), set()).add(c)
        have = sorted(members)  # every text has an image: each study contributes at least one
        bounds["text_to_image"] = engine_rank_bounds(text_vecs[have], image_vecs, [members[t] for t in have])
    candidates = {"image_to_text": len(text_vecs), "text_to_image": len(image_vecs)}
    metrics = {d: _score(pess, opt, candidates[d], bootstrap, seed) for d, (pess, opt) in bounds.items()}
    return metrics, {d: pess for d, (pess, _) in bounds.items()}


def evaluate(studies: List[EvalStudy], embedder: Any, *, protocol: str = "full", bootstrap: int = 1000, seed: int = 0,
             progress: bool = False) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """Run a protocol on selected studies (:func:`~cxr_search.evaluation.retrieval_protocol.select_studies`).

    ``cxr-clip`` first picks each study's query image
    (:func:`~cxr_search.evaluation.retrieval_protocol.select_queries`; studies already reduced to their
    query are unchanged by it). ``embedder``: a :class:`cxr_search.inference.Embedder` whose model has a
    tokenizer, or anything with its ``embed_images(paths, progress=...)`` and ``embed_texts(texts)``.

    Returns:
        ``(result, ranks)``: the JSON-ready result (see :func:`run_retrieval`) and the headline ranks
        per direction (for Recall@K curves).

    Raises:
        ConfigError: Unknown protocol.
        DatasetError: Fewer than 2 studies to evaluate.
    """
    protocol = check_protocol(protocol)
    query_images, warnings = None, []
    if protocol == "cxr-clip":
        studies, query_images, warnings = select_queries(studies)
        for message in warnings:  # the result's "warnings" carries them; the CLI prints them
            logger.debug("%s", message)
    if len(studies) < 2:
        raise DatasetError(f"retrieval needs at least 2 studies with a report text, found {len(studies)}")
    emb = _embed(studies, embedder, progress)
    texts = [s.text for s in studies]
    result: Dict[str, Any] = {"protocol": protocol, "ks": list(KS), "studies": len(studies),
                              "images": int(len(emb.images)), "unique_texts": len(dedup_exact(texts)[0])}
    ids = evaluated_ids(studies, protocol)
    evaluated = {"count": len(ids), "sha256": ids_sha256(ids)}
    if protocol == "cxr-clip":
        # The reference: one query per study, texts de-duplicated, image->text only, no intervals.
        metrics, ranks = _directions(emb.images, emb.image_study, texts, emb.texts, dedup=True, bootstrap=0,
                                     seed=seed, image_to_text_only=True)
        result.update(metrics)
        result["headline"] = {"image_to_text": _headline(metrics["image_to_text"])}
        result["query_images"] = query_images
        result["warnings"] = warnings
        result["evaluated_ids"] = evaluated
        return result, ranks

    study_vecs = _normalise(np.stack([emb.images[emb.image_study == s].mean(axis=0)
                                      for s in range(len(studies))]))  # [S, D]
    levels = {"image_level": (emb.images, emb.image_study),
              "study_level": (study_vecs, np.arange(len(studies), dtype=np.int64))}
    headline_ranks: Dict[str, np.ndarray] = {}
    for level, (vecs, owner) in levels.items():
        result[level] = {}
        for dedup in (True, False):
            metrics, ranks = _directions(vecs, owner, texts, emb.texts, dedup=dedup, bootstrap=bootstrap, seed=seed)
            result[level]["dedup" if dedup else "no_dedup"] = metrics
            if level == "image_level" and dedup:
                headline_ranks = ranks
    result["bootstrap"] = {"resamples": bootstrap, "seed": seed, "level": 0.95, "method": "percentile"}
    result["headline"] = {d: _headline(m) for d, m in result["image_level"]["dedup"].items()}
    result["study_level_headline"] = {d: _headline(m) for d, m in result["study_level"]["dedup"].items()}
    result["warnings"] = warnings
    result["evaluated_ids"] = evaluated
    return result, headline_ranks


def _headline(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: metrics[k] for k in ("R@1", "R@5", "R@10", "mean_rank")}


def protocol_options(plan: RetrievalPlan, *, bootstrap: int, seed: int,
                     ids_file: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The options that decide a retrieval number, for the result's ``provenance``."""
    options: Dict[str, Any] = {
        "protocol": plan.protocol,
        "text_rule": plan.text_rule,
        "ks": list(KS),
        "ties": f"pessimistic (a candidate within {TIE_TOL:g} of the positive's score ranks above it)",
        "text_dedup": "exact string" if plan.protocol == "cxr-clip" else "exact string, and none",
    }
    if plan.query_images is not None:
        options["query_image"] = plan.query_images["rule"]
    if plan.protocol == "full":
        options.update(bootstrap=bootstrap, seed=seed)
    if ids_file is not None:
        options["ids_file"] = ids_file
    return options


def run_retrieval(rows: Sequence[ManifestRow], embedder: Any, *, protocol: str = "full", bootstrap: int = 1000,
                  seed: int = 0, progress: bool = False, text_rule: str = "longer") -> Dict[str, Any]:
    """Run the retrieval benchmark on manifest rows (already restricted to the evaluated split).

    Args:
        rows: Manifest rows; studies without a text (and, ``cxr-clip``, without a frontal image) are left
            out (counted in ``skipped``).
        embedder: A :class:`cxr_search.inference.Embedder` whose model has a tokenizer (its batch sizes,
            device and precision are the embedding's), or anything with its ``embed_images`` / ``embed_texts``.
        protocol: ``"cxr-clip"`` (the reference) or ``"full"``.
        bootstrap: Bootstrap resamples for the 95 % intervals (``full`` only; 0 = none).
        seed: Seed of the bootstrap.
        progress: Show progress bars.
        text_rule: One of :data:`cxr_search.evaluation.retrieval_protocol.TEXT_RULES` (``longer`` default).

    Returns:
        A JSON-ready dict. Always ``headline`` = ``{"image_to_text": {"R@1", "R@5", "R@10",
        "mean_rank"}, "text_to_image": {...}}`` (``full``: image level, texts de-duplicated;
        ``cxr-clip``: image->text only), ``skipped``, ``warnings``, ``evaluated_ids`` (count, SHA-256) and
        ``provenance`` (software, model fingerprint, options). Each direction's metrics hold ``ties``.
        ``full`` adds ``image_level`` / ``study_level`` -> ``dedup`` / ``no_dedup`` -> direction -> metrics
        with ``ci95``, and ``study_level_headline``; ``cxr-clip`` adds ``query_images``.

    Raises:
        ConfigError: Unknown protocol or text rule.
        DatasetError: Fewer than 2 studies to evaluate.
    """
    plan = plan_retrieval(rows, protocol=protocol, text_rule=text_rule)
    result, _ = evaluate(plan.studies, embedder, protocol=plan.protocol, bootstrap=bootstrap, seed=seed,
                         progress=progress)
    result["skipped"] = plan.skipped
    model = getattr(embedder, "model", None)
    result["provenance"] = bench_provenance(
        model=model_provenance(model, getattr(model, "provenance", {}).get("source", "")) if model is not None
        else None,
        options=protocol_options(plan, bootstrap=bootstrap, seed=seed), evaluated_ids=result["evaluated_ids"])
    return result
