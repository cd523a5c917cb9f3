"""The DICOM node against real peers (dcmtk's echoscu / storescu, pynetdicom as SCU), in-process.

C-ECHO, C-STORE written durably before Success, the allow-list at association, failure statuses
(unreadable dataset, unsupported SOP class, a disk that refuses) with the node serving on, and
quiet studies becoming searchable with their reports (SR and HL7, before or after the images).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import List

import pytest
from pydicom import dcmread
from sqlalchemy import select

from index.build import BuildOptions
from index.index_dir import IndexDir
from index.store import EMBEDDED, Image, Report, Study
from tests.helpers.dicom_files import make_ds, radiograph, save
from tests.helpers.pacs_node import oru_message, sr_file, storescu, uncompressed_archive, wait_until
from tests.helpers.system import need_module, need_program

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory):
    """Five uncompressed studies (frontal and lateral or AP views) with their RIS report texts."""
    return uncompressed_archive(tmp_path_factory.mktemp("node-send") / "send", studies=5, seed=31)


@pytest.fixture()
def scp(tmp_path: Path):
    """A storage node without a worker (what is received stays in the inbox); stopped after the test."""
    need_module("pynetdicom", "node")
    from index.node.inbox import Inbox
    from index.node.scp import NodeConfig, StorageNode

    started: List = []

    def make(**config):
        inbox = Inbox(tmp_path / "index")
        inbox.prepare()
        node = StorageNode(inbox, NodeConfig(port=0, **config))
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


def _scu_store(port: int, ds, *, calling: str = "PYSCU") -> int:
    """C-STORE one dataset with pynetdicom; returns the status the node answered."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRSEARCH")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


