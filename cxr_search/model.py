"""The CXR-CLIP dual encoder and ``create_model``.

``encode_image`` / ``encode_text`` work on tensors and return L2-normalised embeddings (training and
losses use them); ``embed_images`` / ``embed_texts`` take files, PIL images, arrays or strings and
return float32 numpy arrays (inference, indexing).
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr_search.config import ModelConfig, get_model_config
from cxr_search.errors import ConfigError, TokenizerError
from cxr_search.tokenizer import TextTokenizer
from cxr_search.towers import ImageTower, TextTower
from cxr_search.images import ImageItem, preprocess_item

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but no CUDA GPU is available; use --device cpu")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX-512 BF16 or AMX).

    Without them bf16 autocast is emulated and far slower than fp32 (measured: a BERT-sized matmul
    160x slower on an AVX2-only EPYC), so ``auto`` precision must not pick it.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``auto`` into the fastest accurate precision for ``device``; warn about slow choices.

    ``auto``: bf16 on GPUs that support it (else fp16), bf16 on CPUs with native bf16, else fp32.

    Raises:
        ConfigError: Unknown precision, or fp16 on CPU.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        if not getattr(resolve_precision, "_warned", False):
            logger.warning(
                "this CPU has no native bf16 (AVX-512 BF16 / AMX): bf16 autocast is emulated and much "
                "slower than fp32; use --precision fp32 or auto"
            )
            resolve_precision._warned = True  # type: ignore[attr-defined]
    return precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``bf16``/``fp16``; a no-op for ``fp32`` (``auto`` is resolved first)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 autocast needs a GPU; use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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

    def _require_tokenizer(self) -> TextTokenizer:
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

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """Both embeddings and the scale, for losses."""
        return {
            "image": self.encode_image(pixels),  # [B, D]
            "text": self.encode_text(input_ids, attention_mask),  # [B, D]
            "logit_scale": self.logit_scale.exp(),  # []
        }

    # ---------------------------------------------------------------------------- inference
    def embed_images(
        self,
        items: Sequence[ImageItem],
        *,
        batch_size: int = 32,
        device: Optional[Union[str, torch.device]] = None,
        precision: str = "fp32",
        num_workers: int = 0,
        progress: bool = False,
    ) -> np.ndarray:
        """Embed images given as paths (.png/.jpg/.dcm), PIL images or arrays.

        Args:
            items: The images.
            batch_size: Images per forward pass.
            device: ``None``/``"auto"`` (GPU when present), ``"cpu"``, ``"cuda:0"``...
            precision: ``fp32``, ``bf16`` (autocast; CPU or GPU), ``fp16`` (GPU) or ``auto``
                (see :func:`resolve_precision`).
            num_workers: DataLoader worker processes decoding and preprocessing images.
            progress: Show a progress bar.

        Returns:
            float32 ``[N, D]``, L2-normalised rows.

        Raises:
            ImageReadError / DicomError: An item cannot be read (the message names the file).
        """
        dev = resolve_device(device)
        precision = resolve_precision(precision, dev)
        out = np.zeros((len(items), self.config.embed_dim), dtype=np.float32)
        if not len(items):
            return out
        batches = _image_batches(items, self.config, batch_size, num_workers)
        done = 0
        with _progress(progress, len(items), "images") as bar:
            for pixels in batches:
                emb = self.embed_pixels(pixels, device=dev, precision=precision)  # [B, D]
                out[done : done + len(emb)] = emb
                done += len(emb)
                bar.update(len(emb))
        return out

    def embed_pixels(
        self, pixels: torch.Tensor, *, device: Optional[Union[str, torch.device]] = None, precision: str = "fp32"
    ) -> np.ndarray:
        """Embed one batch of preprocessed images ``[B, 3, H, W]`` (the eval transform's output).

        The model step of :meth:`embed_images`, for pipelines that read and preprocess images
        themselves. Returns float32 ``[B, D]`` with L2-normalised rows.
        """
        dev = resolve_device(device)
        precision = resolve_precision(precision, dev)
        self._prepare(dev)
        with torch.inference_mode():
            pixels = pixels.to(dev, non_blocking=True)  # [B, 3, H, W]
            if self._channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            with autocast_context(dev, precision):
                emb = self.encode_image(pixels)  # [B, D]
            return emb.float().cpu().numpy()

    def embed_texts(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 64,
        device: Optional[Union[str, torch.device]] = None,
        precision: str = "fp32",
        progress: bool = False,
    ) -> np.ndarray:
        """Embed texts; returns float32 ``[N, D]`` with L2-normalised rows.

        Texts are sorted by length before batching so padding stays short (padding does not
        change results: attention masks it and the pooling ignores it). ``precision`` is as for
        :meth:`embed_images`, plus ``int8``: a dynamically int8-quantised copy of the text encoder on
        CPU (about 3x faster for single queries, cosine to fp32 >= 0.999; see
        :meth:`_int8_text_encoder`).

        Raises:
            TokenizerError: The model has no tokenizer.
        """
        tok = self._require_tokenizer()
        if isinstance(texts, str):
            texts = [texts]
        dev = resolve_device(device)
        out = np.zeros((len(texts), self.config.embed_dim), dtype=np.float32)
        if precision == "int8":
            if dev.type != "cpu":
                raise ConfigError("int8 text encoding runs on CPU; use fp32, bf16 or auto on a GPU")
            encoder = self._int8_text_encoder()
            context: Any = contextlib.nullcontext
            encode: Any = lambda ids, mask: F.normalize(encoder(ids, mask).float(), dim=-1)  # noqa: E731
        else:
            precision = resolve_precision(precision, dev)
            if not len(texts):
                return out
            self._prepare(dev)
            context = lambda: autocast_context(dev, precision)  # noqa: E731
            encode = lambda ids, mask: self.encode_text(ids.to(dev), mask.to(dev))  # noqa: E731
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode(), _progress(progress, len(texts), "texts") as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = tok([texts[i] for i in idx])
                with context():
                    emb = encode(batch["input_ids"], batch["attention_mask"])  # [B, D]
                out[idx] = emb.float().cpu().numpy()
                bar.update(len(idx))
        return out

    def _int8_text_encoder(self) -> nn.Module:
        """The int8 text encoder of ``embed_texts(precision="int8")``, rebuilt when the text weights change.

        A dynamically int8-quantised copy of the text tower and projection. A single short query
        through BERT-base reads all 340 MB of fp32 weights for a few dozen tokens, so on CPU it is
        bound by memory bandwidth; int8 weights cut that 4x (measured on 2 AVX2 cores: 87 -> 28 ms
        per query, cosine to fp32 >= 0.999). An approximation, like ANN search: for interactive
        queries, not for building indices.
        """
        params = list(self.text_tower.parameters()) + list(self.text_projection.parameters())
        key = tuple((p.data_ptr(), p._version) for p in params)
        cached = self.__dict__.get("_int8_text")  # not a submodule: stays out of state_dict()
        if cached is not None and cached[0] == key:
            return cached[1]
        import copy
        import warnings

        encoder = _TextEncoder(copy.deepcopy(self.text_tower).cpu(), copy.deepcopy(self.text_projection).cpu()).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice (torchao is its successor)
            quantised = torch.ao.quantization.quantize_dynamic(encoder, {nn.Linear}, dtype=torch.qint8)
        self.__dict__["_int8_text"] = (key, quantised)
        return quantised

    _channels_last: bool = False

    def _prepare(self, dev: torch.device) -> None:
        if self.training:
            self.eval()
        if self.device != dev:
            self.to(dev)
        # channels-last speeds up convolutional trunks on CPU and GPU alike (engine facts: +28 %).
        if self.config.image.backend == "timm" and not self._channels_last:
            self.image_tower.to(memory_format=torch.channels_last)
            self._channels_last = True

    def num_parameters(self) -> Dict[str, int]:
        """Parameter counts per part."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "image_tower": count(self.image_tower),
            "text_tower": count(self.text_tower),
            "projections": count(self.image_projection) + count(self.text_projection),
            "total": count(self),
        }


class _TextEncoder(nn.Module):
    """Text tower + projection as one module (what int8 quantisation copies)."""

    def __init__(self, tower: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.projection = projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.projection(self.tower(input_ids, attention_mask))  # [B, D]


class _ImageListDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[ImageItem], config: ModelConfig) -> None:
        self.items = items
        self.preprocess = config.preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return preprocess_item(self.items[i], self.preprocess)  # [3, H, W]


def _image_batches(
    items: Sequence[ImageItem], config: ModelConfig, batch_size: int, num_workers: int
) -> Iterator[torch.Tensor]:
    if num_workers <= 0:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            yield torch.stack([preprocess_item(x, config.preprocess) for x in chunk])  # [B, 3, H, W]
        return
    loader = torch.utils.data.DataLoader(
        _ImageListDataset(items, config), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    yield from loader


@contextlib.contextmanager
def _progress(enabled: bool, total: int, unit: str) -> Iterator[Any]:
    if not enabled:

        class _Null:
            def update(self, n: int) -> None:
                pass

        yield _Null()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, unit=unit[:-1], desc=f"embedding {unit}") as bar:
        yield bar


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
