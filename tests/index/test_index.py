"""The engine end to end on a synthetic PACS export: build, resume, add, remove, verify, privacy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from cxr_search.errors import SearchIndexError
from index import embed as pipeline
from index.ann.vector_index import VectorIndex
from index.build import BuildOptions, build
from index.index_dir import IndexDir
from index.store import EMBEDDED, Image, Section, Study
from index.verify import verify
from tests.helpers.index_data import DB_PARAMS, copy_archive, copy_index, db_url_for, ground_truth, store_dump

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _state(index_dir: Path, db_url=None) -> dict:
    """Store rows and FAISS ids, keyed by UIDs (ids are store-internal)."""
    idx = IndexDir.open(index_dir, db_url=db_url)
    try:
        with idx.store.session() as s:
            images = dict(s.execute(select(Image.sop_uid, Image.id).where(Image.status == EMBEDDED)).all())
            studies = dict(s.execute(select(Study.study_uid, Study.id)).all())
            n_sections = len(s.scalars(select(Section.id)).all())
        faiss_ids = {k: idx.vector_index(k).ids() for k in ("image", "section", "study")}
    finally:
        idx.close()
    return {"images": images, "studies": studies, "sections": n_sections, "faiss": faiss_ids}


@pytest.fixture(scope="module", params=DB_PARAMS)
def built(request, pacs_archive: Path, tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """(index folder, build summary, store URL or None) — once per store backend."""
    out = tmp_path_factory.mktemp("built") / "index"
    db_url = db_url_for(request.param)
    summary = build(pacs_archive, out, tiny_model,
                    BuildOptions(reports_csv=pacs_archive / "reports.csv", batch_size=4, db_url=db_url))
    return out, summary, db_url


def test_build_indexes_every_image_and_records_failures(built, pacs_archive: Path) -> None:
    out, summary, db_url = built
    gt = ground_truth(pacs_archive)
    assert summary["totals"]["images"] == len(gt)  # broken files are not in the ground truth
    assert summary["totals"]["studies"] == len({r["study_id"] for r in gt})
    assert summary["added"] == summary["totals"]
    # truncated DICOM (decode), text notes, zero-byte file, ground_truth.csv: each recorded with a reason
    assert summary["totals"]["failed"] == 4
    reasons = summary["catalogue"]["failure_reasons"]
    assert reasons.get("not DICOM", 0) >= 2
    assert summary["embedding"]["images"]["failed"] == 1
    state = _state(out, db_url)
    assert set(state["images"]) == {r["image_id"] for r in gt}
    assert len(_broken_sops(out, db_url)) == 1  # the truncated file: catalogued from its header, then fails to decode
    np.testing.assert_array_equal(state["faiss"]["image"], np.sort(np.fromiter(state["images"].values(), np.int64)))
    assert len(state["faiss"]["study"]) == summary["totals"]["studies"]
    assert len(state["faiss"]["section"]) == summary["totals"]["sections"] >= summary["totals"]["studies"]
    report = verify(out, db_url=db_url)
    assert report["ok"], report["problems"]


def _broken_sops(index_dir: Path, db_url=None) -> set:
    idx = IndexDir.open(index_dir, db_url=db_url)
    try:
        with idx.store.session() as s:
            return set(s.scalars(select(Image.sop_uid).where(Image.status != EMBEDDED)).all())
    finally:
        idx.close()


def test_rebuild_is_idempotent(built, pacs_archive: Path, tiny_model, tmp_path: Path) -> None:
    out, first, db_url = built
    copy = tmp_path / "index"
    db_url = copy_index(out, copy, db_url)
    before = _state(copy, db_url)
    again = build(pacs_archive, copy, tiny_model,
                  BuildOptions(reports_csv=pacs_archive / "reports.csv", batch_size=4, db_url=db_url))
    assert again["added"] == {"images": 0, "studies": 0, "sections": 0, "failed": 0}
    assert again["totals"] == first["totals"]
    after = _state(copy, db_url)
    assert after["images"] == before["images"]
    for kind in ("image", "section", "study"):
        np.testing.assert_array_equal(after["faiss"][kind], before["faiss"][kind])
    assert verify(copy, db_url=db_url)["ok"]


class _Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["embedding", "sync"])
def test_resume_after_crash_has_no_duplicate_and_no_gap(where: str, built, pacs_archive: Path, tiny_model,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db_url = db_url_for("postgresql" if built[2] else "sqlite")
    out = tmp_path / "index"
    opts = BuildOptions(reports_csv=pacs_archive / "reports.csv", batch_size=4, db_url=db_url)
    if where == "embedding":
        real = pipeline.write_image_batch
        calls = {"n": 0}

        def crashing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise _Crash("killed")
            return real(*args, **kwargs)

        monkeypatch.setattr(pipeline, "write_image_batch", crashing)
    else:
        monkeypatch.setattr(IndexDir, "_clear_dirty", lambda self: (_ for _ in ()).throw(_Crash("killed")))
    with pytest.raises(_Crash):
        build(pacs_archive, out, tiny_model, opts)
    monkeypatch.undo()
    summary = build(pacs_archive, out, tiny_model, opts)
    assert summary["totals"] == built[1]["totals"]
    state, reference = _state(out, db_url), _state(built[0], built[2])
    assert set(state["images"]) == set(reference["images"])
    for kind in ("image", "section", "study"):
        ids = state["faiss"][kind]
        assert len(np.unique(ids)) == len(ids) == len(reference["faiss"][kind])
    report = verify(out, db_url=db_url)
    assert report["ok"], report["problems"]


def test_add_only_new_and_ids_survive(built, pacs_archive: Path, tiny_model, tmp_path: Path) -> None:
    db_url = db_url_for("postgresql" if built[2] else "sqlite")
    gt = ground_truth(pacs_archive)
    studies = sorted({r["study_id"] for r in gt})
    first = {r["path"] for r in gt if r["study_id"] in studies[:7]}
    part = copy_archive(pacs_archive, tmp_path / "part", keep=first)
    out = tmp_path / "index"
    s1 = build(part, out, tiny_model, BuildOptions(reports_csv=part / "reports.csv", batch_size=4, db_url=db_url))
    before = _state(out, db_url)
    s2 = build(pacs_archive, out, tiny_model,
               BuildOptions(reports_csv=pacs_archive / "reports.csv", batch_size=4, db_url=db_url), command="add")
    after = _state(out, db_url)
    assert s2["added"]["images"] == len(gt) - s1["totals"]["images"]
    assert s2["added"]["studies"] == len(studies) - 7
    for sop, rid in before["images"].items():  # old rows keep their ids, and their vectors stay in FAISS
        assert after["images"][sop] == rid
    assert set(before["faiss"]["image"]) <= set(after["faiss"]["image"])
    assert verify(out, db_url=db_url)["ok"]


def test_add_requires_an_index(pacs_archive: Path, tiny_model, tmp_path: Path) -> None:
    with pytest.raises(SearchIndexError, match="no index to add to"):
        build(pacs_archive, tmp_path / "none", tiny_model, BuildOptions(), command="add")


def test_remove_study_and_patient(built, pacs_archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    db_url = copy_index(built[0], out, built[2])
    before = _state(out, db_url)
    gt = ground_truth(pacs_archive)
    victim_study = gt[0]["study_id"]
    victim_patient = gt[-1]["patient_id"]
    idx = IndexDir.open(out, db_url=db_url)
    try:
        removed = idx.remove(study_uids=[victim_study], patient_ids=[victim_patient])["removed"]
        absent = idx.remove(study_uids=["1.2.3.404"])  # idempotent: not an error, and recorded all the same
        assert absent["not_in_index"] == ["study 1.2.3.404"] and absent["tombstones_added"] == 1
    finally:
        idx.close()
    gone_studies = {r["study_id"] for r in gt if r["study_id"] == victim_study or r["patient_id"] == victim_patient}
    assert removed["study"] == len(gone_studies)
    after = _state(out, db_url)
    assert set(after["studies"]) == set(before["studies"]) - gone_studies
    gone_ids = {before["studies"][u] for u in gone_studies}
    assert not gone_ids & set(after["faiss"]["study"])
    kept = {sop: rid for sop, rid in before["images"].items() if sop in after["images"]}
    assert kept == {sop: after["images"][sop] for sop in kept}  # survivors keep their ids
    np.testing.assert_array_equal(after["faiss"]["image"], np.sort(np.fromiter(after["images"].values(), np.int64)))
    assert verify(out, db_url=db_url)["ok"]


def test_verify_catches_a_deleted_vector_and_a_stray_one(built, tmp_path: Path) -> None:
    out = tmp_path / "index"
    db_url = copy_index(built[0], out, built[2])
    path = out / "images.faiss"
    index = VectorIndex.load(path)
    ids = index.ids()
    index.remove(ids[:1])
    index.add(np.eye(1, index.dim, dtype=np.float32), np.array([10_000_000], dtype=np.int64))
    index.save(path)
    report = verify(out, db_url=db_url)
    assert not report["ok"]
    problems = {(p["kind"], p["problem"].split(" (")[0]): p for p in report["problems"]}
    gap = problems[("image", "row with no vector in the FAISS index")]
    stray = problems[("image", "FAISS id with no row in the store")]
    assert gap["examples"] == [int(ids[0])] and stray["examples"] == [10_000_000]
    # The next build repairs the FAISS file from the store.
    idx = IndexDir.open(out, db_url=db_url)
    try:
        idx.sync()
    finally:
        idx.close()
    assert verify(out, db_url=db_url)["ok"]


def test_verify_reports_missing_files_and_model_mismatch(built, tmp_path: Path) -> None:
    from cxr_search.checkpoints import load_model
    from cxr_search.model import create_model

    out = tmp_path / "index"
    db_url = copy_index(built[0], out, built[2])
    (out / "studies.faiss").unlink()
    other = create_model("tiny", init_seed=1)
    other.provenance = {}
    report = verify(out, model=other, db_url=db_url)
    kinds = {p["kind"] for p in report["problems"]}
    assert not report["ok"] and {"study", "model"} <= kinds
    assert load_model("tiny") is not None


def test_store_holds_no_names_ids_or_paths(built, pacs_archive: Path) -> None:
    out, _, db_url = built
    blob = store_dump(out, db_url)
    gt = ground_truth(pacs_archive)
    assert gt[0]["image_id"].encode() in blob  # the dump does see the stored UIDs
    for row in gt:
        assert row["patient_id"].encode() not in blob  # the MRN (raw PatientID)
        assert row["accession_number"].encode() not in blob
        assert row["path"].encode() not in blob and Path(row["path"]).name.encode() not in blob
    # Names appear in the folder names of the export (style "LAST_FIRST_MRN"): never in the store.
    names = {part.split("_")[0] for r in gt for part in r["path"].split("/")[:1] if part.count("_") >= 2}
    assert names, "the fixture should include patient-named folders"
    for name in names:
        assert name.encode() not in blob


@pytest.mark.slow
def test_kill_9_then_same_command_resumes(built, pacs_archive: Path, tmp_path: Path) -> None:
    """A real SIGKILL in the middle of embedding; the same command then finishes the index."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    out = tmp_path / "index"
    db_url = db_url_for("postgresql" if built[2] else "sqlite")
    cmd = [sys.executable, "-m", "cli", "index", "build", str(pacs_archive), "--model", "tiny", "--out", str(out),
           "--reports", str(pacs_archive / "reports.csv"), "--batch-size", "1", "--json"]
    cmd += ["--db", db_url] if db_url else []
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = out / "store.sqlite"
    watcher = create_engine(db_url or f"sqlite:///{db}")
    deadline = time.monotonic() + 120
    embedded = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if db_url or db.is_file():
            try:
                with watcher.connect() as con:
                    embedded = con.execute(text("SELECT count(*) FROM image_vectors")).scalar_one()
            except SQLAlchemyError:  # the build has not created the table yet
                embedded = 0
            if embedded >= 3:
                break
        time.sleep(0.05)
    watcher.dispose()
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "images.faiss").exists()  # killed mid-embedding: nothing was indexed in FAISS yet
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    summary = json.loads(done.stdout)
    assert summary["totals"] == built[1]["totals"]
    assert 0 < summary["added"]["images"] < summary["totals"]["images"]  # the first run's batches were kept
    report = verify(out, db_url=db_url)
    assert report["ok"], report["problems"]
    state = _state(out, db_url)
    assert set(state["images"]) == set(_state(built[0], built[2])["images"])


