"""Patient and image overlap between a training and an evaluation manifest (``cxr-search bench overlap``).

A model evaluated on images it was trained on, or on other films of its training patients, scores too
well. Public sets overlap in ways their ids hide: RSNA Pneumonia's and SIIM-ACR's images are ChestX-ray14
images converted to DICOM and renamed, so only the pixels show it. The report therefore matches on ids
where ids mean the same thing and on content everywhere.

**Patients** (``by_id``) are matched by ``(namespace, patient_id)``. The namespace is the dataset name,
except that ``chexpert5x200`` shares CheXpert's (its rows are CheXpert films, its patient ids CheXpert's
``patientNNNNN`` folders). Ids of different namespaces are never compared: MIMIC's ``subject_id``,
CheXpert's folder numbers, NIH's ``Patient ID`` and OpenI's report numbers are independent counters
(patient 1 of one set is not patient 1 of another), RSNA's ``patientId`` and SIIM's ``PatientID`` are
per-image pseudonyms unrelated to NIH's ids, and VinDr-CXR has no patient id (its manifest repeats the
image id). Two ``pacs`` manifests compare equal on SHA-256(PatientID), which identifies one person only
when both exports come from the same issuer of patient ids (one hospital); ``synth`` archives share
their generator's numbering. **Patients linked by shared images** (``by_shared_images``) are the test
patients with at least one image matched below, whatever the namespaces: how RSNA patients are found
among NIH patients.

**Images** are matched by

* ``image_id`` within a namespace (e.g. the same MIMIC ``dicom_id`` in both sets);
* ``sop_instance_uid``, across datasets (DICOM UIDs are globally unique by construction; empty ignored);
* ``image_path``: the same file after resolving (relative paths against the manifest's folder,
  symbolic links followed);
* ``pixels_exact``: identical decoded pixels (:func:`cxr_search.evaluation.image_hash.pixel_digest`), e.g. a PNG
  and the DICOM made from it;
* ``near_duplicate``: thumbnail correlation >= ``min_correlation`` (a re-encode, resize or contrast
  change of the same film; see :mod:`cxr_search.evaluation.image_hash`); includes the exact matches.

Counts are of *test* images (patients) with at least one match in the training set, with their
fraction of the test set; ``pairs`` counts (test, train) image pairs. The result is deterministic: the
same manifests and files give the same JSON (cache hits and timings are logged, not reported).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from cxr_search.datasets.manifest import ManifestRow, read_manifest
from cxr_search.errors import ConfigError, DatasetError
from cxr_search.evaluation.image_hash import (
    DEFAULT_MIN_CORRELATION,
    THUMB_SIDE,
    hash_files,
    near_duplicate_pairs,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

ID_CRITERIA: Tuple[str, ...] = ("image_id", "sop_instance_uid", "image_path")
CONTENT_CRITERIA: Tuple[str, ...] = ("pixels_exact", "near_duplicate")
CRITERIA: Tuple[str, ...] = ID_CRITERIA + CONTENT_CRITERIA
#: ``--by`` choices and the criteria each runs.
BY_CHOICES: Dict[str, Tuple[str, ...]] = {"ids": ID_CRITERIA, "pixels": CONTENT_CRITERIA, "all": CRITERIA}
#: Datasets whose patient and image ids live in another dataset's namespace.
SHARED_NAMESPACES: Dict[str, str] = {"chexpert5x200": "chexpert"}
OUTPUT_FILES: Tuple[str, ...] = ("overlap_summary.json", "overlap_images.csv", "overlap_patients.csv")


def id_namespace(dataset: str) -> str:
    """The namespace in which a dataset's patient and image ids are comparable (see the module docstring)."""
    return SHARED_NAMESPACES.get(dataset, dataset)


def resolve_image_path(image_path: str, base: Path) -> str:
    """Absolute, symlink-free path of a manifest cell (relative paths are relative to ``base``)."""
    p = Path(image_path).expanduser()
    return os.path.realpath(p if p.is_absolute() else base / p)


