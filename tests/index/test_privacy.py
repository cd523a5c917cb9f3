"""The index secret: keyed pseudonyms, path encryption, scrubbed failure reasons."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cxr_search.errors import SearchIndexError
from index.privacy import SECRET_FILE, IndexSecret, scrub_path


def test_pseudonyms_are_keyed_and_stable(tmp_path: Path) -> None:
    a = IndexSecret.load_or_create(tmp_path / "a", create=True)
    again = IndexSecret.load_or_create(tmp_path / "a", create=False)
    b = IndexSecret.load_or_create(tmp_path / "b", create=True)
    assert a.patient_key("0042371") == again.patient_key("0042371")
    assert a.patient_key("0042371") != b.patient_key("0042371")  # not linkable across indices
    assert a.patient_key("0042371") != a.path_key("0042371")  # one derived key per use
    assert len(a.patient_key("x")) == 64 and "0042371" not in a.patient_key("0042371")
    assert stat.S_IMODE((tmp_path / "a" / SECRET_FILE).stat().st_mode) == 0o600


def test_paths_round_trip_only_with_their_secret(tmp_path: Path) -> None:
    a = IndexSecret.load_or_create(tmp_path / "a", create=True)
    b = IndexSecret.load_or_create(tmp_path / "b", create=True)
    path = "/pacs/SMITH_JOHN_12345/IM0001"
    token = a.encrypt_path(path)
    assert "SMITH" not in token and a.decrypt_path(token) == path
    with pytest.raises(SearchIndexError, match="secret.key does not belong"):
        b.decrypt_path(token)


def test_missing_or_damaged_secret(tmp_path: Path) -> None:
    with pytest.raises(SearchIndexError, match="secret missing"):
        IndexSecret.load_or_create(tmp_path, create=False)
    (tmp_path / SECRET_FILE).write_text("not hex\n")
    with pytest.raises(SearchIndexError, match="damaged"):
        IndexSecret.load_or_create(tmp_path, create=False)


def test_scrub_path_removes_the_path_and_file_name() -> None:
    msg = "PixelDataError: /pacs/DOE_JANE_77/IM90001: truncated; IM90001 is short"
    assert scrub_path(msg, "/pacs/DOE_JANE_77/IM90001") == "PixelDataError: <file>: truncated; <file> is short"
