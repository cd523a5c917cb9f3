"""System parts (Debian packages) that some tests need: skip locally when absent, fail in CI.

``.ci/run`` installs the parts with apt and sets ``CXR_SEARCH_REQUIRE_SYSTEM=1``; with it set, a
missing part is a test failure, so a CI image that lost a package cannot turn into a green run of
skipped tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import pytest

REQUIRE_ENV = "CXR_SEARCH_REQUIRE_SYSTEM"


def required() -> bool:
    """True in CI (``CXR_SEARCH_REQUIRE_SYSTEM=1``): missing system parts fail instead of skipping."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def need_program(name: str, package: str, *, candidates: tuple = ()) -> str:
    """Path of program ``name`` (from Debian package ``package``); skips or fails when it is absent.

    Args:
        name: Program looked up on PATH.
        package: Debian package that provides it (named in the skip reason).
        candidates: Extra absolute paths to try (programs outside PATH, e.g. PostgreSQL's bin folder).
    """
    found: Optional[str] = shutil.which(name)
    for c in candidates:
        if found is None and Path(c).is_file() and os.access(c, os.X_OK):
            found = str(c)
    if found is None:
        why = f"{name} not found: install the Debian package {package} (apt-get install {package})"
        if required():
            pytest.fail(f"{why}; {REQUIRE_ENV} is set, so this part is required", pytrace=False)
        pytest.skip(why)
    return found


def need_module(module: str, extra: str) -> None:
    """Skip (or fail in CI) when Python module ``module`` (installed by ``pip install -e '.[extra]'``) is absent."""
    try:
        __import__(module)
    except ImportError:
        why = f"Python module {module} not installed: pip install -e '.[{extra}]'"
        if required():
            pytest.fail(f"{why}; {REQUIRE_ENV} is set, so it is required", pytrace=False)
        pytest.skip(why)
