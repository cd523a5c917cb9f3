"""A running node: the DICOM SCP, the optional HL7 listener and the worker, over one index folder.

Used by ``cxr-search node``, and by ``cxr-search serve --node-port`` beside its HTTP server.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any, Dict, FrozenSet, Optional, Sequence, Union

from cxr_search.errors import ConfigError
from cxr_search.model import CXRClip
from index.node.hl7 import HL7Listener
from index.node.inbox import Inbox
from index.node.scp import NodeConfig, StorageNode, counts_dict, parse_allow
from index.node.worker import Worker, WorkerOptions, ensure_index

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_config(ae_title: str, host: str, port: int, allow: Sequence[str], *, allow_any: bool = False) -> NodeConfig:
    """The DICOM side of a node from command-line values, checked.

    Args:
        ae_title: The node's AE title (1 to 16 characters).
        host: Address to listen on.
        port: DICOM port (0: a free one).
        allow: ``AE_TITLE@HOST`` entries of the allow-list.
        allow_any: Admit every caller on a non-loopback address.

    Raises:
        ConfigError: A malformed AE title or allow-list entry, or a non-loopback address without an allow-list.
    """
    if len(ae_title.strip()) == 0 or len(ae_title) > 16:
        raise ConfigError(f"--ae-title {ae_title!r}: an AE title has 1 to 16 characters")
    config = NodeConfig(ae_title=ae_title.strip(), host=host, port=port, allow=parse_allow(allow))
    _check_exposure(config, allow_any)
    return config


def _check_exposure(config: NodeConfig, allow_any: bool) -> None:
    if not is_loopback(config.host) and not config.allow and not allow_any:
        raise ConfigError(f"--host {config.host}: a node reachable from the network needs an allow-list "
                          "(--allow AE@HOST for each PACS or router); --allow-any admits every caller")


class Node:
    """The DICOM node of an index folder.

    Args:
        index_dir: The index folder (created, empty, for ``model`` when missing).
        model: The index's model.
        config: The DICOM side (AE title, address, allow-list).
        worker: Processing options (quiet time, ``index add`` options).
        hl7_port: Port of the HL7 (MLLP) listener; None for none.
        hl7_allowed: Addresses admitted by the HL7 listener (all when empty).
        allow_any: Serve a non-loopback address without an allow-list.

    Raises:
        ConfigError: A non-loopback address without an allow-list (and without ``allow_any``).
    """

    def __init__(self, index_dir: Union[str, Path], model: CXRClip, config: NodeConfig,
                 worker: Optional[WorkerOptions] = None, *, hl7_port: Optional[int] = None,
                 hl7_allowed: FrozenSet[str] = frozenset(), allow_any: bool = False) -> None:
        _check_exposure(config, allow_any)
        self.index_dir = Path(index_dir).expanduser()
        self.model = model
        self.opts = worker or WorkerOptions()
        self.inbox = Inbox(self.index_dir)
        self.scp = StorageNode(self.inbox, config)
        self.worker = Worker(self.index_dir, model, self.inbox, self.opts)
        self.hl7: Optional[HL7Listener] = None
        self._hl7_port = hl7_port
        self._hl7_host = config.host
        self._hl7_allowed = hl7_allowed
        self.recovered: list = []
        self._stopped = False

    def start(self) -> None:
        """Open (or create) the index, finish what a killed run left, then listen and process.

        Raises:
            SearchIndexError: The folder holds an index of another model.
            OSError: A port cannot be bound.
        """
        ensure_index(self.index_dir, self.model, db_url=self.opts.build.db_url)
        self.inbox.prepare()
        self.recovered = self.worker.recover()
        if self.recovered:
            logger.info("finished %d batches of an interrupted run", len(self.recovered))
        self.scp.start()
        if self._hl7_port is not None:
            self.hl7 = HL7Listener(self.inbox, self._hl7_host, self._hl7_port, allowed_hosts=self._hl7_allowed)
            self.hl7.start()
        self.worker.start()

    def stop(self) -> None:
        """Stop listening, then stop the worker after its batch in progress (a second call does nothing)."""
        if self._stopped:
            return
        self._stopped = True
        self.scp.stop()
        if self.hl7 is not None:
            self.hl7.stop()
        self.worker.stop()

    def describe(self) -> str:
        """One line for the operator: where the node listens, its index and its quiet time."""
        st = self.status()
        return (f"node {st['ae_title']} listening on {st['host']}:{st['port']}"
                + (f", HL7 on port {st['hl7_port']}" if st["hl7_port"] else "")
                + f"; index {self.index_dir}; studies are indexed {self.opts.quiet_s:g} s after their last instance")

    def status(self) -> Dict[str, Any]:
        """Ports, counters and what waits in the inbox."""
        return {
            "ae_title": self.scp.config.ae_title, "host": self.scp.config.host, "port": self.scp.port,
            "hl7_port": self.hl7.port if self.hl7 is not None else None, "received": counts_dict(self.scp),
            "hl7_received": self.hl7.received if self.hl7 is not None else 0,
            "inbox_studies": len(self.inbox.inbox_studies()), "batches": len(self.worker.processed),
        }


__all__ = ["Node", "is_loopback", "node_config"]
