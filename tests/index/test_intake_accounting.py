"""The intake accounts for every input: indexed, a report, or a row with its reason; nothing hangs or is lost.

Each test builds a small export folder of real DICOM files, runs ``index build`` with the tiny model and
checks the accounting identity of the ``catalogue`` summary (``files_seen`` equals the sum of the
outcomes) and, in the store, that every input has its row.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from sqlalchemy import select

from cxr_search.datasets.manifest import ManifestRow, write_manifest
from index import embed as embed_module
from index.build import BuildOptions, build
from index.index_dir import IndexDir
from index.ingest_accounting import OUTCOMES
from index.store import EMBEDDED, FAILED, Failure, Image, Patient, Study
from index.store import Report as ReportRow
from index.verify import verify
from tests.helpers.dicom_files import make_ds, radiograph, save

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


# ------------------------------------------------------------------------------------------ helpers
def write_dx(path: Path, *, sop: Optional[str] = None, study: Optional[str] = None, patient: str = "PAT-1",
             seed: int = 0) -> Dataset:
    """A 64x64 chest DX radiograph written to ``path``."""
    ds = make_ds(radiograph(64, 64, seed=seed), BodyPartExamined="CHEST", PatientID=patient, ViewPosition="PA",
                 PatientSex="F", PatientAge="050Y", StudyDate="20240102")
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    save(ds, path)
    return ds


def write_damaged_copy(intact: Path, path: Path) -> None:
    """The same file cut inside its pixel data: the header reads, the pixels do not decode."""
    data = intact.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * 0.6)])


def write_sr(path: Path, study: str, findings: str, impression: str, patient: str = "PAT-1") -> Dataset:
    """A Basic Text SR of ``study`` with a findings and an impression text (empty texts: none)."""
    def code(meaning: str, value: str, scheme: str) -> DicomSequence:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        return DicomSequence([item])

    items = []
    for meaning, value, text in (("Findings", "121071", findings), ("Impression", "121073", impression)):
        if text:
            item = Dataset()
            item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
            item.ConceptNameCodeSequence = code(meaning, value, "DCM")
            item.TextValue = text
            items.append(item)
    ds = make_ds(radiograph(4, 4))  # file meta and UIDs; the pixels are dropped below
    del ds.PixelData
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                    "HighBit", "PixelRepresentation"):
        delattr(ds, keyword)
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.Modality = "SR"
    ds.StudyInstanceUID = study
    ds.PatientID = patient
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = code("Chest X-Ray Report", "18748-4", "LN")
    ds.ContentSequence = DicomSequence(items)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(ds, path)
    return ds


def run_build(archive: Path, out: Path, model: Any, **opts: Any) -> Dict[str, Any]:
    return build(archive, out, model, BuildOptions(batch_size=4, **opts))


def assert_identity(summary: Dict[str, Any]) -> Dict[str, Any]:
    """The accounting identity of the intake; returns the catalogue summary."""
    cat = summary["catalogue"]
    assert cat["files_seen"] == sum(cat[name] for name in OUTCOMES), cat
    return cat


def store_rows(out: Path, db_url: Optional[str] = None) -> Tuple[Dict[str, Tuple[str, str]], Dict[str, Tuple[str, str]]]:
    """({sop: (status, path)}, {path: (stage, reason)}) with the paths decrypted."""
    idx = IndexDir.open(out, db_url=db_url)
    try:
        with idx.store.session() as s:
            images = {sop: (status, idx.secret.decrypt_path(enc))
                      for sop, status, enc in s.execute(select(Image.sop_uid, Image.status, Image.path_enc))}
            failures = {idx.secret.decrypt_path(enc): (stage, reason)
                        for enc, stage, reason in s.execute(select(Failure.path_enc, Failure.stage, Failure.reason))}
    finally:
        idx.close()
    return images, failures


def assert_every_input_has_a_row(out: Path, inputs: list, db_url: Optional[str] = None) -> None:
    """Each input path is an image row or a failure row (both: an image that failed to decode), once; no
    reason holds a path."""
    images, failures = store_rows(out, db_url)
    image_paths = [p for _, p in images.values()]
    status = {p: st for st, p in images.values()}
    for path in map(str, inputs):
        assert image_paths.count(path) <= 1, path
        assert path in status or path in failures, path
        if path in status and path in failures:
            assert status[path] == FAILED and failures[path][0] == "decode", (path, failures[path])
    for _, reason in failures.values():
        assert "/" not in reason.split("SOPInstanceUID")[0], reason  # paths are only stored encrypted


# ------------------------------------------------------------------------------------------ duplicates
@pytest.mark.parametrize("damaged_first", [True, False])
def test_duplicate_keeps_the_copy_that_decodes_in_one_build(damaged_first: bool, store_url: str, tiny_model,
                                                            tmp_path: Path) -> None:
    root = tmp_path / "export"
    intact = root / ("b" if damaged_first else "a") / "IM1"
    damaged = root / ("a" if damaged_first else "b") / "IM1"
    ds = write_dx(intact)
    write_damaged_copy(intact, damaged)
    other = write_dx(root / "c" / "IM2", seed=1)
    out = tmp_path / "index"
    summary = run_build(root, out, tiny_model, db_url=store_url)
    cat = assert_identity(summary)
    assert cat["files_seen"] == 3 and cat["indexed"] == 2 and cat["duplicates"] == 1
    assert summary["totals"]["images"] == 2 and summary["totals"]["failed"] == 0
    assert summary["embedding"]["images"]["switched_to_another_copy"] == (1 if damaged_first else 0)
    images, failures = store_rows(out, store_url)
    assert images[ds.SOPInstanceUID] == (EMBEDDED, str(intact))
    assert images[other.SOPInstanceUID][0] == EMBEDDED
    stage, reason = failures[str(damaged)]
    assert stage == "duplicate" and reason.startswith(f'duplicate of SOPInstanceUID "{ds.SOPInstanceUID}" (')
    assert ("this copy does not decode" in reason) == damaged_first
    assert_every_input_has_a_row(out, [intact, damaged, root / "c" / "IM2"], store_url)
    # The damaged copy's row is consistent: an intact copy of its image is indexed.
    report = verify(out, deep=True, archive=root, db_url=store_url)
    assert report["ok"], report["problems"]


def test_a_later_intact_copy_replaces_a_copy_that_failed(tiny_model, tmp_path: Path) -> None:
    root = tmp_path / "export"
    intact_src = tmp_path / "elsewhere" / "IM1"
    ds = write_dx(intact_src)
    damaged = root / "a" / "IM1"
    write_damaged_copy(intact_src, damaged)
    write_dx(root / "c" / "IM2", seed=1)
    out = tmp_path / "index"
    first = run_build(root, out, tiny_model)
    assert assert_identity(first)["indexed"] == 2
    assert first["totals"]["failed"] == 1 and first["embedding"]["images"]["failed"] == 1
    assert store_rows(out)[0][ds.SOPInstanceUID][0] == FAILED

    intact = root / "b" / "IM1"  # the intact copy arrives, sorted after the damaged one
    intact.parent.mkdir(parents=True)
    shutil.copy(intact_src, intact)
    second = run_build(root, out, tiny_model, )
    cat = assert_identity(second)
    assert (cat["files_seen"], cat["already_catalogued"], cat["indexed"], cat["replaced_failed_copies"]) == (3, 2, 1, 1)
    assert second["totals"]["images"] == 2 and second["totals"]["failed"] == 0
    images, failures = store_rows(out)
    assert images[ds.SOPInstanceUID] == (EMBEDDED, str(intact))
    stage, reason = failures[str(damaged)]
    assert stage == "duplicate" and "this copy does not decode" in reason
    assert_every_input_has_a_row(out, [damaged, intact, root / "c" / "IM2"])
    assert verify(out, deep=True, archive=root)["ok"]

    third = run_build(root, out, tiny_model)  # nothing changes, and every input is accounted for again
    cat = assert_identity(third)
    assert (cat["already_catalogued"], cat["duplicates"], cat["indexed"]) == (2, 1, 0)
    assert third["added"] == {"images": 0, "studies": 0, "sections": 0, "failed": 0}


def test_verify_finds_an_intact_copy_that_is_not_indexed(tiny_model, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The state an intake without the fallback left: the damaged copy failed, the intact one has no image row."""
    root = tmp_path / "export"
    intact = root / "b" / "IM1"
    ds = write_dx(intact)
    damaged = root / "a" / "IM1"
    write_damaged_copy(intact, damaged)
    out = tmp_path / "index"
    monkeypatch.setattr(embed_module._Copies, "replace", lambda self, s, failed: failed)
    run_build(root, out, tiny_model)
    monkeypatch.undo()
    assert store_rows(out)[0][ds.SOPInstanceUID] == (FAILED, str(damaged))

    shallow = verify(out)
    assert not shallow["ok"] and any("never tried" in p["problem"] for p in shallow["problems"])
    deep = verify(out, deep=True)
    assert any(p["problem"].startswith("intact file with no image row") for p in deep["problems"])
    idx = IndexDir.open(out)
    try:  # an intake that wrote nothing for the intact copy: only a walk of the archive can see it
        with idx.store.session() as s:
            s.query(Failure).filter(Failure.path_key == idx.secret.path_key(str(intact))).delete()
    finally:
        idx.close()
    walked = verify(out, archive=root)
    lost = [p for p in walked["problems"] if p["kind"] == "files"]
    assert not walked["ok"] and lost and lost[0]["count"] == 1

    repaired = run_build(root, out, tiny_model)  # the next build repairs it
    cat = assert_identity(repaired)
    assert cat["replaced_failed_copies"] == 1
    assert store_rows(out)[0][ds.SOPInstanceUID] == (EMBEDDED, str(intact))
    report = verify(out, deep=True, archive=root)
    assert report["ok"], report["problems"]


