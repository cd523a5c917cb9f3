"""The README's exit-code table, row by row: every code is produced through the real CLI entry (``cli.main``),
with one line on stderr and no traceback; and the table itself equals ``cxr_search.errors.EXIT_CODES``."""

from __future__ import annotations

import builtins
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import pytest

import cli
from cxr_search import errors

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@dataclass
class Env:
    """What the cases run against: a small archive, its manifest, an index of it, and a scratch folder."""

    archive: Path
    manifest: Path
    index: Path
    tmp: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    tmp = tmp_path_factory.mktemp("exit-codes")
    archive, manifest, index = tmp / "archive", tmp / "manifest.csv", tmp / "index"
    for argv in (["data", "synth", str(archive), "--studies", "8", "--image-size", "64", "--broken", "1", "--json"],
                 ["data", "prepare", "pacs", str(archive), "-o", str(manifest), "-O",
                  f"reports-csv={archive / 'reports.csv'}", "--json"],
                 ["index", "build", str(archive), "-m", "tiny", "-i", str(index), "--reports",
                  str(archive / "reports.csv"), "--json"]):
        assert cli.main(argv) == 0, argv
    return Env(archive, manifest, index, tmp)


def _damaged_copy(env: Env, monkeypatch: pytest.MonkeyPatch) -> List[str]:
    copy = env.tmp / "damaged"
    if not copy.exists():
        shutil.copytree(env.index, copy)
        (copy / "images.faiss").unlink()
    return ["index", "verify", str(copy), "--json"]


def _bad_png(env: Env) -> Path:
    bad = env.tmp / "bad.png"
    bad.write_bytes(b"not an image")
    return bad


def _raising(exc: BaseException) -> Callable[..., None]:
    def fn(*args, **kwargs):
        raise exc

    return fn


#: code -> {case name: (env, monkeypatch) -> argv}. Each code of the README table has at least one case.
CASES: Dict[int, Dict[str, Callable[[Env, pytest.MonkeyPatch], List[str]]]] = {
    0: {
        "presets": lambda e, m: ["presets"],
        "search text": lambda e, m: ["search", "text", "effusion", "-i", str(e.index), "-k", "2"],
        "index remove of an absent study is idempotent": lambda e, m: [
            "index", "remove", str(e.index), "--study", "1.2.3.4.5.404"],
    },
    1: {
        "index verify finds problems": _damaged_copy,
        "unexpected exception": lambda e, m: (m.setattr("cxr_search.config.list_models",
                                                         _raising(RuntimeError("boom"))), ["presets"])[1],
    },
    2: {
        "unknown option (click)": lambda e, m: ["embed", "images", "--bogus"],
        "--level foo": lambda e, m: ["search", "text", "x", "-i", str(e.index), "--level", "foo"],
        "--return foo": lambda e, m: ["search", "image", str(_bad_png(e)), "-i", str(e.index), "--return", "foo"],
        "-k out of range": lambda e, m: ["search", "text", "x", "-i", str(e.index), "-k", "100000"],
        "unknown view": lambda e, m: ["search", "text", "x", "-i", str(e.index), "--filter", "view=XYZ"],
        "inverted age": lambda e, m: ["search", "text", "x", "-i", str(e.index), "--filter", "age=60-40"],
        "--device xyz": lambda e, m: ["search", "text", "x", "-i", str(e.index), "--device", "xyz"],
        "embed texts without text": lambda e, m: ["embed", "texts", "-m", "tiny", "-o", str(e.tmp / "t.npy")],
        "train probe --device tpu": lambda e, m: ["train", "probe", "-m", "tiny", "--data", str(e.manifest),
                                                  "--device", "tpu"],
        "unknown recipe": lambda e, m: ["train", "no-such-recipe", "--data", str(e.manifest), "--out",
                                        str(e.tmp / "r")],
        "bench retrieval --protocol foo": lambda e, m: ["bench", "retrieval", str(e.manifest), "-m", "tiny",
                                                        "--protocol", "foo"],
    },
    3: {"missing checkpoint": lambda e, m: ["model", "info", str(e.tmp / "missing.tar")],
        "neither a file nor a preset": lambda e, m: ["model", "info", "no-such-preset"]},
    4: {"empty tokenizer folder": lambda e, m: ["model", "info", "tiny", "--tokenizer", str(e.tmp)]},
    5: {
        "search image DIR": lambda e, m: ["search", "image", str(e.tmp), "-i", str(e.index)],
        "embed images of a broken file": lambda e, m: ["embed", "images", str(_bad_png(e)), "-m", "tiny", "-o",
                                                       str(e.tmp / "i.npy")],
    },
    6: {"manifest without columns": lambda e, m: (
        (e.tmp / "bad.csv").write_text("x\n1\n"), ["data", "cache", str(e.tmp / "bad.csv"), "-o", str(e.tmp / "c")])[1]},
    7: {
        "missing index": lambda e, m: ["search", "text", "x", "-i", str(e.tmp / "no-index")],
        "another model than the index's": lambda e, m: ["search", "text", "x", "-i", str(e.index), "-m", "small"],
    },
    8: {"diverged training": lambda e, m: [
        "train", "tiny-synth", "--data", str(e.manifest), "--out", str(e.tmp / "run"), "--set", "optim.lr=1e30",
        "--set", "optim.epochs=3", "--set", "optim.batch_size=4", "--set", "data.train_split=test", "--json"]},
    9: {"output under a file": lambda e, m: (
        (e.tmp / "file").write_text("x"), ["embed", "texts", "x", "-m", "tiny", "-o", str(e.tmp / "file" / "x.npy")])[1]},
    130: {"Ctrl-C": lambda e, m: (m.setattr("cxr_search.config.list_models", _raising(KeyboardInterrupt())),
                                  ["presets"])[1]},
}

