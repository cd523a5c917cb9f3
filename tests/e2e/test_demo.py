"""End to end through the CLI: synth -> train -> index build -> search text / image -> bench -> verify,
and ``cxr-search demo --json`` on a small archive, then again from its cache.

Every step goes through ``cli.main`` in this process (one import of torch for the whole file) and is
checked on its real output: exit codes, index totals against the generator's counts, the broken
files as recorded failures, hits that exist on disk and exclude the query's patient, bench fields.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

import cli

STUDIES = 40


def run(capsys: pytest.CaptureFixture, *argv: str) -> Tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> Dict[str, Any]:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """synth -> prepare (patient split) -> cache -> train (a few steps) -> index build, via the CLI."""
    capsys = _ModuleCapture()
    work = tmp_path_factory.mktemp("e2e")
    archive = work / "archive"
    synth = capsys.json("data", "synth", archive, "--studies", STUDIES, "--seed", "3", "--layout", "pacs",
                        "--broken", "4", "--image-size", "96")
    assert synth["studies"] == STUDIES and synth["broken"] == 4
    # The RIS export and the ground truth sit beside the DICOM tree, as in a hospital.
    reports = work / "reports.csv"
    shutil.move(str(archive / "reports.csv"), reports)
    shutil.move(str(archive / "ground_truth.csv"), work / "ground_truth.csv")
    manifest = work / "manifest.csv"
    prep = capsys.json("data", "prepare", "pacs", archive, "--out", manifest, "-O", f"reports-csv={reports}",
                       "-O", "split=seeded")
    assert prep["splits"]["test"]["studies"] > 0 and prep["splits"]["train"]["studies"] > 0
    cache = capsys.json("data", "cache", manifest, "--out", work / "cache", "--shorter-side", "72", "--workers", "1")
    assert len(cache["failed"]) == 1  # the truncated DICOM (broken kind 0) cannot be decoded
    trained = capsys.json("train", "tiny-synth", "--data", cache["manifest"], "--out", work / "run",
                          "--set", "optim.epochs=2", "--set", "optim.batch_size=8", "--set", 'data.val_split=""',
                          "--set", "data.num_workers=0")
    assert trained["stopped"] == "done" and trained["steps"] >= 2
    model = Path(trained["model_dir"])
    built = capsys.json("index", "build", archive, "--reports", reports, "--model", model, "--out", work / "index")
    return {"work": work, "archive": archive, "manifest": manifest, "model": model, "synth": synth, "built": built}


class _ModuleCapture:
    """Runs CLI commands for a module-scoped fixture (pytest's capsys is function-scoped)."""

    def json(self, *argv: Any) -> Dict[str, Any]:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = cli.main([str(a) for a in argv] + ["--json"])
        assert code == 0, f"{argv}: exit {code}"
        return json.loads(buf.getvalue())


def test_index_holds_every_readable_image_and_records_broken_files(pipeline):
    built, synth = pipeline["built"], pipeline["synth"]
    # Every readable radiograph of the generator is indexed, with its study and report sections.
    assert built["totals"]["images"] == synth["images"]
    assert built["totals"]["studies"] == STUDIES
    assert built["totals"]["sections"] >= STUDIES
    # Broken kinds 0, 1, 3: truncated pixel data, a text file, an empty file (kind 2 is a valid SR report).
    assert built["totals"]["failed"] == 3
    reasons = json.dumps(built["catalogue"]["failure_reasons"])
    assert "not DICOM" in reasons


def test_search_text_returns_existing_images(pipeline, capsys):
    res = run_json(capsys, "search", "text", "large right pleural effusion", "--index", pipeline["work"] / "index",
                   "--model", pipeline["model"], "-k", "5")
    hits = res["hits"]
    assert len(hits) == 5
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(h["path"]).is_file() for h in hits)


