"""``--executor ray``: a build on a local Ray cluster (one node, then two simulated nodes, then into PostgreSQL)
equals a local build; a dead embedding actor is replaced; a killed driver resumes with no duplicate.

One Ray session serves the module (started on first use, shut down at the end); the two-node test
replaces it with a ``ray.cluster_utils.Cluster`` for its own duration.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
from sqlalchemy import func, select

import cli
from index.build import BuildOptions, build
from index.failures import list_failures
from index.index_dir import IndexDir
from index.ray_executor import KILL_ONCE_ENV, RayCluster, RayOptions, cpu_threads
from index.store import Image, ImageVector, Report, Section, SectionVector, Study
from index.verify import verify
from tests.helpers.system import need_module

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parents[2]
QUIET = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
COSINE_MIN = 0.9999
KILL_WAIT_S = 240.0


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def kill_marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file whose presence makes the next embedding call end its actor (see ``KILL_ONCE_ENV``)."""
    return tmp_path_factory.mktemp("ray-kill") / "kill-once"


@pytest.fixture(scope="module")
def _ray_module(kill_marker: Path):
    """Shut down whatever Ray session the module's tests left, at the end of the module."""
    need_module("ray", "ray")
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def local_ray(_ray_module, kill_marker: Path):
    """A local single-node Ray session with 2 CPUs (started once, reused by the following tests)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, runtime_env={"env_vars": {KILL_ONCE_ENV: str(kill_marker)}}, **QUIET)
    return ray


@pytest.fixture(scope="module")
def reference(pacs_archive: Path, tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Dict:
    """The local executor's build of the synthetic archive (the one every Ray build must equal)."""
    out = tmp_path_factory.mktemp("ray-ref") / "index"
    summary = build(pacs_archive, out, tiny_model, _opts(pacs_archive))
    return {"summary": summary, "snapshot": _snapshot(out, None, pacs_archive)}


def _opts(archive: Path, **kw) -> BuildOptions:
    return BuildOptions(reports_csv=archive / "reports.csv", batch_size=4, **kw)


# ---------------------------------------------------------------------------------------------- comparison
def _snapshot(index_dir: Path, db_url: Optional[str], archive: Path) -> Dict:
    """Everything a build decides, keyed by what is the same in two stores: UIDs, archive paths, texts."""
    idx = IndexDir.open(index_dir, db_url=db_url)
    try:
        with idx.store.session() as s:
            statuses = dict(s.execute(select(Image.sop_uid, Image.status)).all())
            image_vectors = {uid: np.frombuffer(v, dtype=np.float32) for uid, v in s.execute(
                select(Image.sop_uid, ImageVector.vector).join(ImageVector, ImageVector.image_id == Image.id)).all()}
            section_vectors = {(study, kind, text): np.frombuffer(v, dtype=np.float32) for study, kind, text, v in
                               s.execute(select(Study.study_uid, Section.kind, Section.text, SectionVector.vector)
                                         .join(Section, Section.study_id == Study.id)
                                         .join(SectionVector, SectionVector.section_id == Section.id)).all()}
            duplicates = {
                "image_vectors": s.scalar(select(func.count()).select_from(ImageVector))
                - s.scalar(select(func.count(func.distinct(ImageVector.image_id)))),
                "section_vectors": s.scalar(select(func.count()).select_from(SectionVector))
                - s.scalar(select(func.count(func.distinct(SectionVector.section_id)))),
                "reports": s.scalar(select(func.count()).select_from(Report))
                - s.scalar(select(func.count(func.distinct(Report.study_id)))),
            }
        failures = sorted((str(Path(f["path"]).relative_to(archive)), f["stage"], f["stored_reason"])
                          for f in list_failures(idx.store, idx.secret))
        counts = idx.store.counts()
    finally:
        idx.close()
    return {"statuses": statuses, "image_vectors": image_vectors, "section_vectors": section_vectors,
            "failures": failures, "counts": counts, "duplicates": duplicates}


