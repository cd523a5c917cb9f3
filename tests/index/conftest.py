"""Fixtures of the engine tests: a small synthetic PACS export and the tiny model (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_search.checkpoints import load_model
from cxr_search.model import CXRClip
from cxr_search.synth import synthesize


@pytest.fixture(scope="session")
def tiny_model() -> CXRClip:
    """The seeded ``tiny`` preset (with its basic tokenizer), in eval mode."""
    return load_model("tiny")


@pytest.fixture(scope="session")
def pacs_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 studies (PA + lateral or AP) with 4 broken files: truncated, text, SR, empty."""
    out = tmp_path_factory.mktemp("pacs-index") / "archive"
    synthesize(out, studies=12, seed=21, layout="pacs", broken=4, image_size=64)
    return out
