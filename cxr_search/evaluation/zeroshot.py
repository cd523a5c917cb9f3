"""Zero-shot classification benchmark (CXR-CLIP protocols: ``docs/compatibility.md`` section 5).

Reference protocols (the numbers comparable with published CXR-CLIP results):

* Binary (VinDr-CXR's 18 classes, SIIM "Pneumothorax"): prompts ``("No {class}", "{class}")``;
  RSNA uses the fixed pair :data:`cxr_search.evaluation.zeroshot_prompts.RSNA_PROMPTS`. For each image,
  ``p(positive) = softmax([cos_neg, cos_pos])[1]`` over the two raw cosines (no logit scale);
  AUROC on ``p``, accuracy and F1 on the argmax (a tie goes to the negative prompt, as numpy's
  argmax does); unweighted means over classes.
* CheXpert 5x200 (5-way): GLoRIA's prompt bank (``cxr_search/data/gloria_chexpert_prompts.json``,
  Apache-2.0, 489 prompts). Class score = mean of the image's cosines with the class's prompts
  (not the cosine with a mean embedding); prediction = argmax. Accuracy macro (mean of per-class
  accuracies, where a class's accuracy is the share of its images predicted as it) and micro
  (share of all images); per-class one-vs-rest F1 (on the argmax) and AUROC (on the class scores).

Labels: a binary class uses only rows whose label is 1.0 or 0.0; rows where it is missing or
uncertain (-1.0) are left out of that class and counted as ``n_excluded``. A class whose rows all
share one label value has no AUROC: it is reported as null and left out of the AUROC mean.

Variants, reported under ``variants`` and never mixed into the reference numbers:

* ``negation_safe``: classes whose name is itself a negation (a manifest label such as VinDr's
  "No finding" or CheXpert's "No Finding") turn the reference pair into "No No finding" vs
  "No finding". They are scored instead with :data:`NEGATION_SAFE_PROMPTS` (negative: an abnormal
  study, positive: a normal one); the reference-style pair is scored alongside for comparison.
* ``sentence``: every reference class with ``("There is no {class}.", "There is {class}.")``.

The result dict is deterministic: no timings, floats rounded to 6 decimals, keys in a fixed order,
so rerunning on the same data and model gives identical JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from cxr_search.datasets.manifest import SPLITS, ManifestRow
from cxr_search.errors import ConfigError, DatasetError
from cxr_search.evaluation.classification_metrics import accuracy, auroc, f1_score
from cxr_search.evaluation.retrieval_protocol import write_ids
from cxr_search.evaluation.zeroshot_prompts import (
    CHEXPERT5X200_CLASSES,
    NEGATION_SAFE_PROMPTS,
    TASK_DATASETS,
    binary_prompts,
    check_task,
    gloria_chexpert_prompts,
    is_negated_class,
    reference_binary_prompts,
    sentence_prompts,
)
from cxr_search.fileio import write_json_atomic

logger = logging.getLogger(__name__)

#: Decimals of every float in the result (rounded once, after all means are taken).
DECIMALS = 6


# --------------------------------------------------------------------------------------------------
# Rows and labels
# --------------------------------------------------------------------------------------------------


def select_rows(rows: Iterable[ManifestRow], task: str, split: str = "test") -> List[ManifestRow]:
    """The rows a task evaluates: its dataset's rows of ``split``, in manifest order.

    Raises:
        ConfigError: Unknown task or split.
        DatasetError: No row of the task's dataset, or none in ``split`` (the splits present are named).
    """
    check_task(task)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    dataset = TASK_DATASETS[task]
    all_rows = list(rows)
    mine = [r for r in all_rows if r.dataset == dataset]
    if not mine:
        present = sorted({r.dataset for r in all_rows})
        raise DatasetError(
            f"the manifest has no {dataset!r} rows (datasets present: {', '.join(present) or 'none'}); "
            f"--task {task} needs a manifest from `cxr-search data prepare {dataset}`"
        )
    chosen = [r for r in mine if r.split == split]
    if not chosen:
        counts: Dict[str, int] = {}
        for r in mine:
            counts[r.split] = counts.get(r.split, 0) + 1
        present = ", ".join(f"{s} ({counts[s]} rows)" for s in SPLITS if s in counts)
        raise DatasetError(f"no {dataset} rows in split {split!r}; splits present: {present}; pass --split")
    return chosen


def _find_label(labels: Mapping[str, float], name: str) -> Optional[float]:
    """A label's value by exact name, else by case-insensitive name; None when absent."""
    if name in labels:
        return labels[name]
    folded = name.casefold()
    for key, value in labels.items():
        if key.casefold() == folded:
            return value
    return None


