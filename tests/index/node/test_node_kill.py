"""kill -9 of a node (a real ``cxr-search node`` process) mid-stream, then a restart: every acknowledged
instance is indexed, none twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from index.build import BuildOptions
from index.index_dir import IndexDir
from index.store import EMBEDDED, Image
from tests.helpers.pacs_node import uncompressed_archive, wait_until
from tests.helpers.ports import free_port
from tests.helpers.system import need_module

REPO = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def _start_node(index_dir: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "cli.py"), "node", str(index_dir), "--model", "tiny", "--port", str(port),
           "--quiet", "0.3", "--device", "cpu", "--batch-size", "8"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        wait_until(lambda: "listening on" in log.read_text(errors="replace") or proc.poll() is not None,
                   timeout=90, interval=0.2, what="the node to listen")
    except AssertionError:
        os.kill(proc.pid, signal.SIGKILL)
        raise
    assert proc.poll() is None, log.read_text(errors="replace")
    return proc


def test_kill_9_mid_stream_then_restart_indexes_every_acknowledged_instance_once(tiny_model, tmp_path: Path) -> None:
    need_module("pynetdicom", "node")
    from pynetdicom import AE

    from index.node.runtime import Node
    from index.node.scp import NodeConfig
    from index.node.worker import WorkerOptions

    studies = uncompressed_archive(tmp_path / "send", studies=6, seed=41)
    files = [f for st in studies for f in st.files]
    index_dir = tmp_path / "index"
    port = free_port()
    proc = _start_node(index_dir, port, tmp_path / "node.log")
    acked = []
    killed_at = None
    try:
        ae = AE(ae_title="PACS")
        for sop_class in {str(dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}:
            ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRSEARCH")
        assert assoc.is_established
        first_study = len(studies[0].files)
        for i, path in enumerate(files):
            if i == first_study:  # let the node index the first study, so that the kill finds batches on disk
                wait_until(lambda: any((index_dir / "node" / "done").glob("*")), timeout=60,
                           what="the first batch to be indexed")
            if i == first_study + 3:
                os.kill(proc.pid, signal.SIGKILL)  # mid-stream: an association open, a batch possibly in progress
                killed_at = i
                break
            ds = dcmread(path)
            status = assoc.send_c_store(ds)
            if status and int(status.Status) == 0:
                acked.append(str(ds.SOPInstanceUID))
            time.sleep(0.15)
        if assoc.is_established:
            assoc.abort()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert killed_at is not None and len(acked) == killed_at
    # Restart (in-process): the inbox and unfinished batches are finished.
    node = Node(index_dir, tiny_model, NodeConfig(port=0),
                WorkerOptions(quiet_s=0.0, poll_s=0.1, build=BuildOptions(batch_size=8, device="cpu")))
    node.start()
    try:
        wait_until(lambda: not node.inbox.inbox_studies() and not node.inbox.unfinished_batches(), timeout=60,
                   what="the restarted node to finish its inbox")
    finally:
        node.stop()
    idx = IndexDir.open(index_dir)
    try:
        with idx.store.session() as s:
            sops = s.scalars(select(Image.sop_uid).where(Image.status == EMBEDDED)).all()
            n_rows = s.scalar(select(func.count(Image.id)))
        faiss_ids = idx.vector_index("image").ids()
    finally:
        idx.close()
    assert set(acked) <= set(sops)  # no acknowledged instance lost
    assert set(sops) <= {u for st in studies for u in st.sop_uids}
    assert len(sops) == len(set(sops)) == n_rows  # none twice, none failed
    assert len(faiss_ids) == len(set(faiss_ids.tolist())) == len(sops)
