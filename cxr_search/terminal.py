"""The two terminal streams of every command: results on stdout, messages and progress on stderr.

Both consoles have rich markup and highlighting switched off, so report text, queries and paths are
printed literally: a report containing ``[/ADDENDUM]`` or ``[red]`` is data, not a style. Styles the
program itself wants go through :class:`rich.text.Text` objects (see :func:`styled`).
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

#: Tables and other results (what a script redirects to a file).
out_console = Console(markup=False, highlight=False, emoji=False)
#: Messages, warnings, errors and progress (what a person watches).
err_console = Console(stderr=True, markup=False, highlight=False, emoji=False)


def styled(text: str, style: str) -> Text:
    """``text`` shown in ``style`` (e.g. ``"bold red"``), its characters never parsed as markup."""
    return Text(text, style=style)


__all__ = ["out_console", "err_console", "styled"]