@dataclass(frozen=True)
class ImagePair:
    """One matched (test image, training image) pair.

    Attributes:
        criterion: One of :data:`CRITERIA`.
        test: Index of the test row.
        train: Index of the training row.
        similarity: Thumbnail correlation for ``near_duplicate`` pairs, else None.
    """

    criterion: str
    test: int
    train: int
    similarity: Optional[float] = None


@dataclass
class OverlapResult:
    """Everything :func:`find_overlap` found; :meth:`to_dict` is the JSON report.

    Attributes:
        summary: The report (counts, fractions, examples, settings).
        pairs: Matched image pairs, sorted by criterion, test row, train row.
        shared_patients: ``(namespace, patient_id)`` in both sets, sorted.
        train_rows: Training rows.
        test_rows: Test rows.
        train_paths: Resolved image path of each training row.
        test_paths: Resolved image path of each test row.
        stats: Run facts left out of the report so that it stays identical across runs (cache hits).
    """

    summary: Dict[str, Any]
    pairs: List[ImagePair]
    shared_patients: List[Tuple[str, str]]
    train_rows: List[ManifestRow]
    test_rows: List[ManifestRow]
    train_paths: List[str]
    test_paths: List[str]
    stats: Dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON report."""
        return self.summary

    def write(self, out_dir: PathLike) -> List[Path]:
        """Write :data:`OUTPUT_FILES` (summary JSON, every image pair, every linked patient) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / name for name in OUTPUT_FILES]
        written[0].write_text(json.dumps(self.summary, indent=2) + "\n", encoding="utf-8")
        with written[1].open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["criterion", "similarity", "test_dataset", "test_patient_id", "test_image_id",
                        "test_image_path", "train_dataset", "train_patient_id", "train_image_id",
                        "train_image_path"])
            for p in self.pairs:
                a, b = self.test_rows[p.test], self.train_rows[p.train]
                w.writerow([p.criterion, "" if p.similarity is None else f"{p.similarity:.6f}", a.dataset,
                            a.patient_id, a.image_id, self.test_paths[p.test], b.dataset, b.patient_id,
                            b.image_id, self.train_paths[p.train]])
        with written[2].open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["link", "test_dataset", "test_patient_id", "train_dataset", "train_patient_id"])
            for ns, pid in self.shared_patients:
                w.writerow(["patient_id", ns, pid, ns, pid])
            for (ta, tp), (ra, rp) in _image_links(self):
                w.writerow(["shared_images", ta, tp, ra, rp])
        return written


def _image_links(result: OverlapResult) -> List[Tuple[Tuple[str, str], Tuple[str, str]]]:
    """Distinct ((test dataset, patient), (train dataset, patient)) joined by a matched image pair, sorted."""
    links = {((result.test_rows[p.test].dataset, result.test_rows[p.test].patient_id),
              (result.train_rows[p.train].dataset, result.train_rows[p.train].patient_id)) for p in result.pairs}
    return sorted(links)


def _key(row: ManifestRow) -> str:
    return f"{row.dataset}/{row.image_id}"


def _fraction(n: int, total: int) -> float:
    return round(n / total, 6) if total else 0.0


def _join(test_keys: Sequence[Optional[str]], train_keys: Sequence[Optional[str]], criterion: str) -> List[ImagePair]:
    """Pairs of rows with equal non-empty keys."""
    by_key: Dict[str, List[int]] = {}
    for j, k in enumerate(train_keys):
        if k:
            by_key.setdefault(k, []).append(j)
    return [ImagePair(criterion, i, j) for i, k in enumerate(test_keys) if k for j in by_key.get(k, ())]


def _expand(unique_pairs: Iterable[Tuple[int, int, float]], test_rows_of: List[List[int]],
            train_rows_of: List[List[int]]) -> List[ImagePair]:
    return [ImagePair("near_duplicate", i, j, round(r, 6)) for a, b, r in unique_pairs
            for i in test_rows_of[a] for j in train_rows_of[b]]


