"""The shared-memory loader: determinism across worker counts, the global stream, exact resume, val loader.

Resuming on another world size: tests/test_data_resume.py."""
import os

import cv2
import numpy as np
import pytest
import torch

from data_loader.cityscapes import CityscapesIndex, DatasetError
from data_loader.loader import build_train_loader, build_val_loader
from data_loader.sampler import ShardedStream
from data_loader.shm_ring import leftover_segments
from data_loader.synthetic import generate

OPTS = dict(batch_size=2, crop=(32, 64), scale=(128, 64), ratio_range=(0.5, 2.0))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("loader")), num_train=9, num_val=5, size=(128, 64), seed=11)


def take(loader, n):
    out = []
    for _, batch in zip(range(n), loader):
        out.append((batch.image.clone(), batch.label.clone(), list(batch.meta["index"]), list(batch.meta["epoch"])))
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for (ia, la, xa, ea), (ib, lb, xb, eb) in zip(a, b):
        assert (xa, ea) == (xb, eb)
        assert torch.equal(ia, ib) and torch.equal(la, lb)


def test_batches_are_uint8_fixed_shape_views(root):
    with build_train_loader(root, workers=1, seed=0, **OPTS) as loader:
        batch = next(iter(loader))
        assert batch.image.dtype == torch.uint8 and batch.image.shape == (2, 32, 64, 3)
        assert batch.label.dtype == torch.uint8 and batch.label.shape == (2, 32, 64)
        assert batch.meta["valid_hw"].tolist() == [[32, 64], [32, 64]]
        assert set(np.unique(batch.label.numpy())) <= set(range(19)) | {255}
        names = loader.segment_names
        assert names and all(n.startswith(f"dlt_{os.getpid()}_") for n in names)
        assert set(names) <= set(leftover_segments(os.getpid()))
    assert not set(names) & set(leftover_segments(os.getpid()))


def test_same_seed_same_batches_whatever_the_worker_count(root):
    with build_train_loader(root, workers=0, seed=5, **OPTS) as loader:
        in_process = take(loader, 7)  # 7 batches of 2 span two epochs of 9 samples
    with build_train_loader(root, workers=2, seed=5, **OPTS) as loader:
        two_workers = take(loader, 7)
    assert_same(in_process, two_workers)
    assert {e for b in in_process for e in b[3]} == {0, 1}
    with build_train_loader(root, workers=0, seed=6, **OPTS) as loader:
        other_seed = take(loader, 2)
    assert other_seed[0][2] != in_process[0][2] or not torch.equal(other_seed[0][0], in_process[0][0])


def test_spawned_workers_give_the_same_batches(root):
    with build_train_loader(root, workers=1, seed=5, start_method="spawn", **OPTS) as loader:
        spawned = take(loader, 3)
    with build_train_loader(root, workers=0, seed=5, **OPTS) as loader:
        assert_same(spawned, take(loader, 3))


def global_stream(n, seed, epochs):
    """The documented order, rebuilt here: whole epoch permutations from default_rng([seed, 1, e]),
    concatenated, nothing dropped; one (index, epoch) per position."""
    return [(int(i), e) for e in range(epochs) for i in np.random.default_rng([seed, 1, e]).permutation(n)]


