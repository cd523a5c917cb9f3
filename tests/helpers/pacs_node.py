"""Helpers of the live-intake tests: studies to send, SR and HL7 reports, dcmtk calls, a real Orthanc.

Orthanc is started with its own JSON configuration (free loopback ports, remote access off, its
storage in a temporary folder, the DICOMweb plugin), waited for with a bounded loop on ``/system``
and stopped by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import pytest
import requests
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_search.synth import synthesize
from tests.helpers.ports import free_port
from tests.helpers.system import REQUIRE_ENV, required

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc",)
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def need_dicomweb_plugin() -> str:
    """Path of Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb); skips locally, fails in CI."""
    if not Path(DICOMWEB_PLUGIN).is_file():
        why = f"{DICOMWEB_PLUGIN} not found: install the Debian package orthanc-dicomweb"
        if required():
            pytest.fail(f"{why}; {REQUIRE_ENV} is set, so this part is required", pytrace=False)
        pytest.skip(why)
    return DICOMWEB_PLUGIN


@dataclass
class Study:
    """One study of a test archive: its UIDs, accession number, image files and report text."""

    study_uid: str
    accession: str
    patient_id: str
    files: List[Path] = field(default_factory=list)
    sop_uids: List[str] = field(default_factory=list)
    report: str = ""


def uncompressed_archive(out: Path, *, studies: int, seed: int, image_size: int = 64) -> List[Study]:
    """A synthetic PACS export rewritten in Explicit VR Little Endian (what storescu sends by default).

    Returns the studies with their files (each study in its own folder) and their RIS report texts.
    """
    raw = out.parent / f"{out.name}-raw"
    synthesize(raw, studies=studies, seed=seed, layout="pacs", broken=0, image_size=image_size)
    reports: Dict[str, str] = {}
    import csv

    with open(raw / "reports.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            reports[row["StudyInstanceUID"]] = row["report_text"]
    found: Dict[str, Study] = {}
    for path in sorted(raw.rglob("*")):
        if not path.is_file() or path.suffix == ".csv":
            continue
        ds = dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()  # pixel data to Explicit VR Little Endian
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        uid = str(ds.StudyInstanceUID)
        st = found.setdefault(uid, Study(uid, str(ds.AccessionNumber), str(ds.PatientID), report=reports.get(uid, "")))
        dest = out / f"study{len(found):03d}" / f"{ds.SOPInstanceUID}.dcm"
        dest.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(dest, enforce_file_format=True)
        st.files.append(dest)
        st.sop_uids.append(str(ds.SOPInstanceUID))
    return list(found.values())


def sr_file(path: Path, study: Study, text: str) -> Path:
    """A Basic Text SR of ``study`` holding ``text``."""
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.AccessionNumber = study.accession
    ds.PatientID = study.patient_id
    ds.Modality = "SR"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = DicomSequence([concept])
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = DicomSequence([name])
    item.TextValue = text
    ds.ContentSequence = DicomSequence([item])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def oru_message(accession: str, text: str, *, control_id: str = "MSG1", study_uid: str = "") -> str:
    """An HL7 v2.5 ORU^R01 radiology report (accession in OBR-18, text in FT OBX lines)."""
    lines = [
        f"MSH|^~\\&|RIS|HOSP|CXRSEARCH|HOSP|20240102103000||ORU^R01|{control_id}|P|2.5",
        "PID|1||MRN1^^^HOSP||DOE^JANE",
        f"OBR|1|PL{control_id}|{accession}|CHEST^Chest X-ray|||20240102100000" + "|" * 11 + accession,
    ]
    if study_uid:
        lines.append(f"ZDS|{study_uid}^RIS^Application^DICOM")
    for k, line in enumerate(text.splitlines(), start=1):
        lines.append(f"OBX|{k}|FT|&GDT^Report||{line}||||||F")
    return "\r".join(lines) + "\r"


def storescu(program: str, port: int, files: Sequence[Path], *, calling: str = "TESTSCU", called: str = "CXRSEARCH",
             extra: Sequence[str] = (), timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Send ``files`` with dcmtk's storescu to 127.0.0.1:port."""
    cmd = [program, "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def wait_until(check, *, timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    """Poll ``check()`` until true, at most ``timeout`` seconds (then AssertionError naming ``what``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Orthanc:
    """A real Orthanc on loopback ports with the DICOMweb plugin, storage in ``workdir``.

    Args:
        program: The Orthanc binary.
        workdir: Folder for its configuration and storage.
        modalities: ``{name: [AET, host, port]}`` it may send to.
        lua: A Lua script (e.g. ``OnStoredInstance`` routing).
        dicomweb: Load the DICOMweb plugin.
    """

    def __init__(self, program: str, workdir: Path, *, modalities: Optional[Dict[str, list]] = None,
                 lua: Optional[str] = None, aet: str = "ORTHANC", dicomweb: bool = True) -> None:
        self.program = program
        self.workdir = workdir
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.aet = aet
        self.modalities = modalities or {}
        self.lua = lua
        self.plugins = [DICOMWEB_PLUGIN] if dicomweb else []
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web/"

    def start(self, timeout: float = 30.0) -> "Orthanc":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "cxr-search-test", "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": self.aet, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "HttpServerEnabled": True, "DicomServerEnabled": True, "Plugins": self.plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "DicomModalities": self.modalities,
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "StorageCompression": False,
            "HttpsVerifyPeers": False, "ConcurrentJobs": 1, "LimitFindResults": 0, "LimitFindInstances": 0,
            "DicomScuTimeout": 10, "StableAge": 1,
        }
        if self.lua:
            (self.workdir / "route.lua").write_text(self.lua)
            config["LuaScripts"] = [str(self.workdir / "route.lua")]
        (self.workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = open(self.workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([self.program, str(self.workdir / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: "
                                   f"{(self.workdir / 'orthanc.log').read_text(errors='replace')[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer /system within {timeout:g} s")

    def upload(self, files: Iterable[Path]) -> List[str]:
        """POST each file to /instances; returns Orthanc's instance ids."""
        ids = []
        for f in files:
            r = requests.post(f"{self.url}/instances", data=Path(f).read_bytes(), timeout=30)
            r.raise_for_status()
            ids.append(r.json()["ID"])
        return ids

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.proc = None
        if getattr(self, "log", None) is not None:
            self.log.close()
            self.log = None