def test_search_image_excludes_the_query_patient_and_writes_html(pipeline, capsys):
    from cxr_search.datasets import read_manifest

    rows = read_manifest(pipeline["manifest"], split="test")
    query = next(r for r in rows if r.is_frontal)
    same_patient = {r.study_id for r in read_manifest(pipeline["manifest"]) if r.patient_id == query.patient_id}
    html = pipeline["work"] / "hits.html"
    res = run_json(capsys, "search", "image", query.image_path, "--return", "reports", "--index",
                   pipeline["work"] / "index", "--model", pipeline["model"], "-k", "5", "--html", html)
    assert len(res["hits"]) == 5
    assert all(h["section_text"] for h in res["hits"])
    assert not {h["study_uid"] for h in res["hits"]} & same_patient
    page = html.read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") >= 5  # the query and its hits as inline thumbnails
    res = run_json(capsys, "search", "image", query.image_path, "--return", "images", "--index",
                   pipeline["work"] / "index", "--model", pipeline["model"], "-k", "3")
    assert len(res["hits"]) == 3 and not {h["study_uid"] for h in res["hits"]} & same_patient


def test_bench_retrieval_on_the_test_split(pipeline, capsys):
    from cxr_search.datasets import read_manifest

    res = run_json(capsys, "bench", "retrieval", pipeline["manifest"], "--model", pipeline["model"],
                   "--protocol", "full", "--split", "test")
    assert res["protocol"] == "full" and res["split"] == "test"
    for level in ("headline", "study_level_headline"):
        for direction in ("image_to_text", "text_to_image"):
            m = res[level][direction]
            assert 0.0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1.0
            assert m["mean_rank"] >= 1.0
    # Image level: every image of the held-out studies is a query.
    test_images = sum(1 for r in read_manifest(pipeline["manifest"], split="test") if r.findings or r.impression)
    assert res["image_level"]["dedup"]["image_to_text"]["n_queries"] == test_images


def test_verify_is_clean_after_everything(pipeline, capsys):
    # Last in the file: searches and the bench must not have changed the index.
    res = run_json(capsys, "index", "verify", pipeline["work"] / "index", "--model", pipeline["model"])
    assert res["ok"], res["problems"]


