"""An index remembers its model: ``resolve_model`` turns what ``index.json`` recorded into a loadable source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_search.checkpoints import load_model, save_model
from cxr_search.errors import ConfigError, SearchIndexError
from cxr_search.model import create_model
from index.index_dir import META_FILE, model_identity
from index.model_ref import resolve_model


def _index_with_source(root: Path, source: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / META_FILE).write_text(json.dumps({"model_source": source, "model_sha256": "ab" * 32}))
    return root


def test_override_wins_and_preset_is_resolved(tmp_path: Path) -> None:
    idx = _index_with_source(tmp_path / "idx", "preset:tiny")
    assert resolve_model(idx, None) == "tiny"
    assert resolve_model(idx, "other-model") == "other-model"
    # A folder that is no index is refused before any model is loaded, override or not.
    with pytest.raises(SearchIndexError, match="not an index folder"):
        resolve_model(tmp_path / "nothing", "tiny")


def test_native_folder_is_recorded_absolute_and_reloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_model(create_model("tiny"), tmp_path / "models" / "mine")
    monkeypatch.chdir(tmp_path)
    model = load_model("models/mine")  # relative on the command line ...
    source = model_identity(model)["model_source"]
    assert Path(source).is_absolute() and Path(source) == (tmp_path / "models" / "mine").resolve()
    idx = _index_with_source(tmp_path / "idx", source)
    monkeypatch.chdir(tmp_path / "idx")  # ... and resolvable from anywhere
    assert load_model(resolve_model(idx, None)).provenance["fingerprint"] == model.provenance["fingerprint"]


def test_released_pickle_and_moved_folder_need_model(tmp_path: Path) -> None:
    idx = _index_with_source(tmp_path / "a", "r50_mcc.tar")
    with pytest.raises(ConfigError, match="model convert") as err:
        resolve_model(idx, None)
    assert "--model" in str(err.value)
    idx = _index_with_source(tmp_path / "b", str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match="no longer exists"):
        resolve_model(idx, None)
    idx = _index_with_source(tmp_path / "c", "")
    with pytest.raises(ConfigError, match="--model"):
        resolve_model(idx, None)
    with pytest.raises(SearchIndexError, match="not an index folder"):
        resolve_model(tmp_path / "nothing", None)
