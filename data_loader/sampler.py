"""Which samples form batch k: one global shuffled stream, cut into global steps, split over ranks.

Training (ShardedStream). n = dataset size, B = per-rank batch, W = world size, S = B*W the global
batch. The global stream G is the concatenation of whole epoch permutations: epoch e is a
permutation of the dataset drawn from (seed, e) and nothing is dropped, so position p of G is
sample perm_e[p % n] of epoch e = p // n. Global step k is the contiguous block G[k*S : (k+1)*S]
and rank r's batch k is the r-th slice of it: G[(k*W + r)*B : (k*W + r + 1)*B].

Why: the data order becomes a property of (seed, n) alone. Global step k holds the same samples
for every world size with the same global batch, and concatenating the ranks' batches in rank
order gives exactly the one-process batch (what W ranks with SyncBN training like one process
needs, tests/test_train_ddp.py). A position in the order is one number, the samples all ranks
consumed together (k*S): a checkpoint of 8 ranks resumes on 4 exactly where it stopped, as long
as that number is a multiple of the new global batch (resume_batch). Batches stay a pure function
of (seed, rank, world_size, batch_size, k); augmentation draws from (seed, epoch, index), so a
sample looks the same whatever the world size or the number of loader workers.

Rank r takes a contiguous slice, not every W-th sample (mmengine's InfiniteSampler interleaves:
rank r, per-rank batch k holds positions (k*B + j)*W + r): both give global step k the same set
G[k*S:(k+1)*S], but only slicing keeps its order, so a W-rank step and a 1-rank step see the
identical global batch tensor.

What changed from the previous DistributedSampler(drop_last=True)-like order (each epoch's
permutation cut to a multiple of W, rank r taking positions r::W, the rank's epochs
concatenated): no epoch tail is dropped any more, and an epoch boundary may fall inside a global
step (even inside one rank's batch). Such a step may then hold one dataset index twice, once per
epoch (augmented differently, since the epoch is part of the augmentation seed); (index, epoch)
pairs are always distinct within a step, and indices are distinct when the step lies inside one
epoch. With W = 1 the order is the same as before; with W > 1 it differs, so a checkpoint written
before this change resumes at the same step of the new order.

Evaluation (val_shard): no shuffling, no padding: rank r takes samples r, r + world_size, ...
(ranks may differ by one sample; padding would count a sample twice in the metrics).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

_PERMUTATION_STREAM = 1
AUGMENTATION_STREAM = 2
GLOBAL_ORDER = "global"  # loader state key "order": the training loader follows the global stream


class SampleTask(NamedTuple):
    index: int  # dataset index
    epoch: int  # -1 for evaluation


def augmentation_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The one Generator every random draw of one sample's augmentation comes from."""
    return np.random.default_rng([seed, AUGMENTATION_STREAM, epoch, index])


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, _PERMUTATION_STREAM, epoch]).permutation(num_samples)


