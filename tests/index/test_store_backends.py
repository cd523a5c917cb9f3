"""The store on each backend, SQLite and a real PostgreSQL: schema, types, vectors, removal, tombstones,
failures, concurrent writers, and the text PostgreSQL refuses where SQLite stores it.

Every test takes ``store_url`` (``tests/index/conftest.py``): a new SQLite file, or a new database on the
test PostgreSQL server, so the same assertions hold on both.
"""

from __future__ import annotations

import datetime as _dt
import threading
from typing import Dict, List

import numpy as np
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError

from cxr_search.errors import SearchIndexError
from index.store import (
    _CHUNK,
    EMBEDDED,
    Build,
    Failure,
    Image,
    ImageVector,
    Meta,
    Patient,
    Report,
    Section,
    SectionVector,
    Series,
    Store,
    Study,
    utcnow,
    vector_bytes,
)

DIM = 8


def _add_study(s, patient_id: int, uid: str, n_images: int, *, report: bool = False) -> Dict[str, List[int]]:
    """A study with a series, ``n_images`` embedded images with vectors and, optionally, a report with two
    embedded sections. Returns the new ids per kind."""
    study = Study(study_uid=uid, patient_id=patient_id, study_date=_dt.date(2020, 1, 2), age_years=61.5, sex="F")
    s.add(study)
    s.flush()
    series = Series(series_uid=f"{uid}.1", study_id=study.id, modality="DX")
    s.add(series)
    s.flush()
    images = [Image(sop_uid=f"{uid}.1.{k}", series_id=series.id, study_id=study.id, path_key=f"{uid}-{k}",
                    path_enc="enc", view="PA", modality="DX", status=EMBEDDED) for k in range(n_images)]
    s.add_all(images)
    s.flush()
    rng = np.random.default_rng(len(uid))
    s.add_all([ImageVector(image_id=im.id, vector=vector_bytes(rng.standard_normal(DIM))) for im in images])
    ids = {"study": [study.id], "image": [im.id for im in images], "section": []}
    if report:
        rep = Report(study_id=study.id, source="csv", text="FINDINGS: clear. IMPRESSION: normal.")
        s.add(rep)
        s.flush()
        sections = [Section(report_id=rep.id, study_id=study.id, kind=kind, text=text, status=EMBEDDED)
                    for kind, text in (("findings", "clear"), ("impression", "normal"))]
        s.add_all(sections)
        s.flush()
        s.add_all([SectionVector(section_id=sec.id, vector=vector_bytes(np.ones(DIM))) for sec in sections])
        ids["section"] = [sec.id for sec in sections]
    return ids


def _patient(s, name: str) -> int:
    p = Patient(pseudo_id=name.ljust(64, "0"))
    s.add(p)
    s.flush()
    return p.id


def _rows(store: Store, table) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(table)) or 0


@pytest.fixture()
def store(store_url: str):
    st = Store(store_url, create=True)
    yield st
    st.close()


def test_schema_is_created_then_checked(store_url: str) -> None:
    Store(store_url, create=True).close()
    again = Store(store_url)  # an existing store opens without create
    assert again.counts() == {"images": 0, "studies": 0, "sections": 0, "failed": 0, "pending": 0, "patients": 0}
    with again.session() as s:
        s.execute(update(Meta).where(Meta.key == "schema_version").values(value="99"))
    again.close()
    with pytest.raises(SearchIndexError, match="schema version 99"):
        Store(store_url)


def test_vectors_round_trip_bit_exact_across_in_chunks(store: Store) -> None:
    n = 2 * _CHUNK + 203  # more ids than two IN (...) clauses hold
    with store.session() as s:
        pid = _patient(s, "p")
        study = Study(study_uid="1.2.3", patient_id=pid)
        s.add(study)
        s.flush()
        images = [Image(sop_uid=f"1.2.3.{k}", study_id=study.id, path_key=f"k{k}", path_enc="e", status=EMBEDDED)
                  for k in range(n)]
        s.add_all(images)
        s.flush()
        ids = np.array([im.id for im in images], dtype=np.int64)
        vecs = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
        # Values a lossy path would change: signed zero, infinities, NaN, the smallest subnormal, the largest float.
        vecs[0, :6] = [-0.0, np.inf, -np.inf, np.nan, np.finfo(np.float32).smallest_subnormal, np.finfo(np.float32).max]
        s.add_all([ImageVector(image_id=int(i), vector=vector_bytes(v)) for i, v in zip(ids, vecs, strict=True)])
    with store.session() as s:
        blob = s.scalar(select(ImageVector.vector).where(ImageVector.image_id == int(ids[0])))
    assert type(blob) is bytes and len(blob) == 4 * DIM

    got_ids, got = store.load_vectors("image", None, DIM)
    np.testing.assert_array_equal(got_ids, np.sort(ids))
    order = np.argsort(ids)
    assert got.view(np.uint32).tolist() == vecs[order].view(np.uint32).tolist()  # bit for bit, NaN included
    np.testing.assert_array_equal(store.vector_ids("image"), np.sort(ids))

    rng = np.random.default_rng(1)
    wanted = rng.permutation(ids)[: n - 50].tolist() + [int(ids.max()) + 1000]  # shuffled, one id not stored
    in_order = store.vectors_in_order("image", wanted, DIM)
    row = {int(i): r for r, i in enumerate(ids)}
    assert in_order[:-1].view(np.uint32).tolist() == vecs[[row[i] for i in wanted[:-1]]].view(np.uint32).tolist()
    assert not in_order[-1].any()
    assert store.study_image_ids([study.id]) == {study.id: sorted(ids.tolist())}