def test_echo_and_store_answer_success_only_once_the_file_is_on_disk(scp, studies) -> None:
    echoscu = need_program("echoscu", "dcmtk")
    store_bin = need_program("storescu", "dcmtk")
    node = scp()
    seen_at_success: List[bool] = []
    original = node._on_store

    def checked(event):  # what the node answers, and whether the file was already there at that moment
        status = original(event)
        sop = str(event.request.AffectedSOPInstanceUID)
        seen_at_success.append(status == 0 and any(node.inbox.studies.rglob(f"{sop}.dcm")))
        return status

    node._on_store = checked
    node.start()
    assert node.port > 0
    echo = __import__("subprocess").run([echoscu, "-aec", "CXRSEARCH", "127.0.0.1", str(node.port)],
                                        capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    study = studies[0]
    sent = storescu(store_bin, node.port, study.files)
    assert sent.returncode == 0, sent.stderr
    assert seen_at_success == [True] * len(study.files)
    stored = sorted(node.inbox.study_files(study.study_uid))
    assert [p.name for p in stored] == sorted(f"{u}.dcm" for u in study.sop_uids)
    for path in stored:  # the very dataset that was sent
        got, want = dcmread(path), dcmread(study.files[study.sop_uids.index(path.name[:-4])])
        assert got.SOPInstanceUID == want.SOPInstanceUID and got.PixelData == want.PixelData
    assert node.counts["stored"] == len(study.files)


def test_allow_list_rejects_other_callers_at_association(scp, studies) -> None:
    echoscu = need_program("echoscu", "dcmtk")
    store_bin = need_program("storescu", "dcmtk")
    from index.node.scp import parse_allow

    node = scp(allow=parse_allow(["PACS@127.0.0.1", "ROUTER@10.255.255.1"]))
    node.start()
    import subprocess

    def echo(aet: str) -> subprocess.CompletedProcess:
        return subprocess.run([echoscu, "-aet", aet, "-aec", "CXRSEARCH", "127.0.0.1", str(node.port)],
                              capture_output=True, text=True, timeout=30)

    assert echo("PACS").returncode == 0
    for stranger in ("INTRUDER", "ROUTER"):  # unknown AE title; known AE title from another host
        res = echo(stranger)
        assert res.returncode != 0 and "Association Rejected" in res.stderr, res.stderr
        assert "Calling AE Title Not Recognized" in res.stderr
    sent = storescu(store_bin, node.port, studies[0].files, calling="INTRUDER")
    assert sent.returncode != 0
    assert node.inbox.inbox_studies() == []
    assert node.counts["rejected_associations"] == 3
    called = subprocess.run([echoscu, "-aet", "PACS", "-aec", "WRONGAE", "127.0.0.1", str(node.port)],
                            capture_output=True, text=True, timeout=30)
    assert called.returncode != 0  # the called AE title must be the node's


def test_failure_statuses_and_the_node_serves_on(scp, studies, tmp_path: Path, monkeypatch) -> None:
    store_bin = need_program("storescu", "dcmtk")
    node = scp()
    node.start()
    # A dataset without StudyInstanceUID cannot be filed: 0xC000 (cannot understand), nothing kept.
    ds = make_ds(radiograph(), BodyPartExamined="CHEST", PatientID="P1")
    del ds.StudyInstanceUID
    assert _scu_store(node.port, ds) == 0xC000
    # An unsupported SOP class (CT) is refused at negotiation: storescu cannot send it.
    ct = make_ds(radiograph(), BodyPartExamined="CHEST", PatientID="P1")
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct.Modality = "CT"
    ct_file = save(ct, tmp_path / "ct.dcm")
    refused = storescu(store_bin, node.port, [ct_file])
    assert refused.returncode != 0
    assert node.inbox.inbox_studies() == []
    # A disk that refuses the write: 0xA700 (out of resources), never Success.
    good = make_ds(radiograph(), BodyPartExamined="CHEST", PatientID="P2")

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(node.inbox, "store", full)
    assert _scu_store(node.port, good) == 0xA700
    monkeypatch.undo()
    assert node.inbox.inbox_studies() == []
    # ... and the node still serves.
    assert _scu_store(node.port, good) == 0x0000
    assert node.inbox.inbox_studies() == [str(good.StudyInstanceUID)]
    assert node.counts["failed_unreadable"] == 1 and node.counts["failed_storage"] == 1


def test_compressed_transfer_syntax_is_accepted(scp, tmp_path: Path) -> None:
    store_bin = need_program("storescu", "dcmtk")
    from pydicom.uid import JPEG2000Lossless

    ds = make_ds(radiograph(), BodyPartExamined="CHEST", PatientID="P3")
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    path = save(ds, tmp_path / "j2k.dcm")
    node = scp()
    node.start()
    sent = storescu(store_bin, node.port, [path], extra=["-xv"])  # propose JPEG 2000 lossless
    assert sent.returncode == 0, sent.stderr
    (stored,) = node.inbox.study_files(str(ds.StudyInstanceUID))
    assert dcmread(stored).file_meta.TransferSyntaxUID == JPEG2000Lossless


# --------------------------------------------------------------------------------------- indexing
def _study_state(index_dir: Path) -> dict:
    """StudyInstanceUID -> (embedded SOPs, report source or None)."""
    idx = IndexDir.open(index_dir)
    try:
        with idx.store.session() as s:
            rows = s.execute(select(Study.study_uid, Image.sop_uid).join(Image, Image.study_id == Study.id)
                             .where(Image.status == EMBEDDED)).all()
            reports = dict(s.execute(select(Study.study_uid, Report.source).join(Report, Report.study_id == Study.id))
                           .all())
    finally:
        idx.close()
    out: dict = {}
    for uid, sop in rows:
        out.setdefault(uid, [set(), reports.get(uid)])[0].add(sop)
    return {k: (v[0], v[1]) for k, v in out.items()}


@pytest.mark.slow
def test_quiet_studies_are_indexed_and_reports_attach_before_or_after_images(studies, tiny_model,
                                                                             tmp_path: Path) -> None:
    store_bin = need_program("storescu", "dcmtk")
    need_module("pynetdicom", "node")
    need_module("hl7", "node")
    from hl7.client import MLLPClient

    from cxr_search.inference import Embedder
    from index.node.runtime import Node
    from index.node.scp import NodeConfig
    from index.node.worker import WorkerOptions
    from index.search import Searcher

    index_dir = tmp_path / "index"
    node = Node(index_dir, tiny_model, NodeConfig(port=0),
                WorkerOptions(quiet_s=0.5, poll_s=0.1, build=BuildOptions(batch_size=8, device="cpu")), hl7_port=0)
    node.start()
    try:
        a, b, c = studies[0], studies[1], studies[2]
        # Study A: images and its SR together. Study B: its SR first. Study C: its HL7 report first.
        sr_a = sr_file(tmp_path / "sr" / "a.dcm", a, a.report)
        sr_b = sr_file(tmp_path / "sr" / "b.dcm", b, b.report)
        assert storescu(store_bin, node.scp.port, [*a.files, sr_a, sr_b]).returncode == 0
        with MLLPClient("127.0.0.1", node.hl7.port) as client:
            assert b"MSA|AA|" in client.send_message(oru_message(c.accession, c.report, control_id="C1"))
        wait_until(lambda: node.inbox.pending_report_studies() == [b.study_uid] and not node.inbox.inbox_studies(),
                   timeout=30, what="study A indexed and B's SR parked")
        state = _study_state(index_dir)
        assert set(state) == {a.study_uid}
        assert state[a.study_uid] == (set(a.sop_uids), "sr")
        # The images of B and C arrive later: their waiting reports are attached.
        assert storescu(store_bin, node.scp.port, [*b.files, *c.files]).returncode == 0
        wait_until(lambda: len(_study_state(index_dir)) == 3 and not node.inbox.pending_report_studies()
                   and not list(node.inbox.hl7.glob("*.json")) and not node.inbox.unfinished_batches(),
                   timeout=30, what="studies B and C with reports")
        state = _study_state(index_dir)
        assert state[b.study_uid] == (set(b.sop_uids), "sr")
        assert state[c.study_uid] == (set(c.sop_uids), "csv")  # the HL7 report, through the RIS CSV path
        # Study D: images first, its HL7 report (matched by StudyInstanceUID alone) afterwards.
        d = studies[3]
        assert storescu(store_bin, node.scp.port, d.files).returncode == 0
        wait_until(lambda: d.study_uid in _study_state(index_dir), timeout=30, what="study D indexed")
        assert _study_state(index_dir)[d.study_uid][1] is None
        with MLLPClient("127.0.0.1", node.hl7.port) as client:
            ack_d = client.send_message(oru_message("UNKNOWN-ACC", d.report, control_id="D1", study_uid=d.study_uid))
        assert b"MSA|AA|D1" in ack_d
        wait_until(lambda: _study_state(index_dir)[d.study_uid][1] == "csv", timeout=30,
                   what="study D's late report attached")
        wait_until(lambda: not list(node.inbox.hl7.glob("*.json")), timeout=10, what="the HL7 report consumed")
    finally:
        node.stop()
    # Searchable through the search API: every study is a study-level hit of a text query.
    searcher = Searcher(index_dir, Embedder(tiny_model, device="cpu"))
    try:
        hits = searcher.search_text("pleural effusion", k=10, level="study")
    finally:
        searcher.close()
    assert {h.study_uid for h in hits} == {st.study_uid for st in studies[:4]}
    # Everything received is accounted for: each batch is done, nothing is left in the inbox.
    assert node.inbox.unfinished_batches() == [] and node.inbox.inbox_studies() == []
    assert os.listdir(node.inbox.tmp) == []



def test_a_parked_sr_joins_the_batch_of_its_images(studies, tiny_model, tmp_path: Path) -> None:
    """An SR that came before its images is indexed in the same round as they are, never one round later."""
    from index.node.inbox import Inbox
    from index.node.worker import Worker, WorkerOptions, ensure_index

    index_dir = tmp_path / "index"
    ensure_index(index_dir, tiny_model)
    inbox = Inbox(index_dir)
    inbox.prepare()
    worker = Worker(index_dir, tiny_model, inbox, WorkerOptions(build=BuildOptions(batch_size=8, device="cpu")))
    study = studies[4]
    sr = sr_file(tmp_path / "sr.dcm", study, study.report)
    inbox.store(study.study_uid, str(dcmread(sr).SOPInstanceUID), sr.read_bytes(), report=True)
    (first,) = worker.run_once(quiet_s=0)
    assert first["reports_parked"] == 1 and inbox.pending_report_studies() == [study.study_uid]
    assert _study_state(index_dir) == {}
    for path, sop in zip(study.files, study.sop_uids, strict=True):
        inbox.store(study.study_uid, sop, path.read_bytes())
    (second,) = worker.run_once(quiet_s=0)  # one round: the images and their waiting SR together
    assert second["studies"] == [study.study_uid] and second["reports_parked"] == 0
    assert _study_state(index_dir) == {study.study_uid: (set(study.sop_uids), "sr")}
    assert inbox.pending_report_studies() == [] and worker.run_once(quiet_s=0) == []

def test_ensure_index_creates_one_index_under_the_writer_lock(tiny_model, tmp_path: Path) -> None:
    """A node and an import started together on a new folder create the index once; a folder of other files
    is refused and left as it is; a folder holding only a lock file (a killed writer's) is fine."""
    import threading

    from cxr_search.errors import SearchIndexError
    from index.lock import LOCK_FILE
    from index.node.worker import ensure_index

    root = tmp_path / "new"
    created: List[bool] = []
    errors: List[BaseException] = []

    def create() -> None:
        try:
            created.append(ensure_index(root, tiny_model))
        except BaseException as exc:  # a thread's error must reach the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and sorted(created) == [False, False, True]
    idx = IndexDir.open(root)
    idx.close()

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(SearchIndexError, match="not empty"):
        ensure_index(other, tiny_model)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]

    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / LOCK_FILE).write_text("")
    assert ensure_index(locked, tiny_model) is True
