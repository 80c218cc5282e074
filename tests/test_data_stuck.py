"""A worker that stops producing batches: reported fast, with where it is stuck; a stop request ends
the wait. The stall is real: the sample's label file is replaced by a FIFO with no writer, so the
worker blocks in open() exactly as it would on a hung network file system."""
import os
import re
import threading
import time

import pytest
import torch

from data_loader.cityscapes import CityscapesIndex
from data_loader.loader import LoaderInterrupted, LoaderWorkerError, build_train_loader
from data_loader.synthetic import generate

OPTS = dict(seed=0, batch_size=1, crop=(32, 64), scale=(128, 64))


@pytest.fixture
def root(tmp_path):
    return generate(str(tmp_path / "data"), num_train=3, num_val=0, size=(128, 64), seed=2)


def stall_labels(root):
    """Replace every train label by a FIFO; returns {path: original bytes} to un-stall later."""
    saved = {}
    for _, label in CityscapesIndex(root, "train").samples:
        with open(label, "rb") as f:
            saved[label] = f.read()
        os.unlink(label)
        os.mkfifo(label)
    return saved


def feed(saved):
    """Open each FIFO for writing and give its reader the original PNG (blocks until read)."""
    def write(path, data):
        with open(path, "wb") as f:
            f.write(data)
    threads = [threading.Thread(target=write, args=item, daemon=True) for item in saved.items()]
    for t in threads:
        t.start()
    return threads


def test_a_worker_stuck_on_the_first_batch_is_named_with_its_stack_and_announced(root):
    lines = []
    loader = build_train_loader(root, workers=1, timeout=60, start_timeout=7, log=lines.append, **OPTS)
    stall_labels(root)  # the loader is built (headers read); its worker now blocks on the first label
    start = time.monotonic()
    with pytest.raises(LoaderWorkerError) as err:
        next(iter(loader))
    waited = time.monotonic() - start
    text = str(err.value)
    assert 6 < waited < 20
    assert re.search(r"worker 0 \(pid \d+\) gave no batch for \d+ s \(timeout 7 s for the first batch", text), text
    assert "_gtFine_labelTrainIds.png" in text  # the samples it was filling
    # The stack is the worker's own, down to the blocking call in the decoder.
    assert "worker_main" in text and "read_label" in text and "_read_bytes" in text, text
    assert any("waiting for the first batch from 1 worker" in line for line in lines), lines
    assert loader.segment_names == [] or not any(os.path.exists("/dev/shm/" + n) for n in loader.segment_names)


def test_a_worker_stuck_later_uses_the_shorter_timeout(root):
    loader = build_train_loader(root, workers=1, timeout=2, start_timeout=60, prefetch=1, **OPTS)
    batches = iter(loader)
    next(batches)  # started fine
    names, pid = loader.segment_names, loader.worker_pids[0]
    stall_labels(root)
    with pytest.raises(LoaderWorkerError, match=r"gave no batch for \d+ s \(timeout 2 s\)") as err:
        for _ in range(10):
            next(batches)
    assert "read_label" in str(err.value)
    assert not any(os.path.exists("/dev/shm/" + n) for n in names)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_a_stop_request_ends_the_wait_and_leaves_the_loader_resumable(root):
    with build_train_loader(root, workers=0, **OPTS) as reference:
        expected = next(iter(reference)).image.clone()
    stop = threading.Event()
    loader = build_train_loader(root, workers=1, prefetch=1, interrupt=stop.is_set, **OPTS)
    # Stalled before the first batch is asked for: no batch can have been decoded ahead of the stall.
    saved = stall_labels(root)
    try:
        batches = iter(loader)
        threading.Timer(1.0, stop.set).start()
        start = time.monotonic()
        with pytest.raises(LoaderInterrupted):
            next(batches)
        assert time.monotonic() - start < 5  # not the 300 s first-batch timeout
        assert loader.state_dict()["next_batch"] == 0  # the interrupted batch is still the next one
        stop.clear()
        feed(saved)  # un-stall: the same batch now arrives, with the content it must have
        assert torch.equal(next(batches).image, expected)
    finally:
        loader.close()


def test_with_a_grace_a_stop_request_waits_that_long_then_reports_the_stuck_worker(root):
    stop = threading.Event()
    stop.set()
    loader = build_train_loader(root, workers=1, interrupt=stop.is_set, interrupt_grace=1.5, **OPTS)
    stall_labels(root)
    start = time.monotonic()
    with pytest.raises(LoaderWorkerError, match="a stop was requested and the batch did not come within 1.5 s"):
        next(iter(loader))
    assert time.monotonic() - start < 10