def _content_pairs(test_paths: List[str], train_paths: List[str], criteria: Sequence[str], *,
                   min_correlation: float, cache_file: Optional[PathLike], workers: int, progress: bool
                   ) -> Tuple[List[ImagePair], Dict[str, str], Dict[str, int]]:
    """Pixel-exact and near-duplicate pairs; also the unreadable files and the run's cache facts."""
    run = hash_files(list(test_paths) + list(train_paths), cache_file=cache_file, workers=workers, progress=progress)
    logger.info("fingerprints: %d from the cache, %d decoded, %d unreadable", run.from_cache, run.decoded,
                len(run.errors))
    stats = {"from_cache": run.from_cache, "decoded": run.decoded}
    digest = lambda p: run.hashes[p].pixel_sha256 if p in run.hashes else None  # noqa: E731
    pairs: List[ImagePair] = []
    if "pixels_exact" in criteria:
        pairs += _join([digest(p) for p in test_paths], [digest(p) for p in train_paths], "pixels_exact")
    if "near_duplicate" in criteria:
        sides = []
        for paths in (test_paths, train_paths):
            order = sorted({p for p in paths if p in run.hashes})
            where = {p: u for u, p in enumerate(order)}
            rows_of: List[List[int]] = [[] for _ in order]
            for i, p in enumerate(paths):
                if p in where:
                    rows_of[where[p]].append(i)
            sides.append(([run.hashes[p] for p in order], rows_of))
        (test_h, test_of), (train_h, train_of) = sides
        pairs += _expand(near_duplicate_pairs(test_h, train_h, min_correlation), test_of, train_of)
    return pairs, run.errors, stats


def find_overlap(
    train_rows: Sequence[ManifestRow],
    test_rows: Sequence[ManifestRow],
    *,
    train_base: PathLike = ".",
    test_base: PathLike = ".",
    by: str = "all",
    min_correlation: float = DEFAULT_MIN_CORRELATION,
    cache_file: Optional[PathLike] = None,
    workers: int = 2,
    progress: bool = False,
    examples: int = 5,
    sources: Optional[Dict[str, Any]] = None,
) -> OverlapResult:
    """Patients and images of ``test_rows`` that also occur in ``train_rows``.

    Args:
        train_rows: Training-set manifest rows.
        test_rows: Evaluation-set manifest rows.
        train_base: Folder that relative training image paths are relative to (the manifest's folder).
        test_base: The same for the test rows.
        by: ``ids`` (patients, image ids, UIDs, paths: nothing is decoded), ``pixels`` (content only) or
            ``all``.
        min_correlation: Near-duplicate threshold (:data:`cxr_search.evaluation.image_hash.DEFAULT_MIN_CORRELATION`).
        cache_file: SQLite cache of image fingerprints; None caches nothing.
        workers: Decoding processes for the fingerprints.
        progress: Progress bar on stderr while decoding.
        examples: Example pairs (patients) per criterion in the report.
        sources: Extra facts about the inputs for the report (manifest paths, splits).

    Returns:
        The result; ``result.to_dict()`` is the JSON report.

    Raises:
        ConfigError: Unknown ``by`` or a threshold out of range.
        InputFileError: The fingerprint cache cannot be opened.
    """
    if by not in BY_CHOICES:
        raise ConfigError(f"unknown --by {by!r}; choose one of {', '.join(BY_CHOICES)}")
    if not 0.0 < float(min_correlation) <= 1.0:  # checked here too, so a typo fails before any decoding
        raise ConfigError(f"--min-correlation must be in (0, 1], got {min_correlation}")
    criteria = BY_CHOICES[by]
    train_rows, test_rows = list(train_rows), list(test_rows)
    train_paths = [resolve_image_path(r.image_path, Path(train_base)) for r in train_rows]
    test_paths = [resolve_image_path(r.image_path, Path(test_base)) for r in test_rows]

    pairs: List[ImagePair] = []
    if "image_id" in criteria:
        pairs += _join([f"{id_namespace(r.dataset)}\0{r.image_id}" for r in test_rows],
                       [f"{id_namespace(r.dataset)}\0{r.image_id}" for r in train_rows], "image_id")
    if "sop_instance_uid" in criteria:
        pairs += _join([r.sop_instance_uid for r in test_rows], [r.sop_instance_uid for r in train_rows],
                       "sop_instance_uid")
    if "image_path" in criteria:
        pairs += _join(test_paths, train_paths, "image_path")
    unreadable: Dict[str, str] = {}
    stats: Dict[str, int] = {}
    if any(c in criteria for c in CONTENT_CRITERIA):
        content, unreadable, stats = _content_pairs(test_paths, train_paths, criteria, min_correlation=min_correlation,
                                                    cache_file=cache_file, workers=workers, progress=progress)
        pairs += content
    rank = {c: n for n, c in enumerate(CRITERIA)}
    pairs.sort(key=lambda p: (rank[p.criterion], p.test, p.train))

    def patient(row: ManifestRow) -> Tuple[str, str]:
        return id_namespace(row.dataset), row.patient_id

    test_patients = sorted({patient(r) for r in test_rows})
    shared = sorted(set(test_patients) & {patient(r) for r in train_rows}) if by != "pixels" else []
    result = OverlapResult({}, pairs, shared, train_rows, test_rows, train_paths, test_paths, stats)
    result.summary = _summary(result, by, criteria, test_patients, unreadable, train_paths, test_paths,
                              min_correlation, examples, sources or {})
    return result


