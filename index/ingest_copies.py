"""Copies of one SOPInstanceUID: the copy that decodes is the one indexed, whichever was found first.

An export can hold one image twice (copied twice, or re-exported), and one copy may be damaged in
its pixel data only, which a header read cannot see. So the intake indexes the first copy it finds
and records every other copy as a ``duplicate`` failure row whose reason names the SOPInstanceUID;
when the indexed copy then fails to decode (the embedding stage, :mod:`index.embed`), or had failed
in an earlier build (the next intake, :mod:`index.ingest`), the image row is switched to a copy not
yet tried and the damaged one becomes the duplicate, its reason saying that it does not decode.

Reasons are stored in clear, so they hold the UID (the store holds it anyway) and never a path.
Their form is fixed here and parsed back here only:
``duplicate of SOPInstanceUID "<uid>" (<note>)``, the UID as a JSON string.
"""

from __future__ import annotations

import json
import re
from typing import Dict, Iterable, List, Optional

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from index.store import DUPLICATE, PENDING, Failure, Image, ImageVector, Store, chunks

DUPLICATE_OF = "duplicate of SOPInstanceUID "
#: The note of a copy that was not indexed because another copy of it was found first.
FOUND_FIRST = "the copy found first is indexed; this one is tried if that one fails to decode"
#: The start of the note of a copy that was tried and does not decode.
NOT_DECODED = "this copy does not decode"
_UID = re.compile(r'^duplicate of SOPInstanceUID ("(?:[^"\\]|\\.)*")')


def duplicate_reason(sop_uid: str, note: str) -> str:
    """The reason text of a duplicate copy of ``sop_uid``."""
    return f"{DUPLICATE_OF}{json.dumps(sop_uid)} ({note})"


def not_decoded_note(why: str) -> str:
    """The note of a copy that does not decode (``why``: the decode error, already without its path)."""
    return f"{NOT_DECODED}: {why}; another copy is used"


def duplicate_sop(reason: str) -> Optional[str]:
    """The SOPInstanceUID a duplicate reason names, or None for any other reason."""
    m = _UID.match(reason or "")
    if m is None:
        return None
    try:
        return str(json.loads(m.group(1)))
    except ValueError:
        return None


def was_tried(reason: str) -> bool:
    """Whether a duplicate reason says its copy was tried and does not decode."""
    return f"({NOT_DECODED}" in (reason or "")


def duplicate_rows(s: Session, sop_uids: Iterable[str]) -> Dict[str, List[Failure]]:
    """SOPInstanceUID -> its duplicate rows (oldest first), for the UIDs given.

    Removing an instance removes these too (``index remove``): their reasons name its UID.
    """
    out: Dict[str, List[Failure]] = {}
    for part in chunks(sorted(set(sop_uids)), 100):
        prefixes = [Failure.reason.startswith(DUPLICATE_OF + json.dumps(uid), autoescape=True) for uid in part]
        rows = s.scalars(select(Failure).where(Failure.stage == DUPLICATE, or_(*prefixes)).order_by(Failure.id)).all()
        for row in rows:
            uid = duplicate_sop(row.reason)
            if uid is not None:
                out.setdefault(uid, []).append(row)
    return out


def untried_copies(s: Session, sop_uids: Iterable[str]) -> Dict[str, List[Failure]]:
    """SOPInstanceUID -> its duplicate rows whose copy was never tried (oldest first), for the UIDs given."""
    out: Dict[str, List[Failure]] = {}
    for uid, rows in duplicate_rows(s, sop_uids).items():
        untried = [row for row in rows if not was_tried(row.reason)]
        if untried:
            out[uid] = untried
    return out


def switch_copy(s: Session, store: Store, image: Image, path_key: str, path_enc: str, loser_note: str,
                facts: Optional[Dict[str, object]] = None) -> None:
    """Point ``image`` at another copy of its file (to be embedded again) and record the copy it leaves.

    The left copy gets a ``duplicate`` row with ``loser_note``; the new copy's own failure row (its
    earlier duplicate row) is deleted, since it is now the indexed copy.

    Args:
        s: Open session.
        store: The store.
        image: The image row (any status).
        path_key: Look-up key of the new copy's path.
        path_enc: Its encrypted path.
        loser_note: Why the old copy is left (:func:`not_decoded_note`).
        facts: Header facts of the new copy to store (rows, columns, photometric, transfer_syntax).
    """
    store.add_failure(s, image.path_key, image.path_enc, DUPLICATE, duplicate_reason(image.sop_uid, loser_note))
    s.execute(delete(Failure).where(Failure.path_key == path_key))
    s.execute(delete(ImageVector).where(ImageVector.image_id == image.id))
    image.path_key, image.path_enc, image.status = path_key, path_enc, PENDING
    for name, value in (facts or {}).items():
        if value is not None:
            setattr(image, name, value)


__all__ = [
    "DUPLICATE_OF", "FOUND_FIRST", "NOT_DECODED", "duplicate_reason", "duplicate_rows", "duplicate_sop",
    "not_decoded_note",
    "switch_copy", "untried_copies", "was_tried",
]
