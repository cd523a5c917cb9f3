"""The demo's tables: on stdout, data text printed literally, identifiers and CIs whole at 80 columns."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from index.demo.render import print_demo_tables

FINGERPRINT = "f" * 64
UID = "1.2.826.0.1.3680043.8.498.36934467667754585998165715147448999317"


def _result() -> SimpleNamespace:
    metrics = {"R@1": 0.1234, "R@5": 0.4567, "R@10": 0.789, "mean_rank": 12.3, "ci95": {"R@10": [0.6543, 0.8761]}}
    doc = {
        "out_dir": "demo-out", "timings_s": {"archive": 1.0, "train": 2.0}, "reused": {"archive": True},
        "split": {"splits": {"train": {"patients": 8, "studies": 10, "images": 19}}},
        "archive": {"studies": 12, "images": 23, "patients": 10, "broken_files": ["a", "b"]},
        "index": {"totals": {"images": 23, "studies": 12, "sections": 30, "failed": 2}},
        "training": {"steps": 10, "epochs": 2, "seconds": 3.5},
        "model_dir": "demo-out/run/model", "model_fingerprint": FINGERPRINT,
        "broken_files": {"recorded": 2, "mixed_in": 2, "report_objects": [], "not_recorded": []},
        "failures": [{"path": f"/archive/[red]PATIENT/{UID}.dcm", "stage": "decode",
                      "reason": "not a DICOM file [/ADDENDUM]"}],
        "queries": [{"kind": "text→image", "query": "effusion [/b]", "query_image": False, "relevant": 1,
                     "filters": ["view=PA"], "query_truth": None,
                     "hits": [{"rank": 1, "score": 0.5, "view": "PA", "truth": "[bold]effusion", "relevant": True,
                               "section": "impression", "text": "Effusion [/ADDENDUM] [red]left"}]}],
        "retrieval": {"protocol": "full", "studies": 3, "images": 5, "unique_texts": 3,
                      "image_level": {"dedup": {"image_to_text": metrics}}, "study_level": {}},
        "gallery": "demo-out/gallery.html", "serve_command": "cxr-search serve demo-out/index",
    }
    return SimpleNamespace(to_dict=lambda: doc)


def _column(out: str, title: str, index: int) -> str:
    """The text of column ``index`` of the table titled ``title``, its folded lines joined."""
    table = out.split(title, 1)[1]
    cells = []
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("┡")) + 1  # below the header
    for line in lines[start:]:
        if not line.startswith("│"):
            break
        cells.append(line.split("│")[index + 1].strip())
    return "".join(cells)


def test_demo_tables_print_data_literally_and_whole(capsys: pytest.CaptureFixture) -> None:
    print_demo_tables(_result())
    out, err = capsys.readouterr()
    assert err == ""
    assert max(len(line) for line in out.splitlines()) <= 80
    assert _column(out, "recorded as failures", 0) == f"/archive/[red]PATIENT/{UID}.dcm"  # folded, not cut
    assert _column(out, "recorded as failures", 2) == "not a DICOM file [/ADDENDUM]"
    assert "'effusion [/b]'" in out and "[bold]effusion" in out
    assert _column(out, "relevant)", 4) == "[impression] Effusion [/ADDENDUM][red]left"
    assert "0.654–0.876" in out and FINGERPRINT[:12] in out


def test_demo_tables_end_with_the_serve_command(capsys: pytest.CaptureFixture) -> None:
    print_demo_tables(_result())
    out, _ = capsys.readouterr()
    assert out.rstrip("\n").splitlines()[-1] == "cxr-search serve demo-out/index"


def test_serve_command_names_the_demo_index_quoted() -> None:
    from pathlib import Path

    from index.demo.run import serve_command

    assert serve_command(Path("demo-out")) == "cxr-search serve demo-out/index"
    assert serve_command(Path("/tmp/my demo")) == "cxr-search serve '/tmp/my demo/index'"