def _side(rows: List[ManifestRow]) -> Dict[str, Any]:
    return {"images": len(rows), "patients": len({(id_namespace(r.dataset), r.patient_id) for r in rows}),
            "datasets": sorted({r.dataset for r in rows})}


def _summary(result: OverlapResult, by: str, criteria: Sequence[str], test_patients: List[Tuple[str, str]],
             unreadable: Dict[str, str], train_paths: List[str], test_paths: List[str], min_correlation: float,
             examples: int, sources: Dict[str, Any]) -> Dict[str, Any]:
    test_rows, train_rows = result.test_rows, result.train_rows
    n_test, n_test_patients = len(test_rows), len(test_patients)
    images: Dict[str, Any] = {}
    matched_any: Set[int] = set()
    for c in criteria:
        mine = [p for p in result.pairs if p.criterion == c]
        hit = {p.test for p in mine}
        matched_any |= hit
        shown = sorted(mine, key=lambda p: (_key(test_rows[p.test]), _key(train_rows[p.train])))[:examples]
        images[c] = {
            "test_images": len(hit), "fraction_of_test": _fraction(len(hit), n_test), "pairs": len(mine),
            "examples": [{"test": _key(test_rows[p.test]), "train": _key(train_rows[p.train]),
                          **({"similarity": p.similarity} if p.similarity is not None else {})} for p in shown],
        }
    images["any"] = {"test_images": len(matched_any), "fraction_of_test": _fraction(len(matched_any), n_test)}

    patients: Dict[str, Any] = {}
    linked: Set[Tuple[str, str]] = set()
    if by != "pixels":
        shared = set(result.shared_patients)
        n_img = sum(1 for r in test_rows if (id_namespace(r.dataset), r.patient_id) in shared)
        patients["by_id"] = {
            "test_patients": len(shared), "fraction_of_test_patients": _fraction(len(shared), n_test_patients),
            "test_images_of_these_patients": n_img, "fraction_of_test_images": _fraction(n_img, n_test),
            "examples": [f"{ns}/{pid}" for ns, pid in result.shared_patients[:examples]],
        }
        linked |= shared
    via_images = {(id_namespace(test_rows[p.test].dataset), test_rows[p.test].patient_id) for p in result.pairs}
    patients["by_shared_images"] = {
        "test_patients": len(via_images), "fraction_of_test_patients": _fraction(len(via_images), n_test_patients),
        "examples": [f"{ns}/{pid}" for ns, pid in sorted(via_images)[:examples]],
    }
    linked |= via_images
    patients["any"] = {"test_patients": len(linked), "fraction_of_test_patients": _fraction(len(linked),
                                                                                         n_test_patients)}
    summary: Dict[str, Any] = {
        "train": {**{k[6:]: v for k, v in sources.items() if k.startswith("train_")}, **_side(train_rows)},
        "test": {**{k[5:]: v for k, v in sources.items() if k.startswith("test_")}, **_side(test_rows)},
        "by": by,
        "criteria": list(criteria),
        "patients": patients,
        "images": images,
    }
    if any(c in criteria for c in CONTENT_CRITERIA):
        summary["unreadable"] = {
            "test_images": sum(1 for p in test_paths if p in unreadable),
            "train_images": sum(1 for p in train_paths if p in unreadable),
            "examples": [{"path": p, "reason": unreadable[p]} for p in sorted(unreadable)[:examples]],
        }
        summary["settings"] = {
            "near_duplicate": f"Pearson correlation of {THUMB_SIDE}x{THUMB_SIDE} thumbnails (plain or "
                              "histogram-equalised) >= min_correlation",
            "min_correlation": min_correlation,
        }
    return summary


