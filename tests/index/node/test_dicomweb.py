"""DICOMweb import from a real Orthanc (DICOMweb plugin) on loopback: only new instances, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from index.build import BuildOptions
from index.index_dir import IndexDir
from index.store import EMBEDDED, Image, Report, Study
from tests.helpers.dicom_files import make_ds, radiograph, save
from tests.helpers.pacs_node import (
    ORTHANC_CANDIDATES,
    Orthanc,
    need_dicomweb_plugin,
    sr_file,
    uncompressed_archive,
    wait_until,
)
from tests.helpers.system import need_module, need_program

REPO = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory):
    """(Orthanc with 5 studies, an SR of the first, a CT instance; the studies)."""
    program = need_program("Orthanc", "orthanc", candidates=ORTHANC_CANDIDATES)
    need_dicomweb_plugin()
    need_module("dicomweb_client", "node")
    need_module("pynetdicom", "node")
    root = tmp_path_factory.mktemp("dicomweb")
    studies = uncompressed_archive(root / "send", studies=5, seed=51)
    sr = sr_file(root / "sr.dcm", studies[0], studies[0].report)
    ct = make_ds(radiograph(), StudyInstanceUID=studies[1].study_uid, PatientID=studies[1].patient_id,
                 BodyPartExamined="CHEST")
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct.Modality = "CT"
    server = Orthanc(program, root / "orthanc").start()
    try:
        server.upload([*(f for st in studies for f in st.files), sr, save(ct, root / "ct.dcm")])
        yield server, studies
    finally:
        server.stop()


def _state(index_dir: Path) -> dict:
    idx = IndexDir.open(index_dir)
    try:
        with idx.store.session() as s:
            return {
                "images": sorted(s.scalars(select(Image.sop_uid).where(Image.status == EMBEDDED)).all()),
                "studies": sorted(s.scalars(select(Study.study_uid)).all()),
                "reports": sorted(s.execute(select(Study.study_uid, Report.source)
                                            .join(Report, Report.study_id == Study.id)).all()),
                "counts": idx.store.counts(),
                "faiss": len(idx.vector_index("image").ids()),
            }
    finally:
        idx.close()


def _opts(**kw):
    from index.node.dicomweb import ImportOptions

    return ImportOptions(page_size=2, build=BuildOptions(batch_size=8, device="cpu"), **kw)


@pytest.fixture(scope="module")
def reference(pacs, tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """(summary, index folder) of an uninterrupted import of the whole PACS."""
    from index.node.dicomweb import import_dicomweb

    out = tmp_path_factory.mktemp("dicomweb-reference") / "index"
    return import_dicomweb(pacs[0].dicomweb, out, tiny_model, _opts()), out


def test_import_then_reimport_fetches_nothing_new(pacs, reference, tiny_model, tmp_path: Path) -> None:
    from index.node.dicomweb import import_dicomweb

    server, studies = pacs
    n_images = sum(len(st.files) for st in studies)
    first, index_dir = reference
    assert first["fetch"]["studies"] == len(studies)
    assert first["fetch"]["fetched"] == n_images + 1  # the images and the SR
    assert first["fetch"]["not_wanted"] == 1 and first["fetch"]["failed"] == 0  # the CT instance
    state = _state(index_dir)
    assert state["images"] == sorted(u for st in studies for u in st.sop_uids)
    assert state["studies"] == sorted(st.study_uid for st in studies)
    assert state["reports"] == [(studies[0].study_uid, "sr")]
    assert state["faiss"] == n_images
    again = import_dicomweb(server.dicomweb, index_dir, tiny_model, _opts())
    assert again["fetch"]["fetched"] == 0 and again["fetch"]["known"] == n_images + 1
    assert again["batches"] == []
    assert _state(index_dir) == state
    since = import_dicomweb(server.dicomweb, tmp_path / "other", tiny_model, _opts(since="2100-01-01"))
    assert since["fetch"]["studies"] == 0 and since["totals"]["images"] == 0


def test_killed_import_resumes_to_the_same_totals(pacs, reference, tiny_model, tmp_path: Path,
                                                  monkeypatch) -> None:
    from index.node import dicomweb
    from index.node.worker import Worker

    server, studies = pacs
    ref_summary, ref_dir = reference
    target = tmp_path / "index"
    # Run 1: `cxr-search index build --dicomweb` killed with SIGKILL once its first page is indexed.
    cmd = [sys.executable, str(REPO / "cli.py"), "index", "build", "--dicomweb", server.dicomweb, "-i", str(target),
           "--model", "tiny", "--page-size", "1", "--device", "cpu", "--json"]
    log = open(tmp_path / "import.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: any((target / "node" / "done").glob("*")) or proc.poll() is not None, timeout=90,
                   interval=0.05, what="the import's first batch")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "import.log").read_text(errors="replace")
    # Run 2 dies (in-process) after moving its second page into a batch, before indexing it.
    real_process = Worker.process
    runs = []

    def dying_process(self, batch):
        runs.append(batch.name)
        if len(runs) == 2:
            raise KeyboardInterrupt("killed")
        return real_process(self, batch)

    monkeypatch.setattr(Worker, "process", dying_process)
    with pytest.raises(KeyboardInterrupt):
        dicomweb.import_dicomweb(server.dicomweb, target, tiny_model, _opts())
    monkeypatch.undo()
    # Run 3 finishes the batch left behind, fetches only what is still missing, and ends where a clean run ends.
    on_disk = dicomweb.Inbox(target).known_sop_uids()
    last = dicomweb.import_dicomweb(server.dicomweb, target, tiny_model, _opts())
    assert last["recovered_batches"] >= 1
    assert last["fetch"]["fetched"] == ref_summary["fetch"]["fetched"] - len(on_disk)
    ref, got = _state(ref_dir), _state(target)
    assert got == ref
    assert got["counts"]["failed"] == 0
    # The nightly form: `index add --dicomweb` with the index's own model fetches nothing new.
    again = subprocess.run([sys.executable, str(REPO / "cli.py"), "index", "add", "--dicomweb", server.dicomweb,
                            "-i", str(target), "--device", "cpu", "--json"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["fetch"]["fetched"] == 0 and _state(target) == ref


@pytest.mark.parametrize("argv, words", [
    (["index", "add", "ARCHIVE", "--dicomweb", "http://127.0.0.1:1/dicom-web/"], "not both"),
    (["index", "add", "--dicomweb", "http://127.0.0.1:1/dicom-web/", "--reports", "r.csv"], "--reports"),
    (["index", "add", "--dicomweb", "http://127.0.0.1:1/dicom-web/", "--shard", "1/2"], "--shard"),
    (["index", "add", "--dicomweb", "pacs:8042"], "base URL"),
    (["index", "add", "--dicomweb", "http://127.0.0.1:1/dicom-web/"], "no index to add to"),
    (["index", "build", "--dicomweb", "http://127.0.0.1:1/dicom-web/"], "--model is required"),
    (["index", "add", "--since", "2026-01-01"], "go with --dicomweb"),
    (["index", "add"], "give the archive"),
])
def test_dicomweb_options_are_checked_before_anything_runs(argv, words, tmp_path: Path, capsys) -> None:
    import cli

    code = cli.main([*argv, "-i", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert code in (2, 7) and words in " ".join(err.split()), err
    assert not (tmp_path / "new").exists()
