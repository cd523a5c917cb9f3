"""``cxr-search bench speed``: the report's fields and sanity of its numbers (timings are never asserted)."""

from __future__ import annotations

import json

import numpy as np

import cli
from index.bench.speed import SPEED_FLAGS, cpu_flags, search_benchmark


def run_cli(capsys, *argv: str):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_has_every_field_with_positive_numbers(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "bench", "speed", "--preset", "tiny", "--images", "2", "--texts", "2",
                           "--batch-size", "2", "--index-size", "2000", "--queries", "10", "--text-queries", "2",
                           "--precision", "fp32", "--json", "--out", str(tmp_path / "speed.json"))
    assert code == 0
    result = json.loads(out)
    assert json.loads((tmp_path / "speed.json").read_text()) == result
    assert result["precision"] == {"requested": "fp32", "used": "fp32"}
    (enc,) = result["encoders"]
    assert enc["preset"] == "tiny" and enc["embed_dim"] == 64 and enc["n_images"] == 2
    assert enc["images_per_s"] > 0 and enc["texts_per_s"] > 0
    tq = result["text_query"]["tiny"]
    for precision in ("int8", "fp32"):
        assert 0 < tq[precision]["p50_ms"] <= tq[precision]["p99_ms"]
    assert 0.99 < tq["min_cosine_int8_vs_fp32"] <= 1.0 + 1e-6
    (search,) = result["search"]
    assert (search["n"], search["dim"], search["queries"], search["k"]) == (2000, 64, 10, 10)
    rows = {r["name"]: r for r in search["rows"]}
    assert rows["exact"]["factory"] == "Flat" and rows["exact"]["recall_at_10"] == 1.0
    assert rows["auto"]["factory"] == "Flat" and rows["auto"]["recall_at_10"] == 1.0  # 2,000 < exact threshold
    assert set(rows) == {"exact", "auto", "ann", "ann + re-rank"}
    for name in ("ann", "ann + re-rank"):
        assert "IVF" in rows[name]["factory"] and 0 < rows[name]["recall_at_10"] <= 1.0
        assert rows[name]["search_params"]["nprobe"] >= 1 and rows[name]["note"]
    for r in search["rows"]:
        assert r["build_s"] >= 0 and 0 < r["p50_ms"] <= r["p99_ms"] and r["bytes_per_vector"] > 0


def test_search_recall_is_measured_against_brute_force():
    result = search_benchmark(500, 16, n_queries=5, seed=1, extra_ann=False)
    assert [r["name"] for r in result["rows"]] == ["exact", "auto"]
    assert all(r["recall_at_10"] == 1.0 for r in result["rows"])
    # The recall's reference is a brute-force search: check it by argsort on the same seeded data.
    from index.ann.reference import clustered_unit_vectors, exact_search

    x = clustered_unit_vectors(500, 16, n_clusters=5, seed=1)
    q = clustered_unit_vectors(5, 16, n_clusters=5, seed=1, stream=1)
    ids = np.arange(500) * 7 + 3
    _, top = exact_search(x, ids, q, 10)
    slow = ids[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]]
    assert all(set(a) == set(b) for a, b in zip(top, slow, strict=False))


def test_table_output_and_user_errors(capsys):
    code, out, _ = run_cli(capsys, "bench", "speed", "--preset", "tiny", "--images", "1", "--texts", "1",
                           "--batch-size", "1", "--index-size", "0", "--text-queries", "0")
    assert code == 0 and "tiny" in out and "images/s" in out
    code, out, err = run_cli(capsys, "bench", "speed", "--preset", "tiny", "--precision", "fp8", "--json")
    assert code == 2 and out == "" and "fp8" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "bench", "speed", "--preset", "no-such-model", "--json")
    assert code == 2 and "no-such-model" in err and "Traceback" not in err


def test_cpu_flags_are_the_speed_flags_of_this_machine() -> None:
    flags = cpu_flags()
    assert flags == sorted(set(flags)) and set(flags) <= SPEED_FLAGS
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            listed = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        assert flags == []
        return
    assert set(flags) == listed & SPEED_FLAGS
