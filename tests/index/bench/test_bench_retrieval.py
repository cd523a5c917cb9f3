"""Retrieval benchmark: metric helpers vs naive loops, engine ranks vs the full matrix, the reference
protocol's text selection on OpenI XML fixtures, and both protocols end to end on a synthetic archive."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest

import cli
from cxr_search.datasets import prepare, write_manifest
from cxr_search.evaluation.retrieval_metrics import bootstrap_recall, dedup_exact, positive_ranks, ranks_from_scores
from cxr_search.evaluation.retrieval_protocol import evaluated_ids, select_studies
from cxr_search.synth import synthesize
from index.bench.retrieval import engine_ranks, evaluate, run_retrieval
from tests.helpers.openi_files import OpenIImage, OpenIStudy, write_openi, write_views_csv


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def naive_rank(scores: List[float], positives: set) -> int:
    best = max(scores[j] for j in positives)
    return 1 + sum(1 for j, s in enumerate(scores) if j not in positives and s >= best - 1e-6)


# ------------------------------------------------------------------------------------------ metrics
def test_dedup_exact_keeps_first_appearance_and_exact_strings() -> None:
    texts = ["b", "a", "b", "A", "a ", "a"]
    unique, index = dedup_exact(texts)
    assert unique == ["b", "a", "A", "a "]  # case and whitespace differences stay distinct
    assert [unique[i] for i in index] == texts


def test_ranks_from_engine_order_are_pessimistic_whatever_the_tie_order() -> None:
    scores = np.array([[0.9, 0.5, 0.5, 0.5, 0.1]], dtype=np.float32)
    for order in ([0, 1, 2, 3, 4], [0, 3, 2, 1, 4]):  # the positive (id 2) tied with ids 1 and 3
        ids = np.array([order])
        assert ranks_from_scores(scores, ids, [{2}])[0] == 4
    with pytest.raises(ValueError, match="none of its positives"):
        ranks_from_scores(scores, np.array([[0, 1, 2, 3, 4]]), [{7}])


def test_bootstrap_is_deterministic_and_equals_a_naive_resampling_loop() -> None:
    ranks = np.random.default_rng(3).integers(1, 30, size=57)
    a = bootstrap_recall(ranks, (1, 5, 10), resamples=250, seed=7, chunk=40)
    assert a == bootstrap_recall(ranks, (1, 5, 10), resamples=250, seed=7, chunk=40)
    assert a != bootstrap_recall(ranks, (1, 5, 10), resamples=250, seed=8, chunk=40)
    # Naive: the same draws one resample at a time.
    rng = np.random.default_rng(7)
    draws = np.concatenate([rng.integers(0, len(ranks), size=(n, len(ranks))) for n in (40,) * 6 + (10,)])
    r10 = [np.mean([ranks[i] <= 10 for i in row]) for row in draws]
    mean_rank = [np.mean([ranks[i] for i in row]) for row in draws]
    assert a["R@10"] == pytest.approx(list(np.percentile(r10, [2.5, 97.5])))
    assert a["mean_rank"] == pytest.approx(list(np.percentile(mean_rank, [2.5, 97.5])))
    point = float(np.mean(ranks <= 10))
    assert a["R@10"][0] <= point <= a["R@10"][1]


# ------------------------------------------------------------------------------------------ engine
def test_engine_ranks_equal_the_full_similarity_matrix_and_a_naive_loop() -> None:
    rng = np.random.default_rng(0)
    q = unit(rng.normal(size=(300, 16)))
    c = unit(rng.normal(size=(120, 16)))
    c[7] = c[3]  # an exact tie between candidates
    positives = [set(rng.choice(120, size=1 + i % 3, replace=False).tolist()) for i in range(300)]
    positives[0] = {3}
    fast = engine_ranks(q, c, positives)
    np.testing.assert_array_equal(fast, positive_ranks(q, c, positives))
    sims = q.astype(np.float64) @ c.T.astype(np.float64)
    np.testing.assert_array_equal(fast[:40], [naive_rank(list(sims[i]), positives[i]) for i in range(40)])
    assert fast[0] >= 2  # the tied twin of the positive ranks above it


# ------------------------------------------------------------------------------------------ fake model
class FakeModel:
    """Embeddings from lookup tables: image path -> vector, text -> vector."""

    def __init__(self, images: Dict[str, np.ndarray], texts: Dict[str, np.ndarray]) -> None:
        self.images, self.texts = images, texts
        self.provenance = {"fingerprint": "fake"}

    def embed_images(self, paths: Sequence[str], **_: object) -> np.ndarray:
        return unit(np.stack([self.images[str(p)] for p in paths]))

    def embed_texts(self, texts: Sequence[str], **_: object) -> np.ndarray:
        return unit(np.stack([self.texts[t] for t in texts]))


def naive_full(studies, model) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Every number of the full protocol from full matrices and Python loops."""
    texts = [s.text for s in studies]
    t = model.embed_texts(texts)
    img_paths = [(si, r.image_path) for si, s in enumerate(studies) for r in s.rows]
    iv = model.embed_images([p for _, p in img_paths])
    owner = [si for si, _ in img_paths]
    sv = unit(np.stack([iv[[i for i, o in enumerate(owner) if o == si]].mean(0) for si in range(len(studies))]))
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for level, vecs, own in (("image_level", iv, owner), ("study_level", sv, list(range(len(studies))))):
        for dedup in (True, False):
            if dedup:
                uniq = list(dict.fromkeys(texts))
                tid = [uniq.index(x) for x in texts]
                tv = np.stack([t[texts.index(u)] for u in uniq])
            else:
                tid, tv = list(range(len(texts))), t
            sims = vecs @ tv.T
            i2t = [naive_rank(list(sims[i]), {tid[own[i]]}) for i in range(len(vecs))]
            t2i = [naive_rank(list(sims[:, j]), {i for i in range(len(vecs)) if tid[own[i]] == j}) for j in range(len(tv))]
            key = f"{level}/{'dedup' if dedup else 'no_dedup'}"
            out[key] = {"image_to_text": {"R@1": np.mean(np.array(i2t) <= 1), "R@5": np.mean(np.array(i2t) <= 5),
                                          "mean_rank": np.mean(i2t)},
                        "text_to_image": {"R@1": np.mean(np.array(t2i) <= 1), "R@5": np.mean(np.array(t2i) <= 5),
                                          "mean_rank": np.mean(t2i)}}
    return out