# ------------------------------------------------------------------------------------------ SR documents
def test_sr_documents_become_reports_or_rows(tiny_model, tmp_path: Path) -> None:
    root = tmp_path / "export"
    study = generate_uid()
    write_dx(root / "s1" / "IM1", study=study)
    long_text = "Small left pleural effusion with basal atelectasis."
    write_sr(root / "s1" / "SR1", study, "Heart size normal.", long_text)
    write_sr(root / "s1" / "SR2", study, "", "No change.")  # shorter: not used
    write_sr(root / "s1" / "SR3", study, "", "")  # no text
    write_sr(root / "s9" / "SR9", generate_uid(), "Clear lungs.", "Normal.")  # its study has no image here
    out = tmp_path / "index"
    summary = run_build(root, out, tiny_model)
    cat = assert_identity(summary)
    assert (cat["files_seen"], cat["indexed"], cat["reports"], cat["failures"], cat["skipped"]) == (5, 1, 1, 1, 2)
    assert cat["failure_reasons"] == {"SR with no text": 1}
    assert cat["skipped_reasons"] == {"SR not used: a longer SR of the study is used": 1,
                                      "SR with no study in the index": 1}
    _, failures = store_rows(out)
    assert set(failures) == {str(root / "s1" / "SR2"), str(root / "s1" / "SR3"), str(root / "s9" / "SR9")}
    idx = IndexDir.open(out)
    try:
        with idx.store.session() as s:
            texts = s.execute(select(ReportRow.source, ReportRow.text)).all()
    finally:
        idx.close()
    assert len(texts) == 1 and texts[0][0] == "sr" and long_text in texts[0][1]

    again = run_build(root, out, tiny_model)  # the SR that is the report is known; the others keep their rows
    cat = assert_identity(again)
    assert (cat["already_catalogued"], cat["reports"], cat["failures"], cat["skipped"]) == (2, 0, 1, 2)
    assert again["added"] == {"images": 0, "studies": 0, "sections": 0, "failed": 0}
    assert verify(out, archive=root)["ok"]


