"""The global data order: the same global step whatever the world size, and resuming a checkpoint
of W ranks on W' ranks (same global batch) continues the sample sequence exactly.

Real loaders (worker processes, shared memory) over 9 tiny samples; global batch 4, so step 2
straddles the first epoch boundary (positions 8..11) and step 4 the second (16..19). Expected
orders are rebuilt here from the documented rule, independently of data_loader.sampler."""
import numpy as np
import pytest
import torch

from data_loader.loader import build_train_loader, build_val_loader
from data_loader.synthetic import generate

OPTS = dict(crop=(32, 64), scale=(128, 64), ratio_range=(0.5, 2.0))
SEED = 4
N_SAMPLES = 9
GLOBAL = 4  # global batch: 1 rank x 4, 2 ranks x 2, 4 ranks x 1
BEFORE, AFTER = 2, 3  # steps before the checkpoint, steps after it


def documented_stream(n, seed, epochs):
    """Epoch e is default_rng([seed, 1, e]).permutation(n); epochs concatenated, nothing dropped."""
    return [(int(i), e) for e in range(epochs) for i in np.random.default_rng([seed, 1, e]).permutation(n)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("resume")), num_train=N_SAMPLES, num_val=3, size=(128, 64), seed=7)


def loader(root, world, rank=0, workers=0, seed=SEED):
    return build_train_loader(root, batch_size=GLOBAL // world, workers=workers, seed=seed, rank=rank,
                              world_size=world, **OPTS)


def take(source, n):
    return [(b.image.clone(), b.label.clone(), list(zip(b.meta["index"], b.meta["epoch"])))
            for _, b in zip(range(n), source)]


def steps(per_rank):
    """Per-rank batch lists -> global steps: the ranks' batches concatenated in rank order."""
    return [(torch.cat([b[0] for b in step]), torch.cat([b[1] for b in step]), [s for b in step for s in b[2]])
            for step in zip(*per_rank)]


def assert_same(a, b):
    assert [x[2] for x in a] == [x[2] for x in b]  # the same samples (index, epoch) in the same order
    for (ia, la, _), (ib, lb, _) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(la, lb)  # ... augmented into the same pixels


@pytest.fixture(scope="module")
def runs(root):
    """Uninterrupted runs of BEFORE + AFTER steps on 1, 2 and 4 ranks (different worker counts on
    purpose): {world: (per-rank batches, per-rank states written after BEFORE steps)}."""
    out = {}
    for world, workers in ((1, 2), (2, 1), (4, 0)):
        batches, states = [], []
        for rank in range(world):
            with loader(root, world, rank, workers) as it:
                first = take(it, BEFORE)
                states.append(it.state_dict())
                batches.append(first + take(it, AFTER))
        out[world] = (batches, states)
    return out


def test_global_step_k_is_the_same_block_of_samples_for_1_2_and_4_ranks(runs):
    expected = documented_stream(N_SAMPLES, SEED, 3)
    reference = steps(runs[1][0])
    for k, (_, _, samples) in enumerate(reference):
        assert samples == expected[k * GLOBAL:(k + 1) * GLOBAL]
    assert {e for _, e in reference[2][2]} == {0, 1}  # an epoch boundary inside a global step
    for world in (2, 4):
        assert_same(steps(runs[world][0]), reference)
        for step in zip(*runs[world][0]):  # the ranks of one step see distinct samples
            seen = [s for b in step for s in b[2]]
            assert len(set(seen)) == len(seen) == GLOBAL


