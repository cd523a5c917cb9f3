"""Exception hierarchy for cxr-search, and the exit codes of the command line.

Every error a user can cause (bad file, bad configuration, bad checkpoint) raises a subclass of
:class:`CxrSearchError`. The CLI maps each subclass to an exit code and prints its message without a
traceback, so messages must say which file or key is wrong and what to do about it. :data:`EXIT_CODES`
is the README's table of codes (a test keeps the two equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, Path]


class CxrSearchError(Exception):
    """Base class of every error cxr-search raises on purpose."""

    #: Exit code the CLI uses for this error class.
    exit_code: int = 1


class ConfigError(CxrSearchError, ValueError):
    """An unknown preset, override key or invalid configuration value."""

    exit_code = 2


class CheckpointError(CxrSearchError):
    """A checkpoint file that cannot be loaded safely or does not match the architecture."""

    exit_code = 3


class UnsafeCheckpointError(CheckpointError):
    """A pickle that references a global outside the allow-list; nothing from it was executed."""


class TokenizerError(CxrSearchError):
    """A missing or malformed tokenizer directory."""

    exit_code = 4


class InputFileError(CxrSearchError):
    """A file given as input could not be read.

    Attributes:
        path: The offending file.
        reason: What is wrong with it.
    """

    exit_code = 5

    def __init__(self, path: Optional[PathLike], reason: str) -> None:
        self.path = str(path) if path is not None else None
        self.reason = reason
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{reason}")


class ImageReadError(InputFileError):
    """An image file (PNG, JPEG, ...) that cannot be decoded."""


class DicomError(InputFileError):
    """Base class of DICOM reading errors."""


class NotDicomError(DicomError):
    """The file is not a DICOM file."""


class PixelDataError(DicomError):
    """Pixel data is truncated, corrupt, or in a transfer syntax no installed decoder handles."""


class NoPixelDataError(DicomError):
    """The DICOM object has no pixel data (structured report, presentation state, ...)."""


class MultiFrameError(DicomError):
    """The DICOM object holds several frames; radiographs are single-frame."""


class ColourImageError(DicomError):
    """The DICOM image is in colour; chest radiographs are greyscale."""


class ReportError(InputFileError):
    """A report file (text, XML, SR) that cannot be parsed."""


class DatasetError(CxrSearchError):
    """A dataset folder or manifest that lacks a required file or column."""

    exit_code = 6


class SearchIndexError(CxrSearchError):
    """A missing, corrupt or inconsistent search index."""

    exit_code = 7


class TrainingError(CxrSearchError):
    """A training run that cannot go on as configured (out of memory, diverged loss, clashing run)."""

    exit_code = 8


#: Exit code of a file-system failure (``OSError``) that no more specific error covers.
OS_ERROR_EXIT = 9

#: Every exit code of ``cxr-search`` -> what raises it (the README's table, column "raised as"; a test keeps
#: them equal): a class of this module (its subclasses share its code), a builtin, or "" (no exception).
EXIT_CODES = {
    0: "",
    1: "",  # `index verify` finding problems; an unexpected exception (a bug)
    2: "ConfigError",  # and click's usage errors
    3: "CheckpointError",
    4: "TokenizerError",
    5: "InputFileError",
    6: "DatasetError",
    7: "SearchIndexError",
    8: "TrainingError",
    9: "OSError",
    130: "KeyboardInterrupt",
}