_PARAMS = [(code, name) for code, cases in CASES.items() for name in cases]


@pytest.mark.parametrize("code, name", _PARAMS, ids=[f"{c}-{n}" for c, n in _PARAMS])
def test_exit_code(code: int, name: str, env: Env, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    argv = CASES[code][name](env, monkeypatch)
    got = cli.main(argv)
    _, err = capsys.readouterr()
    assert got == code, f"{name}: exit {got}, stderr: {err}"
    assert "Traceback" not in err
    if code not in (0, 1):
        assert err.strip(), "an error must say what is wrong on stderr"


def test_locked_index_is_7(env: Env, capsys: pytest.CaptureFixture) -> None:
    from index.lock import writer_lock

    held, done = threading.Event(), threading.Event()

    def other_writer() -> None:  # another thread: the lock is re-entrant only within one thread
        with writer_lock(env.index, "index add (another writer)"):
            held.set()
            done.wait(60)

    thread = threading.Thread(target=other_writer)
    thread.start()
    try:
        assert held.wait(60)
        got = cli.main(["index", "add", str(env.archive), "-m", "tiny", "-i", str(env.index)])
    finally:
        done.set()
        thread.join(60)
    err = capsys.readouterr().err
    assert got == 7 and "another writer" in err and "Traceback" not in err


def test_no_traceback_from_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cli", "search", "text", "x", "-i", str(tmp_path / "none")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 7
    assert proc.stderr.startswith("error: ") and "not an index folder" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    proc = subprocess.run([sys.executable, "-m", "cli", "search", "text", "x", "-i", str(tmp_path), "--device", "xyz"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "RuntimeError" not in proc.stderr


# ------------------------------------------------------------------------------------------ the table
def _readme_rows() -> Dict[int, List[str]]:
    section = README.read_text(encoding="utf-8").split("## Errors and exit codes", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"^\|\s*\d+\s*\|", line)]
    out = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        out[int(cells[0])] = cells[1:]
    return out


def test_readme_table_equals_the_code() -> None:
    rows = _readme_rows()
    assert set(rows) == set(errors.EXIT_CODES), "README codes differ from cxr_search.errors.EXIT_CODES"
    for code, (meaning, raised) in rows.items():
        assert meaning, code
        assert raised.strip("`") == errors.EXIT_CODES[code], (code, raised)
        name = errors.EXIT_CODES[code]
        if not name:
            continue
        cls = getattr(errors, name, None) or getattr(builtins, name)
        if issubclass(cls, errors.CxrSearchError):
            assert cls.exit_code == code, f"{name}.exit_code is {cls.exit_code}, README says {code}"
    assert errors.OS_ERROR_EXIT == 9 and cli.OS_ERROR_EXIT == 9 and cli.INTERRUPT_EXIT == 130
    # Every CxrSearchError subclass has a code of the table.
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.CxrSearchError):
            assert cls.exit_code in rows, cls


def test_every_row_of_the_table_has_a_case() -> None:
    assert set(_readme_rows()) <= set(CASES)
