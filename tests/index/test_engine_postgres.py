"""The engine through the command line with its store on a real PostgreSQL server (``--db``): build, search,
remove, verify and stats, with nothing of the store in the index folder and no password written anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

import cli
from tests.helpers.index_data import ground_truth
from tests.helpers.postgres import new_database

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.slow]  # seconds: five CLI runs

PASSWORD = "s3cret-Pw"  # the test server trusts loopback connections: any password is accepted, none is needed


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return json.loads(out)


def _studies_in(url: str) -> set:
    import psycopg

    u = make_url(url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database) as con:
        return {r[0] for r in con.execute("SELECT study_uid FROM studies")}


def test_build_search_remove_verify_on_postgresql(pacs_archive: Path, tmp_path: Path, capsys) -> None:
    url = make_url(new_database()).set(password=PASSWORD).render_as_string(hide_password=False)
    out = tmp_path / "index"
    gt = ground_truth(pacs_archive)
    all_studies = {r["study_id"] for r in gt}

    built = _cli(capsys, "index", "build", str(pacs_archive), "--model", "tiny", "--out", str(out), "--reports",
                 str(pacs_archive / "reports.csv"), "--batch-size", "8", "--device", "cpu", "--db", url, "--json")
    assert built["totals"]["images"] == len(gt) and built["totals"]["studies"] == len(all_studies)
    assert _studies_in(url) == all_studies  # the rows are in PostgreSQL ...
    assert not list(out.glob("store.sqlite*"))  # ... and no SQLite store was made beside the FAISS files
    for f in out.rglob("*"):
        assert not f.is_file() or PASSWORD.encode() not in f.read_bytes(), f"{f.name} holds the store password"

    query = ("search", "text", "large right pleural effusion", "--index", str(out), "--model", "tiny", "--db", url,
             "--device", "cpu", "--json")
    hits = _cli(capsys, *query, "-k", "5")["hits"]
    assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(h["study_uid"] in all_studies and Path(h["path"]).is_file() for h in hits)  # paths decrypted
    victim = hits[0]["study_uid"]

    _cli(capsys, "index", "remove", str(out), "--study", victim, "--db", url, "--json")
    assert _studies_in(url) == all_studies - {victim}
    every = _cli(capsys, *query, "-k", str(len(gt)))["hits"]
    assert every and victim not in {h["study_uid"] for h in every}

    report = _cli(capsys, "index", "verify", str(out), "--db", url, "--json")
    assert report["ok"], report["problems"]
    stats = _cli(capsys, "index", "stats", str(out), "--db", url, "--json")
    assert stats["totals"]["studies"] == len(all_studies) - 1
    assert stats["totals"]["images"] == built["totals"]["images"] - sum(r["study_id"] == victim for r in gt)
