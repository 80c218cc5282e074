"""Inference speed at batch 1: BN folded and the training-side optimisations, against eager fp32.

    python bench/infer.py                                  # R50-D8, 1x3x512x1024, 5 timed forwards
    python bench/infer.py --backbone r18 --base-channels 16 --crop 256x512 --steps 10   # quick
    python bench/infer.py --checkpoint work_dirs/demo/iter_1300.pt   # agreement on your own model

Each variant runs in a fresh process: the model (launch/assembly.build_model from the flags,
random weights: speed does not depend on them) in eval mode, aux head dropped, under
torch.no_grad, timed over --steps forwards of one --crop image after --warmup (median).
Variants: the eager fp32 NCHW model with unfused BN and whole dilated convolutions (baseline);
BN folded into the convs (eagerly, the folded convs' ReLU and residual add run as oneDNN post-ops,
core/fused_conv.py); + channels_last; + padding-aware atrous convolutions; + torch.compile;
fp32-best: folded + channels_last + atrous + Winograd F(4x4, 3x3) for the 3x3 convs of dilation
<= 4 (core/winograd.py; launch/predict.py's fp32 default; eager, see there why not compiled);
bf16 (weights cast, as O3) where the CPU has bf16 kernels; bf16+compile: bf16 + folded +
channels_last + atrous, compiled with freezing; best: bf16 + folded + channels_last + atrous +
Winograd F(2x2, 3x3) in bf16 where it pays (core/winograd_bf16.py; launch/predict.py's bf16
default), eager.

Argmax agreement: the same variants of a model trained on the synthetic set (a random model's
logits are near ties, so agreement on it would mean nothing): --checkpoint, or else the demo
model trained here for --train-iters iterations (launch/run.py), predicts the synthetic val
images, and each variant's trainId maps are compared with the baseline's pixel by pixel.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, finish, machine_line, markdown, measure_peaks, peak_rss_mib, run_child  # noqa: E402

from core.config import _f, parse_config  # noqa: E402
from launch.dist import cpu_threads  # noqa: E402

BASE_DEFAULTS = ["--preset", "cityscapes", "--backbone", "r50", "--crop", "512x1024", "--workers", "1"]
VARIANTS = {  # name: (fold BN, channels_last, atrous, winograd, compile, bf16)
    "baseline": (False, False, False, False, False, False),
    "folded": (True, False, False, False, False, False),
    "folded+channels_last": (True, True, False, False, False, False),
    "folded+cl+atrous": (True, True, True, False, False, False),
    "folded+cl+atrous+compile": (True, True, True, False, True, False),
    # launch/predict.py's fp32 default; not compiled (core/winograd.py: a compiled model keeps the direct conv)
    "fp32-best": (True, True, True, True, False, False),
    "bf16": (True, True, False, False, False, True),
    "bf16+compile": (True, True, True, False, True, True),
    # launch/predict.py's bf16 default; eager (a compiled model keeps the direct conv)
    "best": (True, True, True, True, False, True),
}


@dataclass
class InferOptions:
    steps: int = _f(5, "timed forwards per variant (median)")
    warmup: int = _f(2, "untimed forwards first (a compiled variant compiles here)")
    only: str = _f("", f"run only this variant ({', '.join(VARIANTS)})")
    train_iters: int = _f(300, "iterations of the demo model trained for the agreement check (no --checkpoint)")
    agreement_images: int = _f(10, "synthetic val images the agreement is measured on")
    json: str = _f("", "also write the results to this JSON file")
    child: str = _f("", "internal: run one variant in this process")
    agree_out: str = _f("", "internal: where the child writes its trainId maps")


def prepare(model, name: str):
    """The variant's inference model (in place): fold, memory format, atrous, bf16, compile."""
    import torch

    from core.atrous import revert_atrous
    from core.inference import convert_for_inference
    from core.winograd import revert_winograd
    fold, cl, atrous, winograd, compile_, bf16 = VARIANTS[name]
    model.auxiliary_head = None
    # the trainer's build_model converts for training; every variant starts from plain convs
    # (folding rebuilds convs: the padding-aware and Winograd ones are made afterwards)
    revert_atrous(model), revert_winograd(model)
    model.eval()
    convert_for_inference(model, fold, winograd, atrous)
    model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    if bf16:
        model.to(torch.bfloat16)
    if not compile_:
        return model
    import torch._inductor.config as inductor_config
    # Inference only: freezing folds the weights into the graph as constants, so inductor can use
    # oneDNN's prepacked weight layouts (4.42 s against 4.67 s per R50-D8 image here, fp32).
    inductor_config.freezing = True
    return torch.compile(model, dynamic=False)


