"""Released CXR-CLIP files: safe strict loading, numerical parity with an independent reference,
bad-input refusals, and conversion to our format."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from cxr_search.checkpoints import load_model, save_model
from cxr_search.errors import CheckpointError, TokenizerError, UnsafeCheckpointError
from cxr_search.inference import Embedder
from tests.helpers.released_files import Reference, expected_counts, save_released, write_bert_vocab

try:  # transformers >= 5 keeps the pure-Python tokenizer under this name
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as RefTokenizer
except ImportError:  # transformers 4.x: BertTokenizer is the pure-Python one
    from transformers import BertTokenizer as RefTokenizer

TEXTS = [
    "Large right pleural effusion with basal atelectasis.",
    "No acute cardiopulmonary process. The lungs are clear.",
    "HEART SIZE IS ENLARGED; mild pulmonary edema, XXXX.",
    "small left pneumothorax",
    "Tip of the line projects over the SVC." * 40,  # longer than 256 tokens: truncation
]
MEANS = {"r50": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "swin": ((0.5,) * 3, (0.5,) * 3)}


def _images() -> List[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for h, w in [(300, 260), (512, 640), (225, 225), (700, 500)]:
        yy, xx = np.mgrid[0:h, 0:w]
        base = 128 + 60 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + rng.normal(0, 20, (h, w))
        out.append(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), mode="L"))
    return out


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    return write_bert_vocab(tmp_path_factory.mktemp("bio_clinicalbert"))


@pytest.fixture(scope="module", params=["r50", "swin"])
def released(request, tmp_path_factory) -> Dict:
    backbone = request.param
    ref = Reference(backbone, seed=7 if backbone == "r50" else 8)
    state = ref.released_state_dict()
    path = save_released(tmp_path_factory.mktemp(backbone) / f"{backbone}_mcc.tar", state, backbone)
    return {"backbone": backbone, "ref": ref, "state": state, "path": path}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
def test_released_file_has_spec_layout(released):
    r50, swin = expected_counts()
    assert len(released["state"]) == (r50 if released["backbone"] == "r50" else swin)
    assert released["state"]["text_encoder.text_encoder.embeddings.position_ids"].shape == (1, 512)


@pytest.mark.slow
def test_strict_load_and_embedding_parity(released, vocab_dir):
    model = load_model(released["path"], tokenizer=vocab_dir)
    ref: Reference = released["ref"]
    # Every parameter and persistent buffer equals the reference's: a strict, complete load.
    ours = model.state_dict()
    assert torch.equal(ours["logit_scale"], ref.logit_scale.detach())
    assert model.provenance["licence"].startswith("CC BY-NC")
    assert len(model.provenance["source_sha256"]) == 64

    # Images: independent torchvision preprocessing on RGB PIL images, then the reference modules.
    mean, std = MEANS[released["backbone"]]
    tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])
    images = _images()
    pixels = torch.stack([tf(im.convert("RGB")) for im in images])
    expected = ref.encode_image(pixels).numpy()
    embedder = Embedder(model)
    got = embedder.embed_images(images, batch_size=3)
    assert got.dtype == np.float32 and got.shape == (len(images), 512)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert _cos(got, expected).min() >= 0.99999

    # Texts: the pure-Python BERT tokenizer with BERT's default lowercasing, max 256 tokens.
    tok = RefTokenizer(vocab_file=str(vocab_dir / "vocab.txt"), do_lower_case=True)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 256
    ours_ids = model.tokenizer(TEXTS)
    assert torch.equal(ours_ids["input_ids"], enc["input_ids"])
    expected_t = ref.encode_text(enc["input_ids"], enc["attention_mask"]).numpy()
    got_t = embedder.embed_texts(TEXTS, batch_size=2)
    assert _cos(got_t, expected_t).min() >= 0.99999
    # Padding does not change results: one text alone equals its batched embedding.
    alone = embedder.embed_texts([TEXTS[3]])
    assert _cos(alone, got_t[3:4]).min() >= 0.99999


@pytest.mark.slow
def test_convert_then_load_is_identical_and_pickle_free(released, vocab_dir, tmp_path, monkeypatch):
    model = load_model(released["path"], tokenizer=vocab_dir)
    out = save_model(model, tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("our format must load without unpickling")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    again = load_model(out)
    images = _images()
    ours, theirs = Embedder(model), Embedder(again)
    assert np.array_equal(ours.embed_images(images), theirs.embed_images(images))
    assert np.array_equal(ours.embed_texts(TEXTS), theirs.embed_texts(TEXTS))
    assert again.provenance["source_sha256"] == model.provenance["source_sha256"]
    assert again.provenance["fingerprint"] == model.provenance["fingerprint"]


@pytest.mark.slow
def test_missing_tokenizer_says_what_to_pass(released):
    with pytest.raises(TokenizerError, match="--tokenizer"):
        load_model(released["path"])
    images_only = load_model(released["path"], require_tokenizer=False)
    with pytest.raises(TokenizerError, match="--tokenizer"):
        Embedder(images_only).embed_texts(["no effusion"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_mismatching_tensors_are_named(released, vocab_dir, tmp_path, case):
    state = dict(released["state"])
    if case == "missing":
        key = "text_projection.projection.bias"
        del state[key]
    elif case == "unexpected":
        key = "image_encoder.extra_head.weight"
        state[key] = torch.zeros(3)
    else:
        key = "text_projection.projection.weight"
        state[key] = torch.zeros(256, 768)
    path = save_released(bad_path(tmp_path), state, released["backbone"])
    with pytest.raises(CheckpointError) as err:
        load_model(path, tokenizer=vocab_dir)
    message = str(err.value)
    assert {"missing": "missing tensor", "unexpected": "unexpected tensor", "shape": "shape mismatch"}[case] in message
    # Missing and mismatching keys are named as the model calls them, unexpected ones as the file does.
    named = {"missing": "text_projection.bias", "unexpected": key, "shape": "text_projection.weight"}[case]
    assert named in message and str(bad_path(tmp_path)) in message


def bad_path(tmp_path: Path) -> Path:
    return tmp_path / "bad.tar"


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_with_foreign_global_is_refused_and_not_executed(tmp_path, vocab_dir):
    _Evil.marker = str(tmp_path / "pwned")
    torch.save({"model": {"logit_scale": torch.tensor(1.0)}, "config": {"x": _Evil()}}, tmp_path / "evil.tar")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_model(tmp_path / "evil.tar", tokenizer=vocab_dir)
    assert not (tmp_path / "pwned").exists()


def test_not_a_checkpoint(tmp_path, vocab_dir):
    bad = tmp_path / "r50_m.tar"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="r50_m.tar"):
        load_model(bad, tokenizer=vocab_dir)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing.tar")


def test_text_file_gives_one_short_checkpoint_error(tmp_path, vocab_dir):
    # torch's unpickler fails on it with an IndexError; tests/cxr_search/test_safe_load.py covers the other bad files.
    path = tmp_path / "model.tar"
    path.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(CheckpointError, match="model.tar: not a readable torch checkpoint .*model convert"):
        load_model(path, tokenizer=vocab_dir)