def synthetic_rows(tmp_path: Path, n_studies: int = 12) -> List:
    rows = []
    rng = np.random.default_rng(1)
    for s in range(n_studies):
        text = "normal chest." if s % 4 == 0 else f"finding number {s}."  # studies 0, 4, 8 share a text
        for v, view in enumerate(("PA", "LATERAL")[: 1 + s % 2]):
            rows.append(dict(dataset="mimic-cxr", split="test", patient_id=f"p{s}", study_id=f"s{s}",
                             image_id=f"s{s}_{v}", image_path=str(tmp_path / f"s{s}_{v}.png"), view=view,
                             findings=text))
    images = {r["image_path"]: rng.normal(size=8) for r in rows}
    texts = {t: rng.normal(size=8) for t in sorted({r["findings"] for r in rows})}
    from cxr_search.datasets.manifest import ManifestRow

    return [ManifestRow(**r) for r in rows], FakeModel(images, texts)


def test_full_protocol_equals_naive_matrices_at_both_levels(tmp_path: Path) -> None:
    rows, model = synthetic_rows(tmp_path)
    studies, skipped = select_studies(rows)
    assert skipped == {"studies_without_text": 0} and len(studies) == 12
    result, ranks = evaluate(studies, model, protocol="full", bootstrap=50, seed=0)
    naive = naive_full(studies, model)
    for key, directions in naive.items():
        level, dedup = key.split("/")
        for direction, metrics in directions.items():
            got = result[level][dedup][direction]
            for name, value in metrics.items():
                assert got[name] == pytest.approx(value, abs=1e-6), (key, direction, name)
            assert set(got["ci95"]) == {"R@1", "R@5", "R@10", "mean_rank"}
    assert result["image_level"]["dedup"]["image_to_text"]["n_candidates"] == 10  # 12 texts, 3 identical
    assert result["image_level"]["no_dedup"]["image_to_text"]["n_candidates"] == 12
    assert result["image_level"]["dedup"]["text_to_image"]["n_queries"] == 10
    assert result["images"] == 18 and result["headline"]["image_to_text"]["R@1"] == pytest.approx(
        naive["image_level/dedup"]["image_to_text"]["R@1"], abs=1e-6)
    assert len(ranks["image_to_text"]) == 18 and len(ranks["text_to_image"]) == 10


