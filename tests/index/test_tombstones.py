"""``index remove``: removals that stick (tombstones), idempotent removal, ``--undo``, single images, and no
trace of a removed patient left in the store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
from sqlalchemy import select

import cli
from index.build import BuildOptions, build
from index.index_dir import IndexDir
from index.store import EMBEDDED, FAILED, Failure, Image, Patient, Study
from index.verify import verify
from tests.helpers.index_data import ground_truth, store_dump

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def index_copy(small_index: Tuple[Path, Path], tmp_path: Path) -> Tuple[Path, Path]:
    archive, index = small_index
    shutil.copytree(index, tmp_path / "index")
    return archive, tmp_path / "index"


def _patients(archive: Path) -> Dict[str, Dict[str, Set[str]]]:
    """PatientID -> {"studies": StudyInstanceUIDs, "sops": SOPInstanceUIDs} of the ground truth."""
    out: Dict[str, Dict[str, Set[str]]] = {}
    for r in ground_truth(archive):
        p = out.setdefault(r["patient_id"], {"studies": set(), "sops": set()})
        p["studies"].add(r["study_id"])
        p["sops"].add(r["image_id"])
    return out


def _rows(index: Path) -> Dict[str, Set[str]]:
    idx = IndexDir.open(index, readonly=True)
    try:
        with idx.store.session() as s:
            return {"studies": set(s.scalars(select(Study.study_uid)).all()),
                    "sops": set(s.scalars(select(Image.sop_uid)).all()),
                    "embedded": set(s.scalars(select(Image.sop_uid).where(Image.status == EMBEDDED)).all()),
                    "patients": set(s.scalars(select(Patient.pseudo_id)).all())}
    finally:
        idx.close()


def _add(archive: Path, index: Path, tiny_model) -> dict:
    return build(archive, index, tiny_model, BuildOptions(reports_csv=archive / "reports.csv", batch_size=8),
                 command="add")


def test_removed_patient_stays_out_of_later_intakes(index_copy, tiny_model, capsys) -> None:
    archive, index = index_copy
    patients = _patients(archive)
    victim = sorted(patients)[0]
    assert patients[victim]["sops"] <= _rows(index)["sops"]
    assert cli.main(["index", "remove", str(index), "--patient", victim, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["removed"]["study"] == len(patients[victim]["studies"]) and result["not_in_index"] == []
    assert result["tombstones_added"] == 1
    # The nightly job over the same export: the patient does not come back, and says so.
    summary = _add(archive, index, tiny_model)
    assert summary["added"]["images"] == 0 and summary["added"]["studies"] == 0
    rows = _rows(index)
    assert not rows["studies"] & patients[victim]["studies"] and not rows["sops"] & patients[victim]["sops"]
    # So does a full rebuild command over the same folder.
    build(archive, index, tiny_model, BuildOptions(reports_csv=archive / "reports.csv", batch_size=8))
    assert not _rows(index)["sops"] & patients[victim]["sops"]
    others = set().union(*(p["sops"] for pid, p in patients.items() if pid != victim))
    assert others <= _rows(index)["embedded"]
    assert verify(index)["ok"]


def test_removal_is_idempotent_and_sticks_for_ids_not_yet_indexed(index_copy, tiny_model, capsys, tmp_path) -> None:
    archive, index = index_copy
    patients = _patients(archive)
    victim = sorted(patients)[-1]
    # Build a new index without the victim's studies, then ask for the removal before they arrive.
    part = tmp_path / "part"
    shutil.copytree(archive, part)
    for study in patients[victim]["studies"]:
        for f in part.rglob("*"):
            if f.is_file() and study in str(f.relative_to(part)):
                f.unlink()
    fresh = tmp_path / "fresh"
    build(part, fresh, tiny_model, BuildOptions(reports_csv=part / "reports.csv", batch_size=8))
    before = _rows(fresh)
    for _ in range(2):  # a repeated request succeeds too
        assert cli.main(["index", "remove", str(fresh), "--patient", victim]) == 0
        err = capsys.readouterr().err
        assert "nothing to remove" in err and "tombstone recorded" in err
    assert _rows(fresh) == before
    idx = IndexDir.open(fresh, readonly=True)
    try:
        assert idx.store.tombstones()["patient"] == {idx.secret.patient_key(victim)}
    finally:
        idx.close()
    _add(archive, fresh, tiny_model)  # now the victim's studies are in the export
    rows = _rows(fresh)
    assert not rows["sops"] & patients[victim]["sops"]
    assert not rows["studies"] & patients[victim]["studies"]
    assert verify(fresh)["ok"]


def test_undo_lifts_the_removal_and_the_next_intake_readmits(index_copy, tiny_model, capsys) -> None:
    archive, index = index_copy
    patients = _patients(archive)
    victim = sorted(patients)[1]
    study = sorted(patients[victim]["studies"])[0]
    assert cli.main(["index", "remove", "-i", str(index), "--study", study]) == 0
    assert not _rows(index)["studies"] & {study}
    assert cli.main(["index", "remove", str(index), "--study", study, "--study", "1.2.999", "--undo"]) == 0
    err = capsys.readouterr().err
    assert "lifted 1 tombstones" in err and "re-admits" in err and "study 1.2.999: no removal on record" in err
    summary = _add(archive, index, tiny_model)
    assert summary["added"]["studies"] == 1
    assert study in _rows(index)["studies"]
    assert verify(index)["ok"]


def test_remove_single_images_keeps_the_study_until_its_last_image(index_copy, tiny_model) -> None:
    archive, index = index_copy
    by_study: Dict[str, List[str]] = {}
    for r in ground_truth(archive):
        by_study.setdefault(r["study_id"], []).append(r["image_id"])
    study, sops = next((s, v) for s, v in sorted(by_study.items()) if len(v) >= 2)
    idx = IndexDir.open(index)
    try:
        first = idx.remove(sop_uids=[sops[0]])
        assert first["removed"]["image"] == 1 and first["removed"]["study"] == 0
        assert verify(index)["ok"]  # the study vector was recomputed from the images left
        rest = idx.remove(sop_uids=sops[1:])
        assert rest["removed"]["study"] == 1  # emptied: removed whole, report and sections included
    finally:
        idx.close()
    assert study not in _rows(index)["studies"]
    _add(archive, index, tiny_model)
    assert not _rows(index)["sops"] & set(sops)  # each image's tombstone holds; the study has none
    assert verify(index)["ok"]


def test_removed_patient_leaves_no_trace_in_the_store(index_copy) -> None:
    archive, index = index_copy
    patients = _patients(archive)
    # The patient with the image that failed to decode: its failure row holds its (encrypted) path.
    idx = IndexDir.open(index, readonly=True)
    try:
        with idx.store.session() as s:
            failed_study = s.scalar(select(Study.study_uid).join(Image, Image.study_id == Study.id)
                                    .where(Image.status == FAILED))
            failed_key = s.scalar(select(Image.path_key).where(Image.status == FAILED))
            assert s.scalar(select(Failure.id).where(Failure.path_key == failed_key)) is not None
    finally:
        idx.close()
    victim = next((pid for pid, p in patients.items() if failed_study in p["studies"]), sorted(patients)[0])
    gone = patients[victim]
    assert cli.main(["index", "remove", str(index), "--patient", victim] +
                    (["--study", failed_study] if failed_study not in gone["studies"] else [])) == 0
    blob = store_dump(index, readonly=True)
    for uid in gone["studies"] | gone["sops"] | {failed_study}:
        assert uid.encode() not in blob
    assert victim.encode() not in blob
    idx = IndexDir.open(index, readonly=True)
    try:
        with idx.store.session() as s:
            assert s.scalar(select(Failure.id).where(Failure.path_key == failed_key)) is None
            assert s.scalar(select(Patient.id).where(Patient.pseudo_id == idx.secret.patient_key(victim))) is None
    finally:
        idx.close()
    assert not any(p for p in index.glob("store.sqlite-wal") if p.stat().st_size)  # the log was emptied
    assert verify(index)["ok"]


def test_remove_needs_something_to_remove_and_an_index(tmp_path: Path, capsys) -> None:
    assert cli.main(["index", "remove", str(tmp_path)]) == 2
    assert cli.main(["index", "remove", str(tmp_path / "none"), "--patient", "P1"]) == 7
    assert cli.main(["index", "remove", "--patient", "P1"]) == 2
    assert cli.main(["index", "remove", str(tmp_path), "-i", str(tmp_path / "other"), "--patient", "P1"]) == 2
    assert cli.main(["index", "remove", str(tmp_path), "--patient", "P1", "--wait", "-1"]) == 2
