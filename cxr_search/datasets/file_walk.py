"""Walking a dataset or export folder: every entry, links followed with loop protection, nothing opened."""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WalkEntry:
    """One entry met by :func:`walk_entries`.

    Attributes:
        path: The entry, below the walked root (a symbolic link keeps its own path).
        reason: Empty for a regular file to read; otherwise why it is not read.
        failed: The entry was meant to be read but cannot be (a broken link, a folder that cannot be
            listed); False when it is left out by rule (a FIFO, a link loop, a folder already walked).
    """

    path: Path
    reason: str = ""
    failed: bool = False


_FILE_KINDS = (
    (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"),
)  # fmt: skip


def non_regular_reason(mode: int) -> Optional[str]:
    """``"not a regular file (FIFO)"`` and the like for an ``st_mode``, None for a regular file.

    Such files are never opened: reading a FIFO blocks until someone writes to it.
    """
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "unknown type")
    return f"not a regular file ({kind})"


def walk_entries(root: Path, *, skip_hidden: bool = False) -> Iterator[WalkEntry]:
    """Every entry below ``root`` that is not a folder, streamed in a deterministic (sorted) order.

    Folders are listed one at a time (a million-file tree is never held in memory), a folder's
    files before its subfolders, each in name order. Symbolic links are followed, to files and to
    folders, with loop protection: a folder is walked once, so a link to a folder above it, a link to a
    folder inside ``root`` (walked through its own path) and a second link to one outside folder are
    not walked but yielded with their reason. Nothing is opened
    here: a FIFO, socket or device is yielded with a reason, so a reader never blocks on one.

    Args:
        root: The folder to walk.
        skip_hidden: Leave out names starting with a dot (files and folders) without yielding them.

    Yields:
        A :class:`WalkEntry` per file, link and refused folder.
    """
    root = Path(root)
    try:
        top = os.stat(root)
    except OSError as exc:
        yield WalkEntry(root, f"folder cannot be listed ({exc.strerror or exc})", failed=True)
        return
    visited = {(top.st_dev, top.st_ino)}
    real_root = os.path.realpath(root)
    # (folder, ids of the folder and its ancestors): a link to one of them is a loop
    stack: List[Tuple[Path, Tuple[Tuple[int, int], ...]]] = [(root, ((top.st_dev, top.st_ino),))]
    while stack:
        folder, chain = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield WalkEntry(folder, f"folder cannot be listed ({exc.strerror or exc})", failed=True)
            continue
        subfolders: List[Tuple[Path, Tuple[Tuple[int, int], ...]]] = []
        for entry in entries:
            if skip_hidden and entry.name.startswith("."):
                continue
            path = folder / entry.name
            try:
                if not entry.is_symlink():
                    if entry.is_file(follow_symlinks=False):
                        yield WalkEntry(path)
                        continue
                    info = entry.stat(follow_symlinks=False)
                else:
                    info = os.stat(path)  # follows the link (and its chain)
            except FileNotFoundError:
                yield WalkEntry(path, "broken symbolic link (its target does not exist)", failed=True)
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    yield WalkEntry(path, "symbolic link loop")
                else:
                    yield WalkEntry(path, f"cannot stat ({exc.strerror or exc})", failed=True)
                continue
            if stat.S_ISDIR(info.st_mode):
                ident = (info.st_dev, info.st_ino)
                if ident in chain:
                    yield WalkEntry(path, "symbolic link loop (links to a folder above it)")
                elif entry.is_symlink() and _inside(os.path.realpath(path), real_root):
                    # Its folder is walked through its own path (a link must not make a file count twice).
                    yield WalkEntry(path, "link to a folder inside the walked folder (walked through its own path)")
                elif ident in visited:
                    yield WalkEntry(path, "folder already walked through another path")
                else:
                    visited.add(ident)
                    subfolders.append((path, chain + (ident,)))
                continue
            why = non_regular_reason(info.st_mode)
            yield WalkEntry(path, why or "")
        stack.extend(reversed(subfolders))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def walk_files(root: Path, *, skip_hidden: bool = True) -> Iterator[Path]:
    """Every regular file below ``root`` (links followed), in :func:`walk_entries` order.

    What is left out (FIFOs, link loops, broken links, folders that cannot be listed) is logged.
    """
    for entry in walk_entries(root, skip_hidden=skip_hidden):
        if not entry.reason:
            yield entry.path
        elif entry.failed:
            logger.warning("%s: %s", entry.path, entry.reason)
        else:
            logger.info("%s: left out: %s", entry.path, entry.reason)


__all__ = ["WalkEntry", "non_regular_reason", "walk_entries", "walk_files"]
