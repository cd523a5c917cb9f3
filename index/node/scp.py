"""The DICOM node: a pynetdicom Storage SCP (radiographs and SR) and Verification SCP.

The event handlers do little: a C-STORE is written durably into the inbox (temp file, fsync,
rename, fsync of the folder) and only then answered Success; an instance that cannot be stored
gets a failure status (``0xA700`` out of resources when the disk refuses, ``0xC000`` cannot
understand for a dataset without usable UIDs, ``0xA900`` when the dataset does not match the
request), never a false Success. Processing (cataloguing, embedding, FAISS) happens in the
:class:`index.node.worker.Worker`, not in the association's thread.

Associations are checked before negotiation: the called AE title must be the node's, and with an
allow-list (``AE@HOST`` entries) the calling AE title and the peer's address must match an entry;
anything else gets an A-ASSOCIATE-RJ (calling AE title not recognised).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Dict, FrozenSet, List, Optional, Sequence

from pydicom import dcmread, uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from cxr_search.dicom.codecs import INSTALL_HINTS, J2K_SYNTAXES
from cxr_search.errors import ConfigError
from index.node.inbox import Inbox, valid_uid

logger = logging.getLogger(__name__)

#: SOP classes the node stores: CR, DX for presentation / for processing, Secondary Capture.
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
#: Structured reports: Basic Text, Enhanced, Comprehensive SR.
SR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
}
UNCOMPRESSED_SYNTAXES = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
                         uid.ExplicitVRBigEndian]
#: What the project's DICOM reader decodes (cxr_search.dicom.read / codecs): uncompressed, JPEG,
#: JPEG-LS, JPEG 2000 / HTJ2K and RLE.
IMAGE_SYNTAXES = UNCOMPRESSED_SYNTAXES + sorted(set(INSTALL_HINTS) | set(J2K_SYNTAXES))

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality"]


@dataclass(frozen=True)
class AllowEntry:
    """One allow-list entry: a calling AE title, and the addresses it may call from (any when empty)."""

    ae_title: str
    host: str = ""
    addresses: FrozenSet[str] = frozenset()

    def admits(self, ae_title: str, address: str) -> bool:
        """Whether a call from ``ae_title`` at ``address`` matches this entry."""
        return ae_title == self.ae_title and (not self.addresses or _norm_ip(address) in self.addresses)


def _norm_ip(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return str(mapped or ip)


def parse_allow(items: Sequence[str]) -> List[AllowEntry]:
    """``AE@HOST`` (or ``AE`` for any host) entries; HOST is an address or a name resolved now.

    Raises:
        ConfigError: An empty or over-long AE title, or a host that does not resolve.
    """
    out = []
    for item in items:
        ae_title, _, host = item.partition("@")
        ae_title = ae_title.strip()
        if not ae_title or len(ae_title) > 16 or "\\" in ae_title:
            raise ConfigError(f"--allow {item!r}: write AE_TITLE@HOST (an AE title of 1-16 characters, e.g. "
                              "ORTHANC@10.0.0.5)")
        addresses: FrozenSet[str] = frozenset()
        if host:
            try:
                addresses = frozenset(_norm_ip(str(info[4][0])) for info in socket.getaddrinfo(host, None))
            except OSError as exc:
                raise ConfigError(f"--allow {item!r}: host {host!r} does not resolve ({exc}); give its address") from exc
        out.append(AllowEntry(ae_title, host, addresses))
    return out


@dataclass
class NodeConfig:
    """Where and how the node listens.

    Attributes:
        ae_title: The node's AE title (the called AE title peers must use).
        host: Address to bind (127.0.0.1 by default: give the hospital network's address to serve it).
        port: TCP port (0 picks a free one; :attr:`StorageNode.port` tells which).
        allow: Who may call; empty admits any caller that reaches the port.
        max_associations: Concurrent associations.
    """

    ae_title: str = "CXRSEARCH"
    host: str = "127.0.0.1"
    port: int = 11112
    allow: List[AllowEntry] = field(default_factory=list)
    max_associations: int = 10


def add_storage_contexts(ae: AE) -> None:
    """The presentation contexts the node accepts (images, SR, Verification)."""
    for sop_class in IMAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, IMAGE_SYNTAXES)
    for sop_class in SR_SOP_CLASSES:
        ae.add_supported_context(sop_class, UNCOMPRESSED_SYNTAXES)
    ae.add_supported_context(Verification, UNCOMPRESSED_SYNTAXES)


class StorageNode:
    """The Storage and Verification SCP in front of an :class:`~index.node.inbox.Inbox`.

    Args:
        inbox: Where received instances go (prepared by the caller).
        config: AE title, address, allow-list.
    """

    def __init__(self, inbox: Inbox, config: NodeConfig) -> None:
        self.inbox = inbox
        self.config = config
        self.counts: Counter = Counter()
        self._count_lock = threading.Lock()
        self._server: Optional[ThreadedAssociationServer] = None
        ae = AE(ae_title=config.ae_title)
        ae.maximum_associations = config.max_associations
        ae.require_called_aet = True
        if config.allow:
            ae.require_calling_aet = sorted({e.ae_title for e in config.allow})
        add_storage_contexts(ae)
        self.ae = ae

    # ------------------------------------------------------------------------------ running
    def start(self) -> None:
        """Listen (in background threads) until :meth:`stop`.

        Raises:
            OSError: The address cannot be bound (in use, not local).
        """
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REQUESTED, self._on_requested)]
        self._server = self.ae.start_server((self.config.host, self.config.port), block=False,
                                            evt_handlers=handlers)
        logger.info("DICOM node %s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop listening and close the associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

    def _count(self, key: str) -> None:
        with self._count_lock:
            self.counts[key] += 1

    # ------------------------------------------------------------------------------ handlers
    def _on_requested(self, event: Any) -> None:
        """Reject an association from a caller that is not on the allow-list (before negotiation)."""
        if not self.config.allow:
            return
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        if any(e.admits(calling, address) for e in self.config.allow):
            return
        logger.warning("rejected association from %s at %s: not on the allow-list", calling, address)
        self._count("rejected_associations")
        assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
        assoc.kill()  # as pynetdicom's own rejection: waits until the A-ASSOCIATE-RJ is sent

    def _on_store(self, event: Any) -> int:
        """Store one instance durably; Success only once it is on disk."""
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        sop_class = str(req.AffectedSOPClassUID or "")
        try:
            data = event.encoded_dataset()
            header = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            study_uid = str(header.get("StudyInstanceUID", "") or "")
            ds_sop = str(header.get("SOPInstanceUID", "") or "")
            ds_class = str(header.get("SOPClassUID", "") or "")
        except Exception as exc:  # any parse error: the peer sent something we cannot read
            logger.warning("C-STORE %s: unreadable dataset (%s: %s)", sop_uid, type(exc).__name__, exc)
            self._count("failed_unreadable")
            return CANNOT_UNDERSTAND
        if not valid_uid(study_uid) or not valid_uid(sop_uid):
            logger.warning("C-STORE %r: no usable StudyInstanceUID / SOPInstanceUID (%r)", sop_uid, study_uid)
            self._count("failed_unreadable")
            return CANNOT_UNDERSTAND
        if ds_sop != sop_uid or (ds_class and ds_class != sop_class):
            logger.warning("C-STORE %s: the dataset's SOP instance/class (%s, %s) differ from the request's",
                           sop_uid, ds_sop, ds_class)
            self._count("failed_mismatch")
            return DATASET_MISMATCH
        try:
            self.inbox.store(study_uid, sop_uid, data, report=sop_class in SR_SOP_CLASSES)
        except OSError as exc:
            logger.error("C-STORE %s: not stored (%s); answered out of resources", sop_uid, exc)
            self._count("failed_storage")
            return OUT_OF_RESOURCES
        self._count("stored")
        return SUCCESS


def counts_dict(node: StorageNode) -> Dict[str, int]:
    """A copy of the node's counters (stored, failed_*, rejected_associations)."""
    with node._count_lock:
        return dict(node.counts)


__all__ = ["AllowEntry", "IMAGE_SOP_CLASSES", "IMAGE_SYNTAXES", "NodeConfig", "SR_SOP_CLASSES", "StorageNode",
           "parse_allow"]
