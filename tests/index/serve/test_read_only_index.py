"""The server over a read-only index folder that belongs to another user (issue 18's read-only deployment):
it answers searches and study views, writes its audit log in its own state folder, and changes nothing in
the index folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from tests.helpers.as_user import as_nobody, folder_snapshot, nobody_read_only_copy
from tests.helpers.system import need_module

QUERY = {"query": "right pleural effusion", "k": 3}


def _session(client: Any) -> Dict[str, Any]:
    health = client.get("/healthz")
    found = client.post("/api/search/text", json=QUERY)
    hits = found.json().get("hits", []) if found.status_code == 200 else []
    study = client.get(f"/api/studies/{hits[0]['study_uid']}") if hits else None
    return {"health": health.status_code, "search": found.status_code, "hits": [h["image_id"] for h in hits],
            "study": study.status_code if study is not None else None}


def test_the_server_answers_from_a_read_only_index_of_another_user(serve_index: Path, tiny_model,
                                                                   make_client) -> None:
    need_module("fastapi", "serve")
    need_module("httpx", "dev")
    from fastapi.testclient import TestClient

    from cxr_search.inference import Embedder
    from index.serve.app import create_app
    from index.serve.config import ServeConfig
    from index.serve.engine import Engine

    # The same session as root on the writable index first: every module it needs is loaded before the fork
    # (nobody cannot read the interpreter's folder), and it is the answer to compare with.
    expected = _session(make_client())
    assert expected["search"] == 200 and len(expected["hits"]) == 3 and expected["study"] == 200

    with nobody_read_only_copy(serve_index, writable=("state",)) as index:
        state = index.parent / "state"
        before = folder_snapshot(index)

        def serve_as_nobody() -> Dict[str, Any]:
            engine = Engine(index, Embedder(tiny_model), text_precision="fp32", reload_check_s=0.0)
            try:
                with TestClient(create_app(engine, ServeConfig(state_dir=state))) as client:
                    return _session(client)
            finally:
                engine.close()

        got = as_nobody(serve_as_nobody)
        assert got == expected
        assert folder_snapshot(index) == before  # no WAL, no journal, no cache: nothing written in the index folder
        from index.serve.audit import AuditLog, default_audit_url

        rows = list(AuditLog(default_audit_url(state), create=False).rows())
        assert [r["action"] for r in rows] == ["search.text", "study.view"]
        assert rows[0]["query"]["text"] == QUERY["query"] and rows[0]["user"] == "local"