def _assert_equal_builds(got: Dict, want: Dict) -> None:
    assert got["statuses"] == want["statuses"]
    assert got["failures"] == want["failures"]
    assert got["counts"] == want["counts"]
    assert got["duplicates"] == {"image_vectors": 0, "section_vectors": 0, "reports": 0}
    for kind in ("image_vectors", "section_vectors"):
        assert got[kind].keys() == want[kind].keys() and got[kind], kind
        a = np.stack([got[kind][k] for k in sorted(want[kind])]).astype(np.float64)
        b = np.stack([want[kind][k] for k in sorted(want[kind])]).astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() >= COSINE_MIN, (kind, float(cos.min()))


def _check(out: Path, db_url: Optional[str], archive: Path, reference: Dict) -> None:
    _assert_equal_builds(_snapshot(out, db_url, archive), reference["snapshot"])
    report = verify(out, db_url=db_url)
    assert report["ok"], report["problems"]


# ---------------------------------------------------------------------------------------------- tests
def test_ray_build_equals_a_local_build(local_ray, pacs_archive: Path, tiny_model, tmp_path: Path,
                                        reference: Dict) -> None:
    out = tmp_path / "index"
    summary = build(pacs_archive, out, tiny_model, _opts(pacs_archive, executor="ray"))
    want = reference["summary"]
    assert summary["executor"] == "ray"
    assert summary["totals"] == want["totals"]
    # the archive holds an undecodable (truncated) DICOM: a decode failure, with the local build's reason
    assert summary["embedding"]["images"]["failed"] == want["embedding"]["images"]["failed"] == 1
    assert summary["embedding"]["images"]["failure_reasons"] == want["embedding"]["images"]["failure_reasons"]
    assert summary["embedding"]["sections"]["embedded"] == want["totals"]["sections"]
    assert local_ray.is_initialized()  # the caller's session is kept, not shut down by the build
    _check(out, None, pacs_archive, reference)
    again = build(pacs_archive, out, tiny_model, _opts(pacs_archive, executor="ray"))  # nothing left to do
    assert again["added"] == {"images": 0, "studies": 0, "sections": 0, "failed": 0}


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_the_build_completes(local_ray, kill_marker: Path, pacs_archive: Path,
                                                            tiny_model, tmp_path: Path, reference: Dict) -> None:
    kill_marker.write_text("kill the first embedding actor call once\n")
    out = tmp_path / "index"
    summary = build(pacs_archive, out, tiny_model, _opts(pacs_archive, executor="ray"))
    assert not kill_marker.exists()  # an actor took it and ended its process
    assert summary["totals"] == reference["summary"]["totals"]
    _check(out, None, pacs_archive, reference)


def _vector_count(index_dir: Path) -> int:
    import sqlite3

    db = next(index_dir.glob("*.sqlite"), None)
    if db is None:
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return int(con.execute("SELECT count(*) FROM image_vectors").fetchone()[0])
    except sqlite3.Error:  # the tables are not created yet, or a writer holds the lock for a moment
        return 0


