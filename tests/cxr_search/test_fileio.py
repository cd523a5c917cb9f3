"""Atomic writes: the new file replaces the old one whole, a failure leaves the old one, permissions."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cxr_search.fileio import atomic_write, write_json_atomic, write_text_atomic


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.bin"  # the parent folder is created
    with atomic_write(target) as fh:
        fh.write(b"first")
    with atomic_write(target) as fh:
        fh.write(b"second")
        assert target.read_bytes() == b"first"  # readers see the old file until the rename
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]
    # Permissions as open() would give, not mkstemp's 0600.
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target, "w", encoding="utf-8") as fh:
            fh.write("half of the new")
            raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_write_permissions_and_text_helpers(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    with atomic_write(secret, "w", permissions=0o600) as fh:
        fh.write("k\n")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    write_json_atomic(tmp_path / "d.json", {"b": [1, 2], "a": "é"})
    assert json.loads((tmp_path / "d.json").read_text(encoding="utf-8")) == {"b": [1, 2], "a": "é"}


def test_atomic_write_unwritable_folder_raises_oserror(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        with atomic_write(blocker / "a.bin") as fh:  # parent is a file
            fh.write(b"never")
