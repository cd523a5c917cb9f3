"""Writers of small OpenI-format releases: ``ecgen-radiology/<n>.xml`` reports, PNG images, the DICOM
originals (``<n>/<n>_IM-....dcm``, headers with ViewPosition) and a header table of the views."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from tests.helpers.dataset_files import write_csv
from tests.helpers.dicom_files import make_ds, radiograph, save


@dataclass(frozen=True)
class OpenIImage:
    """One image: its PNG id, the ViewPosition (and SeriesDescription) its DICOM header carries."""

    png_id: str
    view: str = ""
    series: str = ""
    dicom: bool = True  # False: no DICOM original (and no header-table row) for this image


@dataclass(frozen=True)
class OpenIStudy:
    """One report: uId (``CXR<n>``), sections (None = empty element) and images in parentImage order."""

    uid: str
    findings: Optional[str]
    impression: Optional[str]
    images: Sequence[OpenIImage] = field(default_factory=tuple)


def openi_xml(uid: str, findings: Optional[str], impression: Optional[str], images: Sequence[str]) -> str:
    """The XML of one report in the release's layout."""

    def section(label: str, text: Optional[str]) -> str:
        return f'<AbstractText Label="{label}"/>' if text is None else f'<AbstractText Label="{label}">{text}</AbstractText>'

    parents = "".join(f'<parentImage id="{i}"><figureId>F1</figureId><caption>Xray Chest PA and Lateral</caption>'
                      "</parentImage>" for i in images)
    return ('<?xml version="1.0" encoding="utf-8"?>\n<eCitation><meta type="rr"/>'
            f'<uId id="{uid}"/><MedlineCitation><Article><Abstract>'
            f'{section("COMPARISON", "None.")}{section("INDICATION", "XXXX-year-old with cough")}'
            f'{section("FINDINGS", findings)}{section("IMPRESSION", impression)}'
            f"</Abstract></Article></MedlineCitation><MeSH><major>normal</major></MeSH>{parents}</eCitation>")


def dicom_name(png_id: str) -> str:
    """The release's DICOM file name of a PNG id: ``CXR1_1_IM-0001-4001`` -> ``1_IM-0001-4001.dcm``."""
    match = re.match(r"^CXR(\d+)_(?:\d+_)?(IM-.+)$", png_id)
    assert match, png_id
    return f"{match.group(1)}_{match.group(2)}.dcm"


def write_openi(root: Path, studies: Sequence[OpenIStudy], *, dicom_dir: Optional[Path] = None, seed: int = 0) -> None:
    """Write the reports and a distinct random 32x32 PNG per image under ``root``; with ``dicom_dir``, also a
    small DICOM file per image (``<n>/<n>_IM-....dcm``) whose header holds the image's view."""
    rng = np.random.default_rng(seed)
    (root / "ecgen-radiology").mkdir(parents=True, exist_ok=True)
    for study in studies:
        number = study.uid[3:]
        ids = [im.png_id for im in study.images]
        (root / "ecgen-radiology" / f"{number}.xml").write_text(openi_xml(study.uid, study.findings, study.impression,
                                                                          ids))
        for im in study.images:
            (root / "png").mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / "png" / f"{im.png_id}.png")
            if dicom_dir is not None and im.dicom:
                folder = dicom_dir / number
                folder.mkdir(parents=True, exist_ok=True)
                attrs = {"ViewPosition": im.view, "Modality": "CR"}
                if im.series:
                    attrs["SeriesDescription"] = im.series
                save(make_ds(radiograph(16, 16), **attrs), folder / dicom_name(im.png_id))


def write_views_csv(path: Path, studies: Sequence[OpenIStudy], *, style: str = "dicom") -> Path:
    """A header table of the views: ``dicom`` style (file_name of the DICOM file, view_position) as public
    tables of the release's headers have it, or ``png`` style (image_id, ViewPosition, SeriesDescription)."""
    images: List[OpenIImage] = [im for s in studies for im in s.images if im.dicom]
    if style == "dicom":
        return write_csv(path, ["file_name", "modality", "view_position"],
                         [(dicom_name(im.png_id), "CR", im.view) for im in images])
    return write_csv(path, ["image_id", "ViewPosition", "SeriesDescription"],
                     [(im.png_id, im.view, im.series) for im in images])
