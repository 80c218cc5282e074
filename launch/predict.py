#!/usr/bin/env python
"""Segment image files with a trained (or mmseg model-zoo) DeepLabV3 checkpoint.

    python launch/predict.py --checkpoint work_dirs/demo/iter_1300.pt IMAGES... --out DIR [--show]

INPUT: image files, folders (searched recursively) or globs. Writes per image
DIR/trainIds/<name>.png, DIR/labelIds/<name>.png (Cityscapes submission format),
DIR/overlay/<name>.png and, with --show, DIR/show/<name>.png. The work is in core/inference.py.
"""
from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, _ROOT)


def pair(text: str):
    """'512x1024' -> (512, 1024); 'none' -> None; 'auto' stays 'auto'."""
    if text.strip().lower() in ("none", "auto"):
        return None if text.strip().lower() == "none" else "auto"
    parts = text.lower().replace(",", "x").split("x")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers written AxB (or 'none'), got {text!r}") from None
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/predict.py", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("--checkpoint", required=True, help="this project's iter_*.pt, or an mmseg 0.x/1.x DeepLabV3 .pth")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mode", choices=["whole", "slide"], default=None,
                   help="whole image or fixed tiles (default: what the checkpoint was evaluated with, else whole)")
    p.add_argument("--scale", type=pair, default="auto", metavar="WxH|none|auto",
                   help="resize images keep-ratio to fit WxH as the evaluation does; 'none' keeps their size "
                        "(default: the checkpoint's evaluation scale; 2048x1024 for mmseg files)")
    p.add_argument("--tile", type=pair, default=None, metavar="HxW", help="slide tile (default: the training crop)")
    p.add_argument("--stride", type=pair, default=None, metavar="HxW", help="slide stride (default: 2/3 of the tile)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (images of one size are batched)")
    p.add_argument("--opt-level", choices=["O0", "O1", "O2", "O3"], default="O0",
                   help="O0 fp32, O1 autocast, O2/O3 low-precision weights (core/amp.py)")
    p.add_argument("--amp-dtype", choices=["auto", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "npu"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--show", action="store_true", help="also write image | colour mask | overlay side by side")
    p.add_argument("--opacity", type=float, default=0.5, help="weight of the palette in the overlay")
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep BatchNorm layers (default: folded)")
    p.add_argument("--no-winograd", dest="winograd", action="store_false",
                   help="direct 3x3 convolutions (default on the CPU: Winograd F(4x4,3x3) in fp32, F(2x2,3x3) in "
                        "bf16 where the CPU has bf16 kernels; core/winograd.py, core/winograd_bf16.py)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from core.inference import (PredictionWriter, ProgressMeter, Segmenter, collect_inputs, inference_defaults,
                                predict_files)
    from core.mmseg_io import CheckpointError, read_checkpoint

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        items = collect_inputs(args.inputs)
        ckpt = read_checkpoint(args.checkpoint)
        defaults = inference_defaults(ckpt)
        mode = args.mode or defaults["mode"]
        scale = defaults["scale"] if args.scale == "auto" else args.scale
        tile = args.tile or defaults["tile"]
        segmenter = Segmenter(ckpt, device=args.device, opt_level=args.opt_level, amp_dtype=args.amp_dtype,
                              mode=mode, scale=scale, tile=tile, stride=args.stride or defaults["stride"],
                              fuse=args.fuse, winograd=args.winograd)
        writer = PredictionWriter(args.out, ckpt.colours(), ckpt.settings["num_classes"], show=args.show,
                                  opacity=args.opacity)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as exc:  # RuntimeError: device
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint}: {ckpt.describe()}", flush=True)
    for note in ckpt.notes:
        print(f"  note: {note}", flush=True)
    where = "whole image"
    if mode == "slide":
        where = f"tiles {tile[0]}x{tile[1]}, stride {segmenter.stride[0]}x{segmenter.stride[1]}"
    size = "kept" if scale is None else f"{scale[0]}x{scale[1]} (WxH, keep ratio)"
    print(f"{len(items)} images, {where}, scale {size}, batch {args.batch_size}, {args.opt_level}, "
          f"BN {'folded' if args.fuse else 'kept'}, {segmenter.winograd_convs} Winograd convs, "
          f"{segmenter.device.torch_device}, {torch.get_num_threads()} threads "
          f"-> {args.out}/{{{','.join(writer.kinds())}}}", flush=True)
    summary = predict_files(segmenter, items, writer, args.batch_size, ProgressMeter(len(items)))
    print(f"wrote {summary['images']} images in {summary['seconds']:.1f} s ({summary['images_per_s']:.2f} img/s) "
          f"to {args.out}", flush=True)
    if summary["errors"]:
        print(f"predict: {len(summary['errors'])} of {len(items)} images could not be read:", file=sys.stderr)
        for line in summary["errors"]:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
