"""Option names, help texts and cheap checks that every ``cxr-search`` command group shares.

The command groups live next to their packages (``cxr_search.commands``, ``train.commands``,
``index.commands``, ...); what they must spell the same way is here: ``--model/-m``, ``--index/-i``,
``-k/--top-k``, ``--device``, ``--json``. The checks are plain Python (no torch import), so a bad value is
refused with exit code 2 before a model is loaded.
"""

from __future__ import annotations

import re
from typing import Optional

from cxr_search.errors import ConfigError

MODEL_HELP = "Model: our model folder, a released CXR-CLIP file (with --tokenizer) or a preset name."
INDEX_HELP = "Index folder (as given to `cxr-search index build`)."
DB_HELP = ("Store URL (SQLAlchemy, e.g. postgresql+psycopg://host/db); default: INDEX/store.sqlite or "
           "$CXR_SEARCH_DB_URL.")
TOKENIZER_HELP = "Tokenizer folder (Bio_ClinicalBERT: vocab.txt), needed with a released CXR-CLIP file."
DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N."
JSON_HELP = "Print one JSON document on stdout instead of a table."
TOP_K_HELP = "Number of hits (1 to {max_k})."

#: Float precisions of the encoders (``cxr_search.inference.PRECISIONS``; a test keeps them equal).
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
#: Precisions of the query text encoder (``cxr_search.inference.TEXT_PRECISIONS``).
TEXT_PRECISIONS = PRECISIONS + ("int8",)

_DEVICE_RE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def check_device(device: Optional[str]) -> Optional[str]:
    """``device`` when it names a device (``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...), else exit 2.

    Whether that device exists (a GPU) is checked when the model is moved to it.

    Raises:
        ConfigError: A string that names no device.
    """
    if device is None or _DEVICE_RE.fullmatch(device.strip().lower()):
        return device
    raise ConfigError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:1)")


def check_precision(precision: str, *, text: bool = False, option: str = "--precision") -> str:
    """``precision`` when it is one of :data:`PRECISIONS` (:data:`TEXT_PRECISIONS` when ``text``).

    Raises:
        ConfigError: Another value.
    """
    valid = TEXT_PRECISIONS if text else PRECISIONS
    if precision not in valid:
        raise ConfigError(f"{option} {precision!r}: use {', '.join(valid)}")
    return precision


__all__ = ["DB_HELP", "DEVICE_HELP", "INDEX_HELP", "JSON_HELP", "MODEL_HELP", "PRECISIONS", "TEXT_PRECISIONS", "TOKENIZER_HELP",
           "TOP_K_HELP", "check_device", "check_precision"]
