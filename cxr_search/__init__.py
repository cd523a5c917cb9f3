"""cxr-search core library: configs, towers, the CXR-CLIP dual encoder, checkpoints, readers.

The core imports neither ``train`` nor ``index``.
"""

from __future__ import annotations

import logging

from cxr_search.errors import CxrSearchError

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {"load_model": "cxr_search.checkpoints", "save_model": "cxr_search.checkpoints",
         "create_model": "cxr_search.model"}


def __getattr__(name: str):
    """``cxr_search.load_model`` / ``save_model`` / ``create_model``, imported on first use (torch is heavy)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cxr_search' has no attribute {name!r}")


__all__ = ["CxrSearchError", "__version__", "create_model", "load_model", "save_model"]
