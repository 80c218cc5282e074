"""TrainConfig: the one typed configuration of launch/run.py, filled by argparse (+ optional YAML).

Precedence, lowest first: the dataclass defaults (the full Cityscapes recipe of mmseg's
deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024), then the preset (`demo` shrinks everything so
`python launch/run.py` finishes in minutes on a CPU), then `--config file.yaml`, then the flags
given on the command line. The preset defaults to `demo` when no `--data` is given and to
`cityscapes` otherwise. Unknown keys, in YAML or on the command line, are errors.

Every field is a flag: `work_dir` is `--work-dir`, booleans also have a `--no-` form.
Pairs are written `AxB` (crop `512x1024` is HxW; scale `2048x1024` is WxH like mmseg).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml


def _f(default, help: str, choices: Optional[Sequence] = None, pair: Optional[type] = None):
    """A dataclass field with its argparse help (and choices / pair element type) attached."""
    meta = {"help": help, "choices": choices, "pair": pair}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # what to run
    preset: str = _f("auto", "demo: small model on the embedded synthetic set; cityscapes: the full "
                     "recipe; auto: demo without --data, cityscapes with it", ["auto", "demo", "cityscapes"])
    config: Optional[str] = _f(None, "YAML file whose keys (field names) fill the defaults")
    data: Optional[str] = _f(None, "dataset root in Cityscapes layout (default: the embedded synthetic set)")
    pack: Optional[str] = _f(None, "read train and val from a pre-decoded pack (python -m data_loader.pack ROOT "
                             "writes ROOT/pack) instead of decoding PNGs; a stale or corrupt pack is an error")
    work_dir: Optional[str] = _f(None, "output directory (default: work_dirs/<preset and model>)")
    device: str = _f("auto", "auto = cuda if available, else cpu", ["auto", "cpu", "cuda", "npu"])
    eval_only: bool = _f(False, "only evaluate --checkpoint (or the newest one in --work-dir)")
    checkpoint: Optional[str] = _f(None, "checkpoint to evaluate with --eval-only")
    # model
    backbone: str = _f("r50", "ResNet depth with mmseg's V1c deep stem; -v1b: the 7x7 stem (torchvision layout)",
                       ["r18", "r34", "r50", "r101", "r18-v1b", "r34-v1b", "r50-v1b", "r101-v1b"])
    output_stride: int = _f(8, "backbone output stride", [8, 16])
    num_classes: int = _f(19, "number of classes (19 for Cityscapes)")
    base_channels: int = _f(64, "width of the first ResNet stage (64 = the paper; smaller = tiny test models)")
    pretrained: Optional[str] = _f(None, "local ImageNet backbone checkpoint (mmcv or torchvision layout)")
    load_from: Optional[str] = _f(None, "whole-model checkpoint to start training from (mmseg's load_from): ours or "
                                  "an mmseg 0.x/1.x DeepLabV3 .pth; weights only, optimizer and schedule start fresh")
    sync_bn: bool = _f(False, "synchronise BatchNorm statistics across ranks (SyncBatchNorm)")
    norm: str = _f("bn", "BatchNorm flavour (core/norm.py): bn = mmseg's BN + ReLU; inplace-abn = BN + leaky "
                   "ReLU(0.01) keeping only outputs (less activation memory, a different network); "
                   "inplace-abn-residual = also fuses the residual add (leaky after the add too)",
                   ["bn", "inplace-abn", "inplace-abn-residual"])
    channels_last: bool = _f(True, "run the model in channels_last memory format")
    atrous: bool = _f(True, "compute the dilated 3x3 convolutions without the multiply-adds that read only zero "
                      "padding (core/atrous.py), and the ASPP bottleneck without convolving the image-pool "
                      "branch's constant map (core.blocks.split_pool_conv): the same result up to float rounding; "
                      "each layer's algorithm is a fixed rule of its shapes, so a resumed run computes exactly as "
                      "the first")
    winograd: bool = _f(True, "run the 3x3 convolutions of 128+ channels and dilation <= 4 by Winograd F(4x4, 3x3) "
                        "(core/winograd.py) on the CPU in float32, forward and both gradients, where the map "
                        "makes it pay: the same result up to float rounding (a few times a direct conv's)")
    compile: bool = _f(False, "torch.compile the model (dynamic=False): every shape is static, so the train step "
                       "and the evaluation each compile once, at the first step / first evaluation")
    # data
    crop: Tuple[int, int] = _f((512, 1024), "training crop HxW", pair=int)
    scale: Tuple[int, int] = _f((2048, 1024), "training resize scale WxH (times a random ratio)", pair=int)
    ratio_range: Tuple[float, float] = _f((0.5, 2.0), "random resize ratio range AxB", pair=float)
    cat_max_ratio: float = _f(0.75, "max share of one class in a random crop (mmseg RandomCrop)")
    batch_size: int = _f(0, "images per process (0: global_batch / world size)")
    global_batch: int = _f(8, "images per iteration over all ranks, used when --batch-size is 0")
    workers: int = _f(4, "data loader worker processes per rank")
    prefetch: int = _f(2, "batches each loader worker prepares ahead (shared-memory slots: workers x prefetch + 1)")
    # optimisation (mmseg schedule_40k + SGD)
    iters: int = _f(40000, "training iterations")
    lr: float = _f(0.01, "base learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "SGD weight decay")
    poly_power: float = _f(0.9, "poly LR power")
    min_lr: float = _f(1e-4, "poly LR floor")
    aux_weight: float = _f(0.4, "weight of the auxiliary FCN head's loss")
    ignore_index: int = _f(255, "label value that carries no loss and no metric")
    loss_avg_non_ignore: bool = _f(False, "divide the CE sum by valid pixels (torch's mean) instead of all "
                                   "pixels (mmseg's default avg_non_ignore=False)")
    # mixed precision (core/amp.py)
    opt_level: str = _f("O0", "apex-style level: O0 fp32, O1 autocast, O2 low-precision model + fp32 "
                        "master weights (BN fp32), O3 pure low precision", ["O0", "O1", "O2", "O3"])
    amp_dtype: str = _f("auto", "low-precision dtype (auto: bfloat16 on cpu, float16 on cuda/npu)",
                        ["auto", "bfloat16", "float16"])
    memory_check: bool = _f(True, "refuse to start when the estimated memory of a training process exceeds what "
                            "the machine has available (CPU)")
    allow_slow_precision: bool = _f(False, "run a bf16/fp16 opt level on a CPU without kernels for that dtype "
                                    "(refused otherwise: 10-30x slower than fp32 there)")
    init_loss_scale: float = _f(65536.0, "initial dynamic loss scale (float16 only)")
    max_nonfinite: int = _f(20, "stop after this many consecutive steps with a non-finite loss/gradient")
    # distributed
    nproc: int = _f(1, "worker processes to start on this node")
    nnodes: int = _f(1, "number of nodes")
    node_rank: int = _f(0, "rank of this node")
    master_addr: str = _f("127.0.0.1", "address of the rank-0 node")
    master_port: int = _f(0, "rendezvous port (0: a free port on one node, 29500 across nodes)")
    dist_timeout: float = _f(600.0, "seconds a collective may wait before the job fails")
    kill_grace: float = _f(60.0, "seconds the launcher gives the ranks to finish their step and checkpoint after "
                           "SIGTERM (or after another rank failed) before SIGKILL")
    max_restarts: int = _f(0, "restarts of the whole job after a rank fails (torch's elastic agent); a restarted "
                           "job continues with --resume auto")
    min_nnodes: int = _f(0, "with --rdzv-backend c10d: the job may (re)start with this many nodes (0: --nnodes)")
    rdzv_backend: str = _f("c10d", "how the nodes find each other: c10d (a store on --master-addr:--master-port, "
                           "node ranks assigned at rendezvous) or static (--node-rank given on each node)",
                           ["c10d", "static"])
    rdzv_id: str = _f("deeplab", "rendezvous id: the same on every node of one job, different between jobs")
    threads: int = _f(0, "intra-op CPU threads per process (0: cores / processes on this node)")
    # evaluation
    evaluate: bool = _f(True, "evaluate every --eval-interval iterations and at the end (off: e.g. tuning runs)")
    eval_interval: int = _f(4000, "evaluate every N iterations (0: only at the end)")
    eval_mode: str = _f("whole", "whole image, or fixed tiles", ["whole", "slide"])
    eval_scale: Optional[Tuple[int, int]] = _f((2048, 1024), "resize val images to fit WxH (keep ratio)", pair=int)
    eval_tile: Optional[Tuple[int, int]] = _f(None, "slide tile HxW (default: crop)", pair=int)
    eval_stride: Optional[Tuple[int, int]] = _f(None, "slide stride HxW (default: 2/3 of the tile)", pair=int)
    eval_max_images: int = _f(0, "evaluate at most N images (0: all)")
    # checkpoints and logs
    checkpoints: bool = _f(True, "write checkpoints (off: e.g. tuning and benchmark runs)")
    ckpt_interval: int = _f(4000, "save a checkpoint every N iterations")
    keep_ckpts: int = _f(3, "keep the newest K checkpoints")
    resume: Optional[str] = _f(None, "'auto' (newest in --work-dir) or a checkpoint path")
    log_interval: int = _f(50, "log every N iterations")
    peak_tflops: float = _f(0.0, "peak TFLOP/s per process for MFU (0: measure with a matmul benchmark)")
    tensorboard: bool = _f(True, "write TensorBoard events when the tensorboard package is installed")
    seed: int = _f(0, "random seed (rank r uses seed + r)")
    cache_dir: Optional[str] = _f(None, "cache for the generated synthetic set and the measured peak FLOP/s "
                                  "(default: $DEEPLAB_CACHE, else $XDG_CACHE_HOME/deeplab-trainer, else "
                                  "~/.cache/deeplab-trainer)")
    measure_peak: bool = _f(False, "measure the peak FLOP/s behind MFU again now (replacing the cached value)")
    # data loader waits (data_loader/loader.py)
    loader_timeout: float = _f(120.0, "seconds a rank waits for a batch before the worker filling it is declared "
                               "stuck (the error shows its Python stack); keep it well below --dist-timeout")
    loader_start_timeout: float = _f(300.0, "the same for a loader's first batch, which includes starting its workers")


PRESETS: Dict[str, Dict[str, Any]] = {
    "cityscapes": {},
    # Sized for 2 CPU cores (1300 steps, ~3 minutes, mIoU ~47, see README.md): r18 at a quarter
    # width (base 16) with output stride 8 on 128x256 crops of the 512x256 synthetic images. The
    # small classes are what take steps: vegetation (1.2% of the pixels) is learned only after
    # ~700-1000 steps of batch 4 whatever the lr, and the narrow OS8 model makes a step cheap
    # (~135 ms vs ~345 ms at base 64 / OS16, which reached 38 and no vegetation in 300 steps).
    # person (0.4%) needs ~2000+ steps, pole, signs, lights and terrain far more.
    "demo": dict(backbone="r18", base_channels=16, output_stride=8, crop=(128, 256), scale=(512, 256),
                 global_batch=4, workers=1, iters=1300, eval_interval=325, ckpt_interval=650,
                 log_interval=50, eval_scale=None, lr=0.02),
}


def field_names() -> List[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def build_parser(extra: Optional[type] = None, prog: str = "launch/run.py",
                 description: str = "Train or evaluate DeepLabV3 (see README.md). Without --data: the demo preset."
                 ) -> argparse.ArgumentParser:
    """argparse mirror of TrainConfig, plus the fields of a tool's own options dataclass `extra`
    (declared with the same `_f`), so trace/tune/bench take the trainer's flags unchanged and add
    theirs. Flags not given are absent (SUPPRESS), so an explicit `--eval-scale none` is told
    apart from "not given"."""
    # allow_abbrev=False: `--iter 5` is an error, not a silent `--iters 5`
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False)
    group = parser.add_argument_group("training (TrainConfig)") if extra is not None else parser
    _add_fields(group, TrainConfig)
    if extra is not None:
        clash = set(field_names()) & {f.name for f in dataclasses.fields(extra)}
        if clash:
            raise ValueError(f"{extra.__name__} redefines TrainConfig fields {sorted(clash)}")
        _add_fields(parser.add_argument_group(f"{prog} options"), extra)
    return parser


def _add_fields(parser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        default_txt = f" (default: {_fmt(f.default)})" if f.default is not dataclasses.MISSING else ""
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                help=meta["help"] + default_txt)
            continue
        parser.add_argument(flag, dest=f.name, type=_converter(f), choices=meta.get("choices"),
                            help=meta["help"] + default_txt, metavar=_metavar(f))
    return parser


def parse_config(argv: Optional[Sequence[str]] = None, extra: Optional[type] = None, **parser_kwargs):
    """CLI (+ YAML) -> resolved TrainConfig; with `extra`, (TrainConfig, extra(...)) from the same
    command line. Errors name the flag or YAML key."""
    parser = build_parser(extra, **parser_kwargs)
    given = vars(parser.parse_args(argv))  # unknown flags exit with argparse's usage error
    tool = {}
    if extra is not None:
        tool = {f.name: given.pop(f.name) for f in dataclasses.fields(extra) if f.name in given}
    from_yaml = load_yaml(given["config"]) if "config" in given else {}
    cfg = resolve(given, from_yaml)
    return cfg if extra is None else (cfg, extra(**tool))


def resolve(cli: Dict[str, Any], from_yaml: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Apply preset < YAML < CLI on top of the dataclass defaults, then validate."""
    from_yaml = dict(from_yaml or {})
    check_keys(from_yaml, "YAML config")
    check_keys(cli, "command line")
    merged = {**from_yaml, **cli}
    preset = merged.get("preset", "auto")
    if preset == "auto":
        preset = "demo" if merged.get("data") is None else "cityscapes"
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of auto, {', '.join(PRESETS)}; got {preset!r}")
    values = {**PRESETS[preset], **merged, "preset": preset}
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    if cfg.work_dir is None:
        cfg.work_dir = default_work_dir(cfg)
    validate(cfg)
    return cfg


