"""Fixtures of the server tests: a tiny index with a hostile report, its warm engine, and app clients.

The index is built once per session from a copy of the synthetic PACS export whose first study's
report carries ``<script>`` and ``<b>`` markup in its impression, so every page that shows it proves it
is escaped.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path
from typing import Callable, Iterator, Tuple

import pytest

from tests.helpers.serve import XSS
from tests.helpers.system import need_module


@pytest.fixture(scope="session")
def serve_archive(pacs_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, str]:
    """(archive copy, StudyInstanceUID of the study whose report holds markup)."""
    out = tmp_path_factory.mktemp("serve") / "archive"
    shutil.copytree(pacs_archive, out)
    text = (out / "reports.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    rows[0]["report_text"] = rows[0]["report_text"].rstrip() + f"\n\nIMPRESSION: {XSS}\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    (out / "reports.csv").write_text(buf.getvalue(), encoding="utf-8")
    return out, rows[0]["StudyInstanceUID"]


@pytest.fixture(scope="session")
def serve_index(serve_archive: Tuple[Path, str], tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built index of :func:`serve_archive`."""
    from index.build import BuildOptions, build

    archive, _ = serve_archive
    out = tmp_path_factory.mktemp("serve-index") / "index"
    build(archive, out, tiny_model, BuildOptions(reports_csv=archive / "reports.csv", batch_size=8))
    return out


@pytest.fixture(scope="session")
def engine(serve_index: Path, tiny_model):
    """The warm engine over :func:`serve_index` (fp32 text queries, for comparisons with the Searcher)."""
    need_module("fastapi", "serve")
    from cxr_search.inference import Embedder
    from index.serve.engine import Engine

    eng = Engine(serve_index, Embedder(tiny_model), text_precision="fp32", reload_check_s=0.0)
    yield eng
    eng.close()


@pytest.fixture()
def make_client(engine, tmp_path: Path) -> Iterator[Callable[..., object]]:
    """``make_client(**config)``: a TestClient over the engine with a fresh state folder (and ``config`` overrides)."""
    need_module("httpx", "dev")
    from fastapi.testclient import TestClient

    from index.serve.app import create_app
    from index.serve.config import ServeConfig

    clients = []

    def make(eng=None, **overrides):
        cfg = ServeConfig(state_dir=overrides.pop("state_dir", tmp_path / "state"), **overrides)
        client = TestClient(create_app(eng or engine, cfg))
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


@pytest.fixture()
def client(make_client):
    """A client of an open loopback server (no tokens)."""
    return make_client()