def _delete_studies(store: Store, study_ids: List[int]) -> Dict[str, List[int]]:
    from index.removal import delete_rows

    with store.session() as s:
        return delete_rows(s, study_ids=study_ids)


def test_deleting_studies_takes_every_row_and_orphaned_patients(store: Store) -> None:
    with store.session() as s:
        p1, p2 = _patient(s, "a"), _patient(s, "b")
        a = _add_study(s, p1, "1.1", 2, report=True)
        b = _add_study(s, p1, "1.2", 3, report=True)
        c = _add_study(s, p2, "2.1", 1)
        # Enough studies of one patient for the removal to run in several IN (...) chunks.
        many = [_add_study(s, p2, f"3.{k}", 1)["study"][0] for k in range(_CHUNK + 20)]
    removed = _delete_studies(store, a["study"])
    assert sorted(removed["image"]) == a["image"] and sorted(removed["section"]) == a["section"]
    assert removed["study"] == a["study"] and removed["patient"] == []
    assert _rows(store, Patient) == 2  # patient a keeps study 1.2
    removed = _delete_studies(store, b["study"] + c["study"] + many[:-1])
    assert len(removed["study"]) == 2 + len(many) - 1 and removed["patient"] == [p1]
    assert _rows(store, Patient) == 1  # b keeps its last study
    assert _delete_studies(store, many[-1:])["patient"] == [p2]
    for table in (Patient, Study, Series, Image, ImageVector, Report, Section, SectionVector):
        assert _rows(store, table) == 0, table.__tablename__
    assert store.counts()["patients"] == 0


def test_tombstones_add_list_and_lift(store: Store) -> None:
    keys = [f"{k:064x}" for k in range(_CHUNK + 7)]
    with store.session() as s:
        assert store.add_tombstones(s, "sop", keys + keys[:3]) == len(keys)  # repeats count once
        assert store.add_tombstones(s, "study", ["f" * 64]) == 1
    with store.session() as s:
        assert store.add_tombstones(s, "sop", keys[:10] + ["e" * 64]) == 1  # only the new one
    marks = store.tombstones()
    assert marks["sop"] == set(keys) | {"e" * 64} and marks["study"] == {"f" * 64} and marks["patient"] == set()
    with store.session() as s:
        assert store.lift_tombstones(s, "sop", keys + ["0" * 64]) == len(keys)  # the unknown key lifts nothing
        assert store.lift_tombstones(s, "study", ["e" * 64]) == 0  # a key of another kind is left alone
    assert store.tombstones()["sop"] == {"e" * 64}
    with store.session() as s, pytest.raises(ValueError, match="tombstone kind"):
        store.add_tombstones(s, "series", ["x"])


def test_failures_are_upserted_and_timestamps_naive_utc(store: Store) -> None:
    before = utcnow()
    with store.session() as s:
        store.add_failure(s, "k" * 64, "enc", "scan", "not DICOM")
    with store.session() as s:
        store.add_failure(s, "k" * 64, "enc", "decode", "PixelDataError: " + "x" * 5000)
    with store.session() as s:
        rows = s.scalars(select(Failure)).all()
    assert len(rows) == 1 and rows[0].stage == "decode" and len(rows[0].reason) == 2000
    assert rows[0].created.tzinfo is None and before <= rows[0].created <= utcnow()
    assert store.counts()["failed"] == 1