def test_duplicate_texts_rank_above_the_positive_only_without_dedup(tmp_path: Path) -> None:
    rows, _ = synthetic_rows(tmp_path)
    # A perfect model: every image is its study's text vector.
    texts = {t: np.eye(16)[i] for i, t in enumerate(sorted({r.findings for r in rows}))}
    model = FakeModel({r.image_path: texts[r.findings] for r in rows}, texts)
    result, _ = evaluate(select_studies(rows)[0], model, protocol="full", bootstrap=0)
    assert result["image_level"]["dedup"]["image_to_text"]["R@1"] == 1.0
    assert result["image_level"]["dedup"]["text_to_image"]["R@1"] == 1.0
    # Without de-duplication the three "normal chest." studies tie: two of them rank above the own one.
    no = result["image_level"]["no_dedup"]["image_to_text"]
    normal_images = sum(1 for r in rows if r.findings == "normal chest.")
    assert no["R@1"] == pytest.approx((18 - normal_images) / 18)
    assert "ci95" not in no


# ------------------------------------------------------------------------------------------ OpenI
OPENI_REPORTS = [
    # uid, findings, impression, images (parentImage order); no view information (no DICOM, no table)
    OpenIStudy("CXR1", "The heart is normal in size. The lungs are clear.", "Normal chest x-XXXX.",
               [OpenIImage("CXR1_1_IM-0001-4001"), OpenIImage("CXR1_1_IM-0001-3001")]),  # findings longer; two images
    OpenIStudy("CXR2", "Clear lungs.", "z short", [OpenIImage("CXR2_IM-0652-1001")]),  # longer, though max() differs
    OpenIStudy("CXR3", "a", "No acute cardiopulmonary abnormality.", [OpenIImage("CXR3_IM-1384-1001")]),
    OpenIStudy("CXR4", None, "No acute cardiopulmonary abnormality.",
               [OpenIImage("CXR4_IM-2050-1001"), OpenIImage("CXR4_IM-2050-2001")]),
    OpenIStudy("CXR5", "Heart size normal.", None, [OpenIImage("CXR5_IM-2117-1001")]),  # findings only
    OpenIStudy("CXR6", "equal", "EQUAL", [OpenIImage("CXR6_IM-0001-1001")]),  # a tie in length goes to findings
    OpenIStudy("CXR7", None, None, [OpenIImage("CXR7_IM-0001-1001")]),  # no text: not evaluated
    OpenIStudy("CXR8", "Findings without images.", "Impression.", []),  # no image: not evaluated
]


@pytest.fixture()
def openi_rows(tmp_path: Path):
    write_openi(tmp_path / "openi", OPENI_REPORTS)
    return prepare("openi", tmp_path / "openi").rows


def test_openi_text_selection_and_dedup_follow_the_reference(openi_rows) -> None:
    studies, skipped = select_studies(openi_rows)
    assert [s.study_id for s in studies] == ["CXR1", "CXR2", "CXR3", "CXR4", "CXR5", "CXR6"]
    assert [s.text for s in studies] == [
        "The heart is normal in size. The lungs are clear.",  # longer findings
        "Clear lungs.",  # longer by characters, though max() of the strings would pick "z short"
        "No acute cardiopulmonary abnormality.",  # longer impression
        "No acute cardiopulmonary abnormality.",  # the only section
        "Heart size normal.",
        "equal",  # equal length: findings
    ]
    ids = evaluated_ids(studies, "cxr-clip")
    # The first image of each study row in manifest order (OpenI rows are ordered by image id).
    assert [r["image_id"] for r in ids] == ["CXR1_1_IM-0001-3001", "CXR2_IM-0652-1001", "CXR3_IM-1384-1001",
                                            "CXR4_IM-2050-1001", "CXR5_IM-2117-1001", "CXR6_IM-0001-1001"]
    assert ids[2]["text_sha256"] == ids[3]["text_sha256"]
    unique, _ = dedup_exact([s.text for s in studies])
    assert len(unique) == 5  # CXR3 and CXR4 share one candidate


