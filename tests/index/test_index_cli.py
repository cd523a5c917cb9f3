"""The ``index`` command group as a script sees it: the same names everywhere, help and an example on every
command, bad values refused with exit 2 before anything is loaded, tables on stdout and messages on stderr."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Tuple

import pytest
import typer.main

import cli
from index.commands import index_app

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COMMANDS = ("build", "add", "remove", "verify", "stats", "failures")


def _group():
    return typer.main.get_command(index_app)


def test_every_command_has_help_an_example_json_and_the_index_option() -> None:
    group = _group()
    assert set(COMMANDS) <= set(group.commands)
    for name in COMMANDS:
        command = group.commands[name]
        assert "Example: cxr-search index " + name in (command.help or "").replace("\n", " "), name
        opts = {o for p in command.params for o in getattr(p, "opts", [])}
        assert {"--index", "-i", "--json", "--db"} <= opts, name
        for p in command.params:
            if getattr(p, "hidden", False):
                continue
            assert getattr(p, "help", None), f"index {name} {p.name}: no help text"


def _copy(small_index: Tuple[Path, Path], tmp_path: Path) -> Tuple[Path, Path]:
    archive, index = small_index
    shutil.copytree(index, tmp_path / "index")
    return archive, tmp_path / "index"


def test_index_is_taken_positionally_or_with_index_option_and_out_still_works(small_index, tmp_path, capsys) -> None:
    archive, index = _copy(small_index, tmp_path)
    for argv in (["index", "stats", str(index)], ["index", "stats", "-i", str(index)],
                 ["index", "stats", str(index), "--index", str(index)]):
        assert cli.main(argv + ["--json"]) == 0
        assert json.loads(capsys.readouterr().out)["index"] == str(index)
    # build/add: the archive is the argument; the index is --index/-i, and the old --out/-o still works
    assert cli.main(["index", "add", str(archive), "-o", str(index), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["added"]["images"] == 0
    assert cli.main(["index", "add", str(archive), "-i", str(index), "-o", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("extra", [
    ["--batch-size", "0"], ["--workers", "-1"], ["--wait", "-1"], ["--shard", "3/2"], ["--shard", "x"],
    ["--device", "gpu0"], ["--precision", "fp64"], ["--bytes-per-vector", "0"],
    ["--shard", "1/2", "--catalogue-only"],
])
def test_bad_build_options_exit_2_before_any_model_loads(extra, tmp_path: Path, capsys) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    t0 = time.monotonic()
    assert cli.main(["index", "build", str(archive), "-m", "tiny", "-i", str(tmp_path / "idx")] + extra) == 2
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "idx").exists()  # nothing was created either


def test_build_refuses_missing_inputs_before_loading(tmp_path: Path) -> None:
    assert cli.main(["index", "build", str(tmp_path / "none"), "-m", "tiny", "-i", str(tmp_path / "i")]) == 6
    assert cli.main(["index", "add", str(tmp_path), "-i", str(tmp_path / "none")]) == 7  # no index to add to
    assert cli.main(["index", "build", str(tmp_path), "-i", str(tmp_path / "i")]) == 2  # a new index needs --model


def test_tables_go_to_stdout_and_messages_to_stderr(small_index, tmp_path, capsys) -> None:
    _, index = _copy(small_index, tmp_path)
    assert cli.main(["index", "stats", str(index)]) == 0
    out, err = capsys.readouterr()
    assert "images" in out and err == ""
    assert cli.main(["index", "verify", str(index)]) == 0
    out, err = capsys.readouterr()
    assert "in the store" in out and "index OK" in err and "index OK" not in out
    assert cli.main(["index", "remove", str(index), "--study", "1.2.3"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "tombstone recorded" in err