# ------------------------------------------------------------------------------------------ special files
def test_dot_files_are_tried(tiny_model, tmp_path: Path) -> None:
    root = tmp_path / "export"
    hidden = write_dx(root / ".hidden" / ".IM1")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 64)
    summary = run_build(root, tmp_path / "index", tiny_model)
    cat = assert_identity(summary)
    assert (cat["files_seen"], cat["indexed"], cat["failures"]) == (2, 1, 1)
    assert cat["failure_reasons"] == {"not DICOM": 1}
    assert store_rows(tmp_path / "index")[0][hidden.SOPInstanceUID][0] == EMBEDDED


def test_fifo_and_socket_are_never_opened(tiny_model, tmp_path: Path) -> None:
    root = tmp_path / "x"
    write_dx(root / "IM1")
    fifo = root / "pipe"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(root / "sock"))
    done: Dict[str, Any] = {}
    worker = threading.Thread(target=lambda: done.update(summary=run_build(root, tmp_path / "index", tiny_model)),
                              daemon=True)
    try:
        worker.start()
        worker.join(timeout=120)
        hung = worker.is_alive()
        if hung:  # unblock a reader stuck on the FIFO, so that the test ends
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(timeout=30)
    finally:
        sock.close()
    assert not hung, "the build opened the FIFO and blocked"
    cat = assert_identity(done["summary"])
    assert (cat["files_seen"], cat["indexed"], cat["skipped"]) == (3, 1, 2)
    assert cat["skipped_reasons"] == {"not a regular file (FIFO)": 1, "not a regular file (socket)": 1}
    assert_every_input_has_a_row(tmp_path / "index", [root / "IM1", fifo, root / "sock"])