def test_manifest_input_and_reports_from_sr_only(pacs_archive: Path, tiny_model, tmp_path: Path) -> None:
    from cxr_search.datasets.manifest import write_manifest
    from cxr_search.datasets.pacs import prepare_pacs

    prepared = prepare_pacs(pacs_archive, reports_csv=pacs_archive / "reports.csv")
    manifest = tmp_path / "pacs.csv"
    write_manifest(prepared.rows, manifest)
    by_manifest = build(manifest, tmp_path / "from-manifest", tiny_model, BuildOptions(batch_size=8))
    gt = ground_truth(pacs_archive)
    assert by_manifest["totals"]["images"] == len(gt)
    assert by_manifest["totals"]["studies"] == len({r["study_id"] for r in gt})
    assert by_manifest["totals"]["sections"] >= by_manifest["totals"]["studies"]
    assert verify(tmp_path / "from-manifest")["ok"]

    # Without the RIS CSV only the one study with a DICOM SR in the export gets a report.
    no_csv = build(pacs_archive, tmp_path / "no-csv", tiny_model, BuildOptions(batch_size=8))
    assert no_csv["totals"]["images"] == len(gt)
    assert no_csv["catalogue"]["reports_added"] == 1
    assert verify(tmp_path / "no-csv")["ok"]
