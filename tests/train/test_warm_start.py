"""Where training starts: scratch (learnt vocabulary), local pretrained towers, our checkpoint; errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cxr_search.checkpoints import load_model, save_model
from cxr_search.errors import ConfigError
from cxr_search.model import create_model
from cxr_search.tokenizer import TextTokenizer
from train.config import get_recipe
from train.warm_start import initial_model

_CORPUS = ["Small right pleural effusion.", "No pneumothorax.", "Mild cardiomegaly.", "No acute process."] * 5


def test_scratch_learns_a_vocabulary_and_sizes_the_embedding_table() -> None:
    model = initial_model(get_recipe("tiny-synth"), lambda: iter(_CORPUS))
    assert model.tokenizer is not None and "effusion" in model.tokenizer.vocab
    assert model.text_tower.vocab_size == model.tokenizer.vocab_size
    again = initial_model(get_recipe("tiny-synth"), lambda: iter(_CORPUS))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=False):
        assert torch.equal(a, b), k  # seeded initialisation


def test_pretrained_towers_are_loaded_and_the_run_no_longer_needs_their_files(tmp_path: Path) -> None:
    donor = create_model("tiny", init_seed=99)
    image_file = tmp_path / "image.safetensors"
    save_file({k: v.contiguous() for k, v in donor.image_tower.trunk.state_dict().items()}, str(image_file))
    text_dir = tmp_path / "bert"
    donor.text_tower.transformer.save_pretrained(text_dir)
    TextTokenizer.train(_CORPUS, vocab_size=141).save(text_dir)
    cfg = get_recipe("tiny-synth", model_overrides={"text": {"bert_config": {"vocab_size": 141}}},
                     init={"kind": "pretrained", "image_weights": str(image_file), "text_dir": str(text_dir)})
    model = initial_model(cfg, lambda: pytest.fail("no vocabulary should be learnt"))
    for name, value in donor.image_tower.state_dict().items():
        torch.testing.assert_close(model.image_tower.state_dict()[name], value)
    for name, value in donor.text_tower.state_dict().items():
        torch.testing.assert_close(model.text_tower.state_dict()[name], value)
    assert model.config.image.pretrained_path is None and model.config.text.pretrained_dir is None
    assert model.tokenizer is not None and model.tokenizer.vocab == TextTokenizer.from_dir(text_dir).vocab
    saved = save_model(model, tmp_path / "run-model")
    image_file.unlink()
    (text_dir / "config.json").unlink()
    reloaded = load_model(saved)
    torch.testing.assert_close(reloaded.state_dict()["logit_scale"], model.state_dict()["logit_scale"])


def test_from_our_checkpoint_and_architecture_mismatch(tmp_path: Path) -> None:
    donor = initial_model(get_recipe("tiny-synth"), lambda: iter(_CORPUS))
    path = save_model(donor, tmp_path / "ckpt")
    cfg = get_recipe("tiny-synth", init={"kind": "checkpoint", "path": str(path)},
                     model_overrides={"text": {"bert_config": {"vocab_size": donor.tokenizer.vocab_size}}})
    model = initial_model(cfg, lambda: pytest.fail("no vocabulary should be learnt"))
    for k, v in donor.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.provenance["init"] == "checkpoint"
    other = get_recipe("tiny-synth", init={"kind": "checkpoint", "path": str(path)},
                       model_overrides={"image": {"name": "test_convnext"}})
    with pytest.raises(ConfigError, match="architecture"):
        initial_model(other, lambda: iter(_CORPUS))


@pytest.mark.parametrize("init,match", [
    ({"kind": "pretrained"}, "init.image_weights"),
    ({"kind": "released"}, "init.path"),
    ({"kind": "released", "path": "x.tar"}, "init.tokenizer"),
    ({"kind": "checkpoint"}, "init.path"),
])
def test_missing_init_paths_say_what_to_set(init: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        initial_model(get_recipe("r50-m", init=init), lambda: iter(_CORPUS))
