"""cxr-search core library: the CXR-CLIP dual encoder, its checkpoints and inputs, datasets and evaluation.

Everything that the training code (``train``) and the search engine (``index``) share lives here; the
core imports neither of them. ``cxr_search.load_model``, ``save_model`` and ``create_model`` are lazy
shortcuts to :mod:`cxr_search.checkpoints` and :mod:`cxr_search.model` (torch loads on first use).

Modules:

* ``config``: model presets (``model_configs/*.json``) as frozen dataclasses.
* ``towers``: image and text towers over timm and transformers.
* ``model``: :class:`~cxr_search.model.CXRClip`, the dual encoder, and ``create_model``.
* ``inference``: :class:`~cxr_search.inference.Embedder`: device, precision, batching for embedding inputs.
* ``tokenizer``: BERT WordPiece tokenisation from local files only.
* ``images``: image loading (files, DICOM, arrays) and the evaluation transform.
* ``reports``: report section splitting, the reference text choice, report file readers.
* ``labels``: label vocabularies (CheXpert, ChestX-ray14, VinDr-CXR) and label values.
* ``cache``: the resized 8-bit PNG copy of a manifest's images that training reads.
* ``safe_load``: ``torch.load`` with the weights-only unpickler and clear errors.
* ``fileio``: atomic file writes and the JSON printed by ``--json``.
* ``errors``: the exception hierarchy (:class:`~cxr_search.errors.CxrSearchError` and its subclasses).
* ``commands``: the core's CLI command groups (``model``, ``embed``, ``data``, ``presets``).

Packages: ``checkpoints`` (released CXR-CLIP files and our safetensors format), ``dicom`` (DICOM pixels
and headers), ``datasets`` (dataset adapters and the manifest), ``evaluation`` (metrics, zero-shot,
retrieval protocol, overlap checks), ``synth`` (synthetic archives).
"""

from __future__ import annotations

import logging

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


__all__ = ["__version__", "create_model", "load_model", "save_model"]