def test_cxr_clip_protocol_on_openi_ranks_against_the_deduplicated_pool(openi_rows) -> None:
    studies, _ = select_studies(openi_rows)
    basis = {t: np.eye(8)[i] for i, t in enumerate(dict.fromkeys(s.text for s in studies))}
    images = {}
    for s in studies:
        for k, row in enumerate(s.rows):
            # The first image matches its text; any later image points elsewhere (it must not be used).
            images[row.image_path] = basis[s.text] if k == 0 else basis["Heart size normal."]
    images[studies[1].rows[0].image_path] = basis["equal"] + 0.5 * basis["Clear lungs."]  # CXR2: rank 2
    model = FakeModel(images, basis)
    result, ranks = evaluate(studies, model, protocol="cxr-clip")
    m = result["image_to_text"]
    assert (m["n_queries"], m["n_candidates"]) == (6, 5)
    np.testing.assert_array_equal(ranks["image_to_text"], [1, 2, 1, 1, 1, 1])  # CXR4 finds the shared string
    assert m["R@1"] == pytest.approx(5 / 6) and m["mean_rank"] == pytest.approx(7 / 6)
    assert set(result) >= {"headline", "image_to_text"} and "text_to_image" not in result


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-retrieval")
    synthesize(root / "archive", studies=16, seed=5, layout="mimic", image_size=64)
    rows = prepare("mimic-cxr", root / "archive").rows
    for r in rows:
        r.split = "test"
    write_manifest(rows, root / "manifest.csv")
    return root / "manifest.csv"


def run_cli(args: List[str], capsys: pytest.CaptureFixture) -> tuple:
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def without_ids_file(result: dict) -> dict:
    result = json.loads(json.dumps(result))
    result["provenance"]["options"].pop("ids_file", None)
    return result


