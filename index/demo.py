"""The end-to-end demo that ``make demo`` runs.

Until the synthetic archive, training and the index land, the demo runs the largest path that works:
write a small archive of generated radiograph-like images as DICOM (MONOCHROME1 and MONOCHROME2,
12-bit) and PNG, build the ``tiny`` model, save it in our checkpoint format and load it back, embed
every file through the real readers (photometric DICOM chain, eval transform), embed query texts, and
rank the archive for each query. The model is untrained, so the rankings are arbitrary: the demo
shows the plumbing and its timings, not retrieval quality.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from cxr_search.checkpoints import load_model, save_model
from cxr_search.model import create_model
from index.bench.speed import synthetic_images

logger = logging.getLogger(__name__)

QUERIES = [
    "large right pleural effusion with basal atelectasis",
    "no acute cardiopulmonary process",
    "enlarged cardiac silhouette",
]


@dataclass
class DemoResult:
    """What the demo did, stage by stage."""

    out_dir: str
    files: List[str] = field(default_factory=list)
    timings_s: Dict[str, float] = field(default_factory=dict)
    hits: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)
    model_fingerprint: str = ""
    note: str = "untrained tiny model: rankings are arbitrary until training lands"


def write_dicom(path: Path, pixels: np.ndarray, *, monochrome1: bool, uid_seed: int) -> None:
    """Write a 12-bit single-frame DX image (MONOCHROME1 stores the inverted values)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    stored = (pixels.astype(np.float32) / 255.0 * 4095.0).round().astype(np.uint16)
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"demo-sop-{uid_seed}"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"demo-study-{uid_seed}"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"demo-series-{uid_seed}"])
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PatientID = f"DEMO{uid_seed:04d}"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def run_demo(out_dir: Path, *, images: int = 12, k: int = 3) -> DemoResult:
    """Run the demo into ``out_dir`` and return what happened."""
    out_dir = Path(out_dir)
    archive = out_dir / "archive"
    archive.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out_dir=str(out_dir))

    t0 = time.perf_counter()
    for i, img in enumerate(synthetic_images(images, size=256, seed=0)):
        if i % 3 == 2:
            path = archive / f"image_{i:03d}.png"
            img.save(path)
        else:
            path = archive / f"image_{i:03d}.dcm"
            write_dicom(path, np.asarray(img), monochrome1=i % 3 == 1, uid_seed=i)
        result.files.append(str(path))
    result.timings_s["write_archive"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model_dir = save_model(create_model("tiny"), out_dir / "model")
    model = load_model(model_dir)
    result.model_fingerprint = model.provenance["fingerprint"]
    result.timings_s["model_save_load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    image_emb = model.embed_images(result.files, batch_size=8)  # [N, D]
    result.timings_s["embed_images"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    text_emb = model.embed_texts(QUERIES)  # [Q, D]
    result.timings_s["embed_texts"] = time.perf_counter() - t0

    scores = text_emb @ image_emb.T  # [Q, N]
    for q, query in enumerate(QUERIES):
        top = np.argsort(-scores[q])[:k]
        result.hits[query] = [{"rank": r + 1, "score": round(float(scores[q, j]), 4), "file": result.files[j]}
                              for r, j in enumerate(top)]
    result.timings_s = {key: round(v, 3) for key, v in result.timings_s.items()}
    return result
