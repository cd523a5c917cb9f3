"""CXR-CLIP training losses (``docs/compatibility.md`` section 4) as pure functions of L2-normalised embeddings.

Every term is a cross-entropy ``CE(A, B)`` of ``s * A @ B.T`` against the diagonal, where ``s =
exp(logit_scale)`` is one shared learnable scale and ``B`` is gathered across all processes with a
gradient-carrying all-gather. Each process computes the cross-entropy of its OWN rows only (the
queries) against the gathered keys; its rows sit at ``offset = rank * local_batch`` in the gathered
tensor, so the targets are ``offset + arange(b)``. Averaging the per-process losses (what DDP's
gradient averaging does) then gives exactly the single-process loss on the global batch.

Logits are computed in float32 (float64 stays float64) with autocast disabled: under fp16 AMP the
matmul would otherwise run in half precision and ``s * cos`` up to 100 loses the digits that separate
the positives from the negatives.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

#: A function that concatenates a [b, D] tensor from every process in rank order -> [world * b, D].
GatherFn = Callable[[Tensor], Tensor]
ScaleLike = Union[Tensor, float]

__all__ = ["GatherFn", "contrastive_ce", "symmetric_ce", "clip_term", "cxr_clip_loss", "label_targets"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 if any input is float64."""
    dtype = torch.float32
    for t in tensors:
        if not t.is_floating_point():
            raise ValueError(f"embeddings must be floating point, got dtype {t.dtype}")
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _as_scale(scale: ScaleLike, like: Tensor) -> Tensor:
    """The scale as a 0-d tensor on ``like``'s device (a Python float is accepted for convenience)."""
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), device=like.device)
    if scale.numel() != 1:
        raise ValueError(f"scale must be a scalar tensor (exp(logit_scale)), got shape {tuple(scale.shape)}")
    return scale.reshape(())


