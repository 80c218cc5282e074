"""Which samples form batch k: per-epoch shuffling by seed, sharding across ranks, infinite streams.

Training (ShardedStream): epoch e is a permutation of the dataset drawn from (seed, e). As in
torch's DistributedSampler(drop_last=True), the permutation is cut to a multiple of world_size
(the tail is dropped, so every rank sees the same number of distinct samples per epoch and no
sample twice) and rank r takes positions r, r + world_size, ... The rank's epochs are
concatenated into one endless stream and batch k is stream[k*B : (k+1)*B], so a batch may span
two epochs (as mmseg's InfiniteSampler does). Everything is a pure function of
(seed, rank, world_size, k): resuming at batch k gives exactly the batches an uninterrupted run
would have seen.

Evaluation (val_shard): no shuffling, no padding: rank r takes samples r, r + world_size, ...
(ranks may differ by one sample; padding would count a sample twice in the metrics).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

_PERMUTATION_STREAM = 1
AUGMENTATION_STREAM = 2


class SampleTask(NamedTuple):
    index: int  # dataset index
    epoch: int  # -1 for evaluation


def augmentation_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The one Generator every random draw of one sample's augmentation comes from."""
    return np.random.default_rng([seed, AUGMENTATION_STREAM, epoch, index])


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, _PERMUTATION_STREAM, epoch]).permutation(num_samples)


class ShardedStream:
    """Endless per-rank stream of shuffled samples; `batch(k)` is a pure function of k."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        if num_samples < world_size:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than world_size={world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.per_rank = num_samples // world_size  # samples of one epoch on this rank
        self._cache: dict[int, np.ndarray] = {}

    def _rank_epoch(self, epoch: int) -> np.ndarray:
        shard = self._cache.get(epoch)
        if shard is None:
            order = epoch_permutation(self.num_samples, self.seed, epoch) if self.shuffle else np.arange(self.num_samples)
            shard = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[epoch] = shard
        return shard

    def batch(self, k: int) -> list[SampleTask]:
        if k < 0:
            raise ValueError(f"batch index {k}: expected >= 0")
        tasks = []
        for position in range(k * self.batch_size, (k + 1) * self.batch_size):
            epoch, offset = divmod(position, self.per_rank)
            tasks.append(SampleTask(int(self._rank_epoch(epoch)[offset]), epoch))
        return tasks

    def batches_per_epoch(self) -> float:
        return self.per_rank / self.batch_size


def val_shard(num_samples: int, rank: int = 0, world_size: int = 1) -> list[int]:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    return list(range(rank, num_samples, world_size))
