"""The node's durable inbox inside an index folder: received instances, batches, pending reports.

Layout (all under ``INDEX_DIR/node/``)::

    inbox/tmp/<pid>.<random>.part     an instance being written (never acknowledged yet)
    inbox/studies/<StudyUID>/<SOPUID>.dcm     received and fsynced; the node answered Success
    inbox/studies/<StudyUID>/<SOPUID>.sr.dcm  a structured report (kept apart by its name)
    archive/<batch>/<StudyUID>/...    a batch handed to the intake: the index's rows point here
    done/<batch>                      the batch's ``index add`` finished
    reports/<StudyUID>/<SOPUID>.sr.dcm  an SR whose study has no image in the index yet
    hl7/<id>.json                     an HL7 report waiting for its study

Every step is a write to a temporary file plus fsync and rename, or a rename of a file or folder,
and every rename is followed by an fsync of the folders it changed. So after a kill -9 each
acknowledged instance is in exactly one place: in the inbox (not processed yet), or in a batch
(processed, or to be processed again: ``index add`` is idempotent and SOPInstanceUIDs are unique in
the store). A study is *quiet* when its inbox folder has not changed for the quiet time; the
folder's modification time (changed by every rename into it) survives a restart.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Union

logger = logging.getLogger(__name__)

NODE_DIR = "node"
SR_SUFFIX = ".sr.dcm"
DCM_SUFFIX = ".dcm"
# A DICOM UID: digits in dot-separated components, at most 64 characters (PS3.5 9.1). Anything else
# is refused before it can become a file name.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(uid: Optional[str]) -> bool:
    """Whether ``uid`` is a well-formed DICOM UID (and so a safe file name)."""
    return bool(uid) and len(str(uid)) <= 64 and bool(_UID.match(str(uid)))


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames into or out of it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(dest: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``dest`` atomically and durably: temp file, fsync, rename, fsync the folder."""
    tmp = tmp_dir / f"{os.getpid()}.{secrets.token_hex(8)}.part"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _batch_owner(name: str) -> Optional[int]:
    m = re.match(r"^[0-9T]+-p([0-9]+)-[0-9]+$", name)
    return int(m.group(1)) if m else None


