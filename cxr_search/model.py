"""The CXR-CLIP dual encoder (a plain ``nn.Module``) and ``create_model``.

``encode_image`` / ``encode_text`` work on tensors and return L2-normalised embeddings (training and
losses use them) and leave the module's train/eval mode, device and memory format alone. Inference on
files, PIL images, arrays or strings (device, precision, batching, the int8 query encoder) is
:class:`cxr_search.inference.Embedder`'s job.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from cxr_search.config import ModelConfig, get_model_config
from cxr_search.errors import ConfigError, TokenizerError
from cxr_search.tokenizer import TextTokenizer
from cxr_search.towers import ImageTower, TextTower

logger = logging.getLogger(__name__)


class ClipOutput(NamedTuple):
    """What :meth:`CXRClip.forward` returns (the inputs of a contrastive loss)."""

    image: torch.Tensor  #: ``[B, D]`` L2-normalised image embeddings
    text: torch.Tensor  #: ``[B, D]`` L2-normalised text embeddings
    logit_scale: torch.Tensor  #: ``[]`` the temperature's inverse, ``exp`` of the learnt log-scale


class CXRClip(nn.Module):
    """Dual encoder: image tower + text tower + linear projections + learnable ``logit_scale``.

    Attributes:
        config: The resolved architecture and preprocessing.
        tokenizer: The text tokenizer, or None for a model loaded without one.
        provenance: Where the weights came from (file hash, licence, code version), if known.
    """

    def __init__(self, config: ModelConfig, tokenizer: Optional[TextTokenizer] = None) -> None:
        super().__init__()
        self.config = config
        self.image_tower = ImageTower(config.image)
        self.text_tower = TextTower(config.text)
        self.image_projection = nn.Linear(self.image_tower.feature_dim, config.embed_dim, bias=True)
        self.text_projection = nn.Linear(self.text_tower.feature_dim, config.embed_dim, bias=True)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.tokenizer: Optional[TextTokenizer] = None
        self.provenance: Dict[str, Any] = {}
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    # ----------------------------------------------------------------------------- tokenizer
    def set_tokenizer(self, tokenizer: TextTokenizer) -> None:
        """Attach a tokenizer after checking its vocabulary fits the text tower.

        Raises:
            TokenizerError: The vocabulary is larger than the embedding table.
        """
        if tokenizer.vocab_size > self.text_tower.vocab_size:
            raise TokenizerError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the text tower embeds only "
                f"{self.text_tower.vocab_size}; use the tokenizer the model was trained with"
            )
        if tokenizer.vocab_size != self.text_tower.vocab_size:
            logger.warning(
                "tokenizer has %d tokens, text tower %d: ids above the vocabulary are never produced",
                tokenizer.vocab_size,
                self.text_tower.vocab_size,
            )
        self.tokenizer = tokenizer

    def require_tokenizer(self) -> TextTokenizer:
        """The tokenizer.

        Raises:
            TokenizerError: The model has none (the message says what to pass).
        """
        if self.tokenizer is None:
            raise TokenizerError(
                "this model has no tokenizer; pass --tokenizer DIR (tokenizer=...) with a BERT "
                "tokenizer directory, e.g. a local copy of Bio_ClinicalBERT for the released models"
            )
        return self.tokenizer

    # ------------------------------------------------------------------------------ tensors
    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.logit_scale.device

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-projection image features ``[B, F]`` (the linear probe's input)."""
        return self.image_tower(pixels)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings ``[B, D]`` of preprocessed images ``[B, 3, H, W]``."""
        emb = self.image_projection(self.image_tower(pixels))  # [B, D]
        return F.normalize(emb.float(), dim=-1) if normalize else emb

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text embeddings ``[B, D]`` of token ids ``[B, L]``."""
        emb = self.text_projection(self.text_tower(input_ids, attention_mask))  # [B, D]
        return F.normalize(emb.float(), dim=-1) if normalize else emb

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ClipOutput:
        """Both embeddings and the scale, for losses."""
        return ClipOutput(
            image=self.encode_image(pixels),  # [B, D]
            text=self.encode_text(input_ids, attention_mask),  # [B, D]
            logit_scale=self.logit_scale.exp(),  # []
        )

    def num_parameters(self) -> Dict[str, int]:
        """Parameter counts per part."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "image_tower": count(self.image_tower),
            "text_tower": count(self.text_tower),
            "projections": count(self.image_projection) + count(self.text_projection),
            "total": count(self),
        }


def _build_tokenizer(config: ModelConfig, tokenizer: Union[None, str, Path, TextTokenizer]) -> Optional[TextTokenizer]:
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer
    if tokenizer is not None:
        return TextTokenizer.from_dir(tokenizer, max_length=config.tokenizer.max_length)
    if config.tokenizer.kind == "basic":
        return TextTokenizer.basic(max_length=config.tokenizer.max_length)
    return None


def create_model(
    name: Union[str, ModelConfig, Dict[str, Any]] = "tiny",
    *,
    tokenizer: Union[None, str, Path, TextTokenizer] = None,
    **overrides: Any,
) -> CXRClip:
    """Build a randomly initialised (or locally pretrained) model from a preset.

    Args:
        name: Preset name (see :func:`cxr_search.config.list_models`), config or config dict.
        tokenizer: A tokenizer or a tokenizer directory; presets with ``tokenizer.kind == "basic"``
            get the built-in one when this is None.
        **overrides: Config overrides, e.g. ``image={"name": "resnet18"}``, ``embed_dim=256``.

    Returns:
        The model in eval mode. With ``init_seed`` set in the config, initialisation is
        reproducible (and does not disturb the global RNG).
    """
    config = get_model_config(name, **overrides)
    tok = _build_tokenizer(config, tokenizer)
    if config.init_seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            model = CXRClip(config, tok)
    else:
        model = CXRClip(config, tok)
    if not math.isfinite(config.logit_scale_init):
        raise ConfigError("logit_scale_init must be finite")
    return model.eval()


def list_presets() -> List[str]:
    """Registered preset names."""
    from cxr_search.config import list_models

    return list_models()
