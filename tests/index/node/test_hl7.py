"""The HL7 report feed: ORU^R01 parsing, ACKs, and the MLLP listener keeping reports on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from index.node.hl7 import HL7Listener, UnsupportedMessage, ack, parse_oru
from index.node.inbox import Inbox
from index.node.reports import load_pending
from tests.helpers.pacs_node import oru_message
from tests.helpers.system import need_module

TEXT = "FINDINGS: Small left pleural effusion.\nIMPRESSION: Left effusion."


def test_parse_takes_accession_uid_and_text() -> None:
    need_module("hl7", "node")
    got = parse_oru(oru_message("A123", TEXT, control_id="C7", study_uid="1.2.3.4"))
    assert (got.accession, got.study_uid, got.control_id) == ("A123", "1.2.3.4", "C7")
    assert got.text == TEXT
    # FT line breaks (\.br\) become new lines
    escaped = oru_message("A9", "FINDINGS: one.\\.br\\IMPRESSION: two.")
    assert parse_oru(escaped).text == "FINDINGS: one.\nIMPRESSION: two."


def test_parse_refuses_other_messages_and_reports_without_key_or_text() -> None:
    need_module("hl7", "node")
    adt = oru_message("A1", TEXT).replace("ORU^R01", "ADT^A01")
    with pytest.raises(UnsupportedMessage):
        parse_oru(adt)
    no_text = "\r".join(line for line in oru_message("A1", TEXT).split("\r") if not line.startswith("OBX")) + "\r"
    with pytest.raises(ValueError, match="no report text"):
        parse_oru(no_text)
    no_key = oru_message("", TEXT).replace("|PLMSG1|", "||")
    with pytest.raises(ValueError, match="no accession"):
        parse_oru(no_key)


def test_ack_echoes_the_control_id() -> None:
    reply = ack(oru_message("A1", TEXT, control_id="XYZ"), "AA")
    msh, msa = reply.strip("\r").split("\r")
    assert msh.startswith("MSH|^~\\&|CXRSEARCH|HOSP|RIS|HOSP|") and "|ACK|" in msh
    assert msa == "MSA|AA|XYZ"
    assert ack("garbage", "AE", "bad | message").split("\r")[1] == "MSA|AE||bad / message"


def test_listener_keeps_reports_durably_and_acks(tmp_path: Path) -> None:
    need_module("hl7", "node")
    from hl7.client import MLLPClient

    inbox = Inbox(tmp_path)
    inbox.prepare()
    woke = []
    listener = HL7Listener(inbox, port=0, on_report=lambda: woke.append(1))
    listener.start()
    try:
        with MLLPClient("127.0.0.1", listener.port) as client:
            ok = client.send_message(oru_message("A55", TEXT, control_id="M1"))
            rejected = client.send_message(oru_message("A55", TEXT, control_id="M2").replace("ORU^R01", "ADT^A08"))
            broken = client.send_message(oru_message("A56", "", control_id="M3"))
    finally:
        listener.stop()
    assert b"MSA|AA|M1" in ok and b"MSA|AR|M2" in rejected and b"MSA|AE|M3" in broken
    pending = load_pending(inbox)
    assert [(r.accession, r.text, r.message_id) for _, r in pending] == [("A55", TEXT, "M1")]
    assert woke == [1] and listener.received == 1
