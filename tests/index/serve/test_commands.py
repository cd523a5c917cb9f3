"""``cxr-search serve``: tokens and audit commands, refusals, and a real server process (start, query, SIGTERM)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

import cli
from tests.helpers.serve import serve, stop

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_tokens_and_audit_commands(serve_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    state = tmp_path / "state"
    assert cli.main(["serve", "tokens", "add", "alice", "--state-dir", str(state)]) == 0
    token = capsys.readouterr().out.strip()
    assert len(token) >= 40 and token not in (state / "tokens.json").read_text()
    assert cli.main(["serve", "tokens", "add", "alice", "--state-dir", str(state)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["serve", "tokens", "list", "--state-dir", str(state), "--json"]) == 0
    assert [t["name"] for t in json.loads(capsys.readouterr().out)["tokens"]] == ["alice"]
    assert cli.main(["serve", "audit", "--state-dir", str(state), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"rows": []}
    assert cli.main(["serve", "audit", "--state-dir", str(state), "--since", "yesterday"]) == 2
    assert cli.main(["serve", "tokens", "revoke", "alice", "--state-dir", str(state)]) == 0
    assert cli.main(["serve", "tokens", "revoke", "alice", "--state-dir", str(state)]) == 2
    assert cli.main(["serve", "tokens", "list"]) == 2  # neither --index nor --state-dir
    capsys.readouterr()



def test_audit_command_reads_the_audit_database(store_url: str, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """``serve audit --audit-db URL`` (SQLite or PostgreSQL): the latest rows, as JSON or a table of literal text."""
    from cxr_search import terminal
    from index.serve.audit import AuditLog

    monkeypatch.setattr(terminal.out_console, "width", 240)  # a wide terminal: no cell is folded

    log = AuditLog(store_url)
    for i, q in enumerate(["effusion", "effusion [/b] [red]x", "cardiomegaly"]):
        log.record(user="alice", client="10.0.0.7", action="search.text", query={"text": q}, ids=[i])
    log.close()
    assert cli.main(["serve", "audit", "--audit-db", store_url, "--limit", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["query"]["text"] for r in rows] == ["effusion [/b] [red]x", "cardiomegaly"]
    assert cli.main(["serve", "audit", "--audit-db", store_url]) == 0
    assert "[/b] [red]x" in capsys.readouterr().out  # printed literally, never read as markup

def test_start_refusals(serve_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = cli.main(["serve", str(serve_index), "--host", "0.0.0.0", "--state-dir", str(tmp_path / "s")])
    assert rc == 2 and "refusing to listen on 0.0.0.0" in capsys.readouterr().err
    rc = cli.main(["serve", str(tmp_path / "nothing"), "--state-dir", str(tmp_path / "s")])
    assert rc == 2 and "not an index folder" in capsys.readouterr().err
    rc = cli.main(["serve", str(serve_index), "--state-dir", str(tmp_path / "s"), "--viewer-url", "https://pacs/x"])
    assert rc == 2 and "{study_uid}" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")  # the audit database's folder cannot be made: under a file
    rc = cli.main(["serve", str(serve_index), "--state-dir", str(tmp_path / "s"), "--audit-db",
                   f"sqlite:///{tmp_path / 'a-file' / 'audit.sqlite'}"])
    assert rc == 2 and "cannot create the audit log" in capsys.readouterr().err


@pytest.mark.slow
def test_server_process_serves_and_stops_on_sigterm(serve_index: Path, tmp_path: Path) -> None:
    """No --model: the index's own model; a query over HTTP; SIGTERM ends it gracefully."""
    with serve(serve_index, tmp_path / "state") as (base, proc):
        req = urllib.request.Request(base + "/api/search/text", data=json.dumps({"query": "effusion", "k": 3}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.load(r)
        assert len(body["hits"]) == 3
        # uvicorn finishes the requests in flight, runs the shutdown, then re-raises SIGTERM (exit -15).
        assert stop(proc) in (0, -15)
    log = next(tmp_path.glob("server-*.log")).read_text()
    assert "Application shutdown complete" in log
    assert "POST /api/search/text 200" in log and "effusion" not in log  # queries never reach the ordinary log
    from index.serve.audit import AuditLog, default_audit_url

    rows = list(AuditLog(default_audit_url(tmp_path / "state"), create=False).rows())
    assert rows[-1]["action"] == "search.text" and rows[-1]["query"]["text"] == "effusion"
