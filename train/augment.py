"""Training augmentation of the reference CXR-CLIP recipe (``docs/compatibility.md`` section 4).

``RandomResizedCrop(crop, scale 0.8-1.1) -> CLAHE (p 0.5, clip limit uniform in [1, 4], 8x8 tiles)
-> ColorJitter(0.1, 0.2, 0.2, 0.1) -> [0, 1] tensor -> Normalize(mean, std)`` (the defaults of
:class:`train.config.AugmentConfig`, which holds them), on the 8-bit PIL image
that :func:`cxr_search.images.load_image` returns. There is deliberately NO horizontal flip: the
side of the heart, of a pneumothorax or of a line matters in a radiograph, and a flipped image with an
unflipped report teaches the model wrong laterality.

Every random draw comes from torch's global generator, which PyTorch seeds per DataLoader worker from
the loader's ``generator``; seeding torch therefore makes the transform reproducible.

Grey (mode ``L``) images stay single-channel until the end: ColorJitter's brightness and contrast act
identically on every channel of a grey-replicated RGB image, its saturation and hue leave such an
image unchanged, and PIL's grey conversion of ``(v, v, v)`` is exactly ``v``, so jittering the grey
image and replicating afterwards gives the same result as replicating first, at a third of the cost
(the tests check this pixel for pixel).
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from cxr_search.config import PreprocessConfig
from cxr_search.errors import ConfigError
from cxr_search.images import pil_filter
from train.config import AugmentConfig

logger = logging.getLogger(__name__)

__all__ = ["TrainTransform", "apply_clahe", "is_grey_rgb", "train_transform"]


def is_grey_rgb(img: Image.Image) -> bool:
    """True for an RGB image whose three channels are identical (a grey image stored as colour)."""
    if img.mode != "RGB":
        return False
    arr = np.asarray(img)
    return bool(np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]))


def apply_clahe(img: Image.Image, clip_limit: float, tiles: int = 8) -> Image.Image:
    """Contrast-limited adaptive histogram equalisation with OpenCV.

    Grey images (mode ``L``, or RGB with equal channels) are equalised directly. A true colour image
    is equalised on the lightness channel of CIE L*a*b*, as albumentations' CLAHE (the reference's)
    does for RGB input.

    Args:
        img: 8-bit PIL image, mode ``L`` or ``RGB``.
        clip_limit: OpenCV clip limit (contrast limit per tile histogram bin, relative).
        tiles: Number of tiles along each axis.

    Returns:
        A new image of the same mode and size.
    """
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tiles), int(tiles)))
    if img.mode == "L":
        return Image.fromarray(clahe.apply(np.asarray(img)), mode="L")
    if img.mode != "RGB":
        raise ValueError(f"CLAHE expects an 8-bit L or RGB image, got mode {img.mode}")
    if is_grey_rgb(img):
        grey = clahe.apply(np.ascontiguousarray(np.asarray(img)[..., 0]))
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")
    lab = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2LAB)
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return Image.fromarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB), mode="RGB")


def _check_range(name: str, values: Sequence[float], low: float, high: float = math.inf) -> Tuple[float, float]:
    if len(values) != 2:
        raise ConfigError(f"augmentation '{name}' must be a (min, max) pair, got {values!r}")
    lo, hi = float(values[0]), float(values[1])
    if not (low <= lo <= hi <= high):
        raise ConfigError(f"augmentation '{name}' must satisfy {low} <= min <= max <= {high}, got ({lo}, {hi})")
    return lo, hi


class TrainTransform:
    """The training augmentation as a picklable callable (DataLoader workers may be spawned).

    Build it with :func:`train_transform`; ``scale``, ``clahe_p``, ``clahe_clip``, ``clahe_tiles`` and
    ``jitter`` hold the validated settings of its :class:`~train.config.AugmentConfig`.
    """

    def __init__(self, preprocess: PreprocessConfig, augment: Optional[AugmentConfig] = None) -> None:
        augment = AugmentConfig() if augment is None else augment
        scale, clahe_p, clahe_clip = augment.scale, augment.clahe_p, augment.clahe_clip
        clahe_tiles, jitter = augment.clahe_tiles, augment.jitter
        self.scale = _check_range("scale", scale, 1e-6)
        if not 0.0 <= clahe_p <= 1.0:
            raise ConfigError(f"augmentation 'clahe_p' must be in [0, 1], got {clahe_p}")
        self.clahe_p = float(clahe_p)
        self.clahe_clip = _check_range("clahe_clip", clahe_clip, 0.0)
        if int(clahe_tiles) < 1:
            raise ConfigError(f"augmentation 'clahe_tiles' must be >= 1, got {clahe_tiles}")
        self.clahe_tiles = int(clahe_tiles)
        if len(jitter) != 4 or any(float(j) < 0 for j in jitter) or float(jitter[3]) > 0.5:
            raise ConfigError(
                f"augmentation 'jitter' must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, got {jitter!r}"
            )
        self.jitter = tuple(float(j) for j in jitter)
        pil_filter(preprocess.interpolation)  # ConfigError for an unknown name, as the eval transform gives
        self.preprocess = preprocess
        # torchvision's classes, not a re-implementation: same parameter sampling as the reference.
        # On a PIL image the crop is resized with PIL (antialiased), like the eval transform.
        self._crop = T.RandomResizedCrop(
            preprocess.crop_size, scale=self.scale, interpolation=InterpolationMode(preprocess.interpolation)
        )
        self._color = T.ColorJitter(*self.jitter)
        self._mean = np.asarray(preprocess.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(preprocess.std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Augment one 8-bit PIL image (mode ``L`` or ``RGB``) into a ``[3, crop, crop]`` float32 tensor."""
        if not isinstance(img, Image.Image):
            raise TypeError(f"train transform expects a PIL image, got {type(img).__name__}")
        if img.mode not in ("L", "RGB"):
            raise ValueError(f"train transform expects an 8-bit L or RGB image, got mode {img.mode}")
        if is_grey_rgb(img):
            img = img.convert("L")  # exact for equal channels; see the module docstring
        img = self._crop(img)
        # Both draws every call: the RNG stream then does not depend on whether CLAHE fired.
        fire = torch.rand(1).item() < self.clahe_p
        clip = torch.empty(1).uniform_(self.clahe_clip[0], self.clahe_clip[1]).item()
        if fire:
            img = apply_clahe(img, clip, self.clahe_tiles)
        img = self._color(img)
        # numpy, as in eval_transform (same float32 arithmetic, and torch's small CPU ops are slower).
        arr = np.asarray(img, dtype=np.float32) / 255.0  # [H, W] or [H, W, 3]
        if arr.ndim == 2:
            out = (arr[None, :, :] - self._mean) / self._std  # grey broadcasts to [3, H, W]
        else:
            out = (arr.transpose(2, 0, 1) - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop={self.preprocess.crop_size}, scale={self.scale}, clahe_p={self.clahe_p}, "
            f"clahe_clip={self.clahe_clip}, clahe_tiles={self.clahe_tiles}, jitter={self.jitter}, "
            f"mean={tuple(self.preprocess.mean)}, std={tuple(self.preprocess.std)})"
        )