def test_symlink_loops_and_dangling_links_are_recorded(tiny_model, tmp_path: Path) -> None:
    root = tmp_path / "export"
    outside = tmp_path / "elsewhere"
    linked_file = write_dx(outside / "IM9", seed=2)
    linked_dir_image = write_dx(outside / "study" / "IM8", seed=3)
    write_dx(root / "sub" / "IM1")
    (root / "sub" / "up").symlink_to(root)  # a loop: a folder above it
    (root / "again").symlink_to(root / "sub")  # a second path to a folder of the export
    (root / "l1").symlink_to(root / "l2")
    (root / "l2").symlink_to(root / "l1")  # a loop of file links
    (root / "gone").symlink_to(tmp_path / "nothing-here")
    (root / "file-link").symlink_to(outside / "IM9")
    (root / "study-link").symlink_to(outside / "study")
    (root / "study-link2").symlink_to(outside / "study")  # a second path to a folder outside
    summary = run_build(root, tmp_path / "index", tiny_model)
    cat = assert_identity(summary)
    assert (cat["files_seen"], cat["indexed"], cat["skipped"], cat["failures"]) == (9, 3, 5, 1)
    assert cat["skipped_reasons"] == {
        "symbolic link loop": 2, "symbolic link loop (links to a folder above it)": 1,
        "link to a folder inside the walked folder (walked through its own path)": 1,
        "folder already walked through another path": 1,
    }
    assert cat["failure_reasons"] == {"broken symbolic link (its target does not exist)": 1}
    images, _ = store_rows(tmp_path / "index")
    assert images[linked_file.SOPInstanceUID] == (EMBEDDED, str(root / "file-link"))
    assert images[linked_dir_image.SOPInstanceUID] == (EMBEDDED, str(root / "study-link" / "IM8"))
    assert_every_input_has_a_row(tmp_path / "index", [root / n for n in ("again", "l1", "l2", "gone", "sub/up",
                                                                         "study-link2", "sub/IM1")])


