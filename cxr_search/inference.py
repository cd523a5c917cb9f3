"""Inference: :class:`Embedder` turns files, PIL images, arrays and strings into embeddings.

The model (:class:`cxr_search.model.CXRClip`) is a plain ``nn.Module``; everything that is a decision
about *running* it lives here: the device, the numeric precision (autocast), the channels-last memory
format of convolutional trunks, the int8 copy of the text encoder for single queries, decoding workers
and batching. An :class:`Embedder` makes these decisions once, when it is built, so a long-lived one
(a web service's) stays warm, and a model being trained is never changed behind its back by an embed
call.

Usage::

    from cxr_search.checkpoints import load_model
    from cxr_search.inference import Embedder

    embedder = Embedder(load_model("models/r50_mcc"), device="auto", precision="auto")
    img = embedder.embed_images(["study1/frontal.dcm", "other.png"])  # [N, D] float32
    txt = embedder.embed_texts(["no acute cardiopulmonary process"])  # [M, D] float32
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr_search.config import ModelConfig
from cxr_search.errors import ConfigError
from cxr_search.images import ImageItem, preprocess_item
from cxr_search.model import CXRClip

logger = logging.getLogger(__name__)

#: Float precisions of the encoders; ``auto`` is resolved per device by :func:`resolve_precision`.
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
#: The text encoder also runs as a dynamically int8-quantised copy on CPU (see :meth:`Embedder.embed_texts`).
TEXT_PRECISIONS = PRECISIONS + ("int8",)

DeviceLike = Union[None, str, torch.device]


def resolve_device(device: DeviceLike = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU.

    Raises:
        ConfigError: A CUDA device was asked for and there is no GPU, or ``device`` names no device.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:  # torch's "Expected one of cpu, cuda, ... device type"
        raise ConfigError(f"device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
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
        ConfigError: Unknown precision.
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
    """Autocast for ``bf16``/``fp16``; a no-op for ``fp32`` (``auto`` is resolved first).

    Raises:
        ConfigError: Unknown precision, or fp16 on a device other than a GPU.
    """
    precision = _float_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _float_precision(precision: str, device: torch.device) -> str:
    """``precision`` resolved for ``device``, refused where autocast cannot run it."""
    precision = resolve_precision(precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 autocast needs a GPU; use bf16 on CPU")
    return precision


def _text_precision(precision: str, device: torch.device) -> str:
    """A text precision (:data:`TEXT_PRECISIONS`) resolved for ``device``."""
    if precision == "int8":
        if device.type != "cpu":
            raise ConfigError("int8 text encoding runs on CPU; use fp32, bf16 or auto on a GPU")
        return precision
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'; valid: {', '.join(TEXT_PRECISIONS)}")
    return _float_precision(precision, device)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")
    return value


class Embedder:
    """Runs a :class:`CXRClip` for inference: files, images and texts in, float32 embeddings out.

    The Embedder owns the model it is given. Building it prepares the model once: eval mode (frozen
    BatchNorm statistics and no dropout), moved to ``device``, and, for convolutional trunks (the
    tower's backend says so), the image tower in channels-last memory format. Nothing changes the
    model after that, and nothing else should: put it back in training mode and the Embedder refuses
    to run (build a new one when training is done); do not move it to another device while the
    Embedder uses it. ``CXRClip.encode_*`` on tensors never change the model's mode, device or layout.

    Args:
        model: The dual encoder.
        device: ``None``/``"auto"`` (GPU when present), ``"cpu"``, ``"cuda:0"``...
        precision: Image (and, unless ``text_precision`` says otherwise, text) precision: ``fp32``,
            ``bf16`` (autocast; CPU or GPU), ``fp16`` (GPU) or ``auto`` (see :func:`resolve_precision`).
        batch_size: Images per forward pass.
        text_batch_size: Texts per forward pass.
        num_workers: DataLoader worker processes decoding and preprocessing images (0: in this process).
        text_precision: Default precision of :meth:`embed_texts`: one of :data:`TEXT_PRECISIONS`
            (``int8`` on CPU only); ``None`` follows ``precision``.

    Raises:
        ConfigError: An unknown precision or one the device cannot run, a CUDA device without a GPU,
            a batch size below 1 or a negative worker count.
    """

    def __init__(
        self,
        model: CXRClip,
        *,
        device: DeviceLike = None,
        precision: str = "fp32",
        batch_size: int = 32,
        text_batch_size: int = 64,
        num_workers: int = 0,
        text_precision: Optional[str] = None,
    ) -> None:
        dev = resolve_device(device)
        self._precision = _float_precision(precision, dev)
        self._text_precision = self._precision if text_precision is None else _text_precision(text_precision, dev)
        self._batch_size = _positive("batch_size", batch_size)
        self._text_batch_size = _positive("text_batch_size", text_batch_size)
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self._num_workers = num_workers
        self._model = model
        model.eval()
        model.to(dev)
        self._device = dev
        self._channels_last = bool(model.image_tower.channels_last)
        if self._channels_last:
            model.image_tower.to(memory_format=torch.channels_last)
        # (weights key, quantised copy) of the int8 text encoder: built on first use, not part of the model.
        self._int8_text: Optional[Tuple[Tuple[Tuple[int, int], ...], nn.Module]] = None

    # ---------------------------------------------------------------------------- properties
    @property
    def model(self) -> CXRClip:
        """The model (in eval mode, on :attr:`device`)."""
        return self._model

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    @property
    def precision(self) -> str:
        """The resolved image precision (``fp32``, ``bf16`` or ``fp16``)."""
        return self._precision

    @property
    def text_precision(self) -> str:
        """The resolved default text precision (``fp32``, ``bf16``, ``fp16`` or ``int8``)."""
        return self._text_precision

    @property
    def config(self) -> ModelConfig:
        """The model's configuration (preprocessing included)."""
        return self._model.config

    @property
    def embed_dim(self) -> int:
        """Size of the embeddings."""
        return int(self._model.config.embed_dim)

    @property
    def batch_size(self) -> int:
        """Images per forward pass."""
        return self._batch_size

    @property
    def text_batch_size(self) -> int:
        """Texts per forward pass."""
        return self._text_batch_size

    @property
    def num_workers(self) -> int:
        """DataLoader workers decoding images."""
        return self._num_workers

    # ------------------------------------------------------------------------------- images
    def embed_images(
        self,
        items: Sequence[ImageItem],
        *,
        batch_size: Optional[int] = None,
        num_workers: Optional[int] = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Embed images given as paths (.png/.jpg/.dcm), PIL images or arrays.

        Args:
            items: The images.
            batch_size: Images per forward pass (default: the Embedder's).
            num_workers: Decoding workers (default: the Embedder's).
            progress: Show a progress bar.

        Returns:
            float32 ``[N, D]``, L2-normalised rows.

        Raises:
            ImageReadError / DicomError: An item cannot be read (the message names the file).
        """
        return self._over_images(items, self.embed_pixels, self.embed_dim, batch_size, num_workers, progress)

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed one batch of preprocessed images ``[B, 3, H, W]`` (the eval transform's output).

        The model step of :meth:`embed_images`, for pipelines that read and preprocess images
        themselves. Returns float32 ``[B, D]`` with L2-normalised rows.
        """
        return self._forward_pixels(self._model.encode_image, pixels)

    def image_features(
        self,
        items: Sequence[ImageItem],
        *,
        batch_size: Optional[int] = None,
        num_workers: Optional[int] = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Pre-projection image features (the linear probe's input), as :meth:`embed_images` reads them.

        Returns:
            float32 ``[N, F]`` on the CPU, ``F`` the image tower's feature size.

        Raises:
            ImageReadError / DicomError: An item cannot be read (the message names the file).
        """
        step = functools.partial(self._forward_pixels, self._model.image_features)  # [B, F] per batch
        dim = int(self._model.image_tower.feature_dim)
        return torch.from_numpy(self._over_images(items, step, dim, batch_size, num_workers, progress))

    # -------------------------------------------------------------------------------- texts
    def embed_texts(
        self,
        texts: Sequence[str],
        *,
        batch_size: Optional[int] = None,
        precision: Optional[str] = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Embed texts; returns float32 ``[N, D]`` with L2-normalised rows.

        Texts are sorted by length before batching so padding stays short (padding does not change
        results: attention masks it and the pooling ignores it).

        Args:
            texts: The texts (one string is one text).
            batch_size: Texts per forward pass (default: the Embedder's ``text_batch_size``).
            precision: Override of the Embedder's text precision, e.g. ``int8`` for single queries: a
                dynamically int8-quantised copy of the text encoder on CPU (about 3x faster for one
                query, cosine to fp32 >= 0.999; see :meth:`_int8_text_encoder`).
            progress: Show a progress bar.

        Raises:
            TokenizerError: The model has no tokenizer.
            ConfigError: An unknown precision or one the device cannot run.
        """
        tok = self._model.require_tokenizer()
        if isinstance(texts, str):
            texts = [texts]
        precision = self._text_precision if precision is None else _text_precision(precision, self._device)
        size = self._text_batch_size if batch_size is None else _positive("batch_size", batch_size)
        out = np.zeros((len(texts), self.embed_dim), dtype=np.float32)
        if not len(texts):
            return out
        encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        if precision == "int8":
            encoder = self._int8_text_encoder()
            context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
            encode = lambda ids, mask: F.normalize(encoder(ids, mask).float(), dim=-1)  # noqa: E731
        else:
            dev = self._device
            context = lambda: autocast_context(dev, precision)  # noqa: E731
            encode = lambda ids, mask: self._model.encode_text(ids.to(dev), mask.to(dev))  # noqa: E731
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        self._check_eval()
        with torch.inference_mode(), _progress(progress, len(texts), "texts") as bar:
            for start in range(0, len(order), size):
                idx = order[start : start + size]
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
        queries, not for building indices. Cached here, never in the model (it stays out of its
        ``state_dict()``); the key is each weight's storage and in-place version counter.
        """
        model = self._model
        params = list(model.text_tower.parameters()) + list(model.text_projection.parameters())
        key = tuple((p.data_ptr(), p._version) for p in params)
        if self._int8_text is not None and self._int8_text[0] == key:
            return self._int8_text[1]
        encoder = _TextEncoder(copy.deepcopy(model.text_tower).cpu(), copy.deepcopy(model.text_projection).cpu()).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice (torchao is its successor)
            quantised = torch.ao.quantization.quantize_dynamic(encoder, {nn.Linear}, dtype=torch.qint8)
        self._int8_text = (key, quantised)
        return quantised

    # ---------------------------------------------------------------------------- internals
    def _check_eval(self) -> None:
        # BatchNorm in train mode would normalise with batch statistics and update the running ones
        # (even under inference_mode): silently wrong numbers and a changed model. Refuse instead.
        if self._model.training:
            raise RuntimeError(
                "the model was put in training mode after its Embedder was built; an Embedder owns its "
                "model: build a new Embedder (it puts the model in eval mode) when training is done"
            )

    def _forward_pixels(self, forward: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> np.ndarray:
        """``forward`` (an image-side method of the model) on one preprocessed batch, as float32 numpy."""
        self._check_eval()
        pixels = pixels.to(self._device, non_blocking=True)  # [B, 3, H, W]
        if self._channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast_context(self._device, self._precision):
            out = forward(pixels)  # [B, D] or [B, F]
        return out.float().cpu().numpy()

    def _over_images(
        self,
        items: Sequence[ImageItem],
        step: Callable[[torch.Tensor], np.ndarray],
        dim: int,
        batch_size: Optional[int],
        num_workers: Optional[int],
        progress: bool,
    ) -> np.ndarray:
        """``step`` on every batch of preprocessed ``items``, in order; float32 ``[N, dim]``."""
        size = self._batch_size if batch_size is None else _positive("batch_size", batch_size)
        workers = self._num_workers if num_workers is None else num_workers
        out = np.zeros((len(items), dim), dtype=np.float32)
        if not len(items):
            return out
        done = 0
        with _progress(progress, len(items), "images") as bar:
            for pixels in _image_batches(items, self.config, size, workers):
                rows = step(pixels)  # [B, dim]
                out[done : done + len(rows)] = rows
                done += len(rows)
                bar.update(len(rows))
        return out


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


__all__ = ["PRECISIONS", "TEXT_PRECISIONS", "Embedder", "autocast_context", "cpu_has_fast_bf16", "resolve_device",
           "resolve_precision"]
