"""Linear probe (the CXR-CLIP protocol, `docs/compatibility.md` section 5): frozen image tower, one ``Linear`` on the pre-projection feature, BCE.

The protocol: the image tower is frozen and in eval mode, so every image's feature is a constant. We
therefore compute features ONCE (evaluation transform, no augmentation) and train the linear layer on
the cached ``[N, F]`` matrix, which turns 300 epochs into seconds. Settings (the CXR-CLIP protocol): 10 % of
the training labels for 300 epochs or 100 % for 30, batch 256, AdamW lr 5e-5; weight decay 1e-4 and a
per-step linear warm-up over the first 10 % of steps then cosine decay to 0, as the contrastive recipe
(``schedule="constant"`` turns the schedule off).

Differences from the reference, on purpose:

* Uncertain (-1) and missing labels are masked out of the BCE (mean over known entries). The reference
  maps -1 to 0 (``uncertain="zero"`` reproduces that).
* No train-time augmentation and no best-on-validation checkpoint pick: the probe reports the last
  epoch, so the result depends only on the seed.

Usage::

    from cxr_search.inference import Embedder
    from train.probe import probe_from_manifest
    result = probe_from_manifest(Embedder(model), ["rsna.csv"], fraction=0.1)
    print(result.mean_auroc, result.to_dict())
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from cxr_search.datasets.manifest import ManifestRow, read_manifest
from cxr_search.errors import ConfigError, DatasetError
from cxr_search.evaluation.classification_metrics import auroc
from cxr_search.inference import Embedder
from train.optim import lr_factor
from train.probe_labels import label_matrix, masked_bce, subsample

logger = logging.getLogger(__name__)

__all__ = ["ProbeResult", "default_epochs", "extract_features", "probe_from_manifest", "run_probe"]

#: Epochs of the CXR-CLIP protocol: 300 with 10 % of the labels, 30 with all of them.
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
    embedder: Embedder,
    paths: Sequence[str],
    *,
    batch_size: Optional[int] = None,
    num_workers: Optional[int] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Pre-projection image features of image files (evaluation transform, frozen tower).

    The tower runs as the Embedder runs it: in eval mode (BatchNorm statistics and dropout frozen, as
    the protocol requires), without gradients, on its device and in its precision (features are
    returned in fp32).

    Args:
        embedder: The Embedder of the dual encoder.
        paths: Image files (PNG/JPEG/DICOM).
        batch_size: Images per forward pass (default: the Embedder's).
        num_workers: DataLoader workers decoding images (default: the Embedder's).
        progress: Show a progress bar.

    Returns:
        float32 ``[N, F]`` on the CPU.

    Raises:
        ImageReadError / DicomError: An image cannot be read (the message names the file).
    """
    return embedder.image_features(list(paths), batch_size=batch_size, num_workers=num_workers, progress=progress)


def _cached_features(
    embedder: Embedder, paths: Sequence[str], cache: Optional[FeatureCache], **kwargs: Any
) -> torch.Tensor:
    """Features of ``paths``, computing only those missing from ``cache`` (and storing them there)."""
    if cache is None:
        return extract_features(embedder, paths, **kwargs)
    todo = list(dict.fromkeys(p for p in paths if p not in cache))
    if todo:
        fresh = extract_features(embedder, todo, **kwargs)  # [M, F]
        for p, f in zip(todo, fresh, strict=False):
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
    return [r for r, k in zip(rows, keep, strict=False) if k], targets[keep], mask[keep]


def run_probe(
    embedder: Embedder,
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
    progress: bool = False,
    features_cache: Optional[FeatureCache] = None,
) -> ProbeResult:
    """Train a linear layer on frozen pre-projection features and report per-class test AUROC.

    Args:
        embedder: The Embedder of the dual encoder: only its image tower is used, and never updated;
            features are computed and the layer is trained on its device, features in its precision
            and batch size.
        train_rows: Labelled training rows (one image each; each image is its own sample).
        test_rows: Labelled test rows.
        classes: Classes to probe; default: every label found in ``train_rows`` (first-appearance order).
        fraction: Share of the labelled training rows used (seeded random subset; the protocol: 0.1 or 1.0).
        epochs: Default 300 when ``fraction < 1``, else 30 (the CXR-CLIP protocol).
        batch_size: Training batch size (the protocol: 256).
        lr: Peak AdamW learning rate (the protocol: 5e-5).
        weight_decay: AdamW weight decay; 1e-4 is the reference's ``optimizer/adamw.yaml``.
        schedule: ``cosine`` (10 % linear warm-up then cosine to 0, per step, as the reference) or
            ``constant``.
        uncertain: How -1 labels count, see :func:`label_matrix`.
        seed: Seeds the subset, the layer's initialisation and the batch order (the global RNG is
            left alone).
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
        raise ConfigError(f"label fraction must be in (0, 1], got {fraction}; the CXR-CLIP protocol uses 0.1 and 1.0")

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
    for j in range(len(classes)):
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
    dev = embedder.device
    train_paths, test_paths = [r.image_path for r in train_rows], [r.image_path for r in test_rows]
    x_train = _cached_features(embedder, train_paths, features_cache, progress=progress)  # [N, F]
    x_test = _cached_features(embedder, test_paths, features_cache, progress=progress)  # [M, F]

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
    embedder: Embedder,
    manifest_paths: Sequence[str],
    *,
    train_split: str = "train",
    test_split: str = "test",
    **kwargs: Any,
) -> ProbeResult:
    """Read manifests, pick rows by split and run :func:`run_probe` (each row = one image = one sample).

    Args:
        embedder: The Embedder of the dual encoder.
        manifest_paths: Manifest CSVs with labels (rows of all of them are pooled).
        train_split: Split the linear layer is trained on.
        test_split: Split the AUROC is measured on.
        **kwargs: Passed to :func:`run_probe` (fraction, epochs, seed, ...).

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
    return run_probe(embedder, train_rows, test_rows, **kwargs)
