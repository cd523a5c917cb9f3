"""The README's "From Python" examples run as written.

Where an example reads what the user brings, the test makes a stand-in in ``tmp_path`` (the working
directory of the examples): the converted model directory ``models/r50_mcc`` is the seeded ``tiny``
preset saved there, ``study1/frontal.dcm``, ``new_film.dcm`` and ``other.png`` are images of a small
synthetic PACS export, and the index ``/indices/chest`` is built from that export with that model in
``tmp_path`` (the one absolute path of the examples is pointed there; nothing else in them is changed).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
from PIL import Image

from cxr_search.checkpoints import load_model, save_model
from cxr_search.model import create_model
from cxr_search.synth import synthesize
from index.build import BuildOptions, build
from tests.helpers.index_data import ground_truth

README = Path(__file__).resolve().parents[2] / "README.md"
INDEX_LITERAL = '"/indices/chest"'

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def python_examples() -> List[str]:
    """The ```python blocks that follow a "From Python:" line, in README order."""
    text = README.read_text(encoding="utf-8")
    return re.findall(r"^From Python:\s*\n\s*```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the examples name, in a fresh folder."""
    root = tmp_path_factory.mktemp("readme")
    archive = root / "archive"
    synthesize(archive, studies=6, seed=3, layout="pacs", broken=0, image_size=64)
    save_model(create_model("tiny"), root / "models" / "r50_mcc")
    images = [archive / row["path"] for row in ground_truth(archive)]
    (root / "study1").mkdir()
    shutil.copyfile(images[0], root / "study1" / "frontal.dcm")
    shutil.copyfile(images[-1], root / "new_film.dcm")
    Image.fromarray((np.random.default_rng(0).random((80, 70)) * 255).astype(np.uint8)).save(root / "other.png")
    build(archive, root / "indices" / "chest", load_model(root / "models" / "r50_mcc"),
          BuildOptions(reports_csv=archive / "reports.csv", batch_size=8))
    return root


def _run(code: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Dict[str, Any]:
    monkeypatch.chdir(workdir)
    namespace: Dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    return namespace


def test_readme_has_the_python_examples() -> None:
    examples = python_examples()
    assert len(examples) >= 2
    assert all("Embedder" in code for code in examples)  # every example goes through the inference API


def test_embedding_example_runs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = next(c for c in python_examples() if "embed_images" in c)
    ns = _run(code, workdir, monkeypatch)
    assert ns["img"].shape == (2, ns["model"].config.embed_dim) and ns["img"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ns["img"], axis=1), 1.0, atol=1e-5)
    assert ns["txt"].shape == (1, ns["model"].config.embed_dim) and ns["scores"].shape == (1, 2)
    assert not ns["model"].training


def test_search_example_runs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = next(c for c in python_examples() if "Searcher" in c)
    assert INDEX_LITERAL in code
    ns = _run(code.replace(INDEX_LITERAL, repr(str(workdir / "indices" / "chest"))), workdir, monkeypatch)
    assert ns["hits"] and all(h.view == "PA" for h in ns["hits"])
    assert all(h.kind == "study" for h in ns["similar"])