def train_transform(
    preprocess: PreprocessConfig, augment: Optional[AugmentConfig] = None
) -> Callable[[Image.Image], torch.Tensor]:
    """The reference training augmentation, without any flip.

    ``RandomResizedCrop(preprocess.crop_size, augment.scale, default ratio 3/4-4/3)`` -> CLAHE with
    probability ``augment.clahe_p`` and a clip limit uniform in ``augment.clahe_clip`` on
    ``augment.clahe_tiles`` x ``augment.clahe_tiles`` tiles -> ``ColorJitter(*augment.jitter)`` ->
    ``[0, 1]`` tensor -> normalise with ``preprocess.mean`` / ``preprocess.std``. A scale above 1 is
    allowed: when no crop of that area fits, torchvision falls back to a centre crop. Grey input comes
    out replicated to three channels.

    Args:
        preprocess: Crop size, interpolation and normalisation of the model.
        augment: Augmentation settings (a recipe's ``augment`` section); None for the defaults of
            :class:`~train.config.AugmentConfig`, the reference recipe's.

    Returns:
        A picklable callable ``PIL.Image -> float32 tensor [3, crop, crop]``, random through torch's
        global RNG (reproducible after ``torch.manual_seed``).

    Raises:
        ConfigError: An out-of-range parameter or unknown interpolation.
    """
    return TrainTransform(preprocess, augment)
