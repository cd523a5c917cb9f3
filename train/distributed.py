"""torch.distributed helpers: process-group setup from torchrun's environment and the collectives
the trainer needs. Every helper is the identity (or a no-op) in a single process, so training code
calls them unconditionally.

Launch with ``torchrun --nproc_per_node N ...``: torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them :func:`init_distributed` returns a
single-process :class:`DistInfo` and creates no process group.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from cxr_search.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "init_distributed",
    "all_gather_tensor",
    "all_gather_with_grad",
    "all_reduce_mean",
    "broadcast_object",
    "barrier",
    "cleanup",
    "seed_everything",
    "is_distributed",
]

#: True when :func:`init_distributed` created the process group (so :func:`cleanup` may destroy it).
_CREATED_GROUP = False


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank, 0..world_size-1.
        world_size: Number of processes.
        local_rank: Rank on this node (selects the GPU).
        device: The device this process computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ConfigError(f"environment variable {name} is not set; launch with torchrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _resolve_device(device: Optional[str], local_rank: int) -> torch.device:
    """``None``/``"auto"``: ``cuda:{local_rank}`` when CUDA is available, else CPU."""
    if device is None or device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
        if dev.index is None:  # plain "cuda": one GPU per local rank
            dev = torch.device(f"cuda:{local_rank}")
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {dev} does not exist: this node has {torch.cuda.device_count()} GPU(s); launch at "
                f"most that many processes per node"
            )
    return dev


def init_distributed(
    device: Optional[str] = None,
    backend: Optional[str] = None,
    *,
    timeout: Optional[datetime.timedelta] = None,
) -> DistInfo:
    """Set up this process from torchrun's environment variables.

    Without ``RANK``/``WORLD_SIZE`` in the environment the job is one process and no process group
    is created. An already-initialised process group is reused (and left alone by :func:`cleanup`).

    Args:
        device: ``None``/``"auto"``: ``cuda:{LOCAL_RANK}`` when CUDA is available, else CPU;
            ``"cpu"`` forces the CPU; ``"cuda"`` means ``cuda:{LOCAL_RANK}``; ``"cuda:N"`` is taken as is.
        backend: Process-group backend; default ``nccl`` on CUDA, ``gloo`` on CPU.
        timeout: Collective timeout (torch's default when None).

    Returns:
        The rank, world size, local rank and device of this process.

    Raises:
        ConfigError: Malformed or inconsistent torchrun variables, or an unavailable device.
    """
    global _CREATED_GROUP
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", 0)
        info = DistInfo(rank, world_size, local_rank, _resolve_device(device, local_rank))
        logger.debug("reusing the initialised process group: %s", info)
        return info

    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, _resolve_device(device, 0))

    rank = _env_int("RANK")
    world_size = _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(
            f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}"
        )
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not; launch with torchrun")
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed support; run a single process")

    dev = _resolve_device(device, local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    kwargs: dict = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world_size}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if dev.type == "cuda":
        # NCCL binds each process to one GPU; set it before the first collective.
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    _CREATED_GROUP = True
    info = DistInfo(rank, world_size, local_rank, dev)
    logger.info("initialised %s process group: rank %d of %d on %s", backend, rank, world_size, dev)
    return info


def _check_same_shape(t: Tensor) -> None:
    """Raise ValueError on every rank when the ranks' shapes differ (one small extra collective)."""
    world_size = dist.get_world_size()
    shape = torch.tensor([t.dim(), *t.shape, *([0] * (8 - t.dim()))], dtype=torch.int64, device=t.device)  # [9]
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        seen = [tuple(s[1 : 1 + int(s[0])].tolist()) for s in shapes]
        raise ValueError(f"all_gather_with_grad needs the same shape on every rank, got {seen} (rank order)")


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of this rank's slice.

    Written here rather than using ``torch.distributed.nn.functional.all_gather``, which recent torch
    deprecates. The backward is an all-reduce (SUM) of the full gradient followed by taking the own
    slice: it works on every backend, and the extra traffic is negligible for [B, 512] embeddings.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        rank = dist.get_rank()
        ctx.rows = (rank * t.shape[0], (rank + 1) * t.shape[0])
        return all_gather_tensor(t)  # [world * b, ...]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every rank's loss may depend on our rows: d(sum_r L_r)/d(our rows) = sum over ranks.
        grad = grad.contiguous().clone()  # [world * b, ...]
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start, stop = ctx.rows
        return grad[start:stop]  # [b, ...]


def all_gather_with_grad(t: Tensor, *, check_shapes: bool = False) -> Tensor:
    """Concatenate ``t`` from every rank in rank order, keeping the autograd graph.

    The backward pass sums, over ranks, the gradients with respect to each rank's slice and returns
    that sum to its owner. With each rank's loss computed on its own rows and DDP averaging
    parameter gradients, this gives exactly the single-process gradient of the global loss
    (verified in ``tests/train/test_distributed.py``). Every rank must call it in the same order, and the
    backward passes run the matching collectives in the same order (autograd's order is
    deterministic for identical graphs).

    Args:
        t: [b, ...] the same shape on every rank.
        check_shapes: Verify that first (one extra small collective per call).

    Returns:
        [world_size * b, ...]; ``t`` itself when not distributed.

    Raises:
        ValueError: With ``check_shapes``, when the ranks pass different shapes (raised on every rank).
    """
    if not is_distributed():
        return t
    if check_shapes:
        if t.dim() > 8:
            raise ValueError(f"all_gather_with_grad shape check supports at most 8 dims, got {t.dim()}")
        _check_same_shape(t)
    return _GatherWithGrad.apply(t)  # [world * b, ...]


@torch.no_grad()
def all_gather_tensor(t: Tensor) -> Tensor:
    """Concatenate ``t`` (any dtype, same shape on every rank) from every rank in rank order, no gradient.

    Returns ``t`` itself when not distributed.
    """
    if not is_distributed():
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)  # [world * b, ...]


@torch.no_grad()
def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over ranks, for metrics (no gradient); a detached copy when not distributed.

    Integer tensors are averaged as float32.
    """
    out = t.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects); ``obj`` when not distributed."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    """Wait for every rank; a no-op when not distributed."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if :func:`init_distributed` created it; otherwise do nothing."""
    global _CREATED_GROUP
    if _CREATED_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        logger.debug("destroyed the process group")
    _CREATED_GROUP = False


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU).

    Ranks that must draw different augmentations should pass ``seed + rank``.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
