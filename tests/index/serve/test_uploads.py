"""Query images sent to the server: DICOM, PNG, JPEG; malformed, oversized, empty and non-image files."""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from tests.helpers.dicom_files import make_ds, radiograph
from tests.helpers.index_data import ground_truth

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _upload(client, data: bytes, name: str = "query.dcm", **fields):
    form = {k: (json.dumps(v) if k == "filters" else str(v)) for k, v in fields.items()}
    return client.post("/api/search/image", files={"file": (name, data)}, data=form)


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_dicom_upload_excludes_its_patient(client, serve_archive) -> None:
    archive, _ = serve_archive
    gt = ground_truth(archive)
    row = gt[0]
    data = (archive / row["path"]).read_bytes()
    same_patient = {r["study_id"] for r in gt if r["patient_id"] == row["patient_id"]}
    for ret in ("images", "studies", "reports"):
        r = _upload(client, data, **{"return": ret, "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["hits"] and not {h["study_uid"] for h in body["hits"]} & same_patient
        assert body["query_sha256"] == hashlib.sha256(data).hexdigest()
    own = _upload(client, data, **{"return": "images", "k": 1, "include_same_patient": "true"}).json()
    assert own["hits"][0]["sop_uid"] == row["image_id"] and own["hits"][0]["score"] > 0.999
    assert "query_in_index" in {w["code"] for w in own["query_warnings"]}
    filtered = _upload(client, data, **{"return": "images", "k": 3, "filters": {"view": ["PA"]}}).json()
    assert filtered["hits"] and all(h["view"] == "PA" for h in filtered["hits"])


def test_png_and_jpeg_uploads_are_searched(client) -> None:
    img = (radiograph(rows=96, cols=80, bits=8, seed=3) & 0xFF).astype(np.uint8)
    for data, name in ((_png(img), "q.png"), (_png(img, "JPEG"), "q.jpg")):
        r = _upload(client, data, name=name, k=3)
        assert r.status_code == 200, r.text
        assert len(r.json()["hits"]) == 3


def test_large_upload_is_never_spooled_to_disk(client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A 3 MB DICOM (above Starlette's 1 MB spool size) is parsed and decoded without a temporary file."""
    ds = make_ds(radiograph(rows=1200, cols=1200, bits=12, seed=5), PatientID="P-LARGE")
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    assert len(data) > 2 * 1024 * 1024

    def refuse(*_a, **_k):
        raise AssertionError("an upload touched a temporary file")

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    r = _upload(client, data, k=2)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("data,status,match", [
    (b"", 400, "empty"),
    (b"just some text, not an image at all", 415, "not a DICOM"),
    (b"%PDF-1.7 " + b"x" * 300, 415, "not a DICOM"),
    (b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 20, 422, "cannot be read"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, 422, "cannot be decoded"),
    (b"\xff\xd8\xff\xe0" + b"\x01" * 50, 422, "cannot be decoded"),
])
def test_bad_uploads_get_a_one_line_4xx(client, data: bytes, status: int, match: str) -> None:
    r = _upload(client, data)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert match in detail and "\n" not in detail and "/proc/self" not in detail and "Traceback" not in detail


def test_truncated_dicom_pixels_are_a_422(client, serve_archive) -> None:
    archive, _ = serve_archive
    data = (archive / ground_truth(archive)[0]["path"]).read_bytes()
    r = _upload(client, data[: len(data) // 2])
    assert r.status_code == 422 and "\n" not in r.json()["detail"]


def test_oversized_uploads_are_refused(make_client, tmp_path: Path) -> None:
    small = make_client(max_upload_bytes=4096)
    r = _upload(small, b"\x89PNG\r\n\x1a\n" + b"\x00" * 8000)
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_request_shapes_that_are_refused(client) -> None:
    assert client.post("/api/search/image", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    r = client.post("/api/search/image", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/api/search/image", data={"k": "3"}, files={"other": ("a.txt", b"")})
    assert r.status_code in (400, 415)
    r = _upload(client, _png(np.zeros((64, 64), np.uint8)), name="q.png", k="many")
    assert r.status_code == 422 and "k" in r.json()["detail"]
    r = _upload(client, _png(np.zeros((64, 64), np.uint8)), name="q.png", filters="{bad")
    assert r.status_code == 422