@pytest.mark.slow
def test_a_killed_driver_resumes_with_the_same_totals_and_no_duplicate(local_ray, pacs_archive: Path, tiny_model,
                                                                       tmp_path: Path, reference: Dict) -> None:
    out = tmp_path / "index"
    address = local_ray.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "cli", "index", "build", str(pacs_archive), "--model", "tiny", "-i", str(out),
            "--reports", str(pacs_archive / "reports.csv"), "--batch-size", "1", "--json",
            "--executor", "ray", "--ray-address", address]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    committed = 0
    try:
        deadline = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < deadline and proc.poll() is None:
            committed = _vector_count(out)
            if committed > 0:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    total = reference["summary"]["totals"]["images"]
    assert proc.returncode == -signal.SIGKILL, err.decode(errors="replace")[-2000:]
    left = _vector_count(out)
    assert 0 < committed <= left < total  # killed mid-build: some vectors committed, not all
    assert not list(out.glob("*.faiss"))  # the FAISS files come at the end of a finished build

    rerun = subprocess.run(argv, cwd=ROOT, capture_output=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr.decode(errors="replace")[-2000:]
    summary = json.loads(rerun.stdout)
    assert summary["totals"] == reference["summary"]["totals"]
    assert summary["embedding"]["images"]["embedded"] == total - left  # exactly what was left
    _check(out, None, pacs_archive, reference)


@pytest.mark.slow
def test_a_ray_build_into_postgresql(local_ray, pacs_archive: Path, tiny_model, tmp_path: Path,
                                     reference: Dict) -> None:
    from tests.helpers.postgres import new_database

    db_url = new_database()
    out = tmp_path / "index"
    summary = build(pacs_archive, out, tiny_model, _opts(pacs_archive, executor="ray", db_url=db_url))
    assert summary["totals"] == reference["summary"]["totals"]
    _check(out, db_url, pacs_archive, reference)


@pytest.mark.slow
def test_a_two_node_cluster_build_equals_a_local_build(_ray_module, pacs_archive: Path, tiny_model, tmp_path: Path,
                                                       reference: Dict) -> None:
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the module's single-node session; the next test that needs it starts it again
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, **QUIET)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        out = tmp_path / "index"
        summary = build(pacs_archive, out, tiny_model, _opts(pacs_archive, executor="ray", ray_workers=2))
        assert summary["totals"] == reference["summary"]["totals"]
        _check(out, None, pacs_archive, reference)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_cluster_starts_and_stops_its_own_session(_ray_module) -> None:
    import ray

    ray.shutdown()
    with RayCluster(RayOptions(num_cpus=1)):
        assert ray.is_initialized()
    assert not ray.is_initialized()  # started here, so shut down here


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("extra", [
    ["--executor", "spark"], ["--executor", "ray", "--shard", "1/2"], ["--ray-address", "auto"],
    ["--num-gpus-per-worker", "1"], ["--executor", "ray", "--num-gpus-per-worker", "-1"],
])
def test_bad_executor_options_exit_2_before_any_model_loads(extra, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    assert cli.main(["index", "build", str(archive), "-m", "tiny", "-i", str(tmp_path / "idx")] + extra) == 2
    assert not (tmp_path / "idx").exists()


def test_without_ray_the_message_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys) -> None:
    from cxr_search.errors import ConfigError
    from index.ray_executor import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as when it is not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(ConfigError, match=r"pip install 'cxr-search\[ray\]'"):
        require_ray()
    with pytest.raises(ConfigError, match=r"pip install 'cxr-search\[ray\]'"):
        build(tmp_path, tmp_path / "idx", None, BuildOptions(executor="ray"))


def test_a_pool_the_cluster_cannot_hold_is_refused(local_ray) -> None:
    from cxr_search.errors import ConfigError

    with RayCluster(RayOptions(workers=2)) as cluster:  # 2 CPUs: two actors leave none for decoding
        with pytest.raises(ConfigError, match="give fewer --workers"):
            cluster.check_room()
    gpus = local_ray.cluster_resources().get("GPU", 0)
    with RayCluster(RayOptions(workers=1, gpus_per_worker=gpus + 1)) as cluster:
        with pytest.raises(ConfigError, match="GPUs"):
            cluster.check_room()
    assert local_ray.is_initialized()


def test_cpu_actors_use_their_share_of_the_cluster_cores() -> None:
    """One actor on a 2-core machine runs the model on both cores (as the local executor does), never more
    threads than one node has, at least one; an explicit count wins."""
    assert cpu_threads(RayOptions(workers=1), [2.0]) == 2
    assert cpu_threads(RayOptions(workers=2), [2.0]) == 1
    assert cpu_threads(RayOptions(workers=2), [1.0, 2.0]) == 2  # 3 cores for 2 actors, capped at the larger node
    assert cpu_threads(RayOptions(workers=1), [8.0, 8.0]) == 8
    assert cpu_threads(RayOptions(workers=32), [8.0, 8.0]) == 1
    assert cpu_threads(RayOptions(workers=1), []) == 1
    assert cpu_threads(RayOptions(workers=1, torch_threads=3), [2.0]) == 3
