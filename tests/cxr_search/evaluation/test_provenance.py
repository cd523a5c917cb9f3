"""Benchmark provenance: version, git commit of a checkout (never failing without one), file hashes."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from cxr_search import __version__
from cxr_search.evaluation import provenance
from tests.helpers.system import need_program


@pytest.fixture(autouse=True)
def fresh_git_state():
    provenance.git_state.cache_clear()
    yield
    provenance.git_state.cache_clear()


def test_commit_of_this_checkout() -> None:
    soft = provenance.software_provenance()
    assert soft["cxr_search_version"] == __version__
    root = provenance._SOURCE_ROOT
    if not (root / ".git").exists():  # tests run from an unpacked copy: no commit to report
        assert soft["git_commit"] is None
        return
    need_program("git", "git")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    if head.returncode != 0:  # git refuses this checkout (e.g. another owner): provenance must not fail either
        assert soft["git_commit"] is None
        return
    assert soft["git_commit"] == head.stdout.strip() and isinstance(soft["git_dirty"], bool)


def test_no_checkout_or_no_git_gives_nulls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provenance, "_SOURCE_ROOT", tmp_path)  # an installed copy: no .git
    assert provenance.git_state() == {"git_commit": None, "git_dirty": None}
    provenance.git_state.cache_clear()
    (tmp_path / ".git").mkdir()  # looks like a checkout, but git finds no repository there
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert provenance.git_state() == {"git_commit": None, "git_dirty": None}
    provenance.git_state.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git program at all
    assert shutil.which("git") is None
    assert provenance.software_provenance()["git_commit"] is None


def test_file_hash_and_bench_provenance(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"a,b\n1,2\n" * 100_000)
    assert provenance.file_sha256(path, chunk=4096) == hashlib.sha256(path.read_bytes()).hexdigest()
    out = provenance.bench_provenance(split="test", options={"task": "x"})
    assert out["split"] == "test" and out["options"] == {"task": "x"} and "manifest" not in out

    class Model:
        provenance = {"fingerprint": "abc", "source": "/m"}

    assert provenance.model_provenance(Model(), "tiny") == {"fingerprint": "abc", "source": "tiny"}