@pytest.mark.slow
def test_cli_both_protocols_rerun_identically_and_ids_reproduce(synth_manifest: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    base = ["bench", "retrieval", str(synth_manifest), "--model", "tiny", "--json", "--batch-size", "8"]
    outputs = {}
    for protocol in ("cxr-clip", "full"):
        args = base + ["--protocol", protocol, "--bootstrap", "100", "--out", str(tmp_path / protocol)]
        code, first, _ = run_cli(args, capsys)
        assert code == 0
        code, second, _ = run_cli(args, capsys)
        assert code == 0 and first == second
        outputs[protocol] = json.loads(first)
        assert json.loads((tmp_path / protocol / f"retrieval-{protocol}.json").read_text()) == outputs[protocol]
    full = outputs["full"]
    assert full["studies"] == 16 and full["images"] > 16
    for level in ("image_level", "study_level"):
        for dedup in ("dedup", "no_dedup"):
            for direction in ("image_to_text", "text_to_image"):
                m = full[level][dedup][direction]
                assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1 and m["mean_rank"] >= 1
                lo, hi = m["ci95"]["R@10"]
                assert lo <= m["R@10"] <= hi
                opt = m["ties"]["optimistic"]
                assert opt["mean_rank"] <= m["mean_rank"] and opt["R@1"] >= m["R@1"]
    # Without de-duplication a text shared by studies adds ties; it never removes one.
    ties = {d: full["image_level"][d]["image_to_text"]["ties"]["queries_with_tie"] for d in ("dedup", "no_dedup")}
    assert ties["no_dedup"] >= ties["dedup"]
    assert outputs["cxr-clip"]["images"] == 16
    # The id list reproduces the run; a plot is written.
    ids = tmp_path / "full" / "evaluated_ids.csv"
    code, again, _ = run_cli(base + ["--protocol", "full", "--bootstrap", "100", "--ids", str(ids),
                                     "--plot", str(tmp_path / "curves.png")], capsys)
    again = json.loads(again)
    assert code == 0 and without_ids_file(again) == full
    assert again["provenance"]["options"]["ids_file"]["sha256"] == full["evaluated_ids"]["sha256"]
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_provenance_traces_the_numbers(synth_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import hashlib

    from cxr_search import __version__
    from cxr_search.evaluation.provenance import git_state

    code, out, _ = run_cli(["bench", "retrieval", synth_manifest, "-m", "tiny", "--json", "--device", "cpu",
                            "--text-rule", "reference-max", "--out", tmp_path], capsys)
    assert code == 0
    result = json.loads(out)
    prov = result["provenance"]
    assert prov["cxr_search_version"] == __version__ and prov["git_commit"] == git_state()["git_commit"]
    assert prov["model"] == result["model"] and len(prov["model"]["fingerprint"]) == 64
    manifest_bytes = synth_manifest.read_bytes()
    assert prov["manifest"]["sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    from cxr_search.datasets import read_manifest

    assert prov["manifest"]["rows"] == prov["manifest"]["split_rows"] == len(read_manifest(synth_manifest))
    assert prov["split"] == "test"
    assert prov["options"]["protocol"] == "cxr-clip" and prov["options"]["text_rule"] == "reference-max"
    assert prov["options"]["query_image"].startswith("frontal: PA before AP")
    written = (tmp_path / "evaluated_ids.csv").read_bytes()
    assert prov["evaluated_ids"] == {"count": result["images"], "sha256": hashlib.sha256(written).hexdigest()}
    assert result["query_images"]["view_information"] == {"mimic-cxr": True} and result["warnings"] == []


def test_cli_human_output_and_bad_input(synth_manifest: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["bench", "retrieval", str(synth_manifest), "--model", "tiny", "--protocol", "full",
                              "--bootstrap", "20"], capsys)
    assert code == 0 and "R@10" in out and "study" in out and "R@10" not in err  # the table is stdout
    code, _, err = run_cli(["bench", "retrieval", str(synth_manifest), "--model", "tiny", "--protocol", "paper"], capsys)
    assert code == 2 and "unknown protocol" in err and "Traceback" not in err
    code, _, err = run_cli(["bench", "retrieval", str(synth_manifest), "--model", "tiny", "--split", "validate"], capsys)
    assert code == 6 and "splits present: test" in err


def test_run_retrieval_api(synth_manifest: Path) -> None:
    from cxr_search.datasets import read_manifest
    from cxr_search.inference import Embedder
    from cxr_search.model import create_model

    result = run_retrieval(read_manifest(synth_manifest), Embedder(create_model("tiny")), protocol="full", bootstrap=0)
    assert set(result["headline"]) == {"image_to_text", "text_to_image"}
    assert set(result["headline"]["text_to_image"]) == {"R@1", "R@5", "R@10", "mean_rank"}
    assert result["skipped"] == {"studies_without_text": 0}
    assert result["provenance"]["options"]["text_rule"] == "longer"
    assert result["provenance"]["evaluated_ids"]["count"] == result["images"]


# ------------------------------------------------------------------------------------------ option checks
@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model (or running the speed benchmark) fails the test: bad options must stop before it."""
    import index.bench.commands as commands
    import index.bench.speed as speed

    def boom(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(commands, "load_bench_model", boom)
    monkeypatch.setattr(speed, "speed_benchmark", boom)


@pytest.mark.parametrize("extra, says", [
    (["--protocol", "foo"], "unknown protocol 'foo'"),
    (["--text-rule", "max"], "unknown text rule 'max'"),
    (["--split", "testing"], "unknown --split 'testing'"),
    (["--device", "xyz"], "'xyz'"),
    (["--bootstrap", "-1"], "--bootstrap"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_retrieval_options_exit_2_before_the_model_loads(synth_manifest: Path, no_model, extra, says,
                                                             capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["bench", "retrieval", synth_manifest, "-m", "tiny", "--json", *extra], capsys)
    assert code == 2 and out == "" and says in err and "Traceback" not in err and "model was loaded" not in err


def test_bad_options_of_the_other_bench_commands_exit_2(synth_manifest: Path, no_model,
                                                        capsys: pytest.CaptureFixture) -> None:
    m = str(synth_manifest)
    for args, says in [
        (["zeroshot", m, "--task", "vindr", "-m", "tiny", "--split", "val"], "unknown --split 'val'"),
        (["zeroshot", m, "--task", "vindr", "-m", "tiny", "--device", "gpu9"], "'gpu9'"),
        (["overlap", m, m, "--test-split", "foo"], "unknown --test-split 'foo'"),
        (["overlap", m, m, "--by", "pixel"], "unknown --by 'pixel'"),
        (["speed", "--preset", "tiny", "--preset", "no-such-model"], "no-such-model"),
        (["speed", "--precision", "fp8"], "fp8"),
    ]:
        code, out, err = run_cli(["bench", *args, "--json"], capsys)
        assert (code, out) == (2, ""), (args, err)
        assert says in err and "Traceback" not in err and "model was loaded" not in err, (args, err)


def test_every_bench_command_has_an_example_and_help_on_every_option() -> None:
    import typer

    from index.bench.commands import bench_app

    group = typer.main.get_command(bench_app)
    assert set(group.commands) == {"retrieval", "zeroshot", "overlap", "speed"}
    for name, command in group.commands.items():
        assert "Example: cxr-search bench " + name in (command.help or ""), name
        for param in command.params:
            assert getattr(param, "help", None), (name, param.name)
        assert any("--json" in param.opts for param in command.params), name


# ------------------------------------------------------------------------------------------ the reference, naively
REF_STUDIES = [
    # The first image by id is a lateral; max() picks "z short", the longer rule "Clear lungs.".
    OpenIStudy("CXR1", "Clear lungs.", "z short",
               [OpenIImage("CXR1_1_IM-0001-3001", "LL"), OpenIImage("CXR1_1_IM-0001-4001", "PA")]),
    OpenIStudy("CXR2", "No acute disease.", "Heart normal.",
               [OpenIImage("CXR2_IM-0652-1001", "PA"), OpenIImage("CXR2_IM-0652-2001", "LATERAL")]),
    # A tie: another string whose embedding is identical (the tokenizer lower-cases).
    OpenIStudy("CXR3", "no acute disease.", "Heart normal.", [OpenIImage("CXR3_IM-1384-1001", "AP")]),
    # A duplicate: the same string as CXR2's text, one candidate for both; PA before AP.
    OpenIStudy("CXR4", "No acute disease.", "Apple.",
               [OpenIImage("CXR4_IM-2050-1001", "AP"), OpenIImage("CXR4_IM-2050-2001", "PA")]),
    OpenIStudy("CXR5", None, "Effusion on the left.", [OpenIImage("CXR5_IM-2117-1001", "PA")]),
    OpenIStudy("CXR6", "Zebra pattern.", "apple.", [OpenIImage("CXR6_IM-0001-1001", "PA")]),  # "apple." > "Zebra"
    OpenIStudy("CXR7", "Lateral only.", "Nothing frontal.", [OpenIImage("CXR7_IM-0001-2001", "LATERAL")]),
    OpenIStudy("CXR8", "Mild cardiomegaly.", "Stable.", [OpenIImage("CXR8_IM-0003-1001", "PA")]),
    OpenIStudy("CXR9", "Right lower lobe opacity.", "Pneumonia.", [OpenIImage("CXR9_IM-0004-1001", "AP")]),
    OpenIStudy("CXR10", "Pacemaker in place.", "Device.", [OpenIImage("CXR10_IM-0005-1001", "PA")]),
    OpenIStudy("CXR11", "Small left effusion.", "Effusion.", [OpenIImage("CXR11_IM-0006-1001", "PA")]),
    OpenIStudy("CXR12", "Hyperinflated lungs.", "Emphysema.", [OpenIImage("CXR12_IM-0007-1001", "PA")]),
    OpenIStudy("CXR13", "Normal heart.", "Normal study.", [OpenIImage("CXR13_IM-0008-1001", "PA")]),
    OpenIStudy("CXR14", "Clear lungs.", "z short", [OpenIImage("CXR14_IM-0009-1001", "PA")]),  # CXR1's text again
]


@pytest.fixture(scope="module")
def ref_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openi-ref")
    write_openi(root / "openi", REF_STUDIES, dicom_dir=root / "dicom", seed=3)
    views = write_views_csv(root / "views.csv", REF_STUDIES, style="png")
    for name, options in (("dicom", {"dicom": str(root / "dicom")}), ("views", {"views": str(views)}),
                          ("none", {})):
        write_manifest(prepare("openi", root / "openi", **options).rows, root / f"{name}.csv")
    return root


def naive_reference(root: Path, studies: Sequence[OpenIStudy]) -> Dict[str, object]:
    """The reference's rules spelt out: literal max() of the two strings, one frontal image per report
    (PA before AP, then by id), texts de-duplicated in order of first occurrence, the full similarity
    matrix; ranks with ties against the model, with ties for it, and as numpy's argsort leaves them."""
    from cxr_search import load_model
    from cxr_search.inference import Embedder

    queries, texts = [], []
    for study in studies:
        text = max(study.findings or "", study.impression or "")
        frontal = [im for im in study.images if im.view in ("PA", "AP")]
        if text.strip() and frontal:
            queries.append(min(frontal, key=lambda im: (im.view != "PA", im.png_id)).png_id)
            texts.append(text)
    unique: List[str] = []
    label = []
    for text in texts:
        if text not in unique:
            unique.append(text)
        label.append(unique.index(text))
    embedder = Embedder(load_model("tiny"), device="cpu")
    image_vecs = embedder.embed_images([str(root / "openi" / "png" / f"{q}.png") for q in queries]).astype(np.float64)
    text_vecs = embedder.embed_texts(unique).astype(np.float64)
    sims = image_vecs @ text_vecs.T  # [Q, U]
    pess, opt, argsort_rank = [], [], []
    for i, row in enumerate(sims):
        best = row[label[i]]
        others = [row[j] for j in range(len(unique)) if j != label[i]]
        pess.append(1 + sum(s >= best - 1e-6 for s in others))
        opt.append(1 + sum(s > best + 1e-6 for s in others))
        argsort_rank.append(len(unique) - int(np.argwhere(row.argsort() == label[i]).ravel()[0]))

    def metrics(ranks):
        r = np.array(ranks)
        return {"R@1": np.mean(r <= 1), "R@5": np.mean(r <= 5), "R@10": np.mean(r <= 10), "mean_rank": r.mean()}

    return {"queries": queries, "candidates": len(unique), "pessimistic": metrics(pess), "optimistic": metrics(opt),
            "ties": sum(p != o for p, o in zip(pess, opt, strict=True)), "ranks": (pess, opt, argsort_rank)}


def test_cxr_clip_reference_max_equals_the_naive_reference(ref_release: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    naive = naive_reference(ref_release, REF_STUDIES)
    pess, opt, argsort_rank = naive["ranks"]
    assert all(o <= a <= p for p, o, a in zip(pess, opt, argsort_rank, strict=True))  # argsort lies between
    assert naive["ties"] >= 2 and naive["candidates"] < len(naive["queries"])  # the fixture has ties and duplicates
    code, out, err = run_cli(["bench", "retrieval", ref_release / "dicom.csv", "-m", "tiny", "--device", "cpu",
                              "--protocol", "cxr-clip", "--text-rule", "reference-max", "--json",
                              "--out", tmp_path], capsys)
    assert code == 0, err
    result = json.loads(out)
    m = result["image_to_text"]
    assert (m["n_queries"], m["n_candidates"]) == (len(naive["queries"]), naive["candidates"])
    for name, value in naive["pessimistic"].items():
        assert m[name] == pytest.approx(value, abs=1e-6), name
    assert m["ties"]["queries_with_tie"] == naive["ties"]
    for name, value in naive["optimistic"].items():
        assert m["ties"]["optimistic"][name] == pytest.approx(value, abs=1e-6), name
    ids = (tmp_path / "evaluated_ids.csv").read_text().splitlines()[1:]
    assert [line.split(",")[2] for line in ids] == naive["queries"]
    assert result["skipped"] == {"studies_without_text": 0, "studies_without_frontal": 1}
    assert result["query_images"]["view_information"] == {"openi": True} and result["warnings"] == []
    assert "warning" not in err
    # The default rule (the longer text) gives another pool: CXR1 and CXR14 are evaluated on "Clear lungs.".
    code, out, _ = run_cli(["bench", "retrieval", ref_release / "dicom.csv", "-m", "tiny", "--device", "cpu",
                            "--json"], capsys)
    longer = json.loads(out)
    assert code == 0 and longer["provenance"]["options"]["text_rule"] == "longer"
    assert longer["evaluated_ids"]["sha256"] != result["evaluated_ids"]["sha256"]


def test_views_table_queries_the_same_images_and_no_views_warns(ref_release: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    written = {}
    for name in ("dicom", "views", "none"):
        code, out, err = run_cli(["bench", "retrieval", ref_release / f"{name}.csv", "-m", "tiny", "--device", "cpu",
                                  "--json", "--out", tmp_path / name], capsys)
        assert code == 0, err
        written[name] = (json.loads(out), (tmp_path / name / "evaluated_ids.csv").read_text(), err)
    assert written["views"][1] == written["dicom"][1]  # -O views= picks the same query images as -O dicom=
    assert written["views"][0]["image_to_text"] == written["dicom"][0]["image_to_text"]
    result, ids, err = written["none"]
    assert "warning: openi: the manifest has no view information" in " ".join(err.split())
    assert result["query_images"]["view_information"] == {"openi": False}
    assert result["warnings"] and result["skipped"]["studies_without_frontal"] == 0
    assert "CXR1,CXR1_1_IM-0001-3001" in ids  # without views the first image by id: the lateral
    assert "CXR1,CXR1_1_IM-0001-4001" in written["dicom"][1]