class ShardedStream:
    """Rank `rank`'s share of the endless global stream; `batch(k)` is a pure function of k."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        if num_samples < 1:
            raise ValueError(f"the dataset has {num_samples} samples: expected at least one")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.global_batch = batch_size * world_size
        self._cache: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        order = self._cache.get(epoch)
        if order is None:
            n = self.num_samples
            order = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
            if len(self._cache) > 4:  # a batch touches one or two epochs (more only when n < B)
                self._cache.clear()
            self._cache[epoch] = order
        return order

    def sample(self, position: int) -> SampleTask:
        """Position `position` of the global stream."""
        epoch, offset = divmod(position, self.num_samples)
        return SampleTask(int(self._epoch(epoch)[offset]), epoch)

    def batch(self, k: int) -> list[SampleTask]:
        if k < 0:
            raise ValueError(f"batch index {k}: expected >= 0")
        start = (k * self.world_size + self.rank) * self.batch_size
        return [self.sample(p) for p in range(start, start + self.batch_size)]

    def batches_per_epoch(self) -> float:
        """Global steps per epoch (the same for every rank)."""
        return self.num_samples / self.global_batch


# -- resuming -------------------------------------------------------------------------------------

def with_global_position(state: dict) -> dict:
    """A training loader's state gains `global_position`, the samples all ranks consumed together:
    the one number that locates it in the global stream whatever the world size."""
    if state.get("order") == GLOBAL_ORDER:
        state["global_position"] = state["next_batch"] * state["batch_size"] * state["world_size"]
    return state


def stream_position(state: dict) -> int:
    """Samples all ranks had consumed together when `state` was written. States from before the
    global stream have no `global_position`; theirs is next_batch * batch_size * world_size."""
    for key in ("next_batch", "batch_size", "world_size"):
        if not isinstance(state.get(key), int) or state[key] < 0:
            raise ValueError(f"loader state {key}={state.get(key)!r}: expected an int >= 0")
    if state.get("order", GLOBAL_ORDER) != GLOBAL_ORDER:
        raise ValueError(f"loader state order={state['order']!r}: this loader continues order {GLOBAL_ORDER!r} only")
    position = state["next_batch"] * state["batch_size"] * state["world_size"]
    if state.get("global_position", position) != position:
        raise ValueError(f"loader state is inconsistent: global_position={state['global_position']!r} but "
                         f"next_batch x batch_size x world_size = {position}")
    return position


def agreed_state(states: list) -> dict:
    """The state standing for a checkpoint's per-rank list, once every rank is seen to agree."""
    if not states:
        raise ValueError("the checkpoint holds no loader state (an empty per-rank list)")
    first, where = states[0], stream_position(states[0])
    for i, state in enumerate(states):
        if state.get("rank", i) != i:
            raise ValueError(f"entry {i} of the loader states is rank {state.get('rank')!r}'s: expected one "
                             f"state per rank, in rank order")
        for key in ("seed", "num_samples", "world_size", "batch_size", "order"):
            if state.get(key) != first.get(key):
                raise ValueError(f"the checkpoint's loader states disagree on {key}: rank 0 has {first.get(key)!r}, "
                                 f"rank {i} has {state.get(key)!r}")
        if stream_position(state) != where:
            raise ValueError(f"the checkpoint's loader states disagree on the position: rank 0 is at global sample "
                             f"{where}, rank {i} at {stream_position(state)}; every rank must have written its "
                             f"state after the same step")
    if len(states) != first["world_size"]:
        raise ValueError(f"{len(states)} loader states for a world size of {first['world_size']}: "
                         f"expected one per rank")
    return first


def resume_batch(state, keys: dict) -> int:
    """The batch index a training loader with state keys `keys` continues from.

    `state` is one rank's state_dict() or the checkpoint's list of them (one per old rank). The
    same world size and per-rank batch is the old contract: every key must match, rank included
    (from a list, this rank's own entry is taken). Otherwise only the data order must be the same
    (seed, num_samples) and the global position a multiple of this loader's global batch.
    ValueError says what differs and what would be needed."""
    if isinstance(state, (list, tuple)):
        first = agreed_state(list(state))
        same = (first["world_size"], first["batch_size"]) == (keys["world_size"], keys["batch_size"])
        state = state[keys["rank"]] if same else first
    if not isinstance(state, dict):
        raise ValueError(f"loader state of type {type(state).__name__}: expected a dict or a list of per-rank dicts")
    position = stream_position(state)
    same = (state.get("world_size"), state.get("batch_size")) == (keys["world_size"], keys["batch_size"])
    need = [k for k in keys if k != "order"] if same else ["seed", "num_samples"]
    for key in need:
        if state.get(key) != keys[key]:
            hint = {"seed": f": the data order is drawn from the seed; resume with seed {state.get(key)!r}",
                    "num_samples": ": the data order can only continue on a dataset of the same size"}.get(key, "")
            raise ValueError(f"loader state {key}={state.get(key)!r} does not match this loader's {keys[key]!r}{hint}")
    global_batch = keys["batch_size"] * keys["world_size"]
    if position % global_batch:
        raise ValueError(
            f"loader state was written by {state['world_size']} rank(s) x batch {state['batch_size']} after "
            f"{state['next_batch']} steps, at global sample {position}; this loader takes {keys['world_size']} "
            f"rank(s) x batch {keys['batch_size']} = {global_batch} samples per step and {position} is not a "
            f"multiple of {global_batch}: resume with a global batch that divides {position}, e.g. the "
            f"checkpoint's {state['batch_size'] * state['world_size']}")
    return position // global_batch


def val_shard(num_samples: int, rank: int = 0, world_size: int = 1) -> list[int]:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    return list(range(rank, num_samples, world_size))