def render_overlap(summary: Dict[str, Any]) -> Any:
    """A rich table of an overlap report (one row per criterion, then the patient rows)."""
    from rich.table import Table

    test = summary["test"]
    table = Table(title=f"overlap: {test['images']} test images of {test['patients']} patients vs "
                        f"{summary['train']['images']} training images")
    for col in ("matched by", "test items", "% of test", "pairs", "example: test = train"):
        table.add_column(col, justify="left" if col in ("matched by", "example: test = train") else "right")
    for name, m in summary["images"].items():
        ex = m.get("examples") or []
        example = f"{ex[0]['test']} = {ex[0]['train']}" if ex else ""
        table.add_row(name, str(m["test_images"]), f"{100 * m['fraction_of_test']:.2f}",
                      str(m.get("pairs", "")), example)
    for name, m in summary["patients"].items():
        ex = m.get("examples") or []
        table.add_row(f"patients {name}", str(m["test_patients"]), f"{100 * m['fraction_of_test_patients']:.2f}",
                      "", ex[0] if ex else "")
    unread = summary.get("unreadable")
    if unread and (unread["test_images"] or unread["train_images"]):
        first = unread["examples"][0] if unread["examples"] else None
        table.caption = (f"unreadable: {unread['test_images']} test, {unread['train_images']} training images"
                         + (f" (first: {first['path']}: {first['reason']})" if first else ""))
    return table


def overlap_manifests(train_manifest: PathLike, test_manifest: PathLike, *, train_split: Optional[str] = None,
                      test_split: Optional[str] = None, **kw: Any) -> OverlapResult:
    """:func:`find_overlap` of two manifest files (relative image paths resolve against each file's folder).

    Args:
        train_manifest: Training manifest CSV.
        test_manifest: Evaluation manifest CSV (may be the same file with another split).
        train_split: Keep only training rows of this split.
        test_split: Keep only test rows of this split.
        **kw: Passed to :func:`find_overlap`.

    Raises:
        DatasetError: A manifest is missing or malformed, or has no rows (of the split asked for).
    """
    sides = []
    for what, path, split in (("training", train_manifest, train_split), ("test", test_manifest, test_split)):
        rows = read_manifest(path, split=split)
        if not rows:
            raise DatasetError(f"{path}: the {what} manifest has no rows" + (f" of split {split!r}" if split else ""))
        sides.append(rows)
    sources = {"train_manifest": str(train_manifest), "test_manifest": str(test_manifest)}
    if train_split:
        sources["train_split"] = train_split
    if test_split:
        sources["test_split"] = test_split
    return find_overlap(sides[0], sides[1], train_base=Path(train_manifest).resolve().parent,
                        test_base=Path(test_manifest).resolve().parent, sources=sources, **kw)


__all__ = [
    "BY_CHOICES", "CONTENT_CRITERIA", "CRITERIA", "ID_CRITERIA", "OUTPUT_FILES", "SHARED_NAMESPACES", "ImagePair",
    "OverlapResult", "find_overlap", "id_namespace", "overlap_manifests", "render_overlap", "resolve_image_path",
]
