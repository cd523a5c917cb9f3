"""The RIS report feed: HL7 v2 ORU^R01 messages over MLLP, kept until their study is indexed.

MLLP frames a message as ``<VT> message <FS><CR>``; every message is answered with an ACK
(``MSA|AA`` once the report is on disk, ``AE`` when it cannot be used or stored, ``AR`` for a
message type other than ORU^R01). The report is matched to its study by accession number (OBR-18,
the IHE radiology placer field, else OBR-3 filler order number, else OBR-2) or by the
StudyInstanceUID of a ZDS segment; its text is the OBX-5 values of text observations (TX, FT, ST)
in order. Parsing uses the ``hl7`` package.
"""

from __future__ import annotations

import datetime as _dt
import logging
import socket
import socketserver
import threading
from dataclasses import dataclass
from typing import Any, Callable, FrozenSet, List, Optional, Tuple

from index.node.inbox import Inbox, valid_uid
from index.node.reports import PendingReport, save_pending

logger = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
_TEXT_TYPES = {"TX", "FT", "ST"}
_MAX_MESSAGE = 4 * 1024 * 1024  # a report message larger than this is refused (a stream without frame ends)


class UnsupportedMessage(ValueError):
    """A well-formed HL7 message of a type the node does not take (answered AR)."""


@dataclass
class ParsedReport:
    """What the node takes from an ORU^R01 message."""

    control_id: str
    accession: str
    study_uid: str
    text: str


def _field(segment: Any, index: int) -> str:
    try:
        return str(segment[index])
    except (IndexError, KeyError):
        return ""


def _first_component(value: str) -> str:
    return value.split("^", 1)[0].strip()


def parse_oru(message: str) -> ParsedReport:
    """The accession number, StudyInstanceUID and report text of an ORU^R01 message.

    Raises:
        UnsupportedMessage: Not an ORU^R01 message.
        ValueError: No key to match a study, or no report text.
    """
    import hl7

    msg = hl7.parse(message.replace("\r\n", "\r").replace("\n", "\r"))
    msh = msg.segment("MSH")
    kind = _field(msh, 9)
    control_id = _field(msh, 10)
    if not kind.startswith("ORU^R01"):
        raise UnsupportedMessage(f"message type {kind or 'missing'}; the node takes ORU^R01 reports")
    try:
        obr = msg.segment("OBR")
    except KeyError:
        raise ValueError("no OBR segment (order with the accession number)") from None
    accession = next((a for a in (_first_component(_field(obr, i)) for i in (18, 3, 2)) if a), "")
    study_uid = ""
    for seg in msg:
        if _field(seg, 0) == "ZDS":
            candidate = _first_component(_field(seg, 1))
            study_uid = candidate if valid_uid(candidate) else ""
    lines: List[str] = []
    for seg in msg:
        if _field(seg, 0) == "OBX" and _field(seg, 2) in _TEXT_TYPES:
            # FT line breaks (\.br\) unescape to CR; repetitions (~) are lines too.
            lines.append(msg.unescape(_field(seg, 5)).replace("\r", "\n").replace("~", "\n"))
    text = "\n".join(lines).strip()
    if not accession and not study_uid:
        raise ValueError("no accession number (OBR-18/OBR-3/OBR-2) and no StudyInstanceUID (ZDS-1)")
    if not text:
        raise ValueError("no report text (OBX segments of type TX, FT or ST)")
    return ParsedReport(control_id, accession, study_uid, text)


def ack(message: str, code: str, text: str = "") -> str:
    """An HL7 ACK of ``message`` (MSA code AA, AE or AR), built without parsing when the message is broken."""
    first = message.replace("\n", "\r").split("\r", 1)[0]
    fields = first.split("|") if first.startswith("MSH") else ["MSH", "^~\\&"]
    get = lambda i: fields[i] if len(fields) > i else ""  # noqa: E731
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d%H%M%S")
    version = get(11) or "2.5"
    control = get(9)
    msh = "|".join(["MSH", get(1) or "^~\\&", get(4) or "CXRSEARCH", get(5), get(2), get(3), now, "", "ACK",
                    f"ACK{now}", get(10) or "P", version])
    safe = text.replace("|", "/").replace("\r", " ").replace("\n", " ")[:80]
    return f"{msh}\rMSA|{code}|{control}" + (f"|{safe}" if safe else "") + "\r"


class _Handler(socketserver.BaseRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        sock: socket.socket = self.request
        if self.server.allowed and self.client_address[0] not in self.server.allowed:
            logger.warning("HL7 connection from %s refused: not on the allow-list", self.client_address[0])
            return
        sock.settimeout(self.server.idle_timeout)
        buf = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, OSError):
                return
            if not chunk:
                return
            buf += chunk
            while True:
                start = buf.find(START)
                end = buf.find(END, start + 1) if start >= 0 else -1
                if start < 0 or end < 0:
                    break
                frame, buf = buf[start + 1 : end], buf[end + len(END) :]
                reply = self.server.on_message(frame.decode("utf-8", errors="replace"))
                sock.sendall(START + reply.encode("utf-8") + END)
            if len(buf) > _MAX_MESSAGE:
                logger.warning("HL7 stream from %s: no frame end within %d bytes; closed", self.client_address[0],
                               _MAX_MESSAGE)
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], on_message: Callable[[str], str], allowed: FrozenSet[str],
                 idle_timeout: float) -> None:
        self.on_message = on_message
        self.allowed = allowed
        self.idle_timeout = idle_timeout
        super().__init__(address, _Handler)


class HL7Listener:
    """MLLP listener that keeps each ORU^R01 report durably in the node folder, then ACKs it.

    Args:
        inbox: The node folder.
        host: Address to bind (127.0.0.1 by default).
        port: TCP port (0 picks a free one).
        allowed_hosts: Peer addresses admitted (all when empty).
        on_report: Called after a report was kept (e.g. to wake the worker).
    """

    def __init__(self, inbox: Inbox, host: str = "127.0.0.1", port: int = 2575, *,
                 allowed_hosts: FrozenSet[str] = frozenset(), on_report: Optional[Callable[[], None]] = None,
                 idle_timeout: float = 300.0) -> None:
        self.inbox = inbox
        self.on_report = on_report
        self.received = 0
        self._server = _Server((host, port), self.handle_message, allowed_hosts, idle_timeout)
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="cxr-search-hl7", daemon=True)
        self._thread.start()
        logger.info("HL7 (MLLP) listener on %s:%d", *self._server.server_address[:2])

    def stop(self) -> None:
        """Stop listening."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def handle_message(self, message: str) -> str:
        """Keep one message's report; returns the ACK to send."""
        try:
            parsed = parse_oru(message)
        except UnsupportedMessage as exc:
            return ack(message, "AR", str(exc))
        except Exception as exc:  # a broken message is answered, never crashes the listener
            logger.warning("HL7 message not used: %s", exc)
            return ack(message, "AE", str(exc))
        try:
            save_pending(self.inbox, PendingReport(accession=parsed.accession, study_uid=parsed.study_uid,
                                                   text=parsed.text, message_id=parsed.control_id))
        except OSError as exc:
            logger.error("HL7 report %s not stored (%s)", parsed.control_id, exc)
            return ack(message, "AE", "report not stored")
        self.received += 1
        if self.on_report is not None:
            self.on_report()
        return ack(message, "AA")


__all__ = ["HL7Listener", "ParsedReport", "UnsupportedMessage", "ack", "parse_oru"]