def run_variant(argv, name: str) -> dict:
    import numpy as np
    import torch

    from core.engine import to_model_input, whole_inference
    from core.mmseg_io import read_checkpoint
    from launch.assembly import build_model, set_up_process
    cfg, opts = parse_config(argv, extra=InferOptions, prog="bench/infer.py")
    env, device = set_up_process(cfg)
    _, cl, _, _, _, bf16 = VARIANTS[name]
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = prepare(build_model(cfg), name)
    x = torch.randn(1, 3, *cfg.crop).to(dtype=dtype, memory_format=torch.channels_last if cl else torch.contiguous_format)
    times = []
    with torch.no_grad():
        for i in range(opts.warmup + opts.steps):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    result = {"variant": name, "median_s": statistics.median(times[opts.warmup:]), "times_s": times[opts.warmup:],
              "peak_rss_mib": peak_rss_mib(), "dtype": str(dtype).replace("torch.", ""),
              "threads": torch.get_num_threads()}
    if opts.agree_out:  # the trained model, the same variant, on real (synthetic) images
        ckpt = read_checkpoint(cfg.checkpoint)
        trained_cfg = replace(cfg, **{k: v for k, v in ckpt.settings.items()}, pretrained=None, load_from=None)
        trained = build_model(trained_cfg)
        trained.auxiliary_head = None
        trained.load_state_dict({k: v for k, v in ckpt.state_dict.items() if not k.startswith("auxiliary_head.")})
        trained = prepare(trained, name)
        from data_loader.cityscapes import CityscapesIndex
        from data_loader.decode import read_image_rgb
        from data_loader.synthetic import default_dataset
        maps = []
        with torch.no_grad():
            for image_path, _ in CityscapesIndex(default_dataset(), "val").samples[:opts.agreement_images]:
                bgr = torch.from_numpy(np.ascontiguousarray(read_image_rgb(image_path)[:, :, ::-1]))[None]
                xi = to_model_input(bgr, device.torch_device, dtype, cl)
                maps.append(whole_inference(trained, xi, tuple(bgr.shape[1:3])).argmax(1)[0].to(torch.uint8).numpy())
        np.save(opts.agree_out, np.stack(maps))
    return result


def main(argv=None) -> int:
    argv = BASE_DEFAULTS + list(sys.argv[1:] if argv is None else argv)
    cfg, opts = parse_config(argv, extra=InferOptions, prog="bench/infer.py")
    if opts.child:
        import json
        child_argv = argv[:argv.index("--child")] if "--child" in argv else argv
        print(json.dumps(run_variant(child_argv + (["--agree-out", opts.agree_out] if opts.agree_out else []),
                                     opts.child)))
        return 0
    import numpy as np

    from core.cpu import bf16_here
    bf16_ok, why = bf16_here()
    print(f"machine: {machine_line()}")
    print(f"case: {'bf16 kernels present' if bf16_ok else 'no bf16 kernels (' + why + '): bf16 variants left out'}")
    names = [opts.only] if opts.only else [n for n, v in VARIANTS.items() if bf16_ok or not v[5]]
    threads = cpu_threads(cfg.threads, 1)
    peaks = measure_peaks(["float32"] + (["bfloat16"] if bf16_ok else []), threads)
    tmp = tempfile.mkdtemp(prefix="bench-infer-")
    checkpoint = cfg.checkpoint
    if checkpoint is None:  # a trained model for the agreement check: the demo, briefly
        work = os.path.join(tmp, "demo")
        print(f"training the demo model for {opts.train_iters} iterations for the agreement check ...", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "launch", "run.py"), "--iters", str(opts.train_iters),
                        "--eval-interval", "0", "--no-evaluate", "--work-dir", work, "--no-tensorboard",
                        "--ckpt-interval", str(opts.train_iters)], check=True, capture_output=True, cwd=ROOT)
        checkpoint = os.path.join(work, f"iter_{opts.train_iters}.pt")
    rows, maps = [], {}
    for name in names:
        out = os.path.join(tmp, f"{name}.npy")
        r = run_child(__file__, argv + ["--checkpoint", checkpoint, "--agree-out", out], name)
        if "error" not in r:
            maps[name] = np.load(out)
            r["images_per_s"], r["ms"] = 1.0 / r["median_s"], 1000.0 * r["median_s"]
        rows.append(r)
        print(f"{name}: " + (r["error"] if "error" in r else f"{r['median_s'] * 1000:.0f} ms per image"), flush=True)
    ok = [r for r in rows if "error" not in r]
    base = next((r for r in ok if r["variant"] == "baseline"), None)
    for r in ok:
        if base is not None:
            r["speedup"] = base["median_s"] / r["median_s"]
            r["agreement"] = float((maps[r["variant"]] == maps["baseline"]).mean())
    print(f"\n{cfg.backbone.upper()}-D{cfg.output_stride} (base {cfg.base_channels}) inference, batch 1, "
          f"{cfg.crop[0]}x{cfg.crop[1]}, {threads} threads; agreement on "
          f"{opts.agreement_images} synthetic val images with {checkpoint}")
    print(markdown(ok, [("variant", "variant", ""), ("ms/image", "ms", "{:.0f}"),
                        ("images/s", "images_per_s", "{:.2f}"), ("vs baseline", "speedup", "{:.2f}x"),
                        ("dtype", "dtype", ""), ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
                        ("argmax agreement", "agreement", "{:.4%}")]))
    return finish(rows, opts.json, peaks)


if __name__ == "__main__":
    sys.exit(main())