def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Both [b, D] with the same b and D (the two sides of a positive pair)."""
    for name, t in ((name_a, a), (name_b, b)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be a 2-d [batch, dim] tensor, got shape {tuple(t.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same [batch, dim] shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def _gather(t: Tensor, gather: Optional[GatherFn]) -> Tensor:
    return t if gather is None else gather(t)


def contrastive_ce(
    queries: Tensor, keys: Tensor, scale: ScaleLike, offset: int = 0, targets: Optional[Tensor] = None
) -> Tensor:
    """Mean cross-entropy of ``scale * queries @ keys.T`` against targets ``offset + arange(b)``.

    Args:
        queries: [b, D] this process's rows (L2-normalised).
        keys: [N, D] keys gathered from all processes, N >= offset + b; row ``offset + i`` is the
            positive of query ``i``.
        scale: Scalar tensor ``exp(logit_scale)``; gradients flow into it.
        offset: Position of this process's rows in ``keys`` (``rank * b`` when gathered).
        targets: [b, N] probabilities (each row sums to 1, or is all zeros to leave that query
            out) replacing the one-hot targets, e.g. from :func:`label_targets`; None = each
            query's own row.

    Returns:
        0-d float32 tensor (float64 for float64 inputs).

    Raises:
        ValueError: Non-2-d inputs, different embedding sizes, targets outside ``keys`` or of the
            wrong shape.
    """
    if queries.dim() != 2 or keys.dim() != 2:
        raise ValueError(
            f"queries and keys must be 2-d [batch, dim] tensors, got shapes {tuple(queries.shape)} and "
            f"{tuple(keys.shape)}"
        )
    b, dim = queries.shape
    n_keys, key_dim = keys.shape
    if dim != key_dim:
        raise ValueError(f"queries have dim {dim} but keys have dim {key_dim}; both must embed to the same size")
    if b == 0:
        raise ValueError("queries are empty: the cross-entropy of an empty batch is undefined")
    if offset < 0 or offset + b > n_keys:
        raise ValueError(
            f"targets offset..offset+b = {offset}..{offset + b} fall outside the {n_keys} keys; offset must be "
            f"rank * local_batch and keys the gathered tensor"
        )
    if targets is not None and tuple(targets.shape) != (b, n_keys):
        raise ValueError(f"targets must have shape [queries, keys] = {(b, n_keys)}, got {tuple(targets.shape)}")
    dtype = _compute_dtype(queries, keys)
    s = _as_scale(scale, queries)
    # Autocast off: the logits must not be recomputed in half precision under AMP.
    with torch.autocast(device_type=queries.device.type, enabled=False):
        logits = s.to(dtype) * (queries.to(dtype) @ keys.to(dtype).T)  # [b, N]
        if targets is not None:
            return F.cross_entropy(logits, targets.to(dtype))
        own = torch.arange(offset, offset + b, device=queries.device)  # [b]
        return F.cross_entropy(logits, own)


def symmetric_ce(
    a: Tensor,
    b: Tensor,
    scale: ScaleLike,
    *,
    gather: Optional[GatherFn] = None,
    offset: int = 0,
) -> Tensor:
    """``(CE(a, gather(b)) + CE(b, gather(a))) / 2``.

    Args:
        a: [b, D] local rows of one side of the positive pairs.
        b: [b, D] local rows of the other side (same shape).
        scale: Scalar ``exp(logit_scale)``.
        gather: All-gather with gradient (``train.distributed.all_gather_with_grad``); None = one process.
        offset: This process's row offset in the gathered tensors.

    Raises:
        ValueError: ``a`` and ``b`` differ in shape, or see :func:`contrastive_ce`.
    """
    _check_pair(a, b, "a", "b")
    return _symmetric(a, b, _gather(a, gather), _gather(b, gather), scale, offset)


def _symmetric(a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor, scale: ScaleLike, offset: int,
               targets: Optional[Tensor] = None) -> Tensor:
    """Symmetric CE with the gathered tensors already computed (each is gathered once per step)."""
    return (contrastive_ce(a, b_all, scale, offset, targets) + contrastive_ce(b, a_all, scale, offset, targets)) / 2


def _check_views(views: Sequence[Tensor], name: str, ref: Optional[Tensor], ref_name: str) -> Tensor:
    """Every tensor of ``views`` has the shape of ``ref`` (default: the first view); returns the reference."""
    if len(views) == 0:
        raise ValueError(f"{name} must hold at least one [batch, dim] tensor")
    if ref is None:
        ref, ref_name = views[0], f"{name}[0]"
    for i, t in enumerate(views):
        _check_pair(ref, t, ref_name, f"{name}[{i}]")
    return ref


def _clip(
    images: Sequence[Tensor],
    texts: Sequence[Tensor],
    images_all: Sequence[Tensor],
    texts_all: Sequence[Tensor],
    scale: ScaleLike,
    offset: int,
    targets: Optional[Tensor] = None,
) -> Tensor:
    """CLIP term on pre-gathered tensors: mean over pairs of image->text, text->image, then averaged."""
    i2t: List[Tensor] = []
    t2i: List[Tensor] = []
    for image, image_all in zip(images, images_all, strict=False):
        for text, text_all in zip(texts, texts_all, strict=False):
            i2t.append(contrastive_ce(image, text_all, scale, offset, targets))
            t2i.append(contrastive_ce(text, image_all, scale, offset, targets))
    return (torch.stack(i2t).mean() + torch.stack(t2i).mean()) / 2


def clip_term(
    images: Sequence[Tensor],
    texts: Sequence[Tensor],
    scale: ScaleLike,
    *,
    gather: Optional[GatherFn] = None,
    offset: int = 0,
) -> Tensor:
    """Image-text contrastive term over every (image view, text) pair.

    Mean over the ``len(images) * len(texts)`` pairs of image->text CE, the same for text->image, and
    the two directions averaged (the reference uses the 4 pairs (I1|I2) x (T1|T2)).

    Args:
        images: Image embeddings, each [b, D].
        texts: Text embeddings, each [b, D].
        scale: Scalar ``exp(logit_scale)``.
        gather: All-gather with gradient; None = one process.
        offset: This process's row offset in the gathered tensors.

    Raises:
        ValueError: An empty sequence or tensors of different shapes.
    """
    ref = _check_views(images, "images", None, "")
    _check_views(texts, "texts", ref, "images[0]")
    images_all = [_gather(t, gather) for t in images]
    texts_all = [_gather(t, gather) for t in texts]
    return _clip(images, texts, images_all, texts_all, scale, offset)


def label_targets(label_keys: Tensor, offset: int, b: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Soft targets that share each query's probability over the batch's studies with its label set.

    Row ``i`` (query ``offset + i``) is uniform over every key ``j`` whose label key equals the
    query's (the same set of positive labels), its own study included. A query without labels
    (key < 0) gets a row of zeros, so it adds nothing to a soft-target cross-entropy (whose mean
    still divides by every row: the term's scale does not depend on how many rows have labels, and a
    batch without labels contributes exactly 0). Used by the optional label term of
    :func:`cxr_clip_loss` (UniCL-style multi-positive contrast; not part of CXR-CLIP).

    Args:
        label_keys: [N] int64 label-set keys of the gathered batch (-1 = no labels).
        offset: Position of this process's queries in the gathered batch.
        b: Number of this process's queries.
        dtype: Floating dtype of the targets (the loss's compute dtype, so 1/3 stays exact in float64).

    Returns:
        [b, N] rows summing to 1 (0 for a query without labels).

    Raises:
        ValueError: ``label_keys`` is not 1-d or the queries fall outside it.
    """
    if label_keys.dim() != 1:
        raise ValueError(f"label_keys must be a 1-d [batch] tensor, got shape {tuple(label_keys.shape)}")
    n = label_keys.shape[0]
    if offset < 0 or offset + b > n:
        raise ValueError(f"queries offset..offset+b = {offset}..{offset + b} fall outside the {n} label keys")
    own = label_keys[offset : offset + b]  # [b]
    match = ((own[:, None] == label_keys[None, :]) & (own[:, None] >= 0)).to(dtype)  # [b, N]; own column set
    return match / match.sum(dim=1, keepdim=True).clamp(min=1)