def default_work_dir(cfg: TrainConfig) -> str:
    if cfg.preset == "demo":
        return os.path.join("work_dirs", "demo")
    h, w = cfg.crop
    return os.path.join("work_dirs", f"deeplabv3_{cfg.backbone}-d{cfg.output_stride}_{h}x{w}_{cfg.iters}")


def check_keys(values: Dict[str, Any], where: str) -> None:
    names = field_names()
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(names)}")


def load_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no such file {path!r}")
    with open(path) as fh:
        data = yaml.safe_load(fh)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of TrainConfig fields, got {type(data).__name__}")
    data.pop("config", None)  # a saved config.yaml names the file it came from; not a recursive include
    check_keys(data, f"YAML config {path}")
    return data


def validate(cfg: TrainConfig) -> None:
    positive = ["iters", "num_classes", "base_channels", "nproc", "nnodes", "log_interval",
                "ckpt_interval", "keep_ckpts", "max_nonfinite", "global_batch", "prefetch"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ["loader_timeout", "loader_start_timeout"]:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(cfg, name)}")
    for name in ["batch_size", "workers", "eval_interval", "threads", "eval_max_images", "peak_tflops",
                 "max_restarts", "min_nnodes", "kill_grace"]:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.node_rank < cfg.nnodes:
        raise ValueError(f"--node-rank must be in [0, --nnodes={cfg.nnodes}), got {cfg.node_rank}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise ValueError(f"need 0 <= --min-lr <= --lr and --lr > 0; got lr={cfg.lr}, min_lr={cfg.min_lr}")
    if cfg.eval_only and cfg.resume:
        raise ValueError("--eval-only evaluates --checkpoint; --resume is for training")
    if cfg.eval_only and cfg.load_from:
        raise ValueError("--eval-only evaluates --checkpoint; --load-from is for training")
    if cfg.min_nnodes > cfg.nnodes:
        raise ValueError(f"--min-nnodes {cfg.min_nnodes} exceeds --nnodes {cfg.nnodes}")
    if cfg.ratio_range[0] <= 0 or cfg.ratio_range[0] > cfg.ratio_range[1]:
        raise ValueError(f"--ratio-range must be 0 < A <= B, got {cfg.ratio_range}")
    for name in ["crop", "scale", "eval_scale", "eval_tile", "eval_stride"]:
        value = getattr(cfg, name)
        if value is not None and min(value) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be two sizes >= 1 (AxB), got {_fmt(value)}")
    for name in ["dist_timeout", "init_loss_scale"]:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")


def to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """Plain dict (tuples -> lists) for YAML and for checkpoints loaded with weights_only=True."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_yaml(cfg: TrainConfig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(to_yaml(cfg))


def from_dict(values: Dict[str, Any]) -> TrainConfig:
    """Inverse of to_dict (e.g. the config stored in a checkpoint)."""
    check_keys(values, "stored config")
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


# ---- parsing helpers -------------------------------------------------------------------------

def _field(name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}[name]


def _coerce(name: str, value: Any) -> Any:
    """YAML / stored values to the field's type, with an error naming the key. As strict as the
    command line: `iters: true` is not 1, `crop: [64.7, 128]` is not 64, `iters: null` is not a
    default."""
    f = _field(name)
    pair = f.metadata.get("pair")
    if value is None:
        if f.default is None or str(f.type).startswith("Optional"):
            return None
        raise ValueError(f"config key {name!r}: null is not allowed (expected {_expected(f)})")
    try:
        if pair is not None:
            if isinstance(value, str):
                return _parse_pair(value, pair)
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"expected {_expected(f)}")
            return (_scalar(value[0], pair), _scalar(value[1], pair))
        if f.type in ("bool", bool):
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        typ = {"int": int, "float": float, "str": str, "Optional[str]": str}.get(str(f.type))
        value = _scalar(value, typ) if typ is not None else value
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config key {name!r}: cannot use {value!r} ({exc})") from None
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"config key {name!r}: {value!r} is not one of {list(choices)}")
    return value


def _scalar(value: Any, typ: type) -> Any:
    """One YAML scalar as `typ`, refusing what the command line would refuse."""
    if isinstance(value, bool) or isinstance(value, (list, tuple, dict)):
        raise ValueError(f"expected {'an integer' if typ is int else 'a number' if typ is float else 'a string'}")
    if typ is str:
        return str(value)
    if typ is int and isinstance(value, float) and not value.is_integer():
        raise ValueError("expected an integer")
    if typ is int and isinstance(value, str):
        return int(value.strip())  # "64" as the command line takes it; "64.7" raises
    return typ(value)


def _expected(f: dataclasses.Field) -> str:
    pair = f.metadata.get("pair")
    if pair is not None:
        kind = "integers" if pair is int else "numbers"
        return f"two {kind}, as [A, B] or 'AxB'" + (" or null" if f.default is None else "")
    return {"int": "an integer", "float": "a number", "bool": "true or false"}.get(str(f.type), "a string")


def _parse_pair(text: str, typ: type) -> Optional[Tuple[Any, Any]]:
    if text.strip().lower() == "none":  # e.g. --eval-scale none: keep the original size
        return None
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2:
        raise ValueError(f"expected two numbers written AxB, got {text!r}")
    return typ(parts[0]), typ(parts[1])


def _converter(f: dataclasses.Field):
    pair = f.metadata.get("pair")
    if pair is not None:
        def parse(text: str):
            try:
                return _parse_pair(text, pair)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return parse
    return {"int": int, "float": float}.get(str(f.type), str)


def _metavar(f: dataclasses.Field) -> Optional[str]:
    if f.metadata.get("pair") is not None:
        return "AxB"
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)
