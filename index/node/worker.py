"""The node's processing loop: quiet studies of the inbox become batches that ``index add`` indexes.

Each batch is an ordinary archive folder (``INDEX_DIR/node/archive/<batch>/<StudyUID>/``) given to
:func:`index.build.build` with ``command="add"``: the same accounting intake as an ``index add``
of an export folder (every file indexed, failed with its reason or skipped with its reason), the
same embedding and the same FAISS sync, so a running service sees the new index generation.

Reports: the batch's SRs are attached by the intake when their study is in the index (now or
from an earlier batch); an SR whose study has no image yet is parked in ``node/reports/`` and
joins the batch of its study's images later. HL7 reports waiting in ``node/hl7/`` are passed to
every run as a RIS CSV, and removed once their study has a report.

After a kill -9 the next start finishes the batches that were not marked done (``index add``
resumes and skips what it already catalogued), then goes on with the inbox.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from sqlalchemy import select

from cxr_search.model import CXRClip
from index.build import BuildOptions, build
from index.index_dir import META_FILE, IndexDir, model_identity
from index.layout import prepare_folder
from index.lock import writer_lock
from index.node.inbox import Inbox
from index.node.reports import load_pending, match_studies, write_reports_csv
from index.store import Study

logger = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    """How the node processes its inbox.

    Attributes:
        quiet_s: A study is processed once nothing arrived for it for this long (seconds).
        poll_s: How often the inbox is looked at.
        retry_s: Wait before retrying a batch whose ``index add`` failed.
        lock_wait_s: How long a batch waits for the index's writer lock (another writer's run).
        build: Options of the ``index add`` runs (device, batch size, store URL ...).
    """

    quiet_s: float = 10.0
    poll_s: float = 1.0
    retry_s: float = 30.0
    lock_wait_s: float = 3600.0
    build: BuildOptions = field(default_factory=BuildOptions)


def ensure_index(index_dir: Union[str, Path], model: CXRClip, *, db_url: Optional[str] = None) -> bool:
    """Create an empty index for ``model`` at ``index_dir`` when there is none; True when created.

    Raises:
        SearchIndexError: The folder holds an index of another model, or other files.
    """
    root = Path(index_dir).expanduser()
    if (root / META_FILE).is_file():
        _check_model(root, model, db_url)
        return False
    prepare_folder(root)  # a folder of other files is refused before a lock file is made in it
    # Under the writer lock: a node and an import started together on a new folder create it once.
    with writer_lock(root, "node: create the index", wait=60.0):
        if (root / META_FILE).is_file():
            _check_model(root, model, db_url)
            return False
        idx = IndexDir.create_or_open(root, model, db_url=db_url)
        try:
            idx.sync()  # empty FAISS files: a service can open the index before the first study arrives
        finally:
            idx.close()
    logger.info("%s: created an empty index", root)
    return True


def _check_model(root: Path, model: CXRClip, db_url: Optional[str]) -> None:
    idx = IndexDir.open(root, db_url=db_url)
    try:
        idx.check_model(model_identity(model))
    finally:
        idx.close()


class Worker:
    """Turns quiet studies of the inbox into indexed studies, one batch at a time.

    Args:
        index_dir: The index folder (must exist: see :func:`ensure_index`).
        model: The index's model.
        inbox: The node folder of the index.
        opts: Processing options.
    """

    def __init__(self, index_dir: Union[str, Path], model: CXRClip, inbox: Inbox,
                 opts: Optional[WorkerOptions] = None) -> None:
        self.index_dir = Path(index_dir).expanduser()
        self.model = model
        self.inbox = inbox
        self.opts = opts or WorkerOptions()
        self.processed: List[Dict[str, Any]] = []
        self.on_batch: Optional[Callable[[Dict[str, Any]], None]] = None
        self._failed_at: Dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._busy = threading.Lock()

    # ------------------------------------------------------------------------------ one step
    def recover(self) -> List[Dict[str, Any]]:
        """Finish the batches an earlier (killed) run left unfinished; returns their summaries."""
        return [s for b in self.inbox.unfinished_batches() if (s := self._process_safely(b)) is not None]

    def run_once(self, *, now: Optional[float] = None, quiet_s: Optional[float] = None) -> List[Dict[str, Any]]:
        """Process what is ready: unfinished batches, then quiet studies and reports whose study came.

        Args:
            now: The time to measure quietness against (default: now).
            quiet_s: Override of the quiet time (0 processes every study of the inbox).

        Returns:
            The summaries of the batches processed.
        """
        with self._busy:
            done = self.recover()
            quiet = self.inbox.quiet_studies(self.opts.quiet_s if quiet_s is None else quiet_s, now=now)
            parked, hl7_due = self._reports_due(quiet)
            batch: Optional[Path] = None
            if quiet or parked:
                batch = self.inbox.open_batch(quiet, pending_reports=parked)
            if batch is None and hl7_due:
                batch = self.inbox.empty_batch()
            if batch is not None:
                summary = self._process_safely(batch)
                if summary is not None:
                    done.append(summary)
            return done

    def _reports_due(self, quiet: List[str]) -> tuple:
        """(parked SR studies now in the index or in ``quiet``, whether an HL7 report's study is in the index
        without one).

        A parked SR joins the batch of its own images (``quiet``), so the study becomes searchable with its
        report at once rather than one round later (and a reader never sees it indexed without it).
        """
        parked = self.inbox.pending_report_studies()
        pending = load_pending(self.inbox)
        if not parked and not pending:
            return [], False
        idx = IndexDir.open(self.index_dir, db_url=self.opts.build.db_url)
        try:
            with idx.store.session() as s:
                present = set(s.scalars(select(Study.study_uid).where(Study.study_uid.in_(parked))).all()) if parked \
                    else set()
            matched = match_studies(idx.store, idx.secret, pending)
        finally:
            idx.close()
        return sorted(present | (set(parked) & set(quiet))), any(not has for _, has in matched.values())

    def _process_safely(self, batch: Path) -> Optional[Dict[str, Any]]:
        last = self._failed_at.get(batch.name)
        if last is not None and time.monotonic() - last < self.opts.retry_s:
            return None
        try:
            summary = self.process(batch)
        except Exception:  # a failed run is retried later; the node keeps receiving meanwhile
            logger.exception("%s: index add failed; retrying in %.0f s", batch, self.opts.retry_s)
            self._failed_at[batch.name] = time.monotonic()
            return None
        self._failed_at.pop(batch.name, None)
        return summary

    def process(self, batch: Path) -> Dict[str, Any]:
        """``index add`` one batch folder (with the waiting HL7 reports), then settle its reports.

        Raises:
            CxrSearchError: The run failed (the batch stays unfinished and is retried).
        """
        t0 = time.perf_counter()
        # The index's writer lock, as every writer: an `index add` or `remove` beside the node takes turns with it.
        with writer_lock(self.index_dir, "node", wait=self.opts.lock_wait_s):
            pending = load_pending(self.inbox)
            reports_csv = write_reports_csv(self.inbox, pending)
            opts = dataclasses.replace(self.opts.build, reports_csv=reports_csv, progress=False, shard=None,
                                       catalogue_only=False)
            summary = build(batch, self.index_dir, self.model, opts, command="add")
            idx = IndexDir.open(self.index_dir, db_url=self.opts.build.db_url)
            try:
                parked = self._park_orphan_reports(idx, batch)
                attached = match_studies(idx.store, idx.secret, pending)
            finally:
                idx.close()
            consumed = 0
            for path, (_, has_report) in attached.items():
                if has_report:  # attached now, or the study already had a report (which wins)
                    path.unlink(missing_ok=True)
                    consumed += 1
            out = {
                "batch": batch.name, "studies": sorted(p.name for p in batch.iterdir() if p.is_dir()),
                "totals": summary["totals"], "added": summary["added"], "catalogue": summary["catalogue"],
                "reports_parked": parked, "hl7_consumed": consumed, "seconds": round(time.perf_counter() - t0, 3),
            }
            self.inbox.mark_done(batch, out)
        logger.info("%s: %d images added (%d studies, %d failed); %d SRs wait for their images", batch.name,
                    out["added"]["images"], len(out["studies"]), out["added"]["failed"], parked)
        self.processed.append(out)
        if self.on_batch is not None:
            self.on_batch(out)
        return out

    def _park_orphan_reports(self, idx: IndexDir, batch: Path) -> int:
        """Move the batch's SRs whose study has no image in the index to ``node/reports/``."""
        with_sr = [d.name for d in batch.iterdir() if d.is_dir() and any(map(self.inbox.is_report_file, d.iterdir()))]
        if not with_sr:
            return 0
        with idx.store.session() as s:
            present = set(s.scalars(select(Study.study_uid).where(Study.study_uid.in_(with_sr))).all())
        # A present study took its SR (or kept the report it had); only the SRs of absent studies wait.
        return sum(self.inbox.park_reports(batch, uid) for uid in with_sr if uid not in present)

    # ------------------------------------------------------------------------------ the loop
    def start(self) -> None:
        """Process the inbox in a background thread until :meth:`stop`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="cxr-search-node-worker", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the inbox is on disk: nothing is lost, the next round tries again
                logger.exception("node worker round failed")
            self._stop.wait(self.opts.poll_s)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the loop after the batch in progress (it is on disk either way)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


__all__ = ["Worker", "WorkerOptions", "ensure_index"]
