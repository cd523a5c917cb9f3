"""Image loading and the evaluation transform of the released models (``docs/compatibility.md`` section 3).

Every input (PNG/JPEG path, DICOM path, PIL image, numpy array) becomes an 8-bit PIL image, then
``Resize(shorter side, PIL bilinear) -> CenterCrop -> [0, 1] -> normalise``. The resize happens on
the PIL image on purpose: the released models are sensitive to the filter, and a tensor-side resize
changes the embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cxr_search.config import PreprocessConfig
from cxr_search.errors import ConfigError, ImageReadError

ImageItem = Union[str, Path, Image.Image, np.ndarray]

_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}


def pil_filter(name: str) -> Image.Resampling:
    """PIL resampling filter by name."""
    try:
        return _FILTERS[name]
    except KeyError:
        raise ConfigError(f"unknown interpolation '{name}'; valid: {', '.join(_FILTERS)}") from None


def resize_shorter_side(img: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BILINEAR) -> Image.Image:
    """Resize so the shorter side is ``size``, keeping the aspect ratio as torchvision's Resize does.

    The longer side is truncated (``int``), which is torchvision's rule.
    """
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Square centre crop with torchvision's rounding (pads with black when the image is smaller)."""
    w, h = img.size
    if w < size or h < size:
        canvas = Image.new(img.mode, (max(w, size), max(h, size)))
        canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Min-max scale any numeric 2-D array to uint8 (a constant image becomes all zeros)."""
    arr = np.asarray(array)
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def is_dicom_path(path: Path) -> bool:
    """True for DICOM by extension, or by the ``DICM`` magic at byte 128 for extension-less files."""
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}:
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _pil_to_8bit(img: Image.Image, source: Any) -> Image.Image:
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit PNGs: the reference's convert("RGB") would clip them; scale the range instead.
        return Image.fromarray(to_uint8(np.asarray(img)), mode="L")
    if img.mode in ("LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "1"):
        converted = img.convert("RGB")
        return converted
    raise ImageReadError(str(source), f"unsupported image mode {img.mode}")


def load_image(item: ImageItem, preprocess: PreprocessConfig) -> Image.Image:
    """Read one input into an 8-bit PIL image (mode ``L`` or ``RGB``).

    DICOM files go through the photometric chain of :func:`cxr_search.dicom.read.read_dicom` and are
    resized (antialiased) to ``preprocess.dicom_shorter_side``, as the released models' training
    images were.

    Raises:
        ImageReadError: A path that is missing or not a decodable image.
        DicomError: A DICOM file that cannot be turned into a radiograph.
    """
    if isinstance(item, Image.Image):
        return _pil_to_8bit(item, "<PIL image>")
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            return Image.fromarray(to_uint8(item), mode="L")
        if item.ndim == 3 and item.shape[2] == 3 and item.dtype == np.uint8:
            return Image.fromarray(item, mode="RGB")
        raise ImageReadError(None, f"array of shape {item.shape} and dtype {item.dtype} is not a 2-D image or HxWx3 uint8")
    path = Path(item)
    if not path.is_file():
        raise ImageReadError(str(path), "file not found")
    if is_dicom_path(path):
        from cxr_search.dicom.read import read_dicom

        pixels = read_dicom(path, reduce_to=preprocess.dicom_shorter_side).pixels  # [H, W] uint8
        img = Image.fromarray(pixels, mode="L")
        return resize_shorter_side(img, preprocess.dicom_shorter_side, Image.Resampling.BILINEAR)
    try:
        with Image.open(path) as opened:
            opened.load()
            return _pil_to_8bit(opened, path)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(str(path), f"not a readable image ({exc}); expected PNG, JPEG or DICOM") from exc


def eval_transform(img: Image.Image, preprocess: PreprocessConfig) -> torch.Tensor:
    """The deterministic evaluation transform: ``[3, crop, crop]`` float32, normalised."""
    img = resize_shorter_side(img, preprocess.resize, pil_filter(preprocess.interpolation))
    img = center_crop(img, preprocess.crop_size)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # [H, W] or [H, W, 3]
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    if arr.ndim == 2:
        # Grey replicated to RGB, computed once per channel value: identical to converting first.
        chans = [(arr - mean[c]) / std[c] for c in range(3)]
        out = np.stack(chans, axis=0)  # [3, H, W]
    else:
        out = ((arr - mean) / std).transpose(2, 0, 1)  # [3, H, W]
    return torch.from_numpy(np.ascontiguousarray(out))


def preprocess_item(item: ImageItem, preprocess: PreprocessConfig) -> torch.Tensor:
    """:func:`load_image` then :func:`eval_transform`."""
    return eval_transform(load_image(item, preprocess), preprocess)


def image_size_of(preprocess: PreprocessConfig) -> Tuple[int, int]:
    """(H, W) of the tensors :func:`eval_transform` produces."""
    return preprocess.crop_size, preprocess.crop_size
