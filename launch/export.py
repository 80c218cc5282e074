#!/usr/bin/env python
"""Export a DeepLabV3 checkpoint (this project's or mmseg's) to a static-shape ONNX file.

    python launch/export.py --checkpoint work_dirs/demo/iter_1300.pt --crop 512x1024 --out model.onnx

BN folded, aux head dropped, input float32 [batch,3,H,W] normalised RGB, output logits
[batch,K,H,W]; default opset 13 (--opset 13..18). Then onnxruntime is compared with torch on
random inputs and, with --check-images, on real images. The work is in core/onnx_export.py.
"""
from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, _ROOT)

from launch.predict import pair  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from core.onnx_export import DEFAULT_OPSET, EXPORTER_OPSET
    p = argparse.ArgumentParser(prog="launch/export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="this project's iter_*.pt, or an mmseg 0.x/1.x DeepLabV3 .pth")
    p.add_argument("--crop", required=True, type=pair, metavar="HxW", help="the static input size, e.g. 512x1024")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--batch", type=int, default=1, help="static batch size of the graph")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, choices=range(13, EXPORTER_OPSET + 1),
                   metavar=f"13..{EXPORTER_OPSET}", help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--check-images", nargs="+", default=[], metavar="INPUT",
                   help="also compare onnxruntime with torch on these images (files, folders, globs), "
                        "resized to the crop")
    p.add_argument("--random-checks", type=int, default=2, help="random inputs compared (0: none)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the onnxruntime comparison")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from core.blocks import fuse_for_inference
    from core.engine import MEAN_RGB, STD_RGB
    from core.mmseg_io import CheckpointError, build_from_checkpoint, read_checkpoint
    from core.onnx_export import compare_with_onnxruntime, export_metadata, export_onnx, op_counts

    if args.crop is None:
        print("export: error: --crop needs a size HxW", file=sys.stderr)
        return 2
    try:
        ckpt = read_checkpoint(args.checkpoint)
        model = fuse_for_inference(build_from_checkpoint(ckpt, aux_head=False))
        print(f"{args.checkpoint}: {ckpt.describe()}", flush=True)
        meta = export_metadata(MEAN_RGB, STD_RGB, ckpt.class_names(), ckpt.colours(), args.crop)
        proto = export_onnx(model, args.out, args.crop, batch=args.batch, opset=args.opset, metadata=meta)
    except (CheckpointError, ValueError, ImportError, RuntimeError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    h, w = args.crop
    k = ckpt.settings["num_classes"]
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB): opset {args.opset} (ai.onnx), "
          f"input float32 [{args.batch},3,{h},{w}] -> logits float32 [{args.batch},{k},{h},{w}], "
          f"BN folded, no aux head", flush=True)
    print("ops: " + ", ".join(f"{k} x{v}" for k, v in op_counts(proto).items()), flush=True)
    if not args.verify:
        return 0
    checks = []
    if args.random_checks > 0:
        g = torch.Generator().manual_seed(0)
        checks.append(("random", torch.randn(args.random_checks, 3, h, w, generator=g)))
    if args.check_images:
        checks.append(("images", _images_as_input(args.check_images, (h, w))))
    try:
        for name, inputs in checks:
            stats = compare_with_onnxruntime(model, args.out, inputs)
            print(f"onnxruntime vs torch on {inputs.shape[0]} {name} inputs: max |logit diff| "
                  f"{stats['max_abs_diff']:.3g}, argmax agreement {100 * stats['argmax_agreement']:.3f}% "
                  f"of {stats['pixels']} pixels", flush=True)
    except ImportError as exc:
        print(f"export: not verified: {exc}", file=sys.stderr)
    return 0


def _images_as_input(specs, crop):
    """Real images, resized to the crop (cv2 bilinear semantics) and normalised as in training."""
    import numpy as np
    import torch
    from core.engine import to_model_input
    from core.inference import collect_inputs
    from data_loader.decode import read_image_bgr
    from kernels import ops
    h, w = crop
    batch = []
    for path, _ in collect_inputs(specs):
        bgr = np.ascontiguousarray(read_image_bgr(path))
        batch.append(ops.resize_crop(bgr, (h, w), (0, 0, h, w), interp="bilinear"))
    return to_model_input(torch.from_numpy(np.stack(batch)), torch.device("cpu"), channels_last=False).contiguous()


if __name__ == "__main__":
    sys.exit(main())
