"""The inputs an index holds no image for, and why: ``index failures`` and the counts of ``index stats``.

Every input the intake could not index, or chose not to, has a failure row: ``failed`` (stage
``scan``: not a readable radiograph; ``decode``: its pixels could not be decoded), ``skipped`` (accounted
for without being an error: hidden or special files, tombstoned by a removal, ...) or ``duplicate`` (a
second file with a SOPInstanceUID already indexed). The store keeps the file's path only encrypted and
the reason with the path replaced by ``<file>`` (paths can name patients; the reason is stored in clear).
The listing decrypts the path with the index secret, so only the index owner sees it, and puts it back
into the reason.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional

from sqlalchemy import select

from index.privacy import IndexSecret
from index.store import DECODE, DUPLICATE, SCAN, SKIPPED, Failure, Store

#: Listing kind -> the failure stages it covers.
FAILURE_KINDS: Dict[str, tuple] = {"failed": (SCAN, DECODE), "skipped": (SKIPPED,), "duplicate": (DUPLICATE,)}
_PLACEHOLDER = "<file>"


def kind_of(stage: str) -> str:
    """The listing kind (``failed``, ``skipped``, ``duplicate``) of a failure stage."""
    for kind, stages in FAILURE_KINDS.items():
        if stage in stages:
            return kind
    return "failed"  # a stage of a newer writer is still an input that is not indexed


def reason_kind(stage: str, reason: str) -> str:
    """The reason without its details, for counting: ``not DICOM``, ``PixelDataError``, ``duplicate SOPInstanceUID``."""
    if kind_of(stage) == "duplicate":
        return "duplicate SOPInstanceUID"
    head = (reason or "").split(":", 1)[0].replace(_PLACEHOLDER, "").strip()
    return head or "unknown"


def failure_counts(store: Store) -> Dict[str, Dict[str, int]]:
    """``{kind: {reason kind: count}}`` over every failure row (kinds without rows are left out)."""
    out: Dict[str, Counter] = {}
    with store.session() as s:
        for stage, reason in s.execute(select(Failure.stage, Failure.reason)):
            out.setdefault(kind_of(stage), Counter())[reason_kind(stage, reason)] += 1
    return {kind: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for kind, c in sorted(out.items())}


def list_failures(store: Store, secret: IndexSecret, *, kind: Optional[str] = None,
                  reason: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every failure row with its decrypted path, oldest first.

    Args:
        store: The index's store.
        secret: The index secret (decrypts the paths).
        kind: Only ``failed``, ``skipped`` or ``duplicate`` rows.
        reason: Only rows whose reason contains this text (any case; the path is part of the reason).

    Returns:
        Dicts with ``path``, ``kind``, ``stage``, ``reason`` (the file's path in place of ``<file>``),
        ``stored_reason`` (as stored, with ``<file>``), ``reason_kind`` and ``recorded`` (UTC, ISO 8601).

    Raises:
        ValueError: An unknown kind.
        SearchIndexError: A path that the secret cannot decrypt (not this store's secret).
    """
    if kind is not None and kind not in FAILURE_KINDS:
        raise ValueError(f"unknown failure kind {kind!r}; one of {', '.join(FAILURE_KINDS)}")
    q = select(Failure.path_enc, Failure.stage, Failure.reason, Failure.created).order_by(Failure.id)
    if kind is not None:
        q = q.where(Failure.stage.in_(FAILURE_KINDS[kind])) if kind != "failed" else q.where(
            ~Failure.stage.in_([st for k, sts in FAILURE_KINDS.items() if k != "failed" for st in sts]))
    needle = (reason or "").lower()
    out: List[Dict[str, Any]] = []
    with store.session() as s:
        rows = s.execute(q).all()
    for enc, stage, stored, created in rows:
        path = secret.decrypt_path(enc)
        shown = (stored or "").replace(_PLACEHOLDER, path)
        if needle and needle not in shown.lower():
            continue
        out.append({"path": path, "kind": kind_of(stage), "stage": stage, "reason": shown, "stored_reason": stored,
                    "reason_kind": reason_kind(stage, stored or ""),
                    "recorded": created.isoformat(timespec="seconds") + "Z" if created else None})
    return out


__all__ = ["FAILURE_KINDS", "failure_counts", "kind_of", "list_failures", "reason_kind"]
