"""Tokens (missing, wrong, right, revoked), the loopback-only open mode, and the audit log's rows."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cxr_search.errors import ConfigError
from index.serve.audit import TABLE, AuditLog, default_audit_url
from index.serve.auth import TokenStore
from index.serve.config import check_bind, is_loopback

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture()
def secured(make_client, tmp_path: Path):
    """(client, token of "alice") of a server with tokens configured."""
    token = TokenStore(tmp_path / "state" / "tokens.json").add("alice")
    return make_client(), token


def test_tokens_are_stored_hashed(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    token = store.add("alice")
    text = (tmp_path / "tokens.json").read_text()
    assert token not in text and len(token) >= 40
    assert stat.S_IMODE(os.stat(tmp_path / "tokens.json").st_mode) == 0o600
    assert store.verify(token) == "alice" and store.verify(token + "x") is None
    with pytest.raises(ConfigError, match="exists"):
        store.add("alice")
    with pytest.raises(ConfigError, match="token name"):
        store.add("bad name with spaces")
    assert [t["name"] for t in store.names()] == ["alice"]


def test_requests_need_a_valid_token(secured, serve_archive) -> None:
    client, token = secured
    _, uid = serve_archive
    body = {"query": "effusion", "k": 2}
    missing = client.post("/api/search/text", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/api/search/text", json=body, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    assert client.post("/api/search/text", json=body, headers={"Authorization": f"Basic {token}"}).status_code == 401
    ok = client.post("/api/search/text", json=body, headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and len(ok.json()["hits"]) == 2
    # Unauthenticated answers do not say whether an id exists.
    known = client.get(f"/api/studies/{uid}")
    unknown = client.get("/api/studies/9.9.9.9")
    assert known.status_code == unknown.status_code == 401 and known.json() == unknown.json()
    for path in ("/api/images/1/thumbnail", "/api/images/1/preview", "/metrics", "/"):
        assert client.get(path, follow_redirects=False).status_code in (401, 303), path
    assert client.get("/healthz").status_code == 200  # readiness carries no patient data


def test_revoked_token_is_refused_at_once(secured, tmp_path: Path) -> None:
    client, token = secured
    auth = {"Authorization": f"Bearer {token}"}
    assert client.post("/api/search/text", json={"query": "effusion"}, headers=auth).status_code == 200
    store = TokenStore(tmp_path / "state" / "tokens.json")
    other = store.add("bob")
    store.revoke("alice")
    assert client.post("/api/search/text", json={"query": "effusion"}, headers=auth).status_code == 401
    assert client.post("/api/search/text", json={"query": "effusion"},
                       headers={"Authorization": f"Bearer {other}"}).status_code == 200


def test_page_login_sets_a_strict_cookie(secured) -> None:
    client, token = secured
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.post("/login", data={"token": "wrong"}).status_code == 401
    r = client.post("/login", data={"token": token}, follow_redirects=False)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = client.get("/?q=effusion")
    assert page.status_code == 200 and "alice" in page.text and 'class="card"' in page.text
    client.post("/logout")
    client.cookies.clear()
    assert client.get("/", follow_redirects=False).status_code == 303


def test_audit_rows_for_searches_and_views(secured, tmp_path: Path, serve_archive) -> None:
    client, token = secured
    _, uid = serve_archive
    auth = {"Authorization": f"Bearer {token}"}
    client.post("/api/search/text", json={"query": "nothing"})  # denied
    hits = client.post("/api/search/text", json={"query": "right pleural effusion", "k": 3,
                                                 "filters": {"sex": ["F"]}}, headers=auth).json()["hits"]
    client.get(f"/api/studies/{uid}", headers=auth)
    client.get(hits[0]["thumbnail_url"], headers=auth)
    client.post("/api/search/image", json={"image_id": hits[0]["image_id"], "k": 2}, headers=auth)
    client.post("/api/search/text", json={"query": "   "}, headers=auth)
    rows = list(AuditLog(default_audit_url(tmp_path / "state")).rows())
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "audit.sqlite").st_mode) == 0o600
    by_action = {}
    for row in rows:
        by_action.setdefault(row["action"], []).append(row)
    denied = by_action["auth.denied"][0]
    assert denied["user"] == "-" and denied["status"] == 401 and denied["client"]
    text = by_action["search.text"]
    assert text[0]["user"] == "alice" and text[0]["query"]["text"] == "right pleural effusion"
    assert text[0]["query"]["filters"] == {"sex": ["F"]} and text[0]["status"] == 200
    assert [i["image_id"] for i in text[0]["ids"]] == [h["image_id"] for h in hits]
    assert text[1]["status"] == 422  # failed searches are audited too
    view = by_action["study.view"][0]
    assert view["query"]["study_uid"] == uid and view["ids"] and view["generation"]
    assert by_action["image.thumbnail"][0]["ids"] == [hits[0]["image_id"]]
    assert by_action["search.image"][0]["query"]["image_id"] == hits[0]["image_id"]
    assert all(r["time"] <= s["time"] for r, s in zip(rows, rows[1:], strict=False))
    since = rows[2]["time"]
    assert list(AuditLog(default_audit_url(tmp_path / "state")).rows(since=since)) == rows[2:]


def test_uploads_are_audited_by_hash(client, tmp_path: Path, serve_archive) -> None:
    archive, _ = serve_archive
    data = next(archive.rglob("*.DCM")).read_bytes()
    r = client.post("/api/search/image", files={"file": ("q.dcm", data)}, data={"k": "2"})
    assert r.status_code == 200
    row = [r for r in AuditLog(default_audit_url(tmp_path / "state")).rows() if r["action"] == "search.image"][-1]
    assert row["user"] == "local" and row["query"]["upload_sha256"] == r.json()["query_sha256"]
    assert row["query"]["type"] == "dicom" and "path" not in json.dumps(row["query"])



def test_the_audit_log_is_append_only_in_the_database(store_url: str) -> None:
    """The database itself refuses to change or delete a row (SQLite and PostgreSQL); reading creates nothing."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError

    assert list(AuditLog(store_url, create=False).rows()) == []  # no log yet: empty, and no table is made
    log = AuditLog(store_url)
    log.record(user="alice", client="127.0.0.1", action="search.text", query={"text": "effusion"}, ids=[1, 2])
    log.record(user="bob", client="127.0.0.1", action="study.view", query={"study_uid": "1.2"}, ids=[3])
    engine = create_engine(store_url)
    tampering = [f"UPDATE {TABLE} SET \"user\" = 'mallory'", f"DELETE FROM {TABLE}"]
    if engine.dialect.name == "postgresql":
        tampering.append(f"TRUNCATE {TABLE}")
    try:
        for statement in tampering:
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text(statement))
    finally:
        engine.dispose()
    again = AuditLog(store_url)  # a restart keeps the rows and the triggers
    assert [(r["user"], r["action"], r["ids"]) for r in again.rows()] == [
        ("alice", "search.text", [1, 2]), ("bob", "study.view", [3])]
    assert [r["user"] for r in again.tail(1)] == ["bob"]
    log.close()
    again.close()


def test_worker_processes_append_to_one_audit_log(tmp_path: Path) -> None:
    """Several server processes (``--workers N``) write the same log at once: every row is kept."""
    import multiprocessing

    url = default_audit_url(tmp_path / "state")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_rows, args=(url, f"worker{i}", 40)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    rows = list(AuditLog(url, create=False).rows())
    assert len(rows) == 120
    for i in range(3):
        assert [r["ids"] for r in rows if r["user"] == f"worker{i}"] == [[n] for n in range(40)]


def _append_rows(url: str, user: str, n: int) -> None:
    log = AuditLog(url)
    for i in range(n):
        log.record(user=user, client="127.0.0.1", action="search.text", query={"text": "q"}, ids=[i])
    log.close()

def test_binding_rules() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("myhost")
    with pytest.raises(ConfigError, match="refusing"):
        check_bind("0.0.0.0", have_tokens=False)
    assert "network" in check_bind("0.0.0.0", have_tokens=True)
    assert "no API tokens" in check_bind("127.0.0.1", have_tokens=False)
    assert check_bind("127.0.0.1", have_tokens=True) is None
