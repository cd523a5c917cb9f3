"""A real Orthanc routes what it stores to the node (Lua OnStoredInstance): storescu sends a study to
Orthanc, and it becomes searchable through the running service's API (no restart); the node admits Orthanc by
its allow-list entry only."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from index.build import BuildOptions
from index.index_dir import IndexDir
from index.store import EMBEDDED, Image, Report, Study
from tests.helpers.pacs_node import (
    ORTHANC_CANDIDATES,
    Orthanc,
    sr_file,
    storescu,
    uncompressed_archive,
    wait_until,
)
from tests.helpers.ports import free_port
from tests.helpers.system import need_module, need_program

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

ROUTE_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
   -- route radiographs and reports to the cxr-search node (not what Lua itself stored)
   if origin['RequestOrigin'] ~= 'Lua' then
      local modality = tags['Modality']
      if modality == 'CR' or modality == 'DX' or modality == 'SR' then
         SendToModality(instanceId, 'cxrsearch')
      end
   end
end
"""


def test_orthanc_routes_a_study_to_the_node_and_it_becomes_searchable(tiny_model, tmp_path: Path) -> None:
    program = need_program("Orthanc", "orthanc", candidates=ORTHANC_CANDIDATES)
    store_bin = need_program("storescu", "dcmtk")
    need_module("pynetdicom", "node")
    need_module("fastapi", "serve")
    need_module("httpx", "dev")
    from fastapi.testclient import TestClient

    from cxr_search.inference import Embedder
    from index.node.runtime import Node
    from index.node.scp import NodeConfig, parse_allow
    from index.node.worker import WorkerOptions
    from index.search import Searcher
    from index.serve.app import create_app
    from index.serve.config import ServeConfig
    from index.serve.engine import Engine

    studies = uncompressed_archive(tmp_path / "send", studies=2, seed=61)
    sr = sr_file(tmp_path / "sr.dcm", studies[0], studies[0].report)
    node_port = free_port()
    server = Orthanc(program, tmp_path / "orthanc", modalities={"cxrsearch": ["CXRSEARCH", "127.0.0.1", node_port]},
                     lua=ROUTE_LUA, dicomweb=False).start()
    index_dir = tmp_path / "index"
    node = Node(index_dir, tiny_model, NodeConfig(port=node_port, allow=parse_allow(["ORTHANC@127.0.0.1"])),
                WorkerOptions(quiet_s=1.0, poll_s=0.1, build=BuildOptions(batch_size=8, device="cpu")))
    node.start()
    engine = client = None
    try:
        wait_until(lambda: (index_dir / "index.json").is_file(), timeout=30, interval=0.2, what="the node's index")
        # The service runs before the first study arrives and is never restarted.
        engine = Engine(index_dir, Embedder(tiny_model, device="cpu"), text_precision="fp32", reload_check_s=0.0)
        client = TestClient(create_app(engine, ServeConfig(state_dir=tmp_path / "serve-state")))
        first = client.post("/api/search/text", json={"query": "chest radiograph", "k": 5, "level": "study"})
        assert first.status_code == 200 and first.json()["hits"] == []
        files = [f for st in studies for f in st.files]
        sent = storescu(store_bin, server.dicom_port, [*files, sr], calling="MODALITY", called="ORTHANC")
        assert sent.returncode == 0, sent.stderr

        def indexed() -> bool:
            idx = IndexDir.open(index_dir)
            try:
                with idx.store.session() as s:
                    n = len(s.scalars(select(Image.sop_uid).where(Image.status == EMBEDDED)).all())
                    r = len(s.scalars(select(Report.id)).all())
            finally:
                idx.close()
            return n == len(files) and r == 1

        wait_until(indexed, timeout=45, interval=0.3, what="the routed studies to be indexed")
        assert node.scp.counts["stored"] == len(files) + 1
        assert node.scp.counts.get("rejected_associations", 0) == 0

        def served() -> bool:
            r = client.post("/api/search/text", json={"query": "chest radiograph", "k": 5, "level": "study"})
            assert r.status_code == 200, r.text
            return {h["study_uid"] for h in r.json()["hits"]} == {st.study_uid for st in studies}

        wait_until(served, timeout=30, interval=0.3, what="the service to answer with the routed studies")
        assert engine.reloads >= 1
    finally:
        if client is not None:
            client.close()
        if engine is not None:
            engine.close()
        node.stop()
        server.stop()
    idx = IndexDir.open(index_dir)
    try:
        with idx.store.session() as s:
            reported = s.scalar(select(Study.study_uid).join(Report, Report.study_id == Study.id))
    finally:
        idx.close()
    assert reported == studies[0].study_uid
    searcher = Searcher(index_dir, Embedder(tiny_model, device="cpu"))
    try:
        hits = searcher.search_text("chest radiograph", k=5, level="study")
    finally:
        searcher.close()
    assert {h.study_uid for h in hits} == {st.study_uid for st in studies}
