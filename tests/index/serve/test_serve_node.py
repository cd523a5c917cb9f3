"""``cxr-search serve --node-port``: the DICOM node and the web service in one process, over one index."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

import cli
from tests.helpers.pacs_node import storescu, uncompressed_archive, wait_until
from tests.helpers.ports import free_port
from tests.helpers.serve import serve, stop
from tests.helpers.system import need_module, need_program

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


@pytest.mark.slow
def test_one_process_receives_indexes_and_serves(tmp_path: Path) -> None:
    """A new folder: the empty index is created, a study sent by storescu becomes a hit of the running API."""
    store_bin = need_program("storescu", "dcmtk")
    need_module("pynetdicom", "node")
    need_module("fastapi", "serve")
    studies = uncompressed_archive(tmp_path / "send", studies=2, seed=41)
    index = tmp_path / "index"
    node_port = free_port()
    with serve(index, tmp_path / "state", "--model", "tiny", "--node-port", str(node_port), "--quiet", "0.5",
               "--device", "cpu") as (base, proc):
        with urllib.request.urlopen(base + "/healthz", timeout=30) as r:
            assert json.load(r)["counts"]["images"] == 0  # the node's new, empty index
        sent = storescu(store_bin, node_port, [f for st in studies for f in st.files])
        assert sent.returncode == 0, sent.stderr

        def served() -> bool:
            hits = _post(base, "/api/search/text", {"query": "pleural effusion", "k": 10, "level": "study"})["hits"]
            return {h["study_uid"] for h in hits} == {st.study_uid for st in studies}

        wait_until(served, timeout=60, interval=0.3, what="the received studies to be served")
        with urllib.request.urlopen(f"{base}/api/studies/{studies[0].study_uid}", timeout=30) as r:
            record = json.load(r)
        assert {i["sop_uid"] for i in record["images"]} == set(studies[0].sop_uids)
        assert stop(proc) in (0, -15)
    log = " ".join(next(tmp_path.glob("server-*.log")).read_text().split())  # the console wraps long lines
    assert f"node CXRSEARCH listening on 127.0.0.1:{node_port}" in log
    assert log.index("DICOM node stopping") < log.index("Application shutdown complete")  # stopped gracefully
    from index.node.inbox import Inbox

    inbox = Inbox(index)
    assert inbox.inbox_studies() == [] and inbox.unfinished_batches() == []  # everything received was indexed


def test_node_options_are_checked_before_anything_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    index = tmp_path / "new"
    state = ["--state-dir", str(tmp_path / "s")]
    cases = [
        (["--node-port", "0", "--workers", "2", "-m", "tiny"], "--workers 1"),
        (["--allow", "PACS@127.0.0.1"], "give --node-port too"),
        (["--node-port", "0", "--node-host", "0.0.0.0", "-m", "tiny"], "needs an allow-list"),
        (["--node-port", "0", "--ae-title", "A" * 17, "-m", "tiny"], "1 to 16 characters"),
        (["--node-port", "0"], "give --model to start an empty index"),
    ]
    for extra, message in cases:
        assert cli.main(["serve", str(index), *state, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not index.exists()  # nothing was created
