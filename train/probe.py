"""Linear probe (spec section 5): frozen image tower, one ``Linear`` on the pre-projection feature, BCE.

The protocol: the image tower is frozen and in eval mode, so every image's feature is a constant. We
therefore compute features ONCE (evaluation transform, no augmentation) and train the linear layer on
the cached ``[N, F]`` matrix, which turns 300 epochs into seconds. Settings (spec section 5): 10 % of
the training labels for 300 epochs or 100 % for 30, batch 256, AdamW lr 5e-5; weight decay 1e-4 and a
per-step linear warm-up over the first 10 % of steps then cosine decay to 0, as the contrastive recipe
(``schedule="constant"`` turns the schedule off).

Differences from the reference, on purpose:

* Uncertain (-1) and missing labels are masked out of the BCE (mean over known entries). The reference
  maps -1 to 0 (``uncertain="zero"`` reproduces that).
* No train-time augmentation and no best-on-validation checkpoint pick: the probe reports the last
  epoch, so the result depends only on the seed.

Usage::

    from train.probe import probe_from_manifest
    result = probe_from_manifest(model, ["rsna.csv"], fraction=0.1)
    print(result.mean_auroc, result.to_dict())
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from cxr_search.evaluation.classification_metrics import auroc
from cxr_search.datasets.manifest import ManifestRow, read_manifest
from cxr_search.errors import ConfigError, DatasetError
from cxr_search.model import CXRClip, _image_batches, _progress, autocast_context, resolve_device, resolve_precision
from train.optim import lr_factor
from train.probe_labels import label_matrix, masked_bce, subsample

logger = logging.getLogger(__name__)

__all__ = ["ProbeResult", "default_epochs", "extract_features", "probe_from_manifest", "run_probe"]

#: Epochs of the spec: 300 with 10 % of the labels, 30 with all of them.
EPOCHS_FEW_LABELS = 300
EPOCHS_ALL_LABELS = 30
#: Share of optimiser steps spent in linear warm-up (the reference's ``warmup_epochs: 0.1``).
WARMUP_SHARE = 0.1

FeatureCache = Dict[str, torch.Tensor]


@dataclass
class ProbeResult:
    """Outcome of one linear-probe run.

    Attributes:
        classes: Classes the linear layer was trained on (its output order).
        fraction: Share of the labelled training rows used.
        epochs: Training epochs.
        n_train: Training rows used (after the label filter and subsampling).
        n_test: Test rows with at least one known label.
        auroc: Per-class test AUROC, for classes with both label values in the test rows.
        mean_auroc: Unweighted mean of ``auroc``.
        skipped: Classes left out of ``auroc`` because the test rows hold only one label value.
        train_loss: Mean masked BCE of each epoch.
        seconds: Wall time, feature extraction included.
        settings: Hyper-parameters of the run (lr, batch size, weight decay, seed, ...).
    """

    classes: List[str]
    fraction: float
    epochs: int
    n_train: int
    n_test: int
    auroc: Dict[str, float]
    mean_auroc: float
    skipped: List[str]
    train_loss: List[float]
    seconds: float
    settings: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------


def default_epochs(fraction: float) -> int:
    """Spec epochs: 300 below 100 % of the labels, 30 with all of them."""
    return EPOCHS_FEW_LABELS if fraction < 1.0 else EPOCHS_ALL_LABELS


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def extract_features(
    model: CXRClip,
    paths: Sequence[str],
    *,
    batch_size: int = 64,
    device: Optional[Union[str, torch.device]] = None,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """Pre-projection image features of image files (evaluation transform, frozen tower).

    The image tower runs in eval mode (BatchNorm statistics and dropout frozen, as the protocol
    requires) and without gradients; its previous train/eval mode is restored afterwards. The model
    is moved to ``device``, as :meth:`CXRClip.embed_images` does.

    Args:
        model: The dual encoder.
        paths: Image files (PNG/JPEG/DICOM).
        batch_size: Images per forward pass.
        device: ``None``/``"auto"`` (GPU when present), ``"cpu"``, ``"cuda:0"``...
        num_workers: DataLoader workers decoding images.
        precision: ``fp32`` (default), ``bf16``, ``fp16`` or ``auto``; features are returned in fp32.
        progress: Show a progress bar.

    Returns:
        float32 ``[N, F]`` on the CPU.

    Raises:
        ImageReadError / DicomError: An image cannot be read (the message names the file).
    """
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    dim = model.image_tower.feature_dim
    out = torch.zeros((len(paths), dim), dtype=torch.float32)  # [N, F]
    if not len(paths):
        return out
    was_training = model.image_tower.training
    if model.device != dev:
        model.to(dev)
    model.image_tower.eval()
    done = 0
    try:
        with torch.inference_mode(), _progress(progress, len(paths), "images") as bar:
            for pixels in _image_batches(list(paths), model.config, batch_size, num_workers):
                pixels = pixels.to(dev, non_blocking=True)  # [B, 3, H, W]
                with autocast_context(dev, precision):
                    feats = model.image_features(pixels)  # [B, F]
                out[done : done + len(feats)] = feats.float().cpu()
                done += len(feats)
                bar.update(len(feats))
    finally:
        model.image_tower.train(was_training)
    return out


def _cached_features(
    model: CXRClip, paths: Sequence[str], cache: Optional[FeatureCache], **kwargs: Any
) -> torch.Tensor:
    """Features of ``paths``, computing only those missing from ``cache`` (and storing them there)."""
    if cache is None:
        return extract_features(model, paths, **kwargs)
    todo = list(dict.fromkeys(p for p in paths if p not in cache))
    if todo:
        fresh = extract_features(model, todo, **kwargs)  # [M, F]
        for p, f in zip(todo, fresh):
            cache[p] = f
    return torch.stack([torch.as_tensor(cache[p], dtype=torch.float32).reshape(-1) for p in paths])  # [N, F]


# --------------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------------


def _labelled(
    rows: Sequence[ManifestRow], classes: Sequence[str], uncertain: str
) -> Tuple[List[ManifestRow], np.ndarray, np.ndarray]:
    """Rows with at least one known label among ``classes``, with their targets and mask."""
    _, targets, mask = label_matrix(rows, classes, uncertain=uncertain)
    keep = mask.sum(axis=1) > 0
    return [r for r, k in zip(rows, keep) if k], targets[keep], mask[keep]


def run_probe(
    model: CXRClip,
    train_rows: Sequence[ManifestRow],
    test_rows: Sequence[ManifestRow],
    *,
    classes: Optional[Sequence[str]] = None,
    fraction: float = 1.0,
    epochs: Optional[int] = None,
    batch_size: int = 256,
    lr: float = 5e-5,
    weight_decay: float = 1e-4,
    schedule: str = "cosine",
    uncertain: str = "mask",
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    feature_batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    features_cache: Optional[FeatureCache] = None,
) -> ProbeResult:
    """Train a linear layer on frozen pre-projection features and report per-class test AUROC.

    Args:
        model: The dual encoder; only its image tower is used, and never updated.
        train_rows: Labelled training rows (one image each; each image is its own sample).
        test_rows: Labelled test rows.
        classes: Classes to probe; default: every label found in ``train_rows`` (first-appearance order).
        fraction: Share of the labelled training rows used (seeded random subset; spec: 0.1 or 1.0).
        epochs: Default 300 when ``fraction < 1``, else 30 (spec section 5).
        batch_size: Training batch size (spec: 256).
        lr: Peak AdamW learning rate (spec: 5e-5).
        weight_decay: AdamW weight decay; 1e-4 is the reference's ``optimizer/adamw.yaml``.
        schedule: ``cosine`` (10 % linear warm-up then cosine to 0, per step, as the reference) or
            ``constant``.
        uncertain: How -1 labels count, see :func:`label_matrix`.
        seed: Seeds the subset, the layer's initialisation and the batch order (the global RNG is
            left alone).
        device: Where features are computed and the layer is trained.
        feature_batch_size: Images per forward pass of the tower.
        num_workers: DataLoader workers decoding images.
        progress: Show progress bars.
        features_cache: Optional dict image path -> feature ``[F]``; read first, filled with what had
            to be computed. Reuse it only with the same model (e.g. the 10 % and 100 % runs).

    Returns:
        The :class:`ProbeResult`.

    Raises:
        DatasetError: No classes, an unknown class, no labelled training or test rows, or no class
            with both label values in the test rows.
        ConfigError: A bad fraction, epoch count, batch size, schedule or uncertain policy.
    """
    start = time.perf_counter()
    if epochs is None:
        epochs = default_epochs(fraction)
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if schedule not in ("cosine", "constant"):
        raise ConfigError(f"unknown probe schedule {schedule!r}; valid: cosine, constant")
    if not (0.0 < fraction <= 1.0):
        raise ConfigError(f"label fraction must be in (0, 1], got {fraction}; the spec uses 0.1 and 1.0")

    # ---- labels: everything is checked before the (slow) feature extraction
    found = label_matrix(train_rows, None, uncertain=uncertain)[0] if train_rows else []
    if classes is None:
        if not found:
            raise DatasetError(
                f"none of the {len(train_rows)} training rows has labels; the probe needs a labelled "
                "training split (check --train-split and the manifest's 'labels' column)"
            )
        classes = found
    classes = list(classes)
    if not classes:
        raise DatasetError("no classes to probe: pass at least one label name")
    unknown = [c for c in classes if c not in found]
    if unknown:
        raise DatasetError(
            f"class(es) {', '.join(map(repr, unknown))} never occur in the training rows' labels; "
            f"available: {', '.join(found) or 'none'}"
        )
    train_rows, y_train, m_train = _labelled(train_rows, classes, uncertain)
    if not train_rows:
        raise DatasetError(f"no training row has a known (1/0) label for {', '.join(classes)}")
    test_rows, y_test, m_test = _labelled(test_rows, classes, uncertain)
    if not test_rows:
        raise DatasetError(
            f"no test row has a known (1/0) label for {', '.join(classes)}; check --test-split and the manifest"
        )
    evaluable, skipped = [], []
    for j, name in enumerate(classes):
        values = y_test[m_test[:, j] > 0, j]
        (evaluable if values.size and 0 < values.sum() < values.size else skipped).append(j)
    if not evaluable:
        raise DatasetError(
            f"no class has both positive and negative labels among the {len(test_rows)} test rows; "
            "AUROC is undefined (use a larger test split)"
        )
    picked = subsample(len(train_rows), fraction, seed)
    train_rows = [train_rows[i] for i in picked]
    y_train, m_train = y_train[picked], m_train[picked]

    # ---- features: once, frozen tower in eval mode
    dev = resolve_device(device)
    feat_kwargs: Dict[str, Any] = dict(
        batch_size=feature_batch_size, device=dev, num_workers=num_workers, progress=progress
    )
    x_train = _cached_features(model, [r.image_path for r in train_rows], features_cache, **feat_kwargs)  # [N, F]
    x_test = _cached_features(model, [r.image_path for r in test_rows], features_cache, **feat_kwargs)  # [M, F]

    head, train_loss = _train_linear(
        x_train, torch.from_numpy(y_train), torch.from_numpy(m_train), epochs=epochs, batch_size=batch_size,
        lr=lr, weight_decay=weight_decay, schedule=schedule, seed=seed, device=dev,
    )
    with torch.no_grad():
        scores = head(x_test.to(dev)).float().cpu().numpy()  # [M, C]

    per_class: Dict[str, float] = {}
    for j in evaluable:
        known = m_test[:, j] > 0
        value = auroc(y_test[known, j], scores[known, j])
        assert value is not None  # evaluable classes have both values among the known test labels
        per_class[classes[j]] = value
    mean = float(np.mean(list(per_class.values())))
    result = ProbeResult(
        classes=classes, fraction=float(fraction), epochs=int(epochs), n_train=len(train_rows), n_test=len(test_rows),
        auroc=per_class, mean_auroc=mean, skipped=[classes[j] for j in skipped], train_loss=train_loss,
        seconds=time.perf_counter() - start,
        settings={"batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "schedule": schedule,
                  "uncertain": uncertain, "seed": seed, "feature_dim": int(x_train.shape[1])},
    )  # fmt: skip
    logger.info(
        "linear probe: %d train / %d test rows, %d epochs, mean AUROC %.4f over %d classes (%d skipped)",
        result.n_train, result.n_test, epochs, mean, len(per_class), len(skipped),
    )  # fmt: skip
    return result


def _train_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    schedule: str,
    seed: int,
    device: torch.device,
) -> Tuple[nn.Linear, List[float]]:
    """Fit ``Linear(F, C)`` on features ``x [N, F]`` with masked BCE; returns the layer (eval) and epoch losses."""
    n, dim = x.shape
    with torch.random.fork_rng(devices=[]):
        # Seeded init without touching the caller's global RNG stream.
        torch.manual_seed(seed)
        head = nn.Linear(dim, y.shape[1])
    head.to(device).train()
    x, y, mask = x.to(device), y.to(device), mask.to(device)  # [N, F], [N, C], [N, C]
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = math.ceil(total * WARMUP_SHARE) if schedule == "cosine" else 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda step: lr_factor(step, warmup, total)) if schedule == "cosine" else (lambda step: 1.0)
    )
    gen = torch.Generator().manual_seed(seed)
    losses: List[float] = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)  # [N]
        total_loss, total_known = 0.0, 0.0
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]  # [B]
            loss = masked_bce(head(x[idx]), y[idx], mask[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            # Weighted by known entries, so the epoch loss is the mean over all known labels.
            known = float(mask[idx].sum())
            total_loss += float(loss.detach()) * known
            total_known += known
        losses.append(total_loss / max(total_known, 1.0))
    return head.eval(), losses


def probe_from_manifest(
    model: CXRClip,
    manifest_paths: Sequence[str],
    *,
    train_split: str = "train",
    test_split: str = "test",
    **kwargs: Any,
) -> ProbeResult:
    """Read manifests, pick rows by split and run :func:`run_probe` (each row = one image = one sample).

    Args:
        model: The dual encoder.
        manifest_paths: Manifest CSVs with labels (rows of all of them are pooled).
        train_split: Split the linear layer is trained on.
        test_split: Split the AUROC is measured on.
        **kwargs: Passed to :func:`run_probe` (fraction, epochs, seed, device, ...).

    Raises:
        DatasetError: A manifest cannot be read, or a split has no rows (the splits present are named).
    """
    if train_split == test_split:
        raise ConfigError(f"train and test split are both {train_split!r}; the probe must test on held-out rows")
    rows: List[ManifestRow] = []
    for path in manifest_paths:
        rows.extend(read_manifest(path))
    train_rows = [r for r in rows if r.split == train_split]
    test_rows = [r for r in rows if r.split == test_split]
    present = sorted({r.split for r in rows})
    for name, chosen in ((train_split, train_rows), (test_split, test_rows)):
        if not chosen:
            raise DatasetError(
                f"no rows of split {name!r} in {', '.join(map(str, manifest_paths))}; "
                f"splits present: {', '.join(present) or 'none'}"
            )
    return run_probe(model, train_rows, test_rows, **kwargs)
