"""Two gloo ranks with batch 1 each train exactly like one process with batch 2 (SyncBN, fp32)."""
import functools

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blocks_data import blocks_dataset
from core import build_model
from core.amp import Amp
from core.engine import train_one_step
from data_loader.loader import Batch
from core.losses import seg_loss
from core.optim import PolyLR, build_sgd
from core.atrous_plan import count_skipped_macs
from core.sync_bn import CpuSyncBatchNorm, convert_sync_batchnorm
from launch.dist import destroy
from scripts import free_port

STEPS = 10
CROP = 64


def tiny_model(sync_bn=False):
    torch.manual_seed(0)
    # dropout=0: Dropout2d masks would be drawn from different RNG streams in 1 vs 2 processes.
    model = build_model("r18", 8, num_classes=5, base_channels=8, dropout=0.0)
    return convert_sync_batchnorm(model) if sync_bn else model


def train(model, images, labels, rank, world):
    amp = Amp("O0", "cpu", torch.bfloat16)
    model = amp.prepare(model)
    opt = build_sgd(amp.optim_params, 0.01)
    sched = PolyLR(opt, STEPS)
    loss_fn = functools.partial(seg_loss, aux_weight=0.4)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    per_rank = 2 // world
    losses = []
    for it in range(STEPS):
        sched.set_iteration(it)
        lo = 2 * it + rank * per_rank  # rank r takes sample r of the global batch of 2
        result = train_one_step(ddp, Batch(images[lo:lo + per_rank], labels[lo:lo + per_rank], {}), amp, opt, loss_fn,
                                torch.device("cpu"))
        losses.append(result.loss)
    return losses


def _rank_main(rank, world, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        images, labels = blocks_dataset(2 * STEPS)
        model = tiny_model(sync_bn=True)
        assert any(isinstance(m, CpuSyncBatchNorm) for m in model.modules())
        # The trainer counts FLOPs and skipped atrous work by running the synchronised model on the
        # meta device at start-up: that must not attempt a collective (it raised on meta tensors).
        for norm in ("bn", "inplace-abn"):
            synced = convert_sync_batchnorm(build_model("r18", 8, num_classes=5, base_channels=8, norm=norm))
            skipped = count_skipped_macs(synced, (1, 3, CROP, CROP))  # batch 1 per rank, as the trainer has it
            assert synced.training and all(m.training for m in synced.modules())  # its mode is left as it was
            assert skipped["plain"] > skipped["needed"] > 0  # the OS8 dilated convs at 8x8 skip taps
        losses = train(model, images, labels, rank, world)
        if rank == 0:
            bn = model.backbone.stem[1]  # first BN of the deep stem: running stats must match too
            torch.save({"losses": losses, "running_mean": bn.running_mean.clone(),
                        "weight": model.decode_head.conv_seg.weight.detach().clone()}, out_path)
    finally:
        destroy()  # the trainer's teardown: garbage first, then the group (launch/dist.py says why)


def test_two_gloo_ranks_match_one_process_with_double_batch(tmp_path):
    torch.set_num_threads(1)
    images, labels = blocks_dataset(2 * STEPS)
    single = tiny_model()
    ref = train(single, images, labels, 0, 1)

    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)

    ref, losses = np.array(ref), np.array(got["losses"])
    rel = np.abs(losses - ref) / np.abs(ref)
    print(f"DDP(2x1) vs 1x2 loss mean relative error over {STEPS} steps: {rel.mean():.2e}")
    assert rel.mean() < 1e-4, (ref, losses)
    assert ref[-1] < ref[0]  # it is training, not a constant
    torch.testing.assert_close(got["running_mean"], single.backbone.stem[1].running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["weight"], single.decode_head.conv_seg.weight.detach(), rtol=1e-3, atol=1e-5)