def test_column_types_round_trip(store: Store) -> None:
    created = _dt.datetime(2024, 2, 29, 23, 59, 58, 123456)
    info = {"images": {"n": 3, "recall_at_10": 0.875}, "reasons": ["not DICOM", "é ü 肺"], "none": None}
    with store.session() as s:
        pid = _patient(s, "t")
        s.add_all([Study(study_uid="9.1", patient_id=pid, study_date=_dt.date(1999, 12, 31), age_years=0.25, sex="O",
                         vector_dirty=True),
                   Study(study_uid="9.2", patient_id=pid)])
        s.add(Build(command="build", model_sha256="a" * 64, preprocessing={"size": 224, "mean": [0.5, 0.5]},
                    factories=info, counts={}, created=created))
    with store.session() as s:
        st = s.scalar(select(Study).where(Study.study_uid == "9.1"))
        other = s.scalar(select(Study).where(Study.study_uid == "9.2"))
        dirty = s.scalars(select(Study.study_uid).where(Study.vector_dirty.is_(True))).all()
        b = s.scalar(select(Build))
    assert (st.study_date, st.age_years, st.sex) == (_dt.date(1999, 12, 31), 0.25, "O")
    assert other.vector_dirty is False and other.study_date is None and dirty == ["9.1"]
    assert b.created == created and b.finished is None
    assert b.factories == info and b.preprocessing == {"size": 224, "mean": [0.5, 0.5]}


def test_outside_text_is_stored_alike_on_every_backend(store: Store) -> None:
    """Header facts longer than their column and NUL characters in reports: PostgreSQL refuses both, so
    the store clips the descriptive facts and drops NULs, on every backend."""
    long_modality, long_photometric = "DX" + "Y" * 30, "MONOCHROME2" + "X" * 40
    with store.session() as s:
        pid = _patient(s, "n")
        study = Study(study_uid="5.1", patient_id=pid)
        s.add(study)
        s.flush()
        s.add(Series(series_uid="5.1.1", study_id=study.id, modality=long_modality))
        s.add(Image(sop_uid="5.1.1.1", study_id=study.id, path_key="k", path_enc="e", modality=long_modality,
                    photometric=long_photometric, transfer_syntax="1.2." + "9" * 80))
        rep = Report(study_id=study.id, source="csv", text="FINDINGS: eff\x00usion.\x00")
        s.add(rep)
        s.flush()
        s.add(Section(report_id=rep.id, study_id=study.id, kind="findings", text="eff\x00usion"))
        store.add_failure(s, "f" * 64, "e", "scan", "bad\x00value")
    with store.session() as s:
        image = s.scalar(select(Image))
        assert (image.modality, image.photometric) == (long_modality[:16], long_photometric[:32])
        assert image.transfer_syntax == ("1.2." + "9" * 80)[:64]
        assert s.scalar(select(Series.modality)) == long_modality[:16]
        assert s.scalar(select(Report.text)) == "FINDINGS: effusion."
        assert s.scalar(select(Section.text)) == "effusion"
        assert s.scalar(select(Failure.reason)) == "badvalue"
        # The same clipping applies to the values compared with, so a filter on the long value still matches.
        assert s.scalar(select(func.count()).select_from(Image).where(Image.modality == long_modality)) == 1


def test_two_writers_embedding_the_same_studies(store: Store, store_url: str) -> None:
    """Two engines (as two shard processes) commit vector batches that touch the same studies at once."""
    from index import embed as pipeline

    with store.session() as s:
        pid = _patient(s, "w")
        studies = [Study(study_uid=f"7.{k}", patient_id=pid) for k in range(6)]
        s.add_all(studies)
        s.flush()
        images = [Image(sop_uid=f"7.{k}.{j}", study_id=studies[k].id, path_key=f"w{k}.{j}", path_enc="e")
                  for j in range(20) for k in range(6)]
        s.add_all(images)
        s.flush()
        ids = sorted(im.id for im in images)
    shards = [ids[k::2] for k in range(2)]  # each batch of either shard touches every study
    errors: List[BaseException] = []

    def writer(part: List[int]) -> None:
        mine = Store(store_url)
        try:
            for start in range(0, len(part), 6):
                batch = part[start : start + 6]
                pipeline.write_image_batch(mine, batch, np.ones((len(batch), DIM), np.float32), [],
                                           pipeline.StageTimes())
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            mine.close()

    threads = [threading.Thread(target=writer, args=(part,)) for part in shards]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a writer is stuck"
    assert not errors, errors
    assert store.counts()["images"] == len(ids)
    np.testing.assert_array_equal(store.vector_ids("image"), ids)
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Study).where(Study.vector_dirty.is_(True))) == 6


def test_a_reader_cannot_write(store_url: str) -> None:
    Store(store_url, create=True).close()
    reader = Store(store_url, readonly=True)
    try:
        assert reader.counts()["patients"] == 0
        with pytest.raises(DBAPIError), reader.session() as s:
            s.add(Patient(pseudo_id="r" * 64))
            s.flush()
    finally:
        reader.close()
    writer = Store(store_url)
    try:
        assert writer.counts()["patients"] == 0
    finally:
        writer.close()
