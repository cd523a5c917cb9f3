"""The demo's data stages: the synthetic PACS export, its manifest with a patient hold-out, the image cache.

Folder layout under the demo's ``--out`` (every stage writes under a temporary name or resumes, so a
run killed at any point is picked up by the next one):

- ``archive/``: the PACS export (DICOM tree in every common encoding, broken files mixed in);
- ``ris-reports.csv``: the RIS report export (kept outside the DICOM tree, as a hospital keeps it);
- ``ground_truth.csv``: the generator's findings per image (what the demo scores relevance with);
- ``manifest.csv``: every radiograph, ``split`` = ``train`` or ``test`` (patient-level hold-out);
- ``cache/`` + ``train-manifest.csv``: small 8-bit copies of the training images.
- ``demo-state.json``: what each stage was built from (:class:`DemoState`), so a rerun reuses it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, Mapping, Optional, Sequence

from cxr_search.datasets import write_manifest
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.datasets.pacs import prepare_pacs
from cxr_search.datasets.splits import holdout_split, unique_in_order
from cxr_search.errors import DatasetError, InputFileError
from cxr_search.fileio import write_json_atomic
from cxr_search.synth import SynthSummary, synthesize
from cxr_search.synth.findings import FINDINGS

logger = logging.getLogger(__name__)

STATE_FILE = "demo-state.json"
STATE_FORMAT = "cxr-search-demo/1"
ARCHIVE = "archive"
RIS_CSV = "ris-reports.csv"
GROUND_TRUTH = "ground_truth.csv"
MANIFEST = "manifest.csv"
TRAIN_MANIFEST = "train-manifest.csv"
CACHE = "cache"
#: Everything the demo writes; only these are ever deleted when a stage is rebuilt.
OWNED = (ARCHIVE, f"{ARCHIVE}.partial", RIS_CSV, GROUND_TRUTH, MANIFEST, TRAIN_MANIFEST, CACHE, "run", "index",
         "gallery.html", "summary.json", STATE_FILE)
TRAIN_SPLIT, TEST_SPLIT = "train", "test"


# ------------------------------------------------------------------------------------------ state
class DemoState:
    """``demo-state.json``: for each finished stage, the key it was built from and what it produced.

    A stage is reused only when its recorded key equals the key asked for now; the keys of later
    stages include the earlier ones, so changing the archive invalidates everything after it.

    Args:
        root: The demo folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / STATE_FILE
        self.stages: Dict[str, Dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                logger.warning("%s unreadable (%s); rebuilding every stage", self.path, exc)
                data = {}
            if data.get("format") == STATE_FORMAT:
                self.stages = dict(data.get("stages") or {})

    @classmethod
    def open(cls, root: Path) -> "DemoState":
        """Open (or start) the state of ``root``.

        Raises:
            InputFileError: ``root`` is a non-empty folder that is not a demo folder (nothing in it is touched).
        """
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise InputFileError(root, "not a folder; give a new or empty folder for --out")
        if root.is_dir() and not (root / STATE_FILE).is_file():
            foreign = sorted(p.name for p in root.iterdir() if p.name not in OWNED)
            if foreign:
                raise InputFileError(root, f"folder holds files the demo did not write ({', '.join(foreign[:3])}); "
                                           "give a new or empty folder for --out")
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @staticmethod
    def normal(key: Mapping[str, Any]) -> Dict[str, Any]:
        """``key`` as it reads back from JSON (so recorded and asked-for keys compare equal)."""
        return json.loads(json.dumps(dict(key), default=str, sort_keys=True))

    def done(self, stage: str, key: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """The recorded output of ``stage`` when it was finished with exactly ``key``, else None."""
        rec = self.stages.get(stage)
        if rec and rec.get("done") and rec.get("key") == self.normal(key):
            return dict(rec.get("output") or {})
        return None

    def begin(self, stage: str, key: Mapping[str, Any]) -> None:
        """Mark ``stage`` started with ``key`` (a killed run finds it unfinished and resumes it)."""
        self.stages[stage] = {"key": self.normal(key), "done": False}
        self.save()

    def record(self, stage: str, key: Mapping[str, Any], output: Mapping[str, Any]) -> None:
        """Mark ``stage`` finished (written atomically)."""
        self.stages[stage] = {"key": self.normal(key), "done": True,
                              "output": json.loads(json.dumps(dict(output), default=str))}
        self.save()

    def forget(self, *stages: str) -> None:
        """Drop the records of ``stages`` (their outputs are about to be rebuilt)."""
        for s in stages:
            self.stages.pop(s, None)
        self.save()

    def save(self) -> None:
        """Write the state file atomically."""
        write_json_atomic(self.path, {"format": STATE_FORMAT, "stages": self.stages}, sort_keys=True)


def remove_owned(root: Path, *names: str) -> None:
    """Delete demo outputs by name (only names in :data:`OWNED`)."""
    for name in names:
        if name not in OWNED:
            raise ValueError(f"{name} is not a demo output")
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


# ---------------------------------------------------------------------------------------- archive
def _count_files(folder: Path) -> int:
    n = 0
    for _, _, files in os.walk(folder):
        n += len(files)
    return n


def synthesize_archive(root: Path, *, studies: int, seed: int, image_size: int, broken: int,
                       progress: bool) -> Dict[str, Any]:
    """Write the PACS export to ``root/archive`` (via ``archive.partial``), RIS CSV and ground truth beside it.

    A progress bar counts the files written against the planned number of images (the generator
    itself reports nothing until it is done).

    Returns:
        The generator's summary (JSON-ready) with paths relative to ``root``.
    """
    partial = root / f"{ARCHIVE}.partial"
    remove_owned(root, f"{ARCHIVE}.partial", ARCHIVE, RIS_CSV, GROUND_TRUTH)
    stop = threading.Event()
    watcher: Optional[threading.Thread] = None
    bar = None
    if progress:
        from tqdm import tqdm

        from cxr_search.synth.plan import plan_archive

        planned = sum(len(s.views) for s in plan_archive(studies, seed).studies) + broken
        bar = tqdm(total=planned, desc="synthesizing archive", unit="file", dynamic_ncols=True)

        def watch() -> None:
            while not stop.wait(0.5):
                if partial.is_dir():
                    bar.n = min(_count_files(partial), planned)
                    bar.refresh()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    try:
        summary: SynthSummary = synthesize(partial, studies=studies, seed=seed, layout="pacs", broken=broken,
                                           image_size=image_size)
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
        if bar is not None:
            bar.n = bar.total
            bar.close()
    # The RIS export and the ground truth are not part of the DICOM tree a hospital would index.
    os.replace(partial / "reports.csv", root / RIS_CSV)
    os.replace(partial / "ground_truth.csv", root / GROUND_TRUTH)
    os.replace(partial, root / ARCHIVE)
    return {"patients": summary.patients, "studies": summary.studies, "images": summary.images,
            "reports": summary.reports, "broken_files": list(summary.broken_files),
            "finding_counts": dict(summary.finding_counts), "synth_seconds": round(summary.seconds, 2)}


# --------------------------------------------------------------------------------------- manifest
def prepare_manifest(root: Path, *, holdout_fraction: float, seed: int) -> Dict[str, Any]:
    """Manifest of the export with a seeded patient-level hold-out (``test``); the rest is ``train``.

    Returns:
        Counts per split (patients, studies, images) and the skip reasons of the scan.

    Raises:
        DatasetError: The export yields no radiograph, or a split would be empty.
    """
    result = prepare_pacs(root / ARCHIVE, reports_csv=root / RIS_CSV)
    rows = list(result.rows)
    if not rows:
        raise DatasetError(f"{root / ARCHIVE}: no radiograph found; delete {root} and run the demo again")
    patients = unique_in_order(r.patient_id for r in rows)
    held = holdout_split(patients, holdout_fraction, seed=seed)
    if not held or len(held) == len(patients):
        raise DatasetError(f"{len(patients)} patients cannot be split {holdout_fraction:.0%} held out; "
                           "use more --studies")
    for r in rows:
        r.split = TEST_SPLIT if r.patient_id in held else TRAIN_SPLIT
    write_manifest(rows, root / MANIFEST)
    counts: Dict[str, Dict[str, int]] = {}
    for split in (TRAIN_SPLIT, TEST_SPLIT):
        part = [r for r in rows if r.split == split]
        counts[split] = {"patients": len({r.patient_id for r in part}), "studies": len({r.study_id for r in part}),
                         "images": len(part)}
    return {"splits": counts, "skipped": dict(result.summary.get("skipped_reasons", {}))}


def cache_training_images(root: Path, rows: Sequence[ManifestRow], *, shorter_side: int,
                          progress: bool) -> Dict[str, Any]:
    """Cache the training rows' images small (resumable) and write ``train-manifest.csv``."""
    res = build_cache_rows(rows, root / CACHE, shorter_side=shorter_side, progress=progress)
    write_manifest(res.rows, root / TRAIN_MANIFEST)
    return {"cached": res.cached, "reused": res.reused, "failed": len(res.failed), "images": len(res.rows)}


def build_cache_rows(rows: Sequence[ManifestRow], out: Path, *, shorter_side: int, progress: bool) -> Any:
    """:func:`cxr_search.cache.build_cache` with at most two decoding processes (the demo's CPU budget)."""
    from cxr_search.cache import build_cache

    return build_cache(rows, out, shorter_side=shorter_side, workers=min(2, os.cpu_count() or 1), progress=progress)


# ----------------------------------------------------------------------------------- ground truth
@dataclass(frozen=True)
class Truth:
    """The generator's ground truth of one study."""

    findings: FrozenSet[str]
    attributes: Dict[str, str]

    @property
    def label(self) -> str:
        """Readable finding list ("normal" when none)."""
        return ", ".join(f.replace("_", " ") for f in sorted(self.findings)) or "normal"


def read_truth(root: Path) -> Dict[str, Truth]:
    """StudyInstanceUID -> :class:`Truth` from ``ground_truth.csv``.

    Raises:
        DatasetError: The file is missing or not a synthetic ground truth.
    """
    path = root / GROUND_TRUTH
    try:
        with path.open("r", encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the ground truth ({exc}); delete {root} and run the demo "
                           "again") from exc
    out: Dict[str, Truth] = {}
    for r in rows:
        if "study_id" not in r:
            raise DatasetError(f"{path}: not a synthetic ground truth (no study_id column)")
        if r["study_id"] not in out:
            found = frozenset(f for f in FINDINGS if r.get(f) == "1")
            attrs = {k: v for k, v in r.items() if v and any(k.startswith(f + "_") for f in FINDINGS)}
            out[r["study_id"]] = Truth(found, attrs)
    return out


def pick_query_image(rows: Sequence[ManifestRow], truth: Mapping[str, Truth]) -> ManifestRow:
    """A held-out frontal DICOM worth querying: a large or moderate effusion, else cardiomegaly, else any.

    Deterministic (the first candidate in manifest order of the best kind).

    Raises:
        DatasetError: The held-out split has no frontal image.
    """
    frontal = [r for r in rows if r.split == TEST_SPLIT and r.is_frontal]
    if not frontal:
        raise DatasetError("the held-out split has no frontal image; use more --studies")

    def rank(r: ManifestRow) -> int:
        t = truth.get(r.study_id)
        if t is None:
            return 9
        size = t.attributes.get("pleural_effusion_size", "")
        if "pleural_effusion" in t.findings and size in ("large", "moderate") and len(t.findings) <= 2:
            return 0
        if "pleural_effusion" in t.findings:
            return 1
        if "cardiomegaly" in t.findings:
            return 2
        return 3

    return min(frontal, key=rank)


def relative(root: Path, path: Optional[str]) -> str:
    """``path`` relative to ``root`` when inside it (for readable tables), else as given."""
    if not path:
        return ""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


__all__ = [
    "ARCHIVE", "CACHE", "DemoState", "GROUND_TRUTH", "MANIFEST", "RIS_CSV", "STATE_FILE", "TEST_SPLIT",
    "TRAIN_MANIFEST", "TRAIN_SPLIT", "Truth", "cache_training_images", "pick_query_image", "prepare_manifest",
    "read_truth", "relative", "remove_owned", "synthesize_archive",
]
