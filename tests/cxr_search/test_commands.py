"""The core's commands: ``embed`` reads folders as ``index build`` does and survives bad files; ``model``/``presets``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
from PIL import Image

import cli
from cxr_search import cli_options, inference
from cxr_search.checkpoints import load_model
from cxr_search.inference import Embedder
from tests.helpers.dicom_files import radiograph, write


def run(capsys: pytest.CaptureFixture, *argv: str) -> Tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((70, 60)) * 255).astype(np.uint8)).save(path)
    return path


def test_embed_images_reads_extensionless_dicom_and_goes_past_bad_files(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "export"
    (folder / "b").mkdir(parents=True)
    good = [_png(folder / "a.png", 0), write(folder / "b", "IM0001", radiograph(seed=1)),  # no extension
            _png(folder / "c" / "d.jpg.png", 2)]
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "truncated.dcm").write_bytes(good[1].read_bytes()[:400])
    (folder / "notes.txt").write_text("not an image, not taken")
    (folder / ".hidden.png").write_bytes(b"hidden files are skipped")
    out = tmp_path / "emb.npy"
    code, stdout, err = run(capsys, "embed", "images", str(folder), "-m", "tiny", "-o", str(out), "--json",
                            "--batch-size", "2")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["count"] == 3
    assert sorted(Path(f["path"]).name for f in summary["failed"]) == ["broken.png", "truncated.dcm"]
    assert all(f["reason"] for f in summary["failed"])
    paths = [Path(p) for p in (tmp_path / "emb.npy.paths.txt").read_text().splitlines()]
    assert sorted(paths) == sorted(good)
    want = Embedder(load_model("tiny")).embed_images(paths)  # same rows as the library, in the listed order
    np.testing.assert_allclose(np.load(out), want, atol=1e-5)
    # Without --json the failures are listed on stderr, the summary says how many.
    code, _, err = run(capsys, "embed", "images", str(folder), "-m", "tiny", "-o", str(out))
    assert code == 0 and "broken.png" in err and "2 files could not be read" in " ".join(err.split())


def test_embed_images_with_workers_matches_in_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "imgs"
    for i in range(3):
        _png(folder / f"{i}.png", i)
    (folder / "bad.png").write_bytes(b"x")
    code, out, err = run(capsys, "embed", "images", str(folder), "-m", "tiny", "-o", str(tmp_path / "w.npy"),
                         "--workers", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["count"] == 3 and len(json.loads(out)["failed"]) == 1
    run(capsys, "embed", "images", str(folder), "-m", "tiny", "-o", str(tmp_path / "s.npy"), "--json")
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), np.load(tmp_path / "s.npy"), atol=1e-6)


def test_embed_images_fails_only_when_nothing_was_embedded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.png").write_bytes(b"bad")
    (tmp_path / "b.png").write_bytes(b"bad too")
    code, out, err = run(capsys, "embed", "images", str(tmp_path), "-m", "tiny", "-o", str(tmp_path / "x.npy"))
    assert code == 5 and "nothing was embedded" in err and "1 more unreadable" in err and out == ""
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("argv, code, words", [
    (["embed", "texts", "-m", "tiny", "-o", "OUT"], 2, "no texts given"),
    (["embed", "texts", "a", "  ", "-m", "tiny", "-o", "OUT"], 2, "empty text"),
    (["embed", "texts", "a", "-m", "tiny", "-o", "OUT", "--device", "xyz"], 2, "not a device"),
    (["embed", "images", "DIR", "-m", "tiny", "-o", "OUT", "--device", "xyz"], 2, "not a device"),
    (["embed", "images", "DIR", "-m", "tiny", "-o", "OUT", "--precision", "int8"], 2, "--precision"),
    (["embed", "texts", "a", "-m", "tiny", "-o", "OUT", "--file", "MISSING"], 5, "no such file"),
    (["model", "info"], 2, "give the model"),
    (["model", "info", "tiny", "-m", "small"], 2, "given twice"),
])
def test_bad_options_fail_before_loading(argv, code, words, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    import cxr_search.checkpoints

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(cxr_search.checkpoints, "load_model", no_loading)
    _png(tmp_path / "DIR" / "a.png", 0)
    names = {"OUT": str(tmp_path / "o.npy"), "DIR": str(tmp_path / "DIR"), "MISSING": str(tmp_path / "missing.txt")}
    got, out, err = run(capsys, *[names.get(a, a) for a in argv])
    assert got == code, err
    assert words in err and "Traceback" not in err and out == ""


def test_model_info_by_option_and_presets_json(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "model", "info", "-m", "tiny", "--json")
    assert code == 0 and json.loads(out)["embed_dim"] == 64
    code, out, err = run(capsys, "model", "info", "tiny")
    assert code == 0 and "embed_dim" in out and err == ""  # the table goes to stdout
    code, out, _ = run(capsys, "presets", "--json")
    assert code == 0 and "tiny" in json.loads(out)["presets"]


def test_cheap_precision_lists_equal_the_encoders() -> None:
    assert cli_options.PRECISIONS == inference.PRECISIONS
    assert cli_options.TEXT_PRECISIONS == inference.TEXT_PRECISIONS


def test_resolve_device_refuses_a_non_device_as_a_config_error() -> None:
    from cxr_search.errors import ConfigError

    with pytest.raises(ConfigError, match="not a device"):
        inference.resolve_device("xyz")
    assert inference.resolve_device("cpu").type == "cpu"
    assert cli_options.check_device("cuda:1") == "cuda:1" and cli_options.check_device("AUTO") == "AUTO"
    with pytest.raises(ConfigError, match="not a device"):
        cli_options.check_device("gpu0")
