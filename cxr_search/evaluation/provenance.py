"""What produced a benchmark number: software version and commit, model fingerprint, input hashes.

Every ``cxr-search bench`` result carries a ``provenance`` object built here, so a number in a paper
or a report can be traced to the code, the weights and the exact rows that produced it. Nothing here
may fail a run: a missing ``git`` or a copy that is not a checkout gives ``null`` fields.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional, Union

from cxr_search import __version__

logger = logging.getLogger(__name__)

__all__ = ["bench_provenance", "file_sha256", "git_state", "model_provenance", "software_provenance"]

_GIT_TIMEOUT_S = 5.0
#: The folder holding the ``cxr_search`` package: a git checkout's top level when run from one.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=_SOURCE_ROOT, capture_output=True, text=True,
                              timeout=_GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:  # no git, a hung git: provenance stays partial
        logger.debug("git %s failed: %s", " ".join(args), exc)
        return None
    if done.returncode != 0:
        logger.debug("git %s exited %d: %s", " ".join(args), done.returncode, done.stderr.strip())
        return None
    return done.stdout


@functools.lru_cache(maxsize=1)
def git_state() -> Dict[str, Any]:
    """``{"git_commit": sha or None, "git_dirty": bool or None}`` of the checkout cxr-search runs from.

    Only a checkout whose top level holds this ``cxr_search`` package counts (an installed copy inside
    some other repository does not). ``git_dirty``: tracked files differ from the commit.
    """
    none = {"git_commit": None, "git_dirty": None}
    if not (_SOURCE_ROOT / ".git").exists():
        return none
    out = _git("rev-parse", "--show-toplevel", "HEAD")
    lines = out.split() if out else []
    if len(lines) != 2:
        return none
    try:
        same = Path(lines[0]).resolve() == _SOURCE_ROOT
    except OSError:
        same = False
    if not same:
        return none
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": lines[1], "git_dirty": None if status is None else bool(status.strip())}


def software_provenance() -> Dict[str, Any]:
    """The cxr-search version and, when run from a git checkout, its commit and whether it was modified."""
    return {"cxr_search_version": __version__, **git_state()}


def file_sha256(path: Union[str, Path], *, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks.

    Raises:
        OSError: The file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def model_provenance(model: Any, source: str) -> Dict[str, Any]:
    """``{"fingerprint", "source"}`` of a loaded model (fingerprint: weights + preprocessing hash)."""
    prov = getattr(model, "provenance", None) or {}
    return {"fingerprint": prov.get("fingerprint", ""), "source": str(source)}


def bench_provenance(*, model: Optional[Dict[str, Any]] = None, manifest: Optional[Dict[str, Any]] = None,
                     split: Optional[str] = None, options: Optional[Dict[str, Any]] = None,
                     evaluated_ids: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The ``provenance`` object of a benchmark result: software, then whatever the benchmark knows.

    Args:
        model: :func:`model_provenance`.
        manifest: ``{"path", "sha256", "rows"}`` (rows = all rows of the file) and anything else useful.
        split: The evaluated split.
        options: The protocol options that change a number.
        evaluated_ids: ``{"count", "sha256"}`` of the evaluated-id list.
    """
    out: Dict[str, Any] = software_provenance()
    for key, value in (("model", model), ("manifest", manifest), ("split", split), ("options", options),
                       ("evaluated_ids", evaluated_ids)):
        if value is not None:
            out[key] = value
    return out