def test_unreadable_file_is_a_failure_with_its_reason(tiny_model, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000 when not root; root reads any file, so there the open itself is made to fail with EACCES."""
    root = tmp_path / "export"
    write_dx(root / "IM1")
    locked = root / "IM2"
    write_dx(locked, seed=1)
    if os.geteuid() == 0:
        real_open = builtins.open

        def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(locked):
                raise PermissionError(errno.EACCES, "Permission denied", str(locked))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
    else:
        locked.chmod(0)
    try:
        summary = run_build(root, tmp_path / "index", tiny_model)
    finally:
        locked.chmod(0o644)
    cat = assert_identity(summary)
    assert (cat["files_seen"], cat["indexed"], cat["failures"]) == (2, 1, 1)
    assert cat["failure_reasons"] == {"permission denied": 1}
    assert_every_input_has_a_row(tmp_path / "index", [root / "IM1", locked])


def test_every_input_of_the_synthetic_export_has_a_row(pacs_archive: Path, tiny_model, tmp_path: Path) -> None:
    summary = run_build(pacs_archive, tmp_path / "index", tiny_model, reports_csv=pacs_archive / "reports.csv")
    cat = assert_identity(summary)
    assert cat["skipped_reasons"]["the reports CSV given with --reports"] == 1
    assert cat["skipped_reasons"]["SR not used: the study's report comes from the RIS CSV"] == 1
    inputs = [p for p in pacs_archive.rglob("*") if p.is_file()]
    assert cat["files_seen"] == len(inputs)
    assert_every_input_has_a_row(tmp_path / "index", inputs)
    report = verify(tmp_path / "index", archive=pacs_archive)
    assert report["ok"], report["problems"]


# ------------------------------------------------------------------------------------------ tombstones
def _tombstoned_export(root: Path) -> Dict[str, Any]:
    s1, s2, s3 = generate_uid(), generate_uid(), generate_uid()
    p1 = [write_dx(root / "p1" / f"IM{i}", study=s1, patient="P1", seed=i) for i in range(2)]
    write_sr(root / "p1" / "SR", s1, "Opacity.", "Pneumonia.", patient="P1")
    kept = write_dx(root / "p2" / "IM1", study=s2, patient="P2", seed=5)
    gone_sop = write_dx(root / "p2" / "IM2", study=s2, patient="P2", seed=6)
    gone_study = write_dx(root / "p3" / "IM1", study=s3, patient="P3", seed=7)
    return {"s1": s1, "s3": s3, "p1": p1, "kept": kept, "gone_sop": gone_sop, "gone_study": gone_study}


def _add_tombstones(out: Path, model: Any, patient: str, study: str, sop: str) -> None:
    idx = IndexDir.create_or_open(out, model)
    try:
        with idx.store.session() as s:
            idx.store.add_tombstones(s, "patient", [idx.secret.patient_key(patient)])
            idx.store.add_tombstones(s, "study", [idx.secret.uid_key(study)])
            idx.store.add_tombstones(s, "sop", [idx.secret.uid_key(sop)])
    finally:
        idx.close()


def _assert_no_trace(out: Path, info: Dict[str, Any], patient_sources: Tuple[str, ...]) -> None:
    idx = IndexDir.open(out)
    try:
        with idx.store.session() as s:
            assert set(s.scalars(select(Image.sop_uid)).all()) == {info["kept"].SOPInstanceUID}
            assert info["s1"] not in set(s.scalars(select(Study.study_uid)).all())
            assert info["s3"] not in set(s.scalars(select(Study.study_uid)).all())
            pseudo = set(s.scalars(select(Patient.pseudo_id)).all())
            assert not pseudo & {idx.secret.patient_key(p) for p in patient_sources}
            assert s.scalars(select(ReportRow.id)).all() == []
            assert s.scalars(select(Failure.id)).all() == []
    finally:
        idx.close()


def test_tombstoned_patient_study_and_sop_are_skipped_without_a_row(tiny_model, tmp_path: Path) -> None:
    root = tmp_path / "export"
    info = _tombstoned_export(root)
    reports = tmp_path / "ris.csv"
    reports.write_text(f"StudyInstanceUID,report\n{info['s1']},FINDINGS: Opacity. IMPRESSION: Pneumonia.\n")
    out = tmp_path / "index"
    _add_tombstones(out, tiny_model, "P1", info["s3"], info["gone_sop"].SOPInstanceUID)
    for _ in range(2):  # and again: the tombstones hold for every later intake
        summary = run_build(root, out, tiny_model, reports_csv=reports)
        cat = assert_identity(summary)
        assert cat["skipped_by_request"] == 5  # P1's two images and SR, the SOP, the study of P3
        assert cat["files_seen"] == 6
    assert summary["totals"]["images"] == 1 and summary["totals"]["sections"] == 0
    _assert_no_trace(out, info, ("P1", "P3"))


def test_tombstones_hold_for_a_manifest(tiny_model, tmp_path: Path) -> None:
    root = tmp_path / "export"
    info = _tombstoned_export(root)
    rows = []
    for ds, path in [(d, root / "p1" / f"IM{i}") for i, d in enumerate(info["p1"])] + [
            (info["kept"], root / "p2" / "IM1"), (info["gone_sop"], root / "p2" / "IM2"),
            (info["gone_study"], root / "p3" / "IM1")]:
        rows.append(ManifestRow(dataset="pacs", split="test", patient_id=str(ds.PatientID), study_id=ds.StudyInstanceUID,
                                image_id=ds.SOPInstanceUID, image_path=str(path), view="PA",
                                sop_instance_uid=ds.SOPInstanceUID, report_text="Normal chest.",
                                impression="Normal chest."))
    manifest = tmp_path / "pacs.csv"
    write_manifest(rows, manifest)
    out = tmp_path / "index"
    _add_tombstones(out, tiny_model, "pacs:P1", info["s3"], info["gone_sop"].SOPInstanceUID)
    summary = run_build(manifest, out, tiny_model)
    cat = assert_identity(summary)
    assert (cat["files_seen"], cat["skipped_by_request"], cat["indexed"]) == (5, 4, 1)
    idx = IndexDir.open(out)
    try:
        with idx.store.session() as s:
            assert set(s.scalars(select(Image.sop_uid)).all()) == {info["kept"].SOPInstanceUID}
            studies = set(s.scalars(select(Study.study_uid)).all())
            assert studies == {info["kept"].StudyInstanceUID}
            assert s.scalars(select(Failure.id)).all() == []
    finally:
        idx.close()


# ------------------------------------------------------------------------------------------ bad UIDs
def test_uids_longer_than_dicom_allows_are_scan_failures(store_url: str, tiny_model, tmp_path: Path) -> None:
    """A UID over 64 characters is a broken file, recorded with its reason on SQLite and PostgreSQL alike
    (PostgreSQL would otherwise refuse the row and stop the build)."""
    root = tmp_path / "export"
    long_uid = "1.2." + ".".join(["123456789"] * 14)  # 144 characters
    assert len(long_uid) > 128
    write_dx(root / "long-sop", sop=long_uid)
    write_dx(root / "long-study", study=long_uid, seed=1)
    good = write_dx(root / "good", seed=2)
    out = tmp_path / "index"
    summary = run_build(root, out, tiny_model, db_url=store_url)
    cat = assert_identity(summary)
    assert cat["indexed"] == 1 and cat["failures"] == 2
    images, failures = store_rows(out, store_url)
    assert set(images) == {good.SOPInstanceUID}
    assert failures[str(root / "long-sop")] == ("scan", f"SOPInstanceUID longer than 64 characters ({len(long_uid)})")
    assert failures[str(root / "long-study")][1].startswith("StudyInstanceUID longer than 64 characters")