def test_demo_json_then_cached_rerun(tmp_path, capsys):
    from index.demo.data import DemoState
    from index.demo.run import DemoOptions, run_demo

    out = tmp_path / "demo"

    def killed(_request):
        raise KeyboardInterrupt  # the demo killed as training starts

    with pytest.raises(KeyboardInterrupt):
        run_demo(out, train_fn=killed, options=DemoOptions(studies=30, epochs=2, progress=False))
    stages = DemoState(out).stages
    assert all(stages[s]["done"] for s in ("synthesize", "manifest", "cache")) and not stages["train"]["done"]
    (out / "archive.partial").mkdir()  # as a run killed while synthesizing leaves it

    argv = ("demo", "--out", out, "--studies", "30", "--epochs", "2", "--no-progress", "--json")
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    first = json.loads(stdout)  # stdout holds the JSON object and nothing else
    assert first["archive"]["studies"] == 30
    split = first["split"]["splits"]
    assert split["test"]["patients"] > 0 and split["train"]["patients"] > 0
    assert first["index"]["totals"]["studies"] == 30  # the index holds held-out patients too
    assert first["broken_files"]["not_recorded"] == [] and first["broken_files"]["recorded"] >= 4
    failed = [f for f in first["failures"] if f["stage"] != "skipped"]
    assert {f["stage"] for f in failed} == {"scan", "decode"}
    # Inputs accounted for without being failures: the generator's SR object when its study has a RIS report.
    assert all(f["reason"].startswith("SR ") for f in first["failures"] if f["stage"] == "skipped")
    kinds = [q["kind"] for q in first["queries"]]
    assert kinds.count("text->image") >= 5 and "image->reports" in kinds and "image->images" in kinds
    assert all(len(q["hits"]) == 8 for q in first["queries"])
    assert first["retrieval"]["protocol"] == "full" and first["retrieval"]["split"] == "test"
    for level in ("headline", "study_level_headline"):
        for direction in ("image_to_text", "text_to_image"):
            m = first["retrieval"][level][direction]
            assert 0.0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1.0
    page = Path(first["gallery"]).read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") >= 8 and "large right pleural effusion" in page
    assert set(first["timings_s"]) >= {"synthesize", "manifest", "cache", "train", "index", "queries", "bench", "total"}
    # Failures as `index failures` lists them: the file named in its reason, no placeholder left.
    assert all("<file>" not in f["reason"] for f in first["failures"])
    assert any(f["path"] in f["reason"] for f in failed)
    # The one command that serves the demo index: the index names its model, so no --model is needed.
    from index.model_ref import resolve_model

    assert first["serve_command"] == f"cxr-search serve {shlex.quote(str(out / 'index'))}"
    assert Path(resolve_model(out / "index", None)) == Path(first["model_dir"]).resolve()
    # The killed run's stages are reused, training runs; the leftover partial archive is not an obstacle.
    assert first["reused"] == {"synthesize": True, "manifest": True, "cache": True, "train": False, "index": False}
    assert not (out / "archive.partial").exists()

    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    second = json.loads(stdout)
    assert all(second["reused"][s] for s in ("synthesize", "manifest", "cache", "train", "index"))
    assert second["model_fingerprint"] == first["model_fingerprint"]
    assert second["retrieval"]["headline"] == first["retrieval"]["headline"]

    # A moved demo folder: the manifests and the index (absolute paths) are rebuilt, the model is reused.
    moved = tmp_path / "moved"
    shutil.move(str(out), moved)
    code, stdout, err = run(capsys, "demo", "--out", moved, *argv[3:])
    assert code == 0, err
    third = json.loads(stdout)
    assert third["reused"] == {"synthesize": True, "manifest": False, "cache": False, "train": True, "index": False}
    assert third["model_fingerprint"] == first["model_fingerprint"]
    assert all(h["abs_path"].startswith(str(moved)) for q in third["queries"] for h in q["hits"])


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("not the demo's")
    code, stdout, err = run(capsys, "demo", "--out", tmp_path, "--studies", "30", "--json")
    assert code == 5 and stdout == "" and "did not write" in err
    assert (tmp_path / "mine.txt").read_text() == "not the demo's"


def test_stages_reuse_resume_and_rebuild(tmp_path):
    """A finished stage is reused; an unfinished one with the same key resumes on its outputs; a new key wipes them."""
    from index.demo.data import DemoState
    from index.demo.run import DemoResult, _Stages

    out = tmp_path / "manifest.csv"
    seen = []

    def stage(write: str, fail: bool = False):
        def fn():
            seen.append(out.read_text() if out.exists() else None)  # what the stage found when it started
            out.write_text(write)
            if fail:
                raise KeyboardInterrupt
            return {"wrote": write}
        return fn

    def stages():
        return _Stages(tmp_path, DemoState.open(tmp_path), DemoResult(str(tmp_path), {}), lambda _msg: None)

    assert stages().run("manifest", {"v": 1}, ("manifest.csv",), stage("one")) == {"wrote": "one"}
    s = stages()
    assert s.run("manifest", {"v": 1}, ("manifest.csv",), stage("never")) == {"wrote": "one"}
    assert s.result.reused["manifest"] and seen == [None]
    with pytest.raises(KeyboardInterrupt):  # new settings: the old output is wiped, then the run is killed
        stages().run("manifest", {"v": 2}, ("manifest.csv",), stage("two-partial", fail=True))
    assert seen[-1] is None
    assert stages().run("manifest", {"v": 2}, ("manifest.csv",), stage("two")) == {"wrote": "two"}
    assert seen[-1] == "two-partial"  # same settings: the killed run's output is there to resume from
    # An output deleted behind the demo's back is rebuilt.
    out.unlink()
    assert stages().run("manifest", {"v": 2}, ("manifest.csv",), stage("again"), valid=out.exists) == {"wrote": "again"}
