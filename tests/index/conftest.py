"""Fixtures of the engine tests: a small synthetic PACS export and the tiny model (built once per session)."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import pytest

from cxr_search.checkpoints import load_model
from cxr_search.model import CXRClip
from cxr_search.synth import synthesize


@pytest.fixture(scope="session")
def tiny_model() -> CXRClip:
    """The seeded ``tiny`` preset (with its basic tokenizer), in eval mode."""
    return load_model("tiny")


@pytest.fixture(scope="session")
def pacs_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 studies (PA + lateral or AP) with 4 broken files: truncated, text, SR, empty."""
    out = tmp_path_factory.mktemp("pacs-index") / "archive"
    synthesize(out, studies=12, seed=21, layout="pacs", broken=4, image_size=64)
    return out


@pytest.fixture(scope="session")
def small_index(tmp_path_factory: pytest.TempPathFactory, tiny_model: CXRClip) -> Tuple[Path, Path]:
    """(archive, index folder): 5 studies with 4 broken files, indexed once with the tiny model; copy it to change it."""
    from index.build import BuildOptions, build

    root = tmp_path_factory.mktemp("small-index")
    archive = root / "archive"
    synthesize(archive, studies=5, seed=7, layout="pacs", broken=4, image_size=64)
    build(archive, root / "index", tiny_model, BuildOptions(reports_csv=archive / "reports.csv", batch_size=8))
    return archive, root / "index"


# ---------------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="session", autouse=True)
def _stop_postgres():
    """Stop the test PostgreSQL server (started on first use by ``tests/helpers/postgres.py``) by its PID."""
    yield
    from tests.helpers.postgres import stop_server

    stop_server()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path: Path) -> str:
    """A fresh, empty store URL per test: a SQLite file, or a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    from tests.helpers.postgres import new_database

    return new_database()
