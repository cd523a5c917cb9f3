"""Resumable, rank-aware batch order and per-sample seeding.

Two things make a run that is killed and resumed end with the same weights as one that is not:

* :class:`StepSampler` derives the epoch's permutation from ``(seed, epoch)`` alone and can start at
  any optimiser step, so a resumed run sees exactly the batches the uninterrupted run would have.
  Each global batch is cut into ``accum_steps`` micro-batches and each micro-batch into
  ``world_size`` contiguous rank slices, so the all-gathered micro-batch of a multi-process run is
  the micro-batch of a single-process run, in the same order.
* :class:`SeededSamples` seeds torch's RNG from ``(seed, epoch, index)`` before building a sample, so
  its images, texts and augmentation depend neither on which DataLoader worker builds it nor on
  what that worker built before (which changes when a run resumes mid-epoch).

:func:`grouped_permutation` is the optional label-grouped order: studies that share a label set are
placed next to each other in small groups, so the label term finds positives in every batch.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cxr_search.errors import ConfigError, DatasetError
from train.dataset import epoch_generator

__all__ = ["SeededSamples", "StepSampler", "grouped_permutation", "sample_seed"]

Key = Tuple[int, int]  # (epoch, study index)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed of sample ``index`` in ``epoch`` (a hash, so neighbouring keys are unrelated)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, np.uint64)[0] >> 1)


def grouped_permutation(keys: torch.Tensor, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of ``len(keys)`` studies in which studies with the same key come in groups.

    The studies are shuffled, each key's studies are cut (in that shuffled order) into groups of up to
    ``group_size``, and the groups are shuffled and concatenated. A study with key < 0 (no labels)
    is a group of its own. With a contrastive batch of B studies, most groups then lie inside one
    batch, so a study whose label set is rare (two or three findings) still meets a label-mate there
    instead of almost never; a group that straddles two batches is split between them.

    Args:
        keys: ``[N]`` int64 label-set keys (-1 = no labels).
        group_size: Studies per group (>= 1; 1 gives a plain shuffle of the studies).
        generator: Seeded generator; the order depends on it and on ``keys`` only.

    Returns:
        ``[N]`` int64 permutation of ``range(N)``.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    order = torch.randperm(len(keys), generator=generator).tolist()
    key_list = keys.tolist()
    groups: List[List[int]] = []
    members: Dict[int, List[int]] = {}  # insertion-ordered, so the grouping is deterministic
    for i in order:
        if key_list[i] < 0:
            groups.append([i])
        else:
            members.setdefault(key_list[i], []).append(i)
    for same in members.values():
        groups.extend(same[s : s + group_size] for s in range(0, len(same), group_size))
    shuffled = torch.randperm(len(groups), generator=generator).tolist()
    return torch.tensor([i for g in shuffled for i in groups[g]], dtype=torch.int64)


class StepSampler(Sampler[List[Key]]):
    """Yields this process's micro-batches of one epoch as lists of ``(epoch, index)`` keys.

    Args:
        num_samples: Studies in the training set.
        global_batch: Studies per optimiser step over all processes.
        seed: Run seed.
        epoch: Epoch number (0-based); fixes the permutation.
        rank: This process's rank.
        world_size: Number of processes.
        accum_steps: Micro-batches per optimiser step.
        start_step: First optimiser step of the epoch to yield (resume).
        label_keys: ``[num_samples]`` label-set keys for the label-grouped order (with ``group_size``).
        group_size: > 1: studies sharing a label set come in groups of this many
            (:func:`grouped_permutation`); 0 or 1: a plain shuffle.

    Raises:
        ConfigError: ``global_batch`` not divisible by ``world_size * accum_steps``.
        DatasetError: Fewer studies than one global batch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        start_step: int = 0,
        label_keys: Optional[torch.Tensor] = None,
        group_size: int = 0,
    ) -> None:
        if global_batch % (world_size * accum_steps):
            raise ConfigError(
                f"optim.batch_size {global_batch} must be divisible by world size x accum_steps "
                f"({world_size} x {accum_steps}); change --set optim.batch_size or optim.accum_steps"
            )
        if num_samples < global_batch:
            raise DatasetError(
                f"only {num_samples} training studies for a global batch of {global_batch}; "
                "lower --set optim.batch_size or add data"
            )
        self.num_samples, self.global_batch = int(num_samples), int(global_batch)
        self.seed, self.epoch, self.rank, self.world_size = int(seed), int(epoch), int(rank), int(world_size)
        self.accum_steps, self.start_step = int(accum_steps), int(start_step)
        if group_size > 1 and (label_keys is None or len(label_keys) != num_samples):
            raise ValueError("a label-grouped order needs one label key per study")
        self.label_keys, self.group_size = label_keys, int(group_size)
        self.micro = global_batch // accum_steps  # studies per micro-batch, all ranks
        self.local = self.micro // world_size  # studies per micro-batch on this rank

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (the incomplete last batch is dropped: contrastive batches must be full)."""
        return self.num_samples // self.global_batch

    def permutation(self) -> torch.Tensor:
        """The epoch's order of study indices ``[num_samples]``."""
        generator = epoch_generator(self.seed, self.epoch)
        if self.group_size > 1:
            assert self.label_keys is not None
            return grouped_permutation(self.label_keys, self.group_size, generator)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[List[Key]]:
        perm = self.permutation().tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            base = step * self.global_batch
            for a in range(self.accum_steps):
                lo = base + a * self.micro + self.rank * self.local
                yield [(self.epoch, i) for i in perm[lo : lo + self.local]]

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step) * self.accum_steps


class SeededSamples(Dataset):
    """Wraps a dataset so that key ``(epoch, index)`` gives ``dataset[index]`` built under a fixed seed.

    The global RNG is forked, so building a sample in the main process (``num_workers=0``) does not
    disturb the training RNG (dropout).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Key) -> Dict[str, Any]:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]
