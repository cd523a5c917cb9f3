"""Plain helper modules of the tests: file writers, builders and constants shared by several test files.

Fixtures live in ``conftest.py`` files (``tests/conftest.py`` for cross-package ones, ``tests/<pkg>/conftest.py``
for local ones); no test module imports another test module.
"""
