"""Where a training run's weights start: scratch, local pretrained towers, a released file, our checkpoint."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, Iterable

from cxr_search.checkpoints import load_model
from cxr_search.config import ModelConfig, get_model_config
from cxr_search.errors import ConfigError
from cxr_search.model import CXRClip, create_model
from cxr_search.tokenizer import TextTokenizer
from train.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["initial_model", "same_architecture"]

# Config fields that do not change the architecture (compared when starting from a file).
_NON_ARCH = ("name", "init_seed", "logit_scale_init")


def _arch(config: ModelConfig) -> Dict[str, Any]:
    d = config.to_dict()
    for key in _NON_ARCH:
        d.pop(key, None)
    d["image"].pop("pretrained_path", None)
    d["text"].pop("pretrained_dir", None)
    d.pop("tokenizer", None)
    return d


def same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    """True when two configs build the same towers, projections and preprocessing."""
    return _arch(a) == _arch(b)


def _strip_pretrained(model: CXRClip) -> None:
    """Drop local pretrained paths from the config: the weights now live in the checkpoint itself.

    A saved run must reload without the original files; the text config is read back from the
    loaded transformer so that it describes the weights actually present.
    """
    cfg = model.config
    hf = model.text_tower.transformer.config
    bert = {k: getattr(hf, k) for k in cfg.text.bert_config if hasattr(hf, k)}
    model.config = dataclasses.replace(
        cfg,
        image=dataclasses.replace(cfg.image, pretrained_path=None),
        text=dataclasses.replace(cfg.text, pretrained_dir=None, bert_config=bert),
    )
    model.text_tower.cfg = model.config.text
    model.image_tower.cfg = model.config.image


def _train_tokenizer(config: ModelConfig, texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    tok = TextTokenizer.train(
        texts, vocab_size=vocab_size, lowercase=config.tokenizer.lowercase, max_length=config.tokenizer.max_length
    )
    logger.info("trained a %d-token WordPiece vocabulary on the training reports", tok.vocab_size)
    return tok


def initial_model(cfg: TrainConfig, train_texts: Callable[[], Iterable[str]]) -> CXRClip:
    """Build the model a run starts from, as ``cfg.init`` says.

    Args:
        cfg: The resolved recipe.
        train_texts: Returns the training report texts (called only when a WordPiece vocabulary must
            be trained: ``scratch`` without a tokenizer, for a preset without a built-in one).

    Returns:
        The model (train mode is set by the trainer) with its tokenizer; for ``pretrained`` the
        config no longer points at the pretrained files.

    Raises:
        ConfigError: Missing paths for the chosen kind, or a file whose architecture differs from
            the recipe's model.
        CheckpointError, TokenizerError: Unreadable weights or tokenizer.
    """
    init = cfg.init
    base = get_model_config(cfg.model, **cfg.model_overrides)
    if init.kind in ("released", "checkpoint"):
        if not init.path:
            raise ConfigError(f"init.kind={init.kind} needs --set init.path=FILE_OR_DIR")
        if init.kind == "released" and not init.tokenizer:
            raise ConfigError(
                "init.kind=released needs --set init.tokenizer=DIR (a local Bio_ClinicalBERT directory with vocab.txt)"
            )
        model = load_model(init.path, tokenizer=init.tokenizer)
        if not same_architecture(model.config, base):
            raise ConfigError(
                f"{init.path}: its architecture ({model.config.name}) differs from the recipe's model "
                f"'{cfg.model}'; pick a recipe with the same backbone or --set model=..."
            )
        if model.tokenizer is None:
            raise ConfigError(f"{init.path}: has no tokenizer; pass --set init.tokenizer=DIR")
        model.provenance = {**model.provenance, "init": init.kind, "init_source": str(init.path)}
        return model

    if init.kind == "pretrained":
        if not init.image_weights and not init.text_dir:
            raise ConfigError(
                f"recipe '{cfg.name}' starts from pretrained towers: pass --set init.image_weights=FILE "
                "(a timm checkpoint of the image backbone) and/or --set init.text_dir=DIR (a Hugging Face "
                "BERT directory such as Bio_ClinicalBERT), or --set init.kind=scratch"
            )
        overrides: Dict[str, Any] = {}
        if init.image_weights:
            overrides["image"] = {"pretrained_path": str(init.image_weights)}
        if init.text_dir:
            overrides["text"] = {"pretrained_dir": str(init.text_dir)}
        base = get_model_config(base, **overrides)
    tok_dir = init.tokenizer or (init.text_dir if init.kind == "pretrained" else None)
    tokenizer: Any
    if tok_dir:
        tokenizer = TextTokenizer.from_dir(tok_dir, max_length=base.tokenizer.max_length)
    elif base.tokenizer.kind == "basic":
        tokenizer = TextTokenizer.basic(max_length=base.tokenizer.max_length)
    else:
        if init.kind == "pretrained" and init.text_dir:
            raise ConfigError(f"{init.text_dir}: no vocab.txt; pass --set init.tokenizer=DIR")
        size = int(init.vocab_size or base.text.bert_config.get("vocab_size", 30522))
        tokenizer = _train_tokenizer(base, train_texts(), size)
        # The embedding table is sized to the vocabulary actually learnt (small corpora give fewer tokens).
        base = get_model_config(base, text={"bert_config": {"vocab_size": tokenizer.vocab_size}})
    model = create_model(base, tokenizer=tokenizer, init_seed=cfg.seed)
    if init.kind == "pretrained":
        _strip_pretrained(model)
    model.provenance = {"source": f"recipe:{cfg.name}", "init": init.kind, "licence": "trained by the user"}
    return model