def binary_targets(rows: Sequence[ManifestRow], class_name: str) -> np.ndarray:
    """Per row: 1.0 / 0.0 for a positive / negative label, NaN when missing or uncertain."""
    out = np.full(len(rows), np.nan)
    for i, row in enumerate(rows):
        value = _find_label(row.labels, class_name)
        if value in (0.0, 1.0):
            out[i] = value
    return out


def multiclass_targets(rows: Sequence[ManifestRow], classes: Sequence[str]) -> np.ndarray:
    """Per row: the index of its one positive class.

    Raises:
        DatasetError: A row with no positive class or several (the image is named).
    """
    out = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        hits = [k for k, name in enumerate(classes) if _find_label(row.labels, name) == 1.0]
        if len(hits) != 1:
            raise DatasetError(
                f"image {row.image_id!r} has {len(hits)} positive labels among {', '.join(classes)}; "
                "CheXpert 5x200 needs exactly one (re-run `cxr-search data prepare chexpert5x200`)"
            )
        out[i] = hits[0]
    return out


# --------------------------------------------------------------------------------------------------
# Scoring (pure functions on embeddings)
# --------------------------------------------------------------------------------------------------


def _r(value: Optional[float]) -> Optional[float]:
    return None if value is None else float(value)


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def round_floats(obj: Any, decimals: int = DECIMALS) -> Any:
    """A copy of nested dicts/lists with every float rounded (done once, after all means are taken)."""
    if isinstance(obj, float):
        return round(obj, decimals)
    if isinstance(obj, dict):
        return {k: round_floats(v, decimals) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, decimals) for v in obj]
    return obj


def binary_probabilities(cos_negative: np.ndarray, cos_positive: np.ndarray) -> np.ndarray:
    """``softmax([neg, pos])[1]`` per row, over the raw cosines (written as a logistic for stability)."""
    neg = np.asarray(cos_negative, dtype=np.float64)
    pos = np.asarray(cos_positive, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(neg - pos))


def score_binary(images: np.ndarray, negative: np.ndarray, positive: np.ndarray, targets: np.ndarray) -> Dict[str, Any]:
    """Metrics of one binary class.

    Args:
        images: ``[N, D]`` L2-normalised image embeddings.
        negative: ``[D]`` embedding of the negative prompt.
        positive: ``[D]`` embedding of the positive prompt.
        targets: ``[N]`` 1.0 / 0.0, NaN for rows left out.

    Returns:
        n, n_positive, n_excluded, auroc (None when undefined), accuracy, f1 (None when n == 0).
    """
    keep = ~np.isnan(targets)
    y = targets[keep].astype(bool)
    x = np.asarray(images, dtype=np.float64)[keep]
    cos = np.stack([x @ np.asarray(negative, np.float64), x @ np.asarray(positive, np.float64)], axis=1)  # [n, 2]
    result: Dict[str, Any] = {"n": int(len(y)), "n_positive": int(y.sum()), "n_excluded": int((~keep).sum())}
    if len(y) == 0:
        result.update(auroc=None, accuracy=None, f1=None)
        return result
    p = binary_probabilities(cos[:, 0], cos[:, 1])
    pred = np.argmax(cos, axis=1) == 1  # argmax of the softmax = argmax of the cosines
    result.update(auroc=_r(auroc(y, p)), accuracy=_r(accuracy(y, pred)), f1=_r(f1_score(y, pred)))
    return result


