"""The whole command tree: help on every option and argument, a working example in every command, one spelling
of the shared options, ``--version``, and the README's option names."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest
from typer.main import get_command

import cli
from cxr_search import __version__

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: Commands whose example may use another spelling of their path (``train RECIPE`` runs ``train run RECIPE``,
#: ``serve INDEX`` runs ``serve start INDEX``).
EXAMPLE_PATHS = {"train run": "cxr-search train ", "serve start": "cxr-search serve "}
#: Options every command that has the thing spells this way (long name -> its short name).
SHARED = {"--model": "-m", "--index": "-i", "--top-k": "-k", "--json": None, "--device": None}


def _commands(cmd: Any = None, path: Tuple[str, ...] = ()) -> Iterator[Tuple[str, Any]]:
    """(path, leaf command) of every command of the app."""
    cmd = cmd if cmd is not None else get_command(cli.app)
    subs = getattr(cmd, "commands", None)
    if subs:
        for name, sub in sorted(subs.items()):
            yield from _commands(sub, path + (name,))
    else:
        yield " ".join(path), cmd


COMMANDS = dict(_commands())


def _option_names(cmd: Any) -> Set[str]:
    return {name for p in cmd.params if p.param_type_name == "option" for name in (*p.opts, *p.secondary_opts)}


def _examples(cmd: Any) -> List[str]:
    return re.findall(r"Example: (cxr-search [^\n]+)", cmd.help or "")


def test_the_tree_is_complete() -> None:
    for path in ("search text", "search image", "embed images", "embed texts", "model info", "model convert",
                 "train run", "train probe", "index build", "index stats", "bench retrieval", "demo", "presets"):
        assert path in COMMANDS


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_option_and_argument_has_help(path: str) -> None:
    missing = [p.name for p in COMMANDS[path].params if not getattr(p, "hidden", False) and not getattr(p, "help", None)]
    assert not missing, f"`cxr-search {path}`: no help text for {missing}"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_has_an_example_that_parses(path: str) -> None:
    cmd = COMMANDS[path]
    examples = _examples(cmd)
    assert examples, f"`cxr-search {path} --help` shows no 'Example: cxr-search {path} ...'"
    prefix = EXAMPLE_PATHS.get(path, f"cxr-search {path}")
    options = _option_names(cmd)
    for example in examples:
        assert example.startswith(prefix), (path, example)
        used = [w.split("=")[0] for w in shlex.split(example) if w.startswith("-") and w != "-"]
        unknown = [w for w in used if w not in options]
        assert not unknown, f"`cxr-search {path}`'s example uses unknown options {unknown}"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_shared_options_are_spelt_one_way(path: str) -> None:
    for p in COMMANDS[path].params:
        if p.param_type_name != "option" or getattr(p, "hidden", False):
            continue
        names = set(p.opts) | set(p.secondary_opts)
        for long, short in SHARED.items():
            if long in names and short:
                assert short in names, f"`cxr-search {path}`: {long} without {short}"
            if short and short in names:
                assert long in names, f"`cxr-search {path}`: {short} is not {long}"
        assert "--k" not in names, f"`cxr-search {path}`: --k is the hidden old spelling of --top-k"


def test_help_shows_the_example_and_hides_the_old_k(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["search", "text", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Example: cxr-search search text" in " ".join(out.split())
    assert "--top-k" in out and not re.search(r"--k\b", out)


def test_version() -> None:
    proc = subprocess.run([sys.executable, "-c", "import cli, sys; sys.exit(cli.main(['--version']))"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"cxr-search {__version__}" and proc.stderr == ""


# ------------------------------------------------------------------------------------------ README
def _readme_commands() -> Iterator[Tuple[str, List[str]]]:
    """(line, words) of every ``cxr-search ...`` command line in the README's code blocks (continuations joined)."""
    text = README.read_text(encoding="utf-8")
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.match(r"^(?:\.venv/bin/)?cxr-search\s+(.*)$", line)
            if m:
                yield line, shlex.split(m.group(1))


def _resolve(words: List[str]) -> Tuple[Optional[str], List[str]]:
    """The command a README line runs and the words after its path."""
    for n in (3, 2, 1):  # `serve tokens add` has three words
        path = " ".join(words[:n])
        if path in COMMANDS:
            return path, words[n:]
    if words and words[0] == "train":  # `train RECIPE ...` is `train run RECIPE ...`
        return "train run", words[1:]
    if words and words[0] == "serve":  # `serve INDEX ...` is `serve start INDEX ...`
        return "serve start", words[1:]
    return None, words


def test_readme_command_lines_use_existing_commands_and_options() -> None:
    lines = list(_readme_commands())
    assert len(lines) > 20
    problems: List[str] = []
    for line, words in lines:
        path, rest = _resolve(words)
        if path is None:
            problems.append(f"no such command: {line}")
            continue
        options = _option_names(COMMANDS[path])
        for w in rest:
            name = w.split("=")[0]
            if name.startswith("-") and name != "-" and not re.fullmatch(r"-\d.*", name) and name not in options:
                problems.append(f"`cxr-search {path}` has no {name}: {line}")
    assert not problems, "\n".join(problems)


def _readme_table(heading: str) -> List[List[str]]:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_readme_option_table_matches_the_commands() -> None:
    rows = _readme_table("Command-line conventions")
    assert rows
    checked: Dict[str, Set[str]] = {}
    for names_cell, meaning in rows:
        names = re.findall(r"`(-[-\w]+)`", names_cell)
        assert names, names_cell
        where = re.findall(r"`([a-z][a-z -]*[a-z])`", meaning)
        commands = [w for w in where if w in COMMANDS]
        if names == ["--version"]:
            assert cli.main(["--version"]) == 0
            continue
        if "--json" in names:  # "every command that prints one": every command with a table
            commands = [p for p in ("search text", "search image", "model info", "data prepare", "train recipes",
                                    "train probe", "index stats", "demo", "presets") if p in COMMANDS]
        assert commands, f"README row {names_cell} names no command"
        for path in commands:
            missing = set(names) - _option_names(COMMANDS[path])
            assert not missing, f"README: `cxr-search {path}` should have {sorted(missing)}"
            checked.setdefault(path, set()).update(names)
    assert {"-i", "--index"} <= checked["search text"] and {"-m", "--model"} <= checked["embed images"]
