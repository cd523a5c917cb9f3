"""AdamW with an optional no-decay group, and the per-step linear warm-up + cosine schedule."""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import nn

from train.config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> List[Dict[str, Any]]:
    """Parameter groups for AdamW.

    With ``no_decay_norm_bias``, 1-D parameters (biases, norm weights, BatchNorm affine) and
    ``logit_scale`` go to a group without weight decay: decaying a temperature or a norm gain toward
    0 only fights the loss. The reference decays everything, hence the switch.

    Args:
        model: The model (only parameters with ``requires_grad`` are included).
        weight_decay: Decay of the main group.
        no_decay_norm_bias: Split off the no-decay group.

    Returns:
        One or two groups, each ``{"params": [...], "weight_decay": float, "names": [...]}``.
    """
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_decay_norm_bias and (p.ndim <= 1 or name.endswith("logit_scale")):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = [{"params": decay, "weight_decay": float(weight_decay), "names": decay_names}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the config's lr, betas and eps."""
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias)
    for g in groups:
        g.pop("names")  # optimizer state dicts must stay plain tensors and numbers
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based).

    Linear warm-up from ``1/warmup_steps`` to 1 over ``warmup_steps`` steps, then a half cosine from 1
    down to ``min_ratio`` at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimiser step with :func:`lr_factor` (its state is resumable)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_ratio)
    )