class Inbox:
    """The node folder of an index: where received instances wait and where batches live.

    Args:
        index_dir: The index folder.
    """

    def __init__(self, index_dir: Union[str, Path]) -> None:
        self.index_dir = Path(index_dir).expanduser()
        self.root = self.index_dir / NODE_DIR
        self.tmp = self.root / "inbox" / "tmp"
        self.studies = self.root / "inbox" / "studies"
        self.archive = self.root / "archive"
        self.done = self.root / "done"
        self.reports = self.root / "reports"
        self.hl7 = self.root / "hl7"
        # Serialises a rename into a study folder with the move of that folder into a batch (in one
        # process); across processes, store() retries when the folder moved under it.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ set-up
    def prepare(self) -> int:
        """Create the folders and remove partial writes left by dead processes; returns how many."""
        for d in (self.tmp, self.studies, self.archive, self.done, self.reports, self.hl7):
            d.mkdir(parents=True, exist_ok=True)
        removed = 0
        for part in self.tmp.glob("*.part"):
            try:
                pid = int(part.name.split(".", 1)[0])
            except ValueError:
                pid = -1
            if pid == os.getpid() or not _pid_alive(pid):
                part.unlink(missing_ok=True)  # never acknowledged: the sender was not told Success
                removed += 1
        if removed:
            fsync_dir(self.tmp)
            logger.info("%s: removed %d partial writes of an interrupted node", self.tmp, removed)
        return removed

    # ------------------------------------------------------------------------------ receiving
    def store(self, study_uid: str, sop_uid: str, data: bytes, *, report: bool = False) -> Path:
        """Write one instance durably into its study's inbox folder; returns its path.

        Returns only once the file and its folder entry are on disk, so the caller may then
        acknowledge the instance.

        Raises:
            ValueError: A UID that is not a well-formed DICOM UID.
            OSError: The disk refused (full, read-only, ...): the instance is not stored.
        """
        if not valid_uid(study_uid) or not valid_uid(sop_uid):
            raise ValueError(f"malformed UID (study {study_uid!r}, instance {sop_uid!r})")
        name = sop_uid + (SR_SUFFIX if report else DCM_SUFFIX)
        tmp = self.tmp / f"{os.getpid()}.{secrets.token_hex(8)}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            for _ in range(100):  # another process may move the study folder into a batch meanwhile
                folder = self.studies / study_uid
                with self._lock:
                    created = not folder.is_dir()
                    folder.mkdir(exist_ok=True)
                    try:
                        os.replace(tmp, folder / name)
                    except FileNotFoundError:
                        if not tmp.exists():
                            raise
                        continue  # the folder was moved between mkdir and rename: make it again
                    fsync_dir(folder)
                    if created:
                        fsync_dir(self.studies)
                    return folder / name
            raise OSError(errno.EBUSY, f"{self.studies / study_uid}: study folder kept moving; instance not stored")
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------ studies
    def inbox_studies(self) -> List[str]:
        """StudyInstanceUIDs with a folder in the inbox."""
        return sorted(p.name for p in self.studies.iterdir() if p.is_dir()) if self.studies.is_dir() else []

    def quiet_studies(self, quiet_s: float, *, now: Optional[float] = None) -> List[str]:
        """Studies of the inbox that received nothing for ``quiet_s`` seconds (oldest first)."""
        now = time.time() if now is None else now
        found = []
        for uid in self.inbox_studies():
            try:
                mtime = (self.studies / uid).stat().st_mtime
            except FileNotFoundError:
                continue
            if now - mtime >= quiet_s:
                found.append((mtime, uid))
        return [uid for _, uid in sorted(found)]

    def study_files(self, study_uid: str) -> List[Path]:
        """Files of a study's inbox folder."""
        folder = self.studies / study_uid
        return sorted(folder.iterdir()) if folder.is_dir() else []

    @staticmethod
    def is_report_file(path: Path) -> bool:
        """Whether a stored file is a structured report (by the name the inbox gave it)."""
        return path.name.endswith(SR_SUFFIX)

    # ------------------------------------------------------------------------------ batches
    def open_batch(self, study_uids: Sequence[str], *, pending_reports: Sequence[str] = ()) -> Optional[Path]:
        """Move studies from the inbox (and pending SRs of these studies) into a new batch folder.

        Args:
            study_uids: Inbox studies to move (ones that are gone, e.g. moved by another process,
                are left out).
            pending_reports: Studies whose pending SRs (``reports/``) join the batch.

        Returns:
            The batch folder, or None when nothing was moved.
        """
        batch = self._new_batch_dir()
        moved = 0
        with self._lock:
            for uid in study_uids:
                try:
                    os.rename(self.studies / uid, batch / uid)
                    moved += 1
                except FileNotFoundError:
                    continue
        for uid in pending_reports:
            src = self.reports / uid
            if not src.is_dir():
                continue
            (batch / uid).mkdir(exist_ok=True)
            for f in sorted(src.iterdir()):
                os.rename(f, batch / uid / f.name)
                moved += 1
            fsync_dir(batch / uid)
            fsync_dir(src)
        if not moved:
            batch.rmdir()
            return None
        fsync_dir(batch)
        fsync_dir(self.studies)
        fsync_dir(self.reports)
        return batch

    def empty_batch(self) -> Path:
        """A new, empty batch folder (a run that only attaches reports to studies already indexed)."""
        batch = self._new_batch_dir()
        fsync_dir(self.archive)
        return batch

    def _new_batch_dir(self) -> Path:
        # The owner's pid is in the name: another process finishes a batch only once its owner is dead.
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for seq in range(100000):
            batch = self.archive / f"{stamp}-p{os.getpid()}-{seq:05d}"
            try:
                batch.mkdir()
                return batch
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, f"{self.archive}: no free batch name")

    def unfinished_batches(self) -> List[Path]:
        """Batches of this process or of dead ones whose ``index add`` has not finished (in creation order).

        A batch of another live process (a DICOMweb import beside the node) is its owner's to finish.
        """
        if not self.archive.is_dir():
            return []
        out = []
        for b in sorted(self.archive.iterdir()):
            if not b.is_dir() or (self.done / b.name).exists():
                continue
            owner = _batch_owner(b.name)
            if owner is None or owner == os.getpid() or not _pid_alive(owner):
                out.append(b)
        return out

    def mark_done(self, batch: Path, summary: Dict) -> None:
        """Record that a batch's ``index add`` finished (with its summary)."""
        write_durably(self.done / batch.name, json.dumps(summary, default=str).encode(), self.tmp)

    def batch_summary(self, batch_name: str) -> Optional[Dict]:
        """The recorded summary of a finished batch."""
        path = self.done / batch_name
        return json.loads(path.read_text()) if path.is_file() else None

    # ------------------------------------------------------------------------------ pending SRs
    def park_reports(self, batch: Path, study_uid: str) -> int:
        """Move a study's SR files out of a batch into ``reports/`` (their study is not indexed yet)."""
        src = batch / study_uid
        dst = self.reports / study_uid
        dst.mkdir(parents=True, exist_ok=True)
        n = 0
        for f in sorted(src.iterdir()):
            if self.is_report_file(f):
                os.rename(f, dst / f.name)
                n += 1
        fsync_dir(dst)
        fsync_dir(self.reports)
        fsync_dir(src)
        return n

    def pending_report_studies(self) -> List[str]:
        """Studies with SRs waiting for their images."""
        if not self.reports.is_dir():
            return []
        return sorted(p.name for p in self.reports.iterdir() if p.is_dir() and any(p.iterdir()))

    # ------------------------------------------------------------------------------ what is here
    def iter_files(self) -> Iterator[Path]:
        """Every received instance the node folder holds: inbox, batches and pending reports."""
        for top in (self.studies, self.archive, self.reports):
            if top.is_dir():
                yield from (p for p in top.rglob("*.dcm") if p.is_file())

    def known_sop_uids(self) -> Set[str]:
        """SOPInstanceUIDs of every instance the node folder holds (from the file names it gave them)."""
        out = set()
        for p in self.iter_files():
            name = p.name
            out.add(name[: -len(SR_SUFFIX)] if name.endswith(SR_SUFFIX) else name[: -len(DCM_SUFFIX)])
        return out


__all__ = ["Inbox", "NODE_DIR", "fsync_dir", "valid_uid", "write_durably"]
