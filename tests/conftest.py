"""Cross-package test set-up: every test under ``tests/e2e/`` carries the ``e2e`` marker.

The markers (``slow``, ``e2e``, ``ddp``) are declared in ``setup.cfg``; ``make test-fast`` deselects all three.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

E2E_DIR = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Mark the end-to-end tests by their folder, so a new file there needs no marker of its own."""
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
