"""The node's durable inbox: layout, UID checks, quiet studies, batches, recovery of partial writes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from index.node.inbox import Inbox, valid_uid

STUDY = "1.2.3.4"


def test_uid_check_refuses_paths_and_junk() -> None:
    assert valid_uid("1.2.840.10008.1.1")
    for bad in ("", None, "../../etc", "1.2/3", "1..2", "a.b", "1." + "2" * 70, "1.2 "):
        assert not valid_uid(bad), bad


def test_store_writes_under_the_study_and_refuses_bad_uids(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path)
    inbox.prepare()
    image = inbox.store(STUDY, "1.2.3.4.5", b"image bytes")
    report = inbox.store(STUDY, "1.2.3.4.6", b"sr bytes", report=True)
    assert image == inbox.studies / STUDY / "1.2.3.4.5.dcm" and image.read_bytes() == b"image bytes"
    assert inbox.is_report_file(report) and not inbox.is_report_file(image)
    assert list(inbox.tmp.iterdir()) == []  # no temp file left behind
    with pytest.raises(ValueError):
        inbox.store("../evil", "1.2", b"x")
    assert inbox.known_sop_uids() == {"1.2.3.4.5", "1.2.3.4.6"}


def test_quiet_studies_by_folder_age(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path)
    inbox.prepare()
    inbox.store("1.1", "1.1.1", b"a")
    inbox.store("2.2", "2.2.1", b"b")
    old = time.time() - 100
    os.utime(inbox.studies / "1.1", (old, old))
    assert inbox.quiet_studies(10) == ["1.1"]
    assert inbox.quiet_studies(0) == ["1.1", "2.2"]  # oldest first


def test_batches_move_studies_and_pending_reports(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path)
    inbox.prepare()
    inbox.store("1.1", "1.1.1", b"a")
    (inbox.reports / "1.1").mkdir()
    (inbox.reports / "1.1" / "1.1.9.sr.dcm").write_bytes(b"sr")
    batch = inbox.open_batch(["1.1", "9.9"], pending_reports=["1.1"])  # 9.9 is not in the inbox: left out
    assert batch is not None and sorted(p.name for p in (batch / "1.1").iterdir()) == ["1.1.1.dcm", "1.1.9.sr.dcm"]
    assert inbox.inbox_studies() == [] and inbox.pending_report_studies() == []
    assert inbox.unfinished_batches() == [batch]
    inbox.mark_done(batch, {"ok": True})
    assert inbox.unfinished_batches() == [] and inbox.batch_summary(batch.name) == {"ok": True}
    assert inbox.open_batch(["1.1"]) is None  # nothing to move: no empty batch left behind
    assert [b.name for b in inbox.archive.iterdir()] == [batch.name]


def test_partial_writes_of_dead_processes_are_removed(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path)
    inbox.prepare()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (inbox.tmp / f"{dead_pid}.abc.part").write_bytes(b"half")
    (inbox.tmp / f"{os.getppid()}.abc.part").write_bytes(b"a live writer's")
    assert inbox.prepare() == 1
    assert [p.name for p in inbox.tmp.iterdir()] == [f"{os.getppid()}.abc.part"]


def test_batches_of_a_live_other_process_are_left_to_it(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path)
    inbox.prepare()
    mine = inbox.empty_batch()
    other = inbox.archive / f"20200101T000000-p{os.getppid()}-00000"
    other.mkdir()
    assert inbox.unfinished_batches() == [mine]
