"""Manifest I/O, seeded splits and the ``prepare`` dispatcher of :mod:`cxr_search.datasets`.

The adapters are tested in ``test_datasets_public.py`` (CSV/XML datasets) and ``test_datasets_dicom.py``.
The file writers and order checks shared with those files are in ``tests/helpers/dataset_files.py``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List

import pytest

from cxr_search.datasets import (
    DATASETS,
    MANIFEST_COLUMNS,
    REQUIRED_COLUMNS,
    ManifestRow,
    adapter_options,
    group_studies,
    prepare,
    read_manifest,
    write_manifest,
)
from cxr_search.datasets.splits import gloria_split, holdout_split
from cxr_search.errors import ConfigError, DatasetError
from tests.helpers.dataset_files import write_csv

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def full_row(**kw: Any) -> ManifestRow:
    base = dict(dataset="mimic-cxr", split="train", patient_id="p1", study_id="s1", image_id="i1", image_path="/x/i1.jpg")
    base.update(kw)
    return ManifestRow(**base)


# --------------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------------


def test_manifest_columns_follow_the_spec() -> None:
    assert MANIFEST_COLUMNS[:7] == REQUIRED_COLUMNS
    assert MANIFEST_COLUMNS == (
        "dataset", "split", "patient_id", "study_id", "image_id", "image_path", "view", "sex", "age", "study_date",
        "findings", "impression", "report_text", "labels", "label_vocab", "sop_instance_uid", "series_instance_uid",
        "accession_number",
    )  # fmt: skip


def test_manifest_round_trip(tmp_path: Path) -> None:
    rows = [
        full_row(
            view="PA", sex="F", age=63.0, study_date="2180-05-06",
            findings='Line 1, "quoted"\nline 2 — ünïcode', impression="No acute process.",
            report_text='Line 1, "quoted"\nline 2 — ünïcode',
            labels={"No Finding": 1.0, "Edema": 0.0, "Pleural Effusion": -1.0}, label_vocab="chexpert",
            sop_instance_uid="1.2.3", series_instance_uid="1.2.4", accession_number="A1",
        ),
        full_row(image_id="i2", image_path="/x/i2.jpg", view="LATERAL", age=1 / 12),
        full_row(dataset="openi", split="test", study_id="CXR1", image_id="CXR1_1", image_path="/y/a.png"),
    ]
    out = tmp_path / "sub" / "m.csv"
    assert write_manifest(rows, out) == 3
    back = read_manifest(out)
    assert back == rows
    assert back[1].age == 1 / 12
    assert list(back[0].labels) == ["No Finding", "Edema", "Pleural Effusion"]
    # CSV cells: header order, integer age without ".0", labels as compact JSON.
    with out.open(newline="", encoding="utf-8") as fh:
        cells = list(csv.DictReader(fh))
    assert list(cells[0]) == list(MANIFEST_COLUMNS)
    assert cells[0]["age"] == "63" and cells[1]["age"] == repr(1 / 12)
    assert json.loads(cells[0]["labels"]) == {"No Finding": 1.0, "Edema": 0.0, "Pleural Effusion": -1.0}
    assert cells[1]["labels"] == "" and cells[1]["sex"] == ""
    # Mapping access gives the CSV cell (what csv.DictReader consumers expect).
    assert back[0]["labels"] == cells[0]["labels"] and back[0].get("age") == "63"
    assert dict(back[0]) == cells[0]
    assert read_manifest(out, split="test") == rows[2:]
    assert not [p for p in out.parent.iterdir() if p.name != "m.csv"], "temporary file left behind"


def test_write_manifest_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "m.csv"
    write_manifest([full_row()], out)
    before = out.read_bytes()

    def failing():
        yield full_row(image_id="a")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_manifest(failing(), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.csv"]
    with pytest.raises(DatasetError, match="image_path"):
        write_manifest([full_row(image_path="")], tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()


@pytest.mark.parametrize("column", REQUIRED_COLUMNS)
def test_read_manifest_names_missing_column(tmp_path: Path, column: str) -> None:
    header = [c for c in MANIFEST_COLUMNS if c != column]
    path = write_csv(tmp_path / "m.csv", header, [["x"] * len(header)])
    with pytest.raises(DatasetError) as info:
        read_manifest(path)
    assert column in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"split": "val"}, "split"),
        ({"view": "FRONTAL"}, "view"),
        ({"labels": "{not json"}, "labels"),
        ({"labels": '{"Edema": 2}'}, "Edema"),
        ({"age": "old"}, "age"),
        ({"study_id": ""}, "study_id"),
    ],
)
def test_read_manifest_rejects_bad_values(tmp_path: Path, change: Dict[str, str], message: str) -> None:
    cells = full_row().to_csv_dict()
    cells.update(change)
    path = write_csv(tmp_path / "m.csv", MANIFEST_COLUMNS, [[cells[c] for c in MANIFEST_COLUMNS]])
    with pytest.raises(DatasetError, match=message) as info:
        read_manifest(path)
    assert "line 2" in str(info.value)


def test_read_manifest_rejects_duplicate_images_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    write_manifest([full_row(), full_row(study_id="s2")], path)
    with pytest.raises(DatasetError, match="twice"):
        read_manifest(path)
    with pytest.raises(DatasetError, match="not found"):
        read_manifest(tmp_path / "missing.csv")


def test_group_studies_orders_frontal_first() -> None:
    rows = [
        full_row(image_id="c", view="LATERAL"),
        full_row(study_id="s2", image_id="z"),
        full_row(image_id="b", view="PA"),
        full_row(image_id="a", view="UNKNOWN"),
        full_row(image_id="d", view="AP"),
    ]
    groups = group_studies(rows)
    assert list(groups) == ["s1", "s2"]
    assert [r.image_id for r in groups["s1"]] == ["b", "d", "a", "c"]
    with pytest.raises(DatasetError, match="s1"):
        group_studies(rows + [full_row(dataset="openi", image_id="q")])


# --------------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------------


def _sklearn_gloria(units: List[str], seed: int) -> Dict[str, str]:
    from sklearn.model_selection import train_test_split

    train, rest = train_test_split(units, test_size=0.15 * 2, random_state=seed)
    test, valid = train_test_split(rest, test_size=0.5, random_state=seed)
    return {**{u: "train" for u in train}, **{u: "test" for u in test}, **{u: "validate" for u in valid}}


@pytest.mark.parametrize("n", [4, 7, 20, 101, 1000])
def test_gloria_split_equals_sklearn_train_test_split(n: int) -> None:
    pytest.importorskip("sklearn")
    units = [f"u{i:05d}" for i in range(n)]
    for seed in (0, 3):
        assert gloria_split(units, seed=seed) == _sklearn_gloria(units, seed)


def test_gloria_split_proportions_and_determinism() -> None:
    units = [f"p{i}" for i in range(1000)]
    split = gloria_split(units)
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "validate", "test")}
    assert counts == {"train": 700, "test": 150, "validate": 150}
    assert gloria_split(list(units)) == split
    assert gloria_split(units, seed=1) != split
    with pytest.raises(ValueError):
        gloria_split(["a", "a"])


def test_holdout_split() -> None:
    units = [str(i) for i in range(95)]
    held = holdout_split(units, 0.1, seed=0)
    assert len(held) == 10 and held <= set(units)
    assert holdout_split(units, 0.1, seed=0) == held
    assert holdout_split(units, 0.0) == set()


# --------------------------------------------------------------------------------------------------
# prepare() dispatch
# --------------------------------------------------------------------------------------------------


def test_registry_and_option_checks(tmp_path: Path) -> None:
    assert list(DATASETS) == [
        "mimic-cxr", "chexpert", "chestxray14", "openi", "vindr-cxr", "rsna-pneumonia", "siim-acr", "chexpert5x200",
        "pacs",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="valid datasets"):
        prepare("nih", tmp_path)
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare("chestxray14", tmp_path, bogus=1)
    with pytest.raises(ConfigError, match="float"):
        prepare("chestxray14", tmp_path, val_fraction="ten percent")
    assert "reports_csv" in adapter_options("pacs")
    with pytest.raises(DatasetError, match="not found"):
        prepare("chexpert", tmp_path / "nowhere")
