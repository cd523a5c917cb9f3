"""What an intake did with every input it was given, and the removals (tombstones) it honours.

The accounting identity, checked at the end of every intake (folder walk, manifest; the DICOM node
and the DICOMweb import use the same path)::

    files_seen = already_catalogued + indexed + reports + failures + skipped + duplicates + skipped_by_request

* ``files_seen``: every input: each non-folder entry of the walked tree (files, links, FIFOs, sockets,
  devices; a folder only when it cannot be listed or is reached a second time through a link), or each
  manifest row.
* ``already_catalogued``: its path is an image row from an earlier run (not read again), or an SR
  object whose text already is its study's report.
* ``indexed``: became an image row to embed (``replaced`` of them took the place of a copy of the same
  SOPInstanceUID that had failed to decode); whether it decodes is the embedding stage's count.
* ``reports``: a DICOM SR object whose text became its study's report.
* ``failures``: recorded as a failure row (stage ``scan``) with its reason: not DICOM, unreadable,
  not a chest radiograph, permission denied, a broken link, an SR with no text ...
* ``skipped``: recorded as a failure row of stage ``skipped`` with its reason: FIFOs, sockets and
  devices (never opened), symbolic link loops, folders already walked, DICOMDIR files, zip archives,
  the reports CSV given with ``--reports``, an SR whose study is not in the index or whose study's
  report comes from another source.
* ``duplicates``: a copy of a SOPInstanceUID another input already is (stage ``duplicate``, reason
  ``duplicate of SOPInstanceUID "..." (...)``), or a manifest row repeating a file of this run.
* ``skipped_by_request``: its patient, study or SOP instance was removed (``index remove``): no row is
  written for it, so the store keeps no trace of a removed patient beyond the tombstone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict

from index.privacy import IndexSecret
from index.store import Store

#: The counts the accounting identity adds up to ``files_seen``.
OUTCOMES = ("already_catalogued", "indexed", "reports", "failures", "skipped", "duplicates", "skipped_by_request")


@dataclass
class CatalogueResult:
    """What one intake did with its inputs (see the module docstring for the identity)."""

    files_seen: int = 0
    already_catalogued: int = 0
    indexed: int = 0
    replaced: int = 0
    reports: int = 0
    failures: int = 0
    skipped: int = 0
    duplicates: int = 0
    skipped_by_request: int = 0
    reports_added: int = 0
    sections_added: int = 0
    failure_reasons: Counter = field(default_factory=Counter)
    skipped_reasons: Counter = field(default_factory=Counter)

    def accounted(self) -> int:
        """The sum of the outcomes; equals ``files_seen`` after every intake."""
        return sum(getattr(self, name) for name in OUTCOMES)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary (the ``catalogue`` object of ``index build --json``)."""
        out: Dict[str, Any] = {"files_seen": self.files_seen}
        out.update({name: getattr(self, name) for name in OUTCOMES})
        out.update({
            "replaced_failed_copies": self.replaced, "reports_added": self.reports_added,
            "sections_added": self.sections_added, "failure_reasons": dict(self.failure_reasons),
            "skipped_reasons": dict(self.skipped_reasons),
        })  # fmt: skip
        return out


def patient_source(header: Any) -> str:
    """The patient source string of a DICOM header (what the Patient row's pseudonym is the HMAC of).

    The study stands in for a missing PatientID: it becomes its own patient.
    """
    return header.patient_id or f"study:{header.study_instance_uid}"


class Tombstones:
    """The removals an intake must honour: is this patient, study or SOP instance removed?

    Args:
        store: The store (its tombstones are read once).
        secret: The index secret (tombstones hold keyed HMACs only).
    """

    def __init__(self, store: Store, secret: IndexSecret) -> None:
        self.secret = secret
        keys = store.tombstones()
        self.patients = keys.get("patient", set())
        self.studies = keys.get("study", set())
        self.sops = keys.get("sop", set())
        self.any = bool(self.patients or self.studies or self.sops)

    def removed(self, patient_source: str, study_uid: str, sop_uid: str) -> bool:
        """Whether the item's patient (same source string as its Patient row), study or SOP was removed."""
        if not self.any:
            return False
        return bool(
            (self.patients and patient_source and self.secret.patient_key(patient_source) in self.patients)
            or (self.studies and study_uid and self.secret.uid_key(study_uid) in self.studies)
            or (self.sops and sop_uid and self.secret.uid_key(sop_uid) in self.sops)
        )


__all__ = ["CatalogueResult", "OUTCOMES", "Tombstones", "patient_source"]
