"""``index failures``: every input that is not in the index, with its real path and reason; and the counts
by kind and reason in ``index stats`` — on an archive written by the demo's own generator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

import cli
from index.build import BuildOptions, build
from index.demo import data as demo_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def demo_index(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path, List[str]]:
    """(archive, index, broken files relative to the archive): the demo's archive (its generator, its
    number of broken files), indexed with the tiny model as the demo indexes it."""
    from index.demo.run import DemoOptions

    root = tmp_path_factory.mktemp("demo-failures")
    synth = demo_data.synthesize_archive(root, studies=6, seed=0, image_size=64, broken=DemoOptions().broken,
                                         progress=False)
    archive = root / demo_data.ARCHIVE
    build(archive, root / "index", tiny_model, BuildOptions(reports_csv=root / demo_data.RIS_CSV, batch_size=8))
    return archive, root / "index", list(synth["broken_files"])


def _json(capsys, *argv: str) -> Dict[str, Any]:
    rc = cli.main(list(argv) + ["--json"])
    out = capsys.readouterr().out
    assert rc == 0
    return json.loads(out)


def test_failures_lists_the_demo_broken_files_with_reasons(demo_index, capsys) -> None:
    archive, index, broken = demo_index
    listed = _json(capsys, "index", "failures", str(index))
    by_path = {r["path"]: r for r in listed["failures"]}
    assert listed["count"] == len(listed["failures"]) > 0
    for rel in broken:
        row = by_path.get(str(archive / rel))
        assert row is not None, f"{rel} is not listed"
        assert row["reason"] and "<file>" not in row["reason"]
        assert row["kind"] in ("failed", "skipped")
    for row in listed["failures"]:
        assert Path(row["path"]).is_absolute() and row["path"].startswith(str(archive))
        if "<file>" in row["stored_reason"]:  # the scrubbed path is given back, the real one
            assert row["path"] in row["reason"]
    failed = _json(capsys, "index", "failures", "-i", str(index), "--kind", "failed")["failures"]
    assert failed and all(r["kind"] == "failed" for r in failed)
    assert [r["path"] for r in failed] == [r["path"] for r in listed["failures"] if r["kind"] == "failed"]
    needle = failed[0]["reason_kind"]
    matching = _json(capsys, "index", "failures", str(index), "--reason", needle.lower())["failures"]
    assert failed[0]["path"] in {r["path"] for r in matching}
    assert all(needle.lower() in r["reason"].lower() for r in matching)


def test_stats_counts_failures_by_kind_and_reason(demo_index, capsys) -> None:
    _, index, _ = demo_index
    listed = _json(capsys, "index", "failures", str(index))["failures"]
    stats = _json(capsys, "index", "stats", str(index))
    expected: Dict[str, Dict[str, int]] = {}
    for r in listed:
        expected.setdefault(r["kind"], {}).setdefault(r["reason_kind"], 0)
        expected[r["kind"]][r["reason_kind"]] += 1
    assert stats["failures"] == expected
    assert stats["totals"]["failed"] == sum(expected.get("failed", {}).values())
    assert cli.main(["index", "stats", str(index)]) == 0
    labels = _column(capsys.readouterr().out, 0)
    for kind, reasons in expected.items():
        for reason in reasons:
            assert f"{kind}: {reason}".replace(" ", "") in labels  # the stats table shows every reason kind


def _column(out: str, col: int) -> str:
    """The text of one column of a rich table, its wrapped pieces joined back together (without spaces:
    a wrapped line loses the space it was wrapped at)."""
    return "".join(line.split("│")[col + 1].replace(" ", "") for line in out.splitlines() if line.startswith("│"))


def test_failures_table_goes_to_stdout_whole_at_80_columns(demo_index, capsys) -> None:
    _, index, _ = demo_index
    listed = _json(capsys, "index", "failures", str(index))["failures"]
    assert cli.main(["index", "failures", str(index)]) == 0
    captured = capsys.readouterr()
    assert max(len(line) for line in captured.out.splitlines()) <= 80  # captured output is 80 columns wide
    assert "…" not in captured.out  # wrapped, never cut
    files = _column(captured.out, 0)
    for row in listed:
        assert row["path"].replace(" ", "") in files
    assert f"{len(listed)} inputs not indexed" in captured.err  # the summary is a message: stderr


def test_failures_refuses_bad_options(demo_index, tmp_path: Path, capsys) -> None:
    _, index, _ = demo_index
    assert cli.main(["index", "failures", str(index), "--kind", "broken"]) == 2
    assert "failed, skipped, duplicate" in capsys.readouterr().err
    assert cli.main(["index", "failures"]) == 2
    assert cli.main(["index", "failures", str(tmp_path)]) == 7  # not an index folder
