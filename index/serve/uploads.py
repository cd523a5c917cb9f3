"""Query images sent to the server: read with a size limit, type-checked, decoded in memory only.

The body is read into memory up to the limit (a larger ``Content-Length`` is refused before reading);
a multipart body is parsed with Starlette's parser told never to spool to a temporary file. DICOM is
handed to the project's reader through an anonymous in-memory file (``memfd``), so the query never
touches the disk and its header still says which patient to exclude; PNG and JPEG are decoded by PIL
from memory. Anything else is a 4xx with one line saying why, never a 500.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, Iterator, Optional, Tuple

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"


class UploadError(Exception):
    """A query image the server will not take (``status`` 400, 413, 415 or 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class QueryImage:
    """An uploaded image: its bytes, sniffed type and SHA-256 (what the audit log keeps)."""

    data: bytes
    kind: str  # dicom | png | jpeg
    sha256: str

    @property
    def audit(self) -> Dict[str, Any]:
        """What the audit log records of it."""
        return {"upload_sha256": self.sha256, "type": self.kind, "bytes": len(self.data)}


def sniff(data: bytes) -> str:
    """``dicom``, ``png`` or ``jpeg`` from the magic bytes.

    Raises:
        UploadError: 400 for an empty file, 415 for any other type.
    """
    if not data:
        raise UploadError(400, "empty upload: send one DICOM, PNG or JPEG file")
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(_PNG):
        return "png"
    if data.startswith(_JPEG):
        return "jpeg"
    raise UploadError(415, "not a DICOM (Part 10), PNG or JPEG file")


def query_image(data: bytes) -> QueryImage:
    """Sniff and hash an upload (see :func:`sniff`)."""
    return QueryImage(data=data, kind=sniff(data), sha256=hashlib.sha256(data).hexdigest())


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes.

    Raises:
        UploadError: 413 when larger (by ``Content-Length`` or while reading).
    """
    declared = request.headers.get("content-length")
    too_big = UploadError(413, f"upload larger than the server's limit of {limit // (1024 * 1024)} MB")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_big
        except ValueError:
            raise UploadError(400, "malformed Content-Length") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_multipart(request: Request, body: bytes) -> Tuple[Dict[str, str], Optional[bytes]]:
    """(text fields, the first file's bytes or None) of a multipart body already read into memory.

    Raises:
        UploadError: 400 for a malformed body, or more than one file.
    """
    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=1, max_fields=32, max_part_size=64 * 1024)
    parser.spool_max_size = len(body) + 1  # never roll the file over to a temporary file on disk
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise UploadError(400, f"malformed multipart body: {exc.message}") from None
    fields: Dict[str, str] = {}
    data: Optional[bytes] = None
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
            else:
                fields[key] = str(value)
    finally:
        await form.close()
    return fields, data


@contextlib.contextmanager
def decoded(img: QueryImage) -> Iterator[Any]:
    """What :meth:`index.search.Searcher.search_image` takes for the upload: an in-memory file path
    (DICOM, so its header can name the patient to exclude) or a PIL image (PNG/JPEG).

    Raises:
        UploadError: 422 when the image cannot be decoded.
    """
    if img.kind == "dicom":
        with _memory_file(img.data) as path:
            yield path
        return
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(io.BytesIO(img.data)) as opened:
            opened.load()
            pil = opened.copy()
    except (UnidentifiedImageError, OSError, ValueError, PILImage.DecompressionBombError) as exc:
        raise UploadError(422, f"the {img.kind.upper()} image cannot be decoded ({exc})") from None
    yield pil


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("cxr-search-query", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    # Not Linux: a private temporary file, deleted at once (the only case an upload touches a disk).
    with tempfile.NamedTemporaryFile(prefix="cxr-query-", suffix=".dcm") as fh:
        fh.write(data)
        fh.flush()
        yield fh.name


__all__ = ["QueryImage", "UploadError", "decoded", "parse_multipart", "query_image", "read_body", "sniff"]