def _check_weight(name: str, weight: float) -> float:
    weight = float(weight)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {weight}")
    return weight


def cxr_clip_loss(
    image1: Tensor,
    image2: Tensor,
    text1: Tensor,
    text2: Tensor,
    scale: ScaleLike,
    *,
    icl_weight: float = 1.0,
    tcl_weight: float = 0.5,
    label_weight: float = 0.0,
    label_keys: Optional[Tensor] = None,
    label_within: bool = False,
    gather: Optional[GatherFn] = None,
    offset: int = 0,
) -> Dict[str, Tensor]:
    """The CXR-CLIP loss: ``CLIP + icl_weight * ICL + tcl_weight * TCL`` (+ ``label_weight * LABEL``).

    ICL = (CE(I1, I2) + CE(I2, I1)) / 2 and TCL = (CE(T1, T2) + CE(T2, T1)) / 2, keys gathered. Each
    of the four embeddings is gathered once and reused by every term. A weight of 0 skips computing
    its term (the gathers are still needed by the CLIP term).

    LABEL is cxr-search's optional extension (weight 0 = the reference loss): the CLIP term with the
    soft targets of :func:`label_targets`, so studies with the same set of positive labels in a
    batch count as positives of each other instead of as negatives; studies without labels add
    nothing to it. Instance-level contrast alone
    ranks the study with the same side, size and incidental findings first; this term weights the
    shared findings. With ``label_within`` the term also covers the image-image and text-text pairs,
    weighted as ICL and TCL (``CLIP_t + icl_weight * ICL_t + tcl_weight * TCL_t``, ``_t`` = with the
    soft targets): ICL alone pushes the images of two studies with the same findings apart.

    Args:
        image1: [b, D] first image of each study (L2-normalised).
        image2: [b, D] second image (another view, or another augmentation of the same image).
        text1: [b, D] first text.
        text2: [b, D] second text.
        scale: Scalar ``exp(logit_scale)``; gradients flow into it.
        icl_weight: Weight of the image-image term (reference 1.0).
        tcl_weight: Weight of the text-text term (reference 0.5).
        label_weight: Weight of the label term (0 = off, the reference).
        label_keys: [N] int64 label-set keys of the GATHERED batch (rank order; -1 = no labels),
            needed when ``label_weight > 0``.
        label_within: The label term also covers the ICL and TCL pairs (see above).
        gather: All-gather with gradient (``train.distributed.all_gather_with_grad``); None = one process.
        offset: ``rank * b``: this process's rows in the gathered tensors.

    Returns:
        ``{"loss", "clip", "icl", "tcl", "label"}``, 0-d tensors; a skipped term is a zero tensor.

    Raises:
        ValueError: Mismatched shapes, a negative or non-finite weight, a bad offset, or a label
            weight without label keys.
    """
    for name, t in (("image2", image2), ("text1", text1), ("text2", text2)):
        _check_pair(image1, t, "image1", name)
    icl_weight = _check_weight("icl_weight", icl_weight)
    tcl_weight = _check_weight("tcl_weight", tcl_weight)
    label_weight = _check_weight("label_weight", label_weight)
    if label_weight != 0 and label_keys is None:
        raise ValueError("label_weight > 0 needs label_keys (the label-set key of every study in the gathered batch)")
    i1_all, i2_all, t1_all, t2_all = (_gather(t, gather) for t in (image1, image2, text1, text2))

    clip = _clip((image1, image2), (text1, text2), (i1_all, i2_all), (t1_all, t2_all), scale, offset)
    zero = torch.zeros((), dtype=clip.dtype, device=clip.device)
    icl = _symmetric(image1, image2, i1_all, i2_all, scale, offset) if icl_weight != 0 else zero
    tcl = _symmetric(text1, text2, t1_all, t2_all, scale, offset) if tcl_weight != 0 else zero
    label = zero
    if label_weight != 0:
        assert label_keys is not None
        targets = label_targets(label_keys.to(image1.device), offset, image1.shape[0],
                                _compute_dtype(image1, i1_all))  # [b, N]
        label = _clip((image1, image2), (text1, text2), (i1_all, i2_all), (t1_all, t2_all), scale, offset, targets)
        if label_within and icl_weight != 0:
            label = label + icl_weight * _symmetric(image1, image2, i1_all, i2_all, scale, offset, targets)
        if label_within and tcl_weight != 0:
            label = label + tcl_weight * _symmetric(text1, text2, t1_all, t2_all, scale, offset, targets)
    loss = clip
    if icl_weight != 0:
        loss = loss + icl_weight * icl
    if tcl_weight != 0:
        loss = loss + tcl_weight * tcl
    if label_weight != 0:
        loss = loss + label_weight * label
    return {"loss": loss, "clip": clip, "icl": icl, "tcl": tcl, "label": label}
