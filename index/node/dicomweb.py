"""Import from a PACS over DICOMweb: QIDO-RS finds the studies, WADO-RS fetches their new instances.

The import goes through the node folder of the index, like a C-STORE: each fetched instance is
written durably into the inbox (:meth:`index.node.inbox.Inbox.store`), and each page of studies
becomes a batch that ``index add`` indexes (:meth:`index.node.worker.Worker.process`). So a
killed import loses nothing it fetched: the next run finishes the batches left unfinished, and
fetches only the SOPInstanceUIDs that are neither in the index nor in the node folder.

Only the SOP classes the node stores are fetched (CR, DX, Secondary Capture, SR); the others are
counted as ``not_wanted``. Uses ``dicomweb-client`` (``pip install -e '.[node]'``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union

from sqlalchemy import select

from cxr_search.errors import ConfigError, SearchIndexError
from cxr_search.model import CXRClip
from index.build import BuildOptions
from index.index_dir import IndexDir
from index.node.inbox import Inbox, valid_uid
from index.node.scp import IMAGE_SOP_CLASSES, SR_SOP_CLASSES
from index.node.worker import Worker, WorkerOptions, ensure_index
from index.store import Image

logger = logging.getLogger(__name__)

PASSWORD_ENV = "CXR_SEARCH_DICOMWEB_PASSWORD"
TOKEN_ENV = "CXR_SEARCH_DICOMWEB_TOKEN"
_STUDY_UID, _SERIES_UID, _SOP_UID, _SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
_MODALITIES = "00080061"


@dataclass
class ImportOptions:
    """What to import.

    Attributes:
        since: Only studies from this date on (``YYYY-MM-DD`` or ``YYYYMMDD``).
        modalities: Studies listing one of these ModalitiesInStudy are imported (empty: all studies).
        page_size: Studies per QIDO-RS page; each page is one ``index add``.
        build: Options of the ``index add`` runs.
    """

    since: Optional[str] = None
    modalities: List[str] = field(default_factory=lambda: ["CR", "DX"])
    page_size: int = 100
    build: BuildOptions = field(default_factory=BuildOptions)


def make_session(auth: Optional[str], user: Optional[str]) -> Any:
    """A requests session with the credentials of ``--auth`` (read from the environment), or None.

    Raises:
        ConfigError: Unknown scheme, or the user / secret is missing.
    """
    if auth is None:
        return None
    import requests

    session = requests.Session()
    if auth == "basic":
        password = os.environ.get(PASSWORD_ENV)
        if not user or password is None:
            raise ConfigError(f"--auth basic needs --user and the password in ${PASSWORD_ENV}")
        session.auth = (user, password)
    elif auth == "bearer":
        token = os.environ.get(TOKEN_ENV)
        if not token:
            raise ConfigError(f"--auth bearer needs the token in ${TOKEN_ENV}")
        session.headers["Authorization"] = f"Bearer {token}"
    else:
        raise ConfigError(f"--auth {auth!r}: use basic or bearer")
    return session


def _date_filter(since: Optional[str]) -> Optional[str]:
    if not since:
        return None
    text = since.replace("-", "")
    try:
        _dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise ConfigError(f"--since {since!r}: write a date as YYYY-MM-DD") from None
    return f"{text}-"


def _value(obj: Dict[str, Any], tag: str) -> str:
    values = (obj.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else ""


def _paged(search: Any, page_size: int, **kwargs: Any) -> Iterator[List[Dict[str, Any]]]:
    """Pages of a QIDO-RS search (limit/offset) until a short page."""
    offset = 0
    while True:
        page = search(limit=page_size, offset=offset, **kwargs) or []
        yield page
        if len(page) < page_size:
            return
        offset += len(page)


def study_pages(client: Any, opts: ImportOptions) -> Iterator[List[str]]:
    """StudyInstanceUIDs matching the options, a QIDO-RS page at a time (each study once).

    The date goes to the server (``StudyDate=YYYYMMDD-``); the modalities are matched here on the
    ModalitiesInStudy each study lists, because servers page a ModalitiesInStudy query unreliably
    (Orthanc 1.10 answers every page after the first with nothing). A study whose answer lacks
    ModalitiesInStudy is kept: the SOP classes of its instances decide.
    """
    date = _date_filter(opts.since)
    wanted = {m.upper() for m in opts.modalities}
    filters = {"StudyDate": date} if date else {}
    seen: Set[str] = set()
    for page in _paged(client.search_for_studies, opts.page_size, fields=["StudyInstanceUID", "ModalitiesInStudy"],
                       search_filters=filters):
        uids = []
        for obj in page:
            uid = _value(obj, _STUDY_UID)
            listed = {str(m).upper() for m in ((obj.get(_MODALITIES) or {}).get("Value") or [])}
            if not valid_uid(uid) or uid in seen or (wanted and listed and not listed & wanted):
                continue
            seen.add(uid)
            uids.append(uid)
        if uids:
            yield uids


def study_instances(client: Any, study_uid: str, page_size: int = 1000) -> List[Tuple[str, str, str]]:
    """(SeriesInstanceUID, SOPInstanceUID, SOPClassUID) of a study's instances."""
    out = []
    for page in _paged(client.search_for_instances, page_size, study_instance_uid=study_uid,
                       fields=["SOPClassUID", "SeriesInstanceUID"]):
        out += [(_value(o, _SERIES_UID), _value(o, _SOP_UID), _value(o, _SOP_CLASS)) for o in page]
    return out


