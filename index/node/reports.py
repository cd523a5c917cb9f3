"""Reports waiting for their studies: HL7 reports kept durably until their images are indexed.

A report from the RIS (an HL7 ORU message) may arrive before its images. It is kept as one JSON
file in ``INDEX_DIR/node/hl7/`` and handed to every ``index add`` of the node as a RIS CSV (the
intake attaches a CSV report, by accession number then StudyInstanceUID, to the studies that have
none). Once its study has a report the file is removed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from sqlalchemy import select

from index.node.inbox import Inbox, write_durably
from index.privacy import IndexSecret
from index.store import Report, Store, Study

logger = logging.getLogger(__name__)

CSV_NAME = "pending-reports.csv"


@dataclass
class PendingReport:
    """One report from the RIS, waiting for (or attached to) its study."""

    accession: str
    study_uid: str
    text: str
    source: str = "hl7"
    received: float = 0.0
    message_id: str = ""


def save_pending(inbox: Inbox, report: PendingReport) -> Path:
    """Keep a report durably until its study is indexed; returns its file."""
    if not report.received:
        report.received = time.time()
    name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(report.received))}-{secrets.token_hex(6)}.json"
    dest = inbox.hl7 / name
    write_durably(dest, json.dumps(asdict(report)).encode(), inbox.tmp)
    return dest


def load_pending(inbox: Inbox) -> List[Tuple[Path, PendingReport]]:
    """The waiting reports, oldest first (unreadable files are logged and left alone)."""
    out = []
    if not inbox.hl7.is_dir():
        return out
    for path in sorted(inbox.hl7.glob("*.json")):
        try:
            out.append((path, PendingReport(**json.loads(path.read_text()))))
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("%s: unreadable pending report (%s); left in place", path, exc)
    return out


def write_reports_csv(inbox: Inbox, pending: List[Tuple[Path, PendingReport]]) -> Optional[Path]:
    """The waiting reports as a RIS CSV for ``index add --reports`` (None when there are none)."""
    if not pending:
        return None
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["AccessionNumber", "StudyInstanceUID", "report"])
    for _, r in pending:  # oldest first: the CSV reader keeps the last row of a key (the newest version)
        w.writerow([r.accession, r.study_uid, r.text])
    dest = inbox.root / CSV_NAME
    write_durably(dest, buf.getvalue().encode("utf-8"), inbox.tmp)
    return dest


def match_studies(store: Store, secret: IndexSecret,
                  pending: List[Tuple[Path, PendingReport]]) -> Dict[Path, Tuple[int, bool]]:
    """For each waiting report whose study is indexed: (study id, whether the study has a report)."""
    if not pending:
        return {}
    out: Dict[Path, Tuple[int, bool]] = {}
    with store.session() as s:
        for path, r in pending:
            sid = None
            if r.accession:
                sid = s.scalar(select(Study.id).where(Study.accession_key == secret.accession_key(r.accession)))
            if sid is None and r.study_uid:
                sid = s.scalar(select(Study.id).where(Study.study_uid == r.study_uid))
            if sid is not None:
                has = s.scalar(select(Report.id).where(Report.study_id == sid).limit(1)) is not None
                out[path] = (int(sid), has)
    return out


__all__ = ["PendingReport", "load_pending", "match_studies", "save_pending", "write_reports_csv"]
