"""Synthetic chest X-ray archives: phantom radiographs, consistent reports and ground truth.

The generator is the embedded default of the demo and the fixture of the test suite. For a seed it
writes the same bytes every time, in one of three layouts:

- ``"pacs"``: a hospital export (DICOM tree + ``reports.csv`` RIS export), see :mod:`.pacs`;
- ``"mimic"``: MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR report files, see :func:`.writers.write_mimic`;
- ``"openi"``: the Indiana University OpenI collection, see :func:`.writers.write_openi`.

Every layout also gets ``ground_truth.csv`` (one row per image: identifiers, relative path, 0/1
finding columns, side/size/zone attributes, CheXpert-style ``labels``).

This package defines :func:`synthesize` and :class:`SynthSummary`. Modules:

* ``plan``: the layout-independent plan: patients, studies, views, findings, reports.
* ``findings``: sampling of findings and their ground truth.
* ``reportgen``, ``phrases``: report text consistent with the findings, and its phrase banks.
* ``phantom``: rendering of the films; ``scene`` (patient habitus, acquisition variation), ``frontal``,
  ``lateral`` (anatomy), ``lesions`` (findings and devices) and ``canvas`` (drawing primitives) are its
  parts.
* ``pacs``, ``writers``: the DICOM PACS export, and the MIMIC-CXR / OpenI layouts plus ``ground_truth.csv``.
* ``montage``: a contact sheet of one film per finding, for looking at the phantom.

Example:
    >>> summary = synthesize("/tmp/archive", studies=20, seed=0, layout="mimic", image_size=128)
    >>> summary.studies
    20
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Union

from cxr_search.errors import ConfigError, InputFileError
from cxr_search.synth.findings import EXTRAS, FINDINGS
from cxr_search.synth.pacs import write_pacs
from cxr_search.synth.plan import plan_archive
from cxr_search.synth.writers import LayoutResult, write_ground_truth, write_mimic, write_openi

logger = logging.getLogger(__name__)

LAYOUTS = ("pacs", "mimic", "openi")


@dataclass
class SynthSummary:
    """What :func:`synthesize` wrote.

    Attributes:
        out_dir: Root of the archive.
        layout: "pacs", "mimic" or "openi".
        seed: Seed used.
        image_size: Shorter image side in pixels.
        patients: Number of patients.
        studies: Number of studies.
        images: Number of readable images (rows of ``ground_truth.csv``).
        reports: Number of readable reports.
        broken: Number of broken files added.
        broken_files: Their paths, relative to ``out_dir`` (POSIX separators).
        finding_counts: Studies with each finding (keys of :data:`FINDINGS` and :data:`EXTRAS`, plus
            "normal" for studies without any finding or device).
        ground_truth: Path of ``ground_truth.csv``.
        seconds: Wall time of the generation.
    """

    out_dir: Path
    layout: str
    seed: int
    image_size: int
    patients: int
    studies: int
    images: int
    reports: int
    broken: int
    broken_files: List[str] = field(default_factory=list)
    finding_counts: Dict[str, int] = field(default_factory=dict)
    ground_truth: Path = Path()
    seconds: float = 0.0


def synthesize(
    out_dir: Union[str, Path],
    *,
    studies: int,
    seed: int,
    layout: str = "pacs",
    broken: int = 0,
    image_size: int = 512,
) -> SynthSummary:
    """Write a synthetic chest X-ray archive.

    Args:
        out_dir: Destination folder (created; must be empty or absent so that nothing is mixed).
        studies: Number of studies (>= 1); most have a PA and a lateral film, portable ones one AP.
        seed: Seed; the same arguments give the same bytes.
        layout: "pacs", "mimic" or "openi".
        broken: Number of broken files to add (listed in the summary, not in the ground truth).
        image_size: Shorter side of the images in pixels (>= 32).

    Returns:
        Counts, per-finding study counts and the ground-truth path.

    Raises:
        ConfigError: Unknown layout or an invalid count or size.
        InputFileError: ``out_dir`` exists and is not an empty folder.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown synthetic layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if studies < 1:
        raise ConfigError(f"studies must be at least 1, got {studies}")
    if broken < 0:
        raise ConfigError(f"broken must be zero or more, got {broken}")
    if image_size < 32:
        raise ConfigError(f"image_size {image_size} is too small; use at least 32 pixels")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputFileError(out, "output folder exists and is not empty; choose a new folder or empty this one")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plan = plan_archive(studies, seed)
    writer = {"pacs": write_pacs, "mimic": write_mimic, "openi": write_openi}[layout]
    res: LayoutResult = writer(plan, out, image_size, broken)
    gt = write_ground_truth(out, res.rows)
    counts: Dict[str, int] = {name: 0 for name in (*FINDINGS, *EXTRAS)}
    counts["normal"] = 0
    for st in plan.studies:
        for f in st.findings.findings:
            counts[f.name] += 1
        for e in st.findings.extras:
            counts[e] += 1
        counts["normal"] += int(st.findings.is_normal)
    seconds = time.perf_counter() - t0
    logger.info("wrote %s archive of %d studies / %d images to %s in %.1f s", layout, len(plan.studies), res.images,
                out, seconds)
    return SynthSummary(
        out_dir=out, layout=layout, seed=seed, image_size=image_size, patients=len(plan.patients),
        studies=len(plan.studies), images=res.images, reports=res.reports, broken=len(res.broken_files),
        broken_files=res.broken_files, finding_counts=counts, ground_truth=gt, seconds=seconds,
    )


__all__ = ["LAYOUTS", "SynthSummary", "synthesize"]
