"""Worker functions for tests/train/test_distributed.py (importable, so spawned processes can unpickle them).

One spawned job of two CPU/gloo processes checks every helper of ``train.distributed`` and the
distributed CXR-CLIP loss; each rank writes its results to ``rank{r}.pt`` for the parent to compare
with a single-process run.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train.distributed import (
    all_gather_tensor,
    all_gather_with_grad,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
)
from train.losses import cxr_clip_loss

GLOBAL_BATCH = 8
IN_DIM = 6
EMBED_DIM = 16
N_VIEWS = 4  # image1, image2, text1, text2
GATHER_ROWS = 2  # rows per rank in the plain all-gather gradient check
GATHER_DIM = 3
#: Label-set keys of the global batch for the label term: repeats across the two ranks, and -1 (no labels).
LABEL_KEYS = (5, 5, -1, 7, 5, 7, -1, 9)
LABEL_WEIGHT = 0.7


class TinyEncoder(nn.Module):
    """One Linear shared by the four views plus a learnable logit_scale (float64)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Linear(IN_DIM, EMBED_DIM).double()
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(EMBED_DIM, IN_DIM, generator=g, dtype=torch.float64))
            self.proj.bias.copy_(torch.randn(EMBED_DIM, generator=g, dtype=torch.float64))
        self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x), dim=-1)


def global_inputs() -> torch.Tensor:
    """Fixed inputs of the four views for the whole global batch: [4, 8, IN_DIM]."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_VIEWS, GLOBAL_BATCH, IN_DIM, generator=g, dtype=torch.float64)


def loss_of(
    model: nn.Module,
    logit_scale: torch.Tensor,
    x: torch.Tensor,
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]],
    offset: int,
    label_keys: Optional[torch.Tensor] = None,
    label_within: bool = False,
) -> Dict[str, torch.Tensor]:
    """CXR-CLIP loss of views ``x`` [4, b, IN_DIM], encoded in ONE forward call (DDP needs one).

    ``label_keys`` (the gathered batch's keys) switch the label term on with weight ``LABEL_WEIGHT``;
    ``label_within`` extends it to the image-image and text-text pairs.
    """
    n, b, d = x.shape
    emb = model(x.reshape(n * b, d)).reshape(n, b, EMBED_DIM)  # [4, b, D]
    weight = LABEL_WEIGHT if label_keys is not None else 0.0
    return cxr_clip_loss(emb[0], emb[1], emb[2], emb[3], logit_scale.exp(), gather=gather, offset=offset,
                         label_weight=weight, label_keys=label_keys, label_within=label_within)


def gather_weights(rank: int) -> torch.Tensor:
    """Per-rank weights of the linear function used to check all_gather's backward."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2 * GATHER_ROWS, GATHER_DIM, generator=g, dtype=torch.float64)


def gather_local(rank: int) -> torch.Tensor:
    return torch.arange(GATHER_ROWS * GATHER_DIM, dtype=torch.float64).reshape(GATHER_ROWS, GATHER_DIM) + 10 * rank


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of the job; see the module docstring."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    info = init_distributed(device="cpu", timeout=datetime.timedelta(seconds=30))
    res: Dict[str, Any] = {"info": info, "reused": init_distributed(device="cpu")}

    # broadcast_object / all_reduce_mean
    res["broadcast"] = broadcast_object({"from": rank, "list": [1, 2]} if rank == 0 else None)
    res["mean_float"] = all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * rank]))
    res["mean_int"] = all_reduce_mean(torch.tensor(rank))

    # all_gather_with_grad: forward order and backward (each rank's local grad = sum over ranks).
    x = gather_local(rank).requires_grad_(True)
    gathered = all_gather_with_grad(x, check_shapes=True)
    (gathered * gather_weights(rank)).sum().backward()
    res["gathered"] = gathered.detach()
    res["gather_grad"] = x.grad

    # Mismatched shapes are detected on every rank (no hang).
    try:
        all_gather_with_grad(torch.zeros(rank + 1, 2), check_shapes=True)
        res["shape_error"] = None
    except ValueError as exc:
        res["shape_error"] = str(exc)

    # Distributed CXR-CLIP loss through DDP: local rows against gathered keys.
    model = TinyEncoder()
    ddp = DistributedDataParallel(model)
    local = GLOBAL_BATCH // world_size
    x_local = global_inputs()[:, rank * local : (rank + 1) * local]  # [4, local, IN_DIM]
    out = loss_of(ddp, model.logit_scale, x_local, all_gather_with_grad, rank * local)
    out["loss"].backward()
    res["local_loss"] = {k: v.detach() for k, v in out.items()}
    res["mean_loss"] = {k: all_reduce_mean(v) for k, v in out.items()}
    res["grads"] = {name: p.grad.detach().clone() for name, p in model.named_parameters()}

    # The same with the label term: each rank gathers the keys of the global batch (no gradient).
    model = TinyEncoder()
    ddp = DistributedDataParallel(model)
    keys = all_gather_tensor(torch.tensor(LABEL_KEYS[rank * local : (rank + 1) * local], dtype=torch.int64))
    res["gathered_keys"] = keys
    out = loss_of(ddp, model.logit_scale, x_local, all_gather_with_grad, rank * local, label_keys=keys)
    out["loss"].backward()
    res["label_mean_loss"] = {k: all_reduce_mean(v) for k, v in out.items()}
    res["label_grads"] = {name: p.grad.detach().clone() for name, p in model.named_parameters()}

    # And with the label term over the image-image and text-text pairs too.
    model = TinyEncoder()
    ddp = DistributedDataParallel(model)
    out = loss_of(ddp, model.logit_scale, x_local, all_gather_with_grad, rank * local, label_keys=keys,
                  label_within=True)
    out["loss"].backward()
    res["within_mean_loss"] = {k: all_reduce_mean(v) for k, v in out.items()}
    res["within_grads"] = {name: p.grad.detach().clone() for name, p in model.named_parameters()}

    barrier()
    cleanup()
    res["initialised_after_cleanup"] = torch.distributed.is_initialized()
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
