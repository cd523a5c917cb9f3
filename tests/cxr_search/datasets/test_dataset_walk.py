"""The file walk of the adapters: links followed with loop protection, special files never opened, and an
adapter that finds none of the images its layout promised ends with an error (exit code 6)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

import pytest

import cli
from cxr_search.datasets import prepare
from cxr_search.datasets.adapter_kit import SkipLog, finish
from cxr_search.datasets.file_walk import walk_entries
from cxr_search.datasets.header_scan import header_or_reason
from cxr_search.errors import DatasetError
from tests.helpers.dataset_files import write_csv, write_image

NIH_COLUMNS = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]


def _rel(root: Path, entries) -> List[tuple]:
    return [(e.path.relative_to(root).as_posix(), e.reason, e.failed) for e in entries]


def test_walk_entries_follows_links_once_and_names_what_it_does_not_read(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    write_image(outside / "o.png")
    write_image(root / "a" / "x.png")
    (root / ".hidden").mkdir()
    (root / ".hidden" / ".h.png").write_bytes(b"h")
    os.mkfifo(root / "a" / "pipe")
    (root / "a" / "loop").symlink_to(root)
    (root / "b").symlink_to(outside)
    (root / "c").symlink_to(outside)
    (root / "d").symlink_to(root / "a")
    (root / "dead").symlink_to(tmp_path / "missing")
    entries = _rel(root, walk_entries(root))
    assert entries == [  # a folder's own entries first, then its subfolders', each in name order
        ("c", "folder already walked through another path", False),
        ("d", "link to a folder inside the walked folder (walked through its own path)", False),
        ("dead", "broken symbolic link (its target does not exist)", True),
        (".hidden/.h.png", "", False),
        ("a/loop", "symbolic link loop (links to a folder above it)", False),
        ("a/pipe", "not a regular file (FIFO)", False),
        ("a/x.png", "", False),
        ("b/o.png", "", False),
    ]
    hidden_skipped = [p for p, *_ in _rel(root, walk_entries(root, skip_hidden=True))]
    assert ".hidden/.h.png" not in hidden_skipped and "a/x.png" in hidden_skipped
    # A header read never opens a FIFO either (it would block until someone writes to it).
    assert header_or_reason(root / "a" / "pipe") == (None, "not a regular file (FIFO)", "")


def _nih(root: Path, images_root: Path) -> None:
    rows = [[f"0000000{p}_000.png", "No Finding", p, 40, "M", "PA"] for p in range(1, 5)]
    write_csv(root / "Data_Entry_2017.csv", NIH_COLUMNS, rows)
    (root / "train_val_list.txt").write_text("".join(f"{r[0]}\n" for r in rows[:3]))
    (root / "test_list.txt").write_text(f"{rows[3][0]}\n")
    for i, r in enumerate(rows):
        write_image(images_root / f"images_00{1 + i % 2}" / "images" / r[0])


def test_chestxray14_with_symlinked_image_folders(tmp_path: Path) -> None:
    root = tmp_path / "nih"
    store = tmp_path / "disk2"
    _nih(root, store)
    for name in ("images_001", "images_002"):
        (root / name).symlink_to(store / name)
    result = prepare("chestxray14", root)
    assert len(result.rows) == 4
    assert all(Path(r.image_path).is_file() and "/images_00" in r.image_path for r in result.rows)


def test_no_images_where_the_layout_promises_some_is_an_error(tmp_path: Path, capsys) -> None:
    root = tmp_path / "nih"
    _nih(root, tmp_path / "not-linked")  # the images are elsewhere: the folder has none
    with pytest.raises(DatasetError, match="no PNG image found under an images"):
        prepare("chestxray14", root)
    code = cli.main(["data", "prepare", "chestxray14", str(root), "--out", str(tmp_path / "m.csv")])
    assert code == DatasetError.exit_code == 6
    assert "no PNG image found" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()


def test_finish_refuses_a_manifest_whose_listed_images_are_all_missing(tmp_path: Path) -> None:
    skips = SkipLog()
    skips.skip("image file missing", "a.png")
    skips.skip("image file missing", "b.png")
    with pytest.raises(DatasetError, match=r"none of the 2 images its files list was found \(e.g. a.png, b.png\)"):
        finish("demo", tmp_path, [], skips)
    assert finish("demo", tmp_path, [], SkipLog()).rows == []  # nothing was promised: an empty result is fine
