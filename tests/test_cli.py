"""The ``cxr-search`` command line: help, model info/convert, embed, and user errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from cxr_search.checkpoints import save_model
from cxr_search.inference import Embedder
from cxr_search.model import create_model

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-c", "import cli, sys; sys.exit(cli.main(['--help']))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("model", "embed", "presets"):
        assert command in proc.stdout


def test_model_info_json(capsys):
    code, out, _ = run(capsys, "model", "info", "tiny", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["embed_dim"] == 64 and info["parameters"]["total"] > 0
    assert len(info["provenance"]["fingerprint"]) == 64


def test_embed_texts_and_images(tmp_path, capsys):
    code, out, _ = run(capsys, "embed", "texts", "large right pleural effusion", "no acute process",
                       "--model", "tiny", "--out", str(tmp_path / "t.npy"), "--json")
    assert code == 0 and json.loads(out)["count"] == 2
    emb = np.load(tmp_path / "t.npy")
    assert emb.shape == (2, 64)
    np.testing.assert_allclose(emb, Embedder(create_model("tiny")).embed_texts(["large right pleural effusion", "no acute process"]), atol=1e-6)

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((70, 60)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    code, out, _ = run(capsys, "embed", "images", str(folder), "--model", "tiny", "--out", str(tmp_path / "i.npy"),
                       "--json", "--batch-size", "2", "--device", "cpu")
    assert code == 0
    assert np.load(tmp_path / "i.npy").shape == (3, 64)
    assert (tmp_path / "i.npy.paths.txt").read_text().splitlines() == [str(folder / f"{i}.png") for i in range(3)]


@pytest.mark.slow
def test_convert_own_format(tmp_path, capsys):
    src = save_model(create_model("tiny"), tmp_path / "src")
    code, out, _ = run(capsys, "model", "convert", str(src), str(tmp_path / "dst"), "--json")
    assert code == 0 and (tmp_path / "dst" / "model.safetensors").is_file()
    assert json.loads(out)["fingerprint"] == json.loads(
        subprocess.run([sys.executable, "-c", "import cli,sys; sys.exit(cli.main(['model','info',sys.argv[1],'--json']))",
                        str(tmp_path / "dst")], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    )["provenance"]["fingerprint"]


def test_user_errors_are_one_line_with_exit_codes(tmp_path, capsys):
    code, out, err = run(capsys, "embed", "images", str(tmp_path / "nope.png"), "--model", "tiny", "--out", str(tmp_path / "x.npy"))
    assert code == 5 and "nope.png" in err and "Traceback" not in err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, _, err = run(capsys, "embed", "images", str(bad), "--model", "tiny", "--out", str(tmp_path / "x.npy"))
    assert code == 5 and "bad.png" in err and "Traceback" not in err
    code, _, err = run(capsys, "model", "info", str(tmp_path / "missing.tar"))
    assert code == 3 and "missing.tar" in err
    code, _, err = run(capsys, "embed", "texts", "--model", "tiny", "--out", str(tmp_path / "x.npy"))
    assert code == 2 and "no texts" in err
    code, _, err = run(capsys, "embed", "texts", "x", "--model", "tiny", "--out", str(tmp_path / "x.npy"), "--precision", "int3")
    assert code == 2 and "precision" in err
    assert not (tmp_path / "x.npy").exists()
    # An output that cannot be written fails before any work, as one line with the file-system exit code.
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "embed", "texts", "x", "--model", "tiny", "--out", str(tmp_path / "file" / "x.npy"))
    assert code == cli.OS_ERROR_EXIT and "file" in err and "Traceback" not in err and "embedding" not in err


@pytest.mark.parametrize("argv, expected", [
    (["search", "text", "effusion"], "Missing option '--index'"),
    (["embed", "images", "--bogus"], "No such option: --bogus"),
    (["search", "text"], "Missing argument"),
])
def test_usage_errors_print_usage_not_a_traceback(capsys, argv, expected):
    # typer >= 0.24 raises its own copy of click's exceptions; main() must still catch them.
    code, _, err = run(capsys, *argv)
    assert code == 2 and expected in err and "Usage:" in err and "Traceback" not in err


def test_data_synth_prepare_cache(tmp_path, capsys):
    code, out, _ = run(capsys, "data", "synth", str(tmp_path / "arc"), "--studies", "6", "--image-size", "64",
                       "--broken", "2", "--json")
    assert code == 0
    synth = json.loads(out)
    code, out, _ = run(capsys, "data", "prepare", "pacs", str(tmp_path / "arc"), "--out", str(tmp_path / "m.csv"),
                       "-O", f"reports-csv={tmp_path / 'arc' / 'reports.csv'}", "--json")
    assert code == 0
    prepared = json.loads(out)
    assert prepared["studies"] == synth["studies"] and prepared["reports"] == synth["reports"]
    code, out, _ = run(capsys, "data", "cache", str(tmp_path / "m.csv"), "--out", str(tmp_path / "cache"),
                       "--shorter-side", "64", "--workers", "1", "--json")
    assert code == 0
    cached = json.loads(out)
    assert cached["cached"] + len(cached["failed"]) == prepared["images"]
    code, _, err = run(capsys, "data", "prepare", "nope", str(tmp_path), "--out", str(tmp_path / "x.csv"))
    assert code == 2 and "unknown dataset" in err
    code, _, err = run(capsys, "data", "prepare", "pacs", str(tmp_path / "arc"), "--out", str(tmp_path / "x.csv"),
                       "-O", "colour=red")
    assert code == 2 and "colour" in err