def binary_means(classes: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """Unweighted means over classes (classes without a value for a metric are left out of its mean)."""
    return {
        "auroc": _mean(c["auroc"] for c in classes.values()),
        "accuracy": _mean(c["accuracy"] for c in classes.values()),
        "f1": _mean(c["f1"] for c in classes.values()),
        "n_classes_auroc": sum(1 for c in classes.values() if c["auroc"] is not None),
        "n_classes": sum(1 for c in classes.values() if c["n"] > 0),
    }


def class_scores(images: np.ndarray, prompt_embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """``[N, C]``: per class, the mean over its prompts of the image-prompt cosines."""
    x = np.asarray(images, dtype=np.float64)
    return np.stack([(x @ np.asarray(e, np.float64).T).mean(axis=1) for e in prompt_embeddings], axis=1)


def score_multiclass(scores: np.ndarray, targets: np.ndarray, classes: Sequence[str]) -> Dict[str, Any]:
    """Per-class and averaged metrics of a single-label multi-class task from class scores ``[N, C]``."""
    pred = np.argmax(scores, axis=1)
    per_class: Dict[str, Any] = {}
    for k, name in enumerate(classes):
        is_k = targets == k
        n = int(is_k.sum())
        per_class[name] = {
            "n": n,
            "accuracy": _r(float(np.mean(pred[is_k] == k))) if n else None,
            "f1": _r(f1_score(is_k, pred == k)),
            "auroc": _r(auroc(is_k, scores[:, k])),
        }
    confusion = [[int(np.count_nonzero((targets == t) & (pred == p))) for p in range(len(classes))]
                 for t in range(len(classes))]  # fmt: skip
    return {
        "classes": per_class,
        "mean": {
            "accuracy_macro": _mean(c["accuracy"] for c in per_class.values()),
            "accuracy_micro": _r(accuracy(targets, pred)),
            "f1": _mean(c["f1"] for c in per_class.values()),
            "auroc": _mean(c["auroc"] for c in per_class.values()),
        },
        "confusion": {"rows": "true class", "columns": "predicted class", "matrix": confusion},
    }


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


class _TextTable:
    """Embeds a set of prompts once (duplicates embedded once) and looks them up."""

    def __init__(self, embedder: Any, texts: Iterable[str]) -> None:
        unique = list(dict.fromkeys(texts))
        emb = np.asarray(embedder.embed_texts(unique), dtype=np.float64) if unique else np.zeros((0, 0))
        self._index = {t: i for i, t in enumerate(unique)}
        self._emb = emb

    def __call__(self, text: str) -> np.ndarray:
        return self._emb[self._index[text]]

    def many(self, texts: Sequence[str]) -> np.ndarray:
        return self._emb[[self._index[t] for t in texts]]


def _auroc_note(classes: Mapping[str, Mapping[str, Any]], where: str) -> List[str]:
    notes = []
    undefined = [name for name, c in classes.items() if c["n"] > 0 and c["auroc"] is None]
    empty = [name for name, c in classes.items() if c["n"] == 0]
    if undefined:
        notes.append(f"{where}: AUROC undefined for {', '.join(undefined)} (one label value only in these rows); "
                     "reported as null and left out of the AUROC mean")
    if empty:
        notes.append(f"{where}: no evaluable row for {', '.join(empty)} (label missing or uncertain everywhere); "
                     "its metrics are null and left out of the means")
    return notes


def _negated_classes(rows: Sequence[ManifestRow]) -> List[str]:
    seen: Dict[str, None] = {}
    for row in rows:
        for name in row.labels:
            if is_negated_class(name):
                seen.setdefault(name, None)
    return list(seen)


def _run_binary(rows: Sequence[ManifestRow], images: np.ndarray, task: str,
                embedder: Any) -> Tuple[Dict[str, Any], Dict[str, Any], List[str]]:
    reference = reference_binary_prompts(task)
    negated = _negated_classes(rows)
    sentence = {name: sentence_prompts(name) for name in reference}
    safe = {name: NEGATION_SAFE_PROMPTS for name in negated}
    ref_style = {name: binary_prompts(name) for name in negated}
    all_texts = [t for table in (reference, sentence, safe, ref_style) for pair in table.values() for t in pair]
    texts = _TextTable(embedder, all_texts)

    def evaluate(prompts: Mapping[str, Tuple[str, str]]) -> Dict[str, Any]:
        return {name: score_binary(images, texts(neg), texts(pos), binary_targets(rows, name))
                for name, (neg, pos) in prompts.items()}  # fmt: skip

    ref_classes = evaluate(reference)
    notes = _auroc_note(ref_classes, "reference")
    ref_section = {"prompts": {k: list(v) for k, v in reference.items()}, "classes": ref_classes,
                   "mean": binary_means(ref_classes)}  # fmt: skip

    sentence_classes = evaluate(sentence)
    safe_classes = evaluate(safe)
    variants: Dict[str, Any] = {
        "negation_safe": {
            "description": "classes whose name is a negation, scored with a normal-vs-abnormal pair instead of "
                           "'No {class}' / '{class}' (which reads 'No No finding'); 'reference_style' scores the "
                           "reference pair on the same rows for comparison",
            "prompts": {k: list(v) for k, v in safe.items()},
            "classes": safe_classes,
            "reference_style": {"prompts": {k: list(v) for k, v in ref_style.items()}, "classes": evaluate(ref_style)},
        },
        "sentence": {
            "description": "the reference classes with 'There is no {class}.' / 'There is {class}.'",
            "prompts": {k: list(v) for k, v in sentence.items()},
            "classes": sentence_classes,
            "mean": binary_means(sentence_classes),
        },
    }
    if not negated:
        variants["negation_safe"]["note"] = "no label whose name is a negation (e.g. 'No finding') in these rows"
    notes += _auroc_note(safe_classes, "negation_safe")
    return ref_section, variants, notes


def run_zeroshot(
    rows: Sequence[ManifestRow],
    embedder: Any,
    task: str,
    *,
    progress: bool = False,
) -> Dict[str, Any]:
    """Run a zero-shot benchmark on manifest rows (one image per row).

    Args:
        rows: The rows to evaluate (see :func:`select_rows`), all of the task's dataset.
        embedder: A :class:`cxr_search.inference.Embedder` (its batch sizes, device and precision are
            the embedding's), or anything with its ``embed_images(paths, progress=...)`` and
            ``embed_texts(texts)`` returning L2-normalised ``[N, D]`` arrays.
        task: One of :data:`cxr_search.evaluation.zeroshot_prompts.TASKS`.
        progress: Show a progress bar while embedding images.

    Returns:
        The deterministic result dict (module docstring): task, protocol, dataset, n_images,
        reference, variants, notes.

    Raises:
        ConfigError: Unknown task.
        DatasetError: No rows, or CheXpert 5x200 rows without exactly one positive class.
    """
    check_task(task)
    rows = list(rows)
    if not rows:
        raise DatasetError(f"no rows to evaluate for task {task!r}")
    targets = multiclass_targets(rows, CHEXPERT5X200_CLASSES) if task == "chexpert5x200" else None
    logger.info("zero-shot %s: embedding %d images", task, len(rows))
    images = np.asarray(embedder.embed_images([r.image_path for r in rows], progress=progress),
                        dtype=np.float64)  # [N, D]
    result: Dict[str, Any] = {"task": task, "dataset": TASK_DATASETS[task], "n_images": len(rows)}
    if task == "chexpert5x200":
        assert targets is not None
        bank = gloria_chexpert_prompts()
        texts = _TextTable(embedder, [p for prompts in bank.values() for p in prompts])
        scores = class_scores(images, [texts.many(bank[name]) for name in CHEXPERT5X200_CLASSES])
        reference = score_multiclass(scores, targets, CHEXPERT5X200_CLASSES)
        reference["prompt_bank"] = {
            "source": "GLoRIA (github.com/marshuang80/gloria), Apache-2.0",
            "n_prompts": {name: len(bank[name]) for name in CHEXPERT5X200_CLASSES},
            "total": sum(len(v) for v in bank.values()),
            "spelling": "CXR-CLIP reference corrections applied",
        }
        notes = _auroc_note(reference["classes"], "reference")
        result.update(protocol="multiclass", reference=reference, variants={}, notes=notes)
        return round_floats(result)
    reference, variants, notes = _run_binary(rows, images, task, embedder)
    result.update(protocol="binary", reference=reference, variants=variants, notes=notes)
    return round_floats(result)


def write_outputs(
    result: Mapping[str, Any], rows: Sequence[ManifestRow], out_dir: Union[str, Path]
) -> Tuple[Path, Path]:
    """Write ``zeroshot-<task>.json`` and ``evaluated_ids.csv``, atomically.

    ``evaluated_ids.csv`` lists the evaluated images in order (columns dataset, study_id, image_id:
    the columns :func:`cxr_search.evaluation.retrieval_protocol.read_ids` reads).

    Returns:
        (JSON path, CSV path).
    """
    out = Path(out_dir)
    json_path = out / f"zeroshot-{result['task']}.json"
    ids_path = out / "evaluated_ids.csv"
    write_json_atomic(json_path, result)
    write_ids(ids_path, [{"dataset": r.dataset, "study_id": r.study_id, "image_id": r.image_id} for r in rows])
    return json_path, ids_path


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def render_tables(result: Mapping[str, Any]) -> List[Any]:
    """Rich tables of a result: the reference per-class metrics and means, then each variant."""
    from rich.table import Table

    tables = []
    ref = result["reference"]
    title = f"zero-shot {result['task']} ({result['n_images']} images): reference"
    table = Table(title=title)
    multiclass = result["protocol"] == "multiclass"
    for column in ("class", "n", "AUROC", "accuracy", "F1"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, c in ref["classes"].items():
        n = str(c["n"]) if multiclass else f"{c['n']} ({c['n_positive']}+)"
        table.add_row(name, n, _fmt(c["auroc"]), _fmt(c["accuracy"]), _fmt(c["f1"]))
    mean = ref["mean"]
    if multiclass:
        table.add_row("mean (macro)", "", _fmt(mean["auroc"]), _fmt(mean["accuracy_macro"]), _fmt(mean["f1"]),
                      style="bold")
        table.add_row("accuracy (micro)", "", "", _fmt(mean["accuracy_micro"]), "", style="bold")
    else:
        table.add_row("mean", "", _fmt(mean["auroc"]), _fmt(mean["accuracy"]), _fmt(mean["f1"]), style="bold")
    tables.append(table)
    for key, variant in result.get("variants", {}).items():
        if not variant.get("classes"):
            continue
        vt = Table(title=f"variant {key} (not comparable with the reference)")
        for column in ("class", "prompts (neg / pos)", "AUROC", "accuracy", "F1"):
            vt.add_column(column, justify="left" if column.startswith(("class", "prompts")) else "right")
        for name, c in variant["classes"].items():
            neg, pos = variant["prompts"][name]
            vt.add_row(name, f"{neg} / {pos}", _fmt(c["auroc"]), _fmt(c["accuracy"]), _fmt(c["f1"]))
        for name, c in variant.get("reference_style", {}).get("classes", {}).items():
            neg, pos = variant["reference_style"]["prompts"][name]
            vt.add_row(f"{name} (reference-style)", f"{neg} / {pos}", _fmt(c["auroc"]), _fmt(c["accuracy"]),
                       _fmt(c["f1"]))
        if "mean" in variant:
            m = variant["mean"]
            vt.add_row("mean", "", _fmt(m["auroc"]), _fmt(m["accuracy"]), _fmt(m["f1"]), style="bold")
        tables.append(vt)
    return tables


__all__ = [
    "binary_means",
    "binary_probabilities",
    "binary_targets",
    "class_scores",
    "multiclass_targets",
    "render_tables",
    "round_floats",
    "run_zeroshot",
    "score_binary",
    "score_multiclass",
    "select_rows",
    "write_outputs",
]
