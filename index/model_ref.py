"""Which model to load for an index: the one given, else the one the index recorded when it was built.

``index.json`` records ``model_source`` (see :func:`index.index_dir.model_identity`): ``preset:NAME`` for a
preset, the absolute folder of a model in our format, or the file name of a released pickle. Searching an
index therefore needs no ``--model``; the fingerprint check of :class:`index.search.Searcher` still refuses
any model other than the index's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

from cxr_search.errors import ConfigError, SearchIndexError

#: Suffixes of released (pickled) checkpoint files, which are never loaded without being named.
_PICKLE_SUFFIXES = (".tar", ".pt", ".pth", ".ckpt", ".bin", ".pkl")


def _index_meta(index_dir: Path) -> Dict[str, Any]:
    from index.index_dir import META_FILE

    path = index_dir / META_FILE
    if not path.is_file():
        raise SearchIndexError(f"{index_dir}: no {META_FILE}; not an index folder (build one with cxr-search index build)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SearchIndexError(f"{path}: unreadable index metadata ({exc}); rebuild the index") from exc
    if not isinstance(meta, dict):
        raise SearchIndexError(f"{path}: unreadable index metadata (not a JSON object); rebuild the index")
    return meta


def resolve_model(index_dir: Union[str, Path], override: Optional[str]) -> str:
    """The model source to load for searching ``index_dir``: ``override`` when given, else the index's own.

    Args:
        index_dir: The index folder (its ``index.json`` is read; the store is not opened).
        override: The ``--model`` the user gave, or ``None``.

    Returns:
        A preset name or a model folder, as :func:`cxr_search.checkpoints.load_model` takes it.

    Raises:
        SearchIndexError: ``index_dir`` is not an index folder (checked even with ``override``).
        ConfigError: The index's model cannot be loaded without ``--model`` (a released pickle, which is
            never loaded unless named; a model folder that was moved or deleted; an index that recorded none).
    """
    root = Path(index_dir).expanduser()
    meta = _index_meta(root)  # a folder that is no index fails here, before any model is loaded
    if override:
        return override
    source = str(meta.get("model_source") or "").strip()
    fingerprint = str(meta.get("model_sha256") or "?")[:12]
    give = f"pass --model with the model the index was built with (fingerprint {fingerprint})"
    if not source:
        raise ConfigError(f"{root}: the index does not record its model; {give}")
    if source.startswith("preset:"):
        return source[len("preset:"):]
    path = Path(source)
    if path.is_dir():
        return str(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES or path.is_file():
        raise ConfigError(
            f"{root}: the index was built from the released file {source!r}, which is not loaded unless named; "
            f"convert it once with `cxr-search model convert {source} MODEL_DIR` and pass --model MODEL_DIR "
            f"(same fingerprint), or pass --model {path.name} --tokenizer DIR"
        )
    if path.is_absolute():
        raise ConfigError(f"{root}: the index's model folder {source} no longer exists; {give}")
    raise ConfigError(f"{root}: the index records its model as {source!r}, which cannot be loaded by name; {give}")


__all__ = ["resolve_model"]
