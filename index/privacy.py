"""The index's secret: pseudonymous patient keys, path look-up keys and encrypted file paths.

Each index folder holds ``secret.key`` (32 random bytes, mode 0600), created at the first build.
Patients are stored as HMAC-SHA256(secret, PatientID): the same patient gets the same key within an
index (so same-patient exclusion and patient removal work) and keys cannot be linked across indices
or reversed by hashing candidate IDs, as a plain hash could (DICOM PS3.15 Annex E keeps no
re-identifiable key). File paths can name the patient (``SMITH_JOHN_12345/...``), so the store
holds them only encrypted (Fernet, AES-128-CBC + HMAC) plus an HMAC for exact look-ups: the
database alone, for instance on a shared PostgreSQL server, reveals neither names nor paths.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Union

from cryptography.fernet import Fernet, InvalidToken

from cxr_search.errors import SearchIndexError
from cxr_search.fileio import atomic_write

SECRET_FILE = "secret.key"


def scrub_path(text: str, path: Union[str, Path]) -> str:
    """``text`` (an error message) with the file path replaced by ``<file>``: reasons are stored in clear.

    The path itself is stored only encrypted; ``index failures`` decrypts it and puts it back in place of ``<file>``.
    """
    text = text.replace(str(path), "<file>")
    name = Path(str(path)).name
    return text.replace(name, "<file>") if len(name) > 3 else text


class IndexSecret:
    """Keyed pseudonyms and path encryption for one index.

    Args:
        key: The 32-byte secret.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise SearchIndexError("index secret must be 32 bytes; the secret.key file is damaged")
        self._key = key
        # Separate derived keys per use, so a value of one kind never equals a value of another.
        fernet_key = hmac.new(key, b"cxr-search path encryption", hashlib.sha256).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(fernet_key))

    @classmethod
    def load_or_create(cls, index_dir: Union[str, Path], *, create: bool) -> "IndexSecret":
        """Read ``INDEX_DIR/secret.key``, or create it when ``create`` and it is missing.

        Loading only reads the file: it needs no write access to the folder or the file.

        Raises:
            SearchIndexError: Missing (and not creating) or unreadable secret.
        """
        path = Path(index_dir) / SECRET_FILE
        if path.is_file():
            try:  # read only: a read-only index folder (or file) loads like any other
                return cls(bytes.fromhex(path.read_text().strip()))
            except ValueError as exc:
                raise SearchIndexError(f"{path}: damaged index secret ({exc}); restore it from a backup") from exc
            except PermissionError as exc:
                raise SearchIndexError(
                    f"{path}: cannot read the index secret (permission denied); it is readable by the index's "
                    "owner only (mode 0600): search as that user, or give this user read access"
                ) from exc
        if not create:
            raise SearchIndexError(
                f"{path}: index secret missing; this is not an index folder, or the file was deleted "
                "(without it patient keys and file paths cannot be resolved: restore it or rebuild)"
            )
        key = secrets.token_bytes(32)
        with atomic_write(path, "w", permissions=0o600) as fh:  # owner only: it unlocks patient keys
            fh.write(key.hex() + "\n")
        return cls(key)

    def _mac(self, domain: bytes, value: str) -> str:
        return hmac.new(self._key, domain + b"\0" + value.encode("utf-8"), hashlib.sha256).hexdigest()

    def patient_key(self, patient_id: str) -> str:
        """Pseudonymous patient key (64 hex digits) of a PatientID (or any source patient id)."""
        return self._mac(b"patient", patient_id)

    def path_key(self, path: Union[str, Path]) -> str:
        """Look-up key of a file path (64 hex digits)."""
        return self._mac(b"path", str(path))

    def uid_key(self, uid: str) -> str:
        """Keyed HMAC of a Study or SOP Instance UID (what a removal tombstone keeps: never the UID itself)."""
        return self._mac(b"uid", uid)

    def accession_key(self, accession: str) -> str:
        """Look-up key of an accession number (matched against report exports, never stored raw)."""
        return self._mac(b"accession", accession)

    def encrypt_path(self, path: Union[str, Path]) -> str:
        """Encrypted file path (text token)."""
        return self._fernet.encrypt(str(path).encode("utf-8")).decode("ascii")

    def decrypt_path(self, token: str) -> str:
        """The file path of a token from :meth:`encrypt_path`.

        Raises:
            SearchIndexError: The token was made with another secret or is damaged.
        """
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, ValueError) as exc:
            raise SearchIndexError(
                "a stored file path cannot be decrypted: secret.key does not belong to this store"
            ) from exc
