"""The index of ``benchmarks/bench_serve.py``: a small real index padded to N images with synthetic vectors.

A synthetic PACS export of a few studies (512-pixel DICOM with reports) is indexed by ``index build`` with
the ``cxr-clip-r50`` preset (random weights, a WordPiece vocabulary trained in code, saved as a model
folder so the index names its model), then the store is padded with synthetic patients, studies,
series, images with clustered vectors and one-section reports (every padded image points at one of the
real files, so thumbnails render), and ``IndexDir.sync`` writes the FAISS files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

PRESET = "cxr-clip-r50"


def prepare(work: Path, images: int, real_studies: int, rebuild: bool) -> Tuple[Path, Path, Dict[str, Any]]:
    """(index folder, archive folder, facts): the padded index of ``images`` images, built or reused."""
    from index.index_dir import IndexDir

    archive = work / "archive"
    index_dir = work / f"index-{images}"
    facts: Dict[str, Any] = {}
    if index_dir.is_dir() and not rebuild:
        idx = IndexDir.open(index_dir, readonly=True)
        try:
            counts = idx.store.counts()
        finally:
            idx.close()
        if counts["images"] == images:
            print(f"reusing {index_dir} ({counts})", flush=True)
            return index_dir, archive, {"reused": True, "counts": counts}
    if index_dir.exists():
        shutil.rmtree(index_dir)
    model_dir = work / "model"
    from cxr_search.checkpoints import CONFIG_FILE, save_model

    if rebuild or not (model_dir / CONFIG_FILE).is_file():
        from index.bench.speed import bench_model

        model = bench_model(PRESET, seed=0)
        model.provenance = {"source": f"preset:{PRESET} (random weights, benchmark)"}
        save_model(model, model_dir)
    if not (archive / "reports.csv").is_file():
        from cxr_search.synth import synthesize

        if archive.exists():
            shutil.rmtree(archive)
        synthesize(archive, studies=real_studies, seed=5, layout="pacs", broken=0, image_size=512)
    from cxr_search.checkpoints import load_model
    from index.build import BuildOptions, build

    model = load_model(model_dir)
    t0 = time.perf_counter()
    build(archive, index_dir, model, BuildOptions(reports_csv=archive / "reports.csv", batch_size=8, device="cpu"))
    facts["real_build_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    facts.update(pad(index_dir, images))
    facts["pad_and_sync_s"] = round(time.perf_counter() - t0, 1)
    facts["reused"] = False
    return index_dir, archive, facts


def pad(index_dir: Path, images: int, seed: int = 0) -> Dict[str, Any]:
    """Add synthetic patients, studies, series, images (with vectors) and one-section reports to the store
    until it holds ``images`` embedded images, then sync the FAISS files to it."""
    from sqlalchemy import func, insert, select

    from index.ann.reference import clustered_unit_vectors
    from index.index_dir import IndexDir
    from index.store import (
        EMBEDDED,
        Image,
        ImageVector,
        Patient,
        Report,
        Section,
        SectionVector,
        Series,
        Study,
        vector_bytes,
    )

    idx = IndexDir.open(index_dir)
    try:
        dim = int(idx.meta["embed_dim"])
        with idx.store.session() as s:
            real = s.execute(select(Image.path_key, Image.path_enc, Image.view, Image.modality, Image.rows,
                                    Image.columns, Image.photometric, Image.transfer_syntax)
                             .where(Image.status == EMBEDDED).order_by(Image.id)).all()
            texts = s.execute(select(Report.source, Report.text).order_by(Report.id)).all()
            sections = s.execute(select(Section.kind, Section.text).where(Section.status == EMBEDDED)
                                 .order_by(Section.id)).all()
            top = {t.__name__: int(s.scalar(select(func.max(t.id))) or 0) for t in (Patient, Study, Series, Image,
                                                                                     Report, Section)}
        extra = images - len(real)
        if extra <= 0:
            raise SystemExit(f"{index_dir} already holds {len(real)} images (asked for {images})")
        if not texts or not sections:
            raise SystemExit(f"{index_dir}: the real index has no report sections to copy")
        rng = np.random.default_rng(seed)
        vecs = clustered_unit_vectors(extra, dim, seed=seed)
        # Study j holds 2 images, every fourth study 1: 1.75 images a study, as in the synthetic exports.
        study_of = np.zeros(extra, dtype=np.int64)
        j, i = 0, 0
        while i < extra:
            n = 1 if j % 4 == 3 else 2
            study_of[i:i + n] = j
            i, j = i + n, j + 1
        n_studies = j
        sec_vecs = clustered_unit_vectors(n_studies, dim, seed=seed + 1)
        tag = uuid.uuid4().int % 10**12  # UIDs unique to this padding
        base_date = _dt.date(2008, 1, 1)
        patients = [{"id": top["Patient"] + 1 + p, "pseudo_id": hashlib.sha256(f"bench-{tag}-{p}".encode()).hexdigest()}
                    for p in range((n_studies + 2) // 3)]
        studies, series, reports, secs, sec_rows = [], [], [], [], []
        for k in range(n_studies):
            sid = top["Study"] + 1 + k
            studies.append({"id": sid, "study_uid": f"2.25.{tag}.1.{k}", "patient_id": top["Patient"] + 1 + k // 3,
                            "study_date": base_date + _dt.timedelta(days=int(rng.integers(0, 6000))),
                            "age_years": float(rng.integers(18, 95)), "sex": "MF"[k % 2], "vector_dirty": False})
            series.append({"id": top["Series"] + 1 + k, "series_uid": f"2.25.{tag}.2.{k}", "study_id": sid,
                           "modality": "DX"})
            src, text = texts[k % len(texts)]
            reports.append({"id": top["Report"] + 1 + k, "study_id": sid, "source": src, "text": text})
            kind, stext = sections[k % len(sections)]
            secs.append({"id": top["Section"] + 1 + k, "report_id": top["Report"] + 1 + k, "study_id": sid,
                         "kind": kind, "text": stext, "status": EMBEDDED})
            sec_rows.append({"section_id": top["Section"] + 1 + k, "vector": vector_bytes(sec_vecs[k])})
        rows, vec_rows = [], []
        for i in range(extra):
            r = real[i % len(real)]
            iid = top["Image"] + 1 + i
            k = int(study_of[i])
            rows.append({"id": iid, "sop_uid": f"2.25.{tag}.3.{i}", "series_id": top["Series"] + 1 + k,
                         "study_id": top["Study"] + 1 + k, "path_key": r.path_key, "path_enc": r.path_enc,
                         "view": r.view, "modality": r.modality, "rows": r.rows, "columns": r.columns,
                         "photometric": r.photometric, "transfer_syntax": r.transfer_syntax, "status": EMBEDDED})
            vec_rows.append({"image_id": iid, "vector": vector_bytes(vecs[i])})
        t0 = time.perf_counter()
        with idx.store.session() as s:
            for table, data in ((Patient, patients), (Study, studies), (Series, series), (Report, reports),
                                (Section, secs), (SectionVector, sec_rows), (Image, rows), (ImageVector, vec_rows)):
                for start in range(0, len(data), 5000):
                    s.execute(insert(table), data[start:start + 5000])
        insert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        faiss = idx.sync()
        sync_s = time.perf_counter() - t0
        counts = idx.store.counts()
    finally:
        idx.close()
    print(f"padded to {counts} (insert {insert_s:.1f} s, FAISS sync {sync_s:.1f} s)", flush=True)
    return {"real_images": len(real), "padded_images": extra, "padded_studies": n_studies, "counts": counts,
            "insert_s": round(insert_s, 1), "sync_s": round(sync_s, 1),
            "faiss": {k: {"factory": v.get("factory"), "n": v.get("n")} for k, v in faiss.items()}}


def full_size_dicom(folder: Path) -> Path:
    """A 3000x2500 16-bit PA chest DICOM not in the index (a typical CR/DX film size)."""
    from tests.helpers.dicom_files import make_ds, radiograph, save

    path = folder / "query-3000x2500.dcm"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        save(make_ds(radiograph(3000, 2500, seed=7), BodyPartExamined="CHEST", ViewPosition="PA",
                     PatientID="BENCH-QUERY"), path)
    return path


__all__ = ["PRESET", "full_size_dicom", "pad", "prepare"]
