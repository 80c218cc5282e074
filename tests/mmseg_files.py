"""mmseg checkpoint files built the way mmcv (mmseg 0.x) and mmengine (mmseg 1.x) write them,
without mmseg, mmcv or mmengine installed.

Layouts follow mmcv's save_checkpoint + IterBasedRunner.save_checkpoint with mmseg 0.x
tools/train.py's meta, and mmengine's Runner.save_checkpoint. A stand-in class is registered
under mmengine's real module path only while torch.save runs, then removed, so the pickle stream
is what mmengine writes (GLOBAL mmengine.logging.history_buffer HistoryBuffer, NEWOBJ, BUILD with
the instance dict) while nothing of mmengine is importable when the file is read.
"""
import collections
import contextlib
import sys
import types

import numpy as np
import torch

from data_loader.cityscapes import CLASSES, PALETTE

CONFIG_0X = """norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    pretrained='open-mmlab://resnet18_v1c',
    backbone=dict(
        type='ResNetV1c', depth=18, num_stages=4, out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 1, 2), strides=(1, 2, 2, 1),
        norm_cfg=dict(type='SyncBN', requires_grad=True), norm_eval=False, style='pytorch',
        contract_dilation=True),
    decode_head=dict(
        type='ASPPHead', in_channels=512, in_index=3, channels=128, dilations=(1, 6, 12, 18),
        dropout_ratio=0.1, num_classes=19, norm_cfg=dict(type='SyncBN', requires_grad=True),
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(type='FCNHead', in_channels=256, in_index=2, channels=64, num_convs=1),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(512, 1024), stride=(341, 683)))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='MultiScaleFlipAug', img_scale=(2048, 1024), flip=False,
         transforms=[dict(type='Resize', keep_ratio=True), dict(type='RandomFlip')])
]
work_dir = __import__('os').system('touch {marker}')
"""
CONFIG_1X = """crop_size = (512, 1024)
model = dict(type='EncoderDecoder', backbone=dict(type='ResNetV1c', depth=18, dilations=(1, 1, 2, 4),
    strides=(1, 2, 1, 1), contract_dilation=True), decode_head=dict(type='ASPPHead', num_classes=19),
    test_cfg=dict(mode='whole'))
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(2048, 1024), keep_ratio=True)]
"""


@contextlib.contextmanager
def stand_in(module_name, class_name, **body):
    """A class importable as module_name.class_name while pickling, removed afterwards."""
    added = []
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    cls = type(class_name, (), {**body, "__module__": module_name})
    setattr(sys.modules[module_name], class_name, cls)
    try:
        yield cls
    finally:
        for name in added:
            del sys.modules[name]


def mmcv_file(path, model, marker, legacy):
    """mmseg 0.x: mmcv save_checkpoint via IterBasedRunner with tools/train.py's meta."""
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    meta = {"env_info": "sys.platform: linux\nPyTorch: 1.6.0", "seed": 0,
            "exp_name": "deeplabv3_r18-d8_512x1024_80k_cityscapes.py", "mmseg_version": "0.11.0+a1b2c3d",
            "config": CONFIG_0X.format(marker=marker), "CLASSES": CLASSES, "PALETTE": [list(c) for c in PALETTE],
            "hook_msgs": {"last_ckpt": "work_dirs/x/iter_80000.pth", "best_score": np.float64(0.7632),
                          "best_ckpt": "work_dirs/x/best_mIoU_iter_72000.pth"},
            "epoch": 1, "iter": 80000, "mmcv_version": "1.2.7", "time": "Tue Mar  2 01:23:45 2021"}
    torch.save({"meta": meta, "state_dict": model.state_dict(), "optimizer": sgd.state_dict()}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def mmengine_file(path, model):
    """mmseg 1.x: mmengine Runner.save_checkpoint (meta, state_dict, message_hub, optimizer, schedulers)."""
    with stand_in("mmengine.logging.history_buffer", "HistoryBuffer") as hb:
        def buffer(values):
            b = hb.__new__(hb)
            b.max_length, b._log_history, b._count_history = 1000000, np.array(values), np.ones(len(values))
            return b
        sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        meta = {"epoch": 0, "iter": 80000, "cfg": CONFIG_1X, "seed": 1234, "experiment_name": "deeplabv3_r18",
                "time": "20230101_120000", "mmengine_version": "0.10.3",
                "dataset_meta": {"classes": CLASSES, "palette": [list(c) for c in PALETTE],
                                 "label_map": None, "reduce_zero_label": False}}
        hub = {"log_scalars": collections.OrderedDict([("train/lr", buffer([0.01, 0.009])),
                                                       ("train/loss", buffer([2.5, 1.9]))]),
               "runtime_info": collections.OrderedDict([("iter", 80000), ("val/mIoU", np.float64(76.4)),
                                                        ("dataset_meta", meta["dataset_meta"])]),
               "resumed_keys": {"train/lr": True, "train/loss": True, "iter": True}}
        schedulers = [{"eta_min": 1e-4, "power": 0.9, "begin": 0, "end": 80000, "last_step": 80000,
                       "by_epoch": False, "base_values": [0.01], "verbose": False}]
        torch.save({"meta": meta, "state_dict": model.state_dict(), "message_hub": hub,
                    "optimizer": sgd.state_dict(), "param_schedulers": schedulers}, path)
    return path
