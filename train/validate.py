"""Validation during training: contrastive loss and Recall@K on held-out studies."""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxr_search.evaluation.retrieval_metrics import positive_ranks, recall_at_k
from cxr_search.inference import autocast_context
from cxr_search.model import CXRClip
from train.dataset import StudyDataset, make_collate
from train.losses import cxr_clip_loss

logger = logging.getLogger(__name__)

__all__ = ["validate"]


def _pad_cat(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Concatenate two tokenised batches along the batch axis, right-padding to the longer one."""
    length = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    out = {}
    for key in ("input_ids", "attention_mask"):
        parts = [torch.nn.functional.pad(t[key], (0, length - t[key].shape[1])) for t in (a, b)]
        out[key] = torch.cat(parts, dim=0)  # [2B, L]
    return out


@torch.no_grad()
def embed_study_batch(model: CXRClip, batch: Dict[str, object], device: torch.device, precision: str) -> Dict[str, torch.Tensor]:
    """Normalised embeddings of a collated study batch: ``image1, image2, text1, text2`` each ``[B, D]``."""
    b = batch["image1"].shape[0]  # type: ignore[union-attr]
    pixels = torch.cat([batch["image1"], batch["image2"]], dim=0).to(device)  # type: ignore[list-item]  # [2B, 3, H, W]
    tokens = _pad_cat(batch["text1"], batch["text2"])  # type: ignore[arg-type]
    with autocast_context(device, precision):
        img = model.encode_image(pixels)  # [2B, D]
        txt = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))  # [2B, D]
    return {"image1": img[:b], "image2": img[b:], "text1": txt[:b], "text2": txt[b:]}


def validate(
    model: CXRClip,
    dataset: StudyDataset,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    icl_weight: float = 1.0,
    tcl_weight: float = 0.5,
    label_weight: float = 0.0,
    label_within: bool = False,
    num_workers: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> Dict[str, float]:
    """Validation loss (same terms as training, in chunks of ``batch_size`` studies) and Recall@1/5/10.

    Recall uses each study's first image and first text (findings when present): image->text and
    text->image over all validation studies, a study's own text (image) being its only positive.

    ``label_weight`` > 0 adds the label term (keys from the dataset's labels), as in training.

    Returns:
        ``val_loss``, ``val_clip``, ``val_icl``, ``val_tcl``, ``val_label``, ``i2t_R@1/5/10``, ``t2i_R@1/5/10``,
        ``val_R@10`` (mean of both directions), ``val_studies``.
    """
    was_training = model.training
    model.eval()
    assert model.tokenizer is not None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=make_collate(model.tokenizer))
    parts: Dict[str, list] = {"image1": [], "image2": [], "text1": [], "text2": []}
    sums = {"loss": 0.0, "clip": 0.0, "icl": 0.0, "tcl": 0.0, "label": 0.0}
    n_chunks = 0
    scale = model.logit_scale.detach().exp().float()
    for batch in loader:
        emb = embed_study_batch(model, batch, device, precision)
        for k in parts:
            parts[k].append(emb[k].float().cpu())
        if emb["image1"].shape[0] >= 2:  # a contrastive loss needs negatives
            keys = dataset.label_keys(batch["study_index"]) if label_weight else None  # type: ignore[arg-type]
            terms = cxr_clip_loss(emb["image1"], emb["image2"], emb["text1"], emb["text2"], scale.to(device),
                                  icl_weight=icl_weight, tcl_weight=tcl_weight, label_weight=label_weight,
                                  label_keys=keys, label_within=label_within)
            for k in sums:
                sums[k] += float(terms[k])
            n_chunks += 1
        if progress is not None:
            progress(int(batch["image1"].shape[0]))
    model.train(was_training)
    img = torch.cat(parts["image1"]).numpy()  # [N, D]
    txt = torch.cat(parts["text1"]).numpy()  # [N, D]
    own = [[i] for i in range(len(img))]
    out: Dict[str, float] = {f"val_{k}": v / max(1, n_chunks) for k, v in sums.items()}
    for name, (q, c) in {"i2t": (img, txt), "t2i": (txt, img)}.items():
        for k, v in recall_at_k(positive_ranks(q, c, own)).items():
            out[f"{name}_{k}"] = v
    out["val_R@10"] = float(np.mean([out["i2t_R@10"], out["t2i_R@10"]]))
    out["val_studies"] = float(len(img))
    return out
