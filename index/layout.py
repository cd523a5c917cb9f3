"""The index folder before anything heavy is loaded: its metadata file's name, which folder a writer may
use, and the writer lock a run of ``build``/``add`` takes.

Kept free of torch and FAISS imports (it loads in milliseconds), so that a writer finds out that another
writer holds the index before it spends seconds importing and loading a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from cxr_search.errors import SearchIndexError
from index.lock import LOCK_FILE, WriterLock, read_holders, writer_lock

#: The index's metadata (model fingerprint, preprocessing, store URL, FAISS facts); its presence makes an index.
META_FILE = "index.json"
#: What a folder may hold before its first build: what a build killed before writing ``index.json`` leaves.
_NEW_FOLDER_FILES = {"secret.key", "store.sqlite", "store.sqlite-wal", "store.sqlite-shm", LOCK_FILE}


def prepare_folder(root: Union[str, Path]) -> Path:
    """Make sure ``root`` holds an index or can hold a new one (created when missing).

    Raises:
        SearchIndexError: The folder holds other files and no index (it is left as it is).
    """
    root = Path(root).expanduser()
    if not (root / META_FILE).is_file() and root.is_dir():
        if {p.name for p in root.iterdir()} - _NEW_FOLDER_FILES and not _being_created(root):
            raise SearchIndexError(f"{root}: folder is not empty and holds no index; give a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _being_created(root: Path) -> bool:
    """Whether the files of ``root`` are an index that a live writer is creating (or has just finished).

    Two writers started together on a new folder (a node and an import): the second must not call the
    first one's half-written index "other files"; it goes on to the writer lock, which makes it wait or
    refuse naming the first. The holders are read before ``index.json`` is looked at again because a
    writer writes that file before it releases the lock.
    """
    if any(h.alive() is not False for h in read_holders(root)):
        return True
    return (root / META_FILE).is_file()


def writer_target(index_dir: Union[str, Path], command: str, *, shard: bool = False) -> Path:
    """The folder of an ``index build``/``add`` run, checked (and created for a new build).

    Raises:
        SearchIndexError: ``add`` or a shard run without an index, or a folder that holds other files.
    """
    root = Path(index_dir).expanduser()
    if command == "add" and not (root / META_FILE).is_file():
        raise SearchIndexError(f"{index_dir}: no index to add to; create it with cxr-search index build")
    if shard and not (root / META_FILE).is_file():
        raise SearchIndexError(f"{index_dir}: a shard run embeds an index that is already catalogued; run "
                               "`cxr-search index build ARCHIVE --catalogue-only` (same --index and --db) first")
    return prepare_folder(root)


def build_lock(root: Path, command: str, *, shard: bool = False, wait: float = 0.0,
               say: Optional[Callable[[str], None]] = None) -> WriterLock:
    """The writer lock of an ``index build``/``add`` run: exclusive, or shared by the runs of a sharded build."""
    return writer_lock(root, f"index {command}" + (" --shard" if shard else ""), shared=shard, wait=wait, say=say)


__all__ = ["META_FILE", "build_lock", "prepare_folder", "writer_target"]