def _encode(ds: Any) -> bytes:
    from pydicom import dcmwrite

    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _indexed_sops(index_dir: Path, db_url: Optional[str]) -> Set[str]:
    idx = IndexDir.open(index_dir, db_url=db_url)
    try:
        with idx.store.session() as s:
            return set(s.scalars(select(Image.sop_uid)).all())
    finally:
        idx.close()


def import_dicomweb(url: str, index_dir: Union[str, Path], model: CXRClip, opts: Optional[ImportOptions] = None, *,
                    session: Any = None, client: Any = None, progress: bool = False) -> Dict[str, Any]:
    """Import the new instances of a DICOMweb server into an index (created when missing).

    Args:
        url: The DICOMweb base URL (QIDO-RS and WADO-RS below it).
        index_dir: The index folder.
        model: The index's model.
        opts: What to import.
        session: A requests session (credentials), see :func:`make_session`.
        client: A ready DICOMweb client (tests); built from ``url`` and ``session`` when None.
        progress: A progress bar on stderr.

    Returns:
        The JSON summary: what was found and fetched, the batches, the index totals.

    Raises:
        SearchIndexError: The server cannot be queried (the message names the URL), or the index
            belongs to another model.
    """
    opts = opts or ImportOptions()
    index_dir = Path(index_dir).expanduser()
    ensure_index(index_dir, model, db_url=opts.build.db_url)
    inbox = Inbox(index_dir)
    inbox.prepare()
    worker = Worker(index_dir, model, inbox, WorkerOptions(build=opts.build))
    recovered = worker.recover()  # batches a killed import (or node) left unfinished
    if client is None:
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(url, session=session)
    known = _indexed_sops(index_dir, opts.build.db_url) | inbox.known_sop_uids()
    wanted = set(IMAGE_SOP_CLASSES) | set(SR_SOP_CLASSES)
    counts = {"studies": 0, "instances_found": 0, "fetched": 0, "known": 0, "not_wanted": 0, "failed": 0}
    batches: List[Dict[str, Any]] = []
    from tqdm.auto import tqdm

    bar = tqdm(desc="DICOMweb import", unit="study", disable=not progress)
    try:
        for page in _guard(url, study_pages(client, opts)):
            for study_uid in page:
                counts["studies"] += 1
                for series_uid, sop_uid, sop_class in _list_instances(url, client, study_uid):
                    counts["instances_found"] += 1
                    if sop_class not in wanted:
                        counts["not_wanted"] += 1
                        continue
                    if sop_uid in known:
                        counts["known"] += 1
                        continue
                    if _fetch_one(client, inbox, study_uid, series_uid, sop_uid, sop_class):
                        known.add(sop_uid)
                        counts["fetched"] += 1
                    else:
                        counts["failed"] += 1
                bar.update(1)
            # The page's studies (with anything a killed run fetched for them) become one batch.
            batch = inbox.open_batch([u for u in page if (inbox.studies / u).is_dir()])
            if batch is not None:
                batches.append(worker.process(batch))
    finally:
        bar.close()
    idx = IndexDir.open(index_dir, db_url=opts.build.db_url)
    try:
        totals = idx.store.counts()
    finally:
        idx.close()
    return {
        "index": str(index_dir), "url": url, "fetch": counts, "recovered_batches": len(recovered),
        "batches": [{k: b[k] for k in ("batch", "added", "reports_parked")} for b in batches],
        "totals": {k: totals[k] for k in ("images", "studies", "sections", "failed")},
    }


def _list_instances(url: str, client: Any, study_uid: str) -> List[Tuple[str, str, str]]:
    try:
        return study_instances(client, study_uid)
    except Exception as exc:
        raise SearchIndexError(f"{url}: QIDO-RS instance search of a study failed ({type(exc).__name__}: {exc}); "
                               "check the URL, credentials and that the server is up, then run the import again") \
            from exc


def _guard(url: str, pages: Iterator[List[str]]) -> Iterator[List[str]]:
    """Turn a failed QIDO-RS request into an error that names the server."""
    while True:
        try:
            page = next(pages)
        except StopIteration:
            return
        except Exception as exc:
            raise SearchIndexError(f"{url}: QIDO-RS study search failed ({type(exc).__name__}: {exc}); check the "
                                   "URL (it ends in the DICOMweb root, e.g. /dicom-web/), credentials and that "
                                   "the server is up") from exc
        yield page


def _fetch_one(client: Any, inbox: Inbox, study_uid: str, series_uid: str, sop_uid: str, sop_class: str) -> bool:
    """WADO-RS one instance into the inbox; False (logged) when it cannot be fetched or is not what was listed."""
    try:
        ds = client.retrieve_instance(study_uid, series_uid, sop_uid)
        got_sop, got_study = str(ds.get("SOPInstanceUID", "")), str(ds.get("StudyInstanceUID", ""))
        if got_sop != sop_uid or got_study != study_uid:
            logger.warning("WADO-RS %s: the server returned instance %s of study %s", sop_uid, got_sop, got_study)
            return False
        data = _encode(ds)
    except Exception as exc:  # one bad instance must not stop the import; it is fetched again next time
        logger.warning("WADO-RS %s: not fetched (%s: %s)", sop_uid, type(exc).__name__, exc)
        return False
    inbox.store(study_uid, sop_uid, data, report=sop_class in SR_SOP_CLASSES)  # OSError: disk refused -> stop
    return True


__all__ = ["ImportOptions", "import_dicomweb", "make_session", "study_instances", "study_pages"]
