"""Phantom chest radiographs rendered with numpy and OpenCV.

The renderer works in a *density* domain (roughly the X-ray attenuation line integral): soft tissue
adds density, aerated lung removes it, bone and metal add more. Brightness is ``1 - exp(-k * D)``
followed by the contrast curve, unsharp masking and quantum-like noise of a processed radiograph, in
the MONOCHROME2 sense (bone bright, air dark). Findings are drawn by :mod:`cxr_search.synth.lesions`
as changes to the aerated lung (fluid, airspace opacity, collapse, pneumothorax) or as added density
(lesions, devices), so they interact with anatomy the way they do on film: fluid effaces the
diaphragm, consolidation hides vessels, a pneumothorax has no lung markings.

Frontal images show the patient's right on the viewer's left; lateral images face the viewer's
left (anterior = image left). Nothing is ever mirrored.
"""

from __future__ import annotations

import functools
import logging
from typing import Dict, Optional, Tuple

import cv2
import numpy as np

from cxr_search.synth import lesions
from cxr_search.synth.canvas import Frame, blur, smooth_field, to_float
from cxr_search.synth.findings import StudyFindings, sample_findings
from cxr_search.synth.frontal import draw_frontal_anatomy, frontal_geometry
from cxr_search.synth.lateral import draw_lateral_anatomy, lateral_geometry
from cxr_search.synth.scene import (
    VIEWS,
    Anatomy,
    RenderInfo,
    Scene,
    Variation,
    sample_anatomy,
    sample_variation,
)

logger = logging.getLogger(__name__)


#: Films larger than this are rendered at this shorter side and upsampled (anatomy is smooth; the
#: fine noise is added at full resolution), which keeps 512 px archives fast to generate.
MAX_RENDER = 256

_NOISE_TILE = 512


@functools.lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    """A fixed tile of Gaussian noise; films take random windows of it (drawing fresh noise per
    pixel was a sizeable share of the rendering time)."""
    return np.random.default_rng(20240917).standard_normal((_NOISE_TILE, _NOISE_TILE), dtype=np.float32)


