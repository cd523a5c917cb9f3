"""Sharded indexing: catalogue once, embed in N concurrent processes sharing the store, then write FAISS once.
The result equals a one-shot build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

import cli
from index.build import BuildOptions, build
from index.index_dir import IndexDir
from index.store import EMBEDDED, PENDING, Image, ImageVector, Section
from index.verify import verify

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = Path(__file__).resolve().parents[2]


def _vectors(index_dir: Path) -> dict:
    idx = IndexDir.open(index_dir)
    try:
        with idx.store.session() as s:
            rows = s.execute(select(Image.sop_uid, ImageVector.vector).join(ImageVector, ImageVector.image_id == Image.id)).all()
    finally:
        idx.close()
    return {uid: np.frombuffer(v, dtype=np.float32) for uid, v in rows}


@pytest.mark.slow
def test_sharded_build_equals_a_one_shot_build(pacs_archive: Path, tiny_model, tmp_path: Path) -> None:
    reports = pacs_archive / "reports.csv"
    one_shot = tmp_path / "one"
    build(pacs_archive, one_shot, tiny_model, BuildOptions(reports_csv=reports, batch_size=4))

    sharded = tmp_path / "sharded"
    summary = build(pacs_archive, sharded, tiny_model, BuildOptions(reports_csv=reports, catalogue_only=True))
    assert summary["faiss"] == {} and summary["totals"]["images"] == 0  # catalogued, nothing embedded yet
    idx = IndexDir.open(sharded)
    with idx.store.session() as s:
        pending = s.scalars(select(Image.id).where(Image.status == PENDING)).all()
        sections = s.scalars(select(Section.id).where(Section.status == PENDING)).all()
    idx.close()
    assert len(pending) > 4 and sections
    assert not list(sharded.glob("*.faiss"))

    # Two shards at once, as two processes on the same SQLite store (WAL: one writer at a time).
    base = [sys.executable, "-m", "cli", "index", "build", str(pacs_archive), "--model", "tiny", "--out", str(sharded),
            "--reports", str(reports), "--batch-size", "4", "--json"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen(base + ["--shard", f"{k}/2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for k in (1, 2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    shard_summaries = [json.loads(o[0]) for o in outs]
    assert [s["shard"] for s in shard_summaries] == ["1/2", "2/2"]
    embedded = [s["embedding"]["images"]["embedded"] for s in shard_summaries]
    assert all(e > 0 for e in embedded)
    assert sum(embedded) + sum(s["embedding"]["images"]["failed"] for s in shard_summaries) == len(pending)
    assert all(s["catalogue"] is None and s["faiss"] == {} for s in shard_summaries)

    # The closing plain run embeds nothing new and writes the FAISS files.
    final = build(pacs_archive, sharded, tiny_model, BuildOptions(reports_csv=reports, batch_size=4))
    assert final["embedding"]["images"]["embedded"] == 0 and final["embedding"]["sections"]["embedded"] == 0
    ref = build(pacs_archive, one_shot, tiny_model, BuildOptions(reports_csv=reports))  # a no-op rerun
    assert final["totals"] == ref["totals"]
    assert verify(sharded)["ok"]
    a, b = _vectors(sharded), _vectors(one_shot)
    assert a.keys() == b.keys()
    # Other batch sizes (and processes) run differently blocked kernels; the vectors have unit norm, so this
    # absolute tolerance is a relative one, ~150x the batch-versus-single differences measured in test_model.
    for uid in a:
        np.testing.assert_allclose(a[uid], b[uid], atol=1e-5)
    idx = IndexDir.open(sharded)
    try:
        assert idx.vector_index("image").ntotal == len(a)
        with idx.store.session() as s:
            assert not s.scalars(select(Image.id).where(Image.status == PENDING)).all()
            assert len(s.scalars(select(Image.id).where(Image.status == EMBEDDED)).all()) == len(a)
    finally:
        idx.close()


def test_shard_errors(pacs_archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["index", "build", str(pacs_archive), "--model", "tiny", "--out", str(tmp_path / "x")]
    for args, message in ((["--shard", "3/2"], "between 1 and N"), (["--shard", "two"], "write K/N"),
                          (["--shard", "1/2"], "--catalogue-only"),
                          (["--shard", "1/2", "--catalogue-only"], "two steps")):
        assert cli.main(base + args) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