def test_states_record_the_global_position(runs):
    for world in (1, 2, 4):
        states = runs[world][1]
        assert [s["rank"] for s in states] == list(range(world))
        for s in states:
            assert (s["global_position"], s["next_batch"], s["world_size"]) == (BEFORE * GLOBAL, BEFORE, world)
            assert (s["seed"], s["num_samples"], s["batch_size"]) == (SEED, N_SAMPLES, GLOBAL // world)


def test_two_ranks_resume_on_one_rank_where_they_stopped(root, runs):
    states = runs[2][1]
    before = steps([b[:BEFORE] for b in runs[2][0]])  # what the two ranks saw up to the checkpoint
    uninterrupted = runs[1][0][0]
    with loader(root, 1, workers=1) as resumed:
        resumed.load_state_dict(states)  # the checkpoint's list, one state per old rank
        assert resumed.state_dict()["next_batch"] == BEFORE
        assert_same(before + take(resumed, AFTER), uninterrupted)  # the job saw one uninterrupted sequence
    continued = uninterrupted[BEFORE:]
    with loader(root, 1) as resumed:
        resumed.load_state_dict(states[1])  # any one old rank's state locates the position too
        assert_same(take(resumed, 1), continued[:1])


def test_one_rank_resumes_on_two_ranks_where_it_stopped(root, runs):
    state = runs[1][1]
    resumed = []
    for rank in (0, 1):
        with loader(root, 2, rank, workers=1) as it:
            it.load_state_dict(state)
            resumed.append(take(it, AFTER))
    for rank in (0, 1):  # each rank continues exactly like an uninterrupted two-rank run ...
        assert_same(resumed[rank], runs[2][0][rank][BEFORE:])
    before = runs[1][0][0][:BEFORE]  # ... and the job's global steps are one uninterrupted sequence
    assert_same(before + steps(resumed), runs[1][0][0])
    assert_same(before + steps(resumed), steps(runs[2][0]))


def test_two_ranks_resume_on_four_and_on_two(root, runs):
    for world in (4, 2):  # 2 -> 2 is the exact same-world resume, from the checkpoint's list
        for rank in range(world):
            with loader(root, world, rank) as it:
                it.load_state_dict(runs[2][1])
                assert_same(take(it, AFTER), runs[world][0][rank][BEFORE:])


def test_a_smaller_global_batch_continues_the_same_sample_sequence(root, runs):
    expected = documented_stream(N_SAMPLES, SEED, 3)
    with build_train_loader(root, batch_size=2, workers=0, seed=SEED, **OPTS) as it:
        it.load_state_dict(runs[2][1])  # 8 samples consumed: 4 steps of 2
        assert it.state_dict()["next_batch"] == BEFORE * GLOBAL // 2
        got = [s for b in take(it, 3) for s in b[2]]
    assert got == expected[BEFORE * GLOBAL:BEFORE * GLOBAL + 6]


def test_mismatches_are_clear_errors(root, runs):
    states = runs[2][1]
    with loader(root, 1) as one, loader(root, 2, rank=1) as rank1:
        with pytest.raises(ValueError, match=rf"seed={SEED + 1} does not match this loader's {SEED}.*resume with seed"):
            one.load_state_dict([{**s, "seed": SEED + 1} for s in states])
        with pytest.raises(ValueError, match=r"num_samples=10 does not match this loader's 9.*same size"):
            one.load_state_dict([{**s, "num_samples": 10} for s in states])
        with pytest.raises(ValueError, match=r"disagree on the position: rank 0 is at global sample 8, rank 1 at 12"):
            one.load_state_dict([states[0], {**states[1], "next_batch": 3, "global_position": 12}])
        with pytest.raises(ValueError, match=r"inconsistent: global_position=12 but .* = 8"):
            one.load_state_dict({**states[0], "global_position": 12})
        with pytest.raises(ValueError, match="one state per rank, in rank order"):
            one.load_state_dict(states[::-1])
        with pytest.raises(ValueError, match="1 loader states for a world size of 2"):
            one.load_state_dict(states[:1])
        with pytest.raises(ValueError, match="rank=0 does not match this loader's 1"):  # same world: as before
            rank1.load_state_dict(states[0])
        assert rank1.state_dict()["next_batch"] == 0  # a refused state leaves the loader where it was
    with build_train_loader(root, batch_size=3, workers=0, seed=SEED, **OPTS) as three:
        with pytest.raises(ValueError, match=r"global sample 8; this loader takes 1 rank\(s\) x batch 3 = 3 samples "
                                             r"per step and 8 is not a multiple of 3.*the checkpoint's 4"):
            three.load_state_dict(states)


def test_a_state_from_before_the_global_stream_resumes_at_its_step(root):
    legacy = [{"next_batch": 2, "seed": SEED, "rank": r, "world_size": 2, "batch_size": 2, "num_samples": 9}
              for r in (0, 1)]  # no order / global_position keys
    with loader(root, 1) as it:
        it.load_state_dict(legacy)
        assert it.state_dict()["next_batch"] == 2 and it.state_dict()["global_position"] == 8


def test_val_loader_state_is_unchanged(root):
    with build_val_loader(root, workers=0, rank=1, world_size=2) as val:
        state = val.state_dict()
        assert state == {"next_batch": 0, "rank": 1, "world_size": 2, "num_samples": 3}
        with pytest.raises(ValueError, match="world_size=1 does not match this loader's 2"):
            val.load_state_dict({**state, "world_size": 1})
        with pytest.raises(ValueError, match=r"next_batch=2: expected an int in \[0, 1\]"):
            val.load_state_dict({**state, "next_batch": 2})
        val.load_state_dict({**state, "next_batch": 1})  # the end of this rank's single sample
        with pytest.raises(StopIteration):
            next(val)