def film_noise(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    """Unit Gaussian noise of ``shape`` (a random window of the tile, tiled for large films)."""
    h, w = shape
    tile = _noise_tile()
    oy, ox = (int(v) for v in rng.integers(0, _NOISE_TILE, size=2))
    flip = int(rng.integers(0, 4))
    t = tile[::-1] if flip & 1 else tile
    t = t[:, ::-1] if flip & 2 else t
    reps = (-(-(h + oy) // _NOISE_TILE), -(-(w + ox) // _NOISE_TILE))
    if reps != (1, 1):
        t = np.tile(t, reps)
    return t[oy : oy + h, ox : ox + w]


@functools.lru_cache(maxsize=64)
def _tone_curve(k: float, contrast: float, gamma: float) -> np.ndarray:
    """Density -> brightness table: ``1 - exp(-k D)``, window, gamma (one lookup instead of 4 passes)."""
    d = np.linspace(0.0, _D_MAX, _LUT_SIZE, dtype=np.float64)
    b = 1.0 - np.exp(-k * d)
    lo, hi = 0.1, 0.95
    b = np.clip((b - lo) * contrast / (hi - lo), 0.0, 1.0) ** gamma
    return b.astype(np.float32)


_D_MAX = 8.0
_LUT_SIZE = 4096


def _compose(sc: Scene, layers: Dict[str, np.ndarray], var: Variation, rng: np.random.Generator) -> np.ndarray:
    """Density layers -> processed radiograph brightness in [0, 1] (before full-resolution noise)."""
    fr = sc.fr
    density = layers["density"]
    lat = sc.lateral
    air_k = np.float32(0.68 if lat else 1.3)
    med_keep = 1.0 - np.float32(0.55 if lat else 0.88) * layers["med"]
    air_total = np.zeros_like(density)
    vessel_total = np.zeros_like(density)
    vessels = blur(layers["vessels"], fr.px(0.004 + sc.vessel_blur))
    if sc.vessel_blur > 0:
        vessels *= np.float32(1.4)
    # Fine parenchymal texture so that lungs are not flat, and the zonal lucency gradient.
    common = smooth_field(rng, density.shape, 40)
    common *= np.float32(0.07)
    common += np.float32(1.0)
    if "air_gain" in layers:
        common *= layers["air_gain"]
    for side, m in sc.lung.items():
        air = blur(m, fr.px(0.08))
        air *= np.float32(0.55)
        air += np.float32(0.45)
        air *= blur(m, fr.px(0.007))
        air *= common
        if side in sc.opacity:
            air *= 1.0 - sc.opacity[side]
        air_total += air
        if side in sc.vessel_keep:
            air *= sc.vessel_keep[side]
        vessel_total += air
    air_total *= med_keep
    air_total *= air_k
    density -= air_total
    vessel_total *= vessels
    vessel_total *= med_keep
    vessel_total *= np.float32(0.07 if lat else 0.24)
    density += vessel_total
    density += np.float32(0.08 if lat else 0.12) * layers["heart"]
    density += np.float32(0.2) * layers["hila"] * med_keep
    density -= np.float32(0.35 if lat else 0.55) * layers["trachea"]
    density -= np.float32(0.6) * layers["gastric"]
    density += layers["bone"]
    if sc.dense is not None:
        density += sc.dense
    if sc.lucent is not None:
        density -= sc.lucent
    k = round((0.78 if lat else 1.0) * var.exposure, 4)
    lut = _tone_curve(k, round(var.contrast, 4), round(var.gamma, 4))
    np.clip(density, 0.0, _D_MAX, out=density)
    idx = (density * np.float32((_LUT_SIZE - 1) / _D_MAX)).astype(np.int32)
    img = lut[idx]
    # Edge enhancement as in processed CR/DX images.
    img += np.float32(var.sharpen) * (img - blur(img, fr.px(0.05)))
    return img


def _finish(img: np.ndarray, var: Variation, rng: np.random.Generator, size: int) -> np.ndarray:
    """Quantum-like noise (brighter = more signal), clipped to [0, 1].

    Per-pixel noise falls with resolution, as it does when a radiograph is downsampled.
    """
    noise = film_noise(rng, img.shape)
    amp = np.float32(var.noise * min(1.0, (size / 384.0) ** 0.5))
    img += noise * (amp * (np.float32(0.4) + img))
    np.clip(img, 0, 1, out=img)
    return img


def _annotate(img: np.ndarray, sc: Scene, var: Variation) -> None:
    """Lead side marker and portable label, as burned into real films."""
    if not (var.marker or var.portable_label):
        return
    h, w = img.shape
    scale = max(0.3, min(h, w) / 400)
    thick = max(1, int(round(scale * 2)))
    text = np.zeros((h, w), np.uint8)  # OpenCV draws text on 8-bit images only
    if var.marker:
        x = int(w * (0.86 if not sc.lateral else 0.08))
        cv2.putText(text, "L", (x, int(h * 0.1)), cv2.FONT_HERSHEY_SIMPLEX, scale, 250, thick, cv2.LINE_AA)
    if var.portable_label:
        cv2.putText(text, "PORTABLE", (int(w * 0.04), int(h * 0.06)), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.6, 230,
                    max(1, thick - 1), cv2.LINE_AA)
    np.maximum(img, to_float(text), out=img)


def _resize_mask(mask: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0


def film_shape(view: str, size: int, var: Variation) -> Tuple[int, int]:
    """(rows, columns) of a film: ``size`` is the shorter side; PA and lateral are portrait."""
    if view == "AP" and var.aspect < 1.0:
        return size, int(round(size / var.aspect))
    return int(round(size * var.aspect)), size


def render_view(
    anat: Anatomy,
    findings: StudyFindings,
    view: str,
    size: int,
    rng: np.random.Generator,
    *,
    variation: Optional[Variation] = None,
) -> Tuple[np.ndarray, RenderInfo]:
    """Render one film of a patient.

    Randomness is split so that, for the same ``rng`` state, changing the findings changes only the
    findings: the acquisition variation, the noise and each finding's own shape come from separate
    streams.

    Args:
        anat: The patient's habitus.
        findings: What the film shows.
        view: "PA", "AP" or "LATERAL" ("LL", "LAT" accepted).
        size: Shorter image side in pixels (at least 32).
        rng: Random generator.
        variation: Acquisition variation; drawn from ``rng`` when None.

    Returns:
        The image (float32, ``[H, W]`` in [0, 1], MONOCHROME2 sense) and what was drawn.

    Raises:
        ValueError: Unknown view or a size below 32 pixels.
    """
    view = view.upper()
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {sorted(VIEWS)}")
    if size < 32:
        raise ValueError(f"image size {size} is too small; use at least 32 pixels")
    var_seed, noise_seed, find_seed = (int(x) for x in rng.integers(0, 2**63 - 1, size=3))
    var = variation if variation is not None else sample_variation(np.random.default_rng(var_seed), view)
    lateral = VIEWS[view] == "lateral"
    canonical = "LATERAL" if lateral else view
    h, w = film_shape(canonical, size, var)
    rs = min(size, MAX_RENDER)
    rh, rw = (h, w) if rs == size else film_shape(canonical, rs, var)
    fr = Frame(rh, rw, scale=anat.scale * var.zoom, rotation=var.rotation, tx=var.tx, ty=var.ty)
    sc = Scene(fr=fr, view=canonical, lateral=lateral)
    if lateral:
        sc.geom = lateral_geometry(anat, var, findings)
        layers = draw_lateral_anatomy(sc, anat, findings)
    else:
        sc.geom = frontal_geometry(anat, var, findings, canonical)
        layers = draw_frontal_anatomy(sc, anat, findings, var)
    lesions.paint_findings(sc, findings, find_seed)
    noise_rng = np.random.default_rng(noise_seed)
    img = _compose(sc, layers, var, noise_rng)
    if (rh, rw) != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
        fr = Frame(h, w, scale=anat.scale * var.zoom, rotation=var.rotation, tx=var.tx, ty=var.ty)
    img = _finish(img, var, noise_rng, size)
    _annotate(img, sc, var)
    hp = fr.to_px(np.asarray(sc.geom["heart_pts"]))
    info = RenderInfo(
        shape=(h, w),
        view=canonical,
        lung_masks={s: _resize_mask(m > 127, (h, w)) for s, m in sc.lung.items()},
        heart_mask=_resize_mask(layers["heart"] > 0.5, (h, w)),
        heart_width_px=float(hp[:, 0].max() - hp[:, 0].min()),
        thorax_width_px=float(fr.px(float(sc.geom.get("thorax_width", 0.0)))),  # type: ignore[arg-type]
        geom=sc.geom,
    )
    return img, info


def render_study(
    rng: np.random.Generator,
    findings: Optional[StudyFindings] = None,
    view: str = "PA",
    size: int = 256,
    *,
    anatomy: Optional[Anatomy] = None,
) -> np.ndarray:
    """Render one view of a study as a float32 image in [0, 1] (bright bone, dark lungs).

    Args:
        rng: Random generator; the patient's habitus is drawn from it first unless ``anatomy`` is
            given, so the same seed gives the same patient and film whatever the findings.
        findings: The findings to draw (a fresh sample when None).
        view: "PA", "AP" or "LATERAL".
        size: Shorter image side in pixels.
        anatomy: A fixed habitus (e.g. to render several films of one patient).

    Returns:
        ``[H, W]`` float32 image; H >= W for PA and lateral views.
    """
    anat_seed, film_seed, find_seed = (int(x) for x in rng.integers(0, 2**63 - 1, size=3))
    if anatomy is None:
        anatomy = sample_anatomy(np.random.default_rng(anat_seed))
    if findings is None:
        findings = sample_findings(np.random.default_rng(find_seed), portable=view.upper() == "AP")
    img, _ = render_view(anatomy, findings, view, size, np.random.default_rng(film_seed))
    return img


__all__ = ["film_shape", "render_study", "render_view"]