def test_rank_batches_are_slices_of_the_global_stream():
    for n, world, batch in ((9, 2, 2), (10, 3, 1), (7, 7, 2), (5, 1, 3), (3, 4, 1)):
        size = world * batch
        stream = global_stream(n, 3, epochs=6 * size // n + 2)
        shards = [ShardedStream(n, batch, seed=3, rank=r, world_size=world) for r in range(world)]
        for k in range(6):
            step = [(t.index, t.epoch) for s in shards for t in s.batch(k)]  # ranks in rank order
            assert step == stream[k * size:(k + 1) * size], (n, world, batch, k)
            assert len(set(step)) == size  # distinct samples (index, epoch) across ranks within a step
            if len({e for _, e in step}) == 1:  # inside one epoch the dataset indices are distinct too
                assert len({i for i, _ in step}) == size
    assert ShardedStream(9, 2, seed=3, rank=0, world_size=2).batches_per_epoch() == 9 / 4
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        ShardedStream(9, 1, rank=2, world_size=2)


def test_rank_loaders_follow_their_shard(root):
    stream = global_stream(9, 1, 1)
    indices = []
    for rank in (0, 1):
        with build_train_loader(root, workers=0, seed=1, rank=rank, world_size=2, **OPTS) as loader:
            batches = take(loader, 2)
            # global step k is stream[4k : 4k+4]; rank r holds its r-th slice of 2
            assert [list(zip(b[2], b[3])) for b in batches] == [stream[4 * k + 2 * rank:4 * k + 2 * rank + 2]
                                                                 for k in range(2)]
            indices.append([i for b in batches for i in b[2]])
    assert len(set(indices[0]) | set(indices[1])) == 8 and not set(indices[0]) & set(indices[1])


def test_state_dict_resume_gives_the_identical_next_batches(root):
    with build_train_loader(root, workers=2, seed=9, **OPTS) as loader:
        first = take(loader, 2)
        state = loader.state_dict()
        rest = take(loader, 4)
    assert state["next_batch"] == 2 and state["global_position"] == 4 and state["order"] == "global"
    with build_train_loader(root, workers=1, seed=9, **OPTS) as resumed:
        resumed.load_state_dict(state)
        assert_same(take(resumed, 4), rest)
        resumed.load_state_dict({**state, "next_batch": 0, "global_position": 0})  # seeking back mid-run works too
        assert_same(take(resumed, 2), first)
    with build_train_loader(root, workers=0, seed=10, **OPTS) as other:
        with pytest.raises(ValueError, match="seed=9"):
            other.load_state_dict(state)


def test_val_loader_yields_each_sample_once_at_full_resolution(root):
    index = CityscapesIndex(root, "val")
    seen = []
    for rank in (0, 1):
        with build_val_loader(root, workers=1, rank=rank, world_size=2) as loader:
            assert len(loader) == (3 if rank == 0 else 2)
            for _ in range(2):  # a finite loader starts over on each for-loop
                got = []
                for batch in loader:
                    i = batch.meta["index"][0]
                    got.append(i)
                    assert batch.image.shape == (1, 64, 128, 3)
                    np.testing.assert_array_equal(batch.image[0].numpy(), cv2.imread(index[i][0]))
                    np.testing.assert_array_equal(batch.label[0].numpy(), cv2.imread(index[i][1], cv2.IMREAD_UNCHANGED))
            seen += got
    assert sorted(seen) == list(range(5))


def test_val_loader_resizes_images_to_scale_keeping_labels(root):
    with build_val_loader(root, workers=0, scale=(64, 32)) as loader:
        batch = next(iter(loader))
        assert batch.meta["valid_hw"].tolist() == [[32, 64]] and batch.meta["ori_hw"].tolist() == [[64, 128]]
        assert batch.image.shape == (1, 64, 128, 3)  # slot holds the larger (label) size
        assert (batch.image[0, 32:] == 0).all() and batch.image[0, :32, :64].float().std() > 5


def test_a_bad_file_in_a_worker_raises_with_its_path(tmp_path):
    root = generate(str(tmp_path / "bad"), num_train=3, num_val=0, size=(64, 32), seed=2)
    label_path = CityscapesIndex(root, "train")[1][1]
    label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    label[0, 0] = 77
    cv2.imwrite(label_path, label)
    loader = build_train_loader(root, workers=2, seed=0, batch_size=1, crop=(16, 32), scale=(64, 32))
    names = loader.segment_names
    with pytest.raises(DatasetError, match=os.path.basename(label_path) + r": label values \[77\]"):
        take(loader, 6)
    assert not set(names) & set(leftover_segments(os.getpid()))
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)
