"""The dimensions launch/tune.py sweeps: how a --try-<name> value becomes TrainConfig overrides,
the defaults derived from this machine and the base configuration, and what a resolved config's
setting is in each dimension (two configs with the same settings are one trial)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from core.config import TrainConfig
from core.cpu import bf16_here
from launch.dist import cpu_threads

ORDER = ("procs-threads", "batch-size", "precision", "channels-last", "norm", "compile", "workers", "prefetch",
         "pack")


@dataclass(frozen=True)
class Dim:
    name: str                             # --try-<name>, and its name in --sweep
    fields: Tuple[str, ...]               # the TrainConfig fields it sets
    parse: Callable[[str, str], Dict]     # (value text, flag) -> overrides


def _int(text: str, flag: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not an integer") from None
    if value < low:
        raise ValueError(f"{flag}: {value} must be >= {low}")
    return value


def _on_off(text: str, flag: str) -> bool:
    table = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
    if text.lower() not in table:
        raise ValueError(f"{flag}: {text!r} is not on or off")
    return table[text.lower()]


def _procs_threads(text: str, flag: str) -> Dict:
    m = re.fullmatch(r"(\d+)x(\d+)", text.lower())
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"{flag}: {text!r} is not RANKSxTHREADS, e.g. 2x1 (threads 0: cores / ranks)")
    return {"nproc": int(m.group(1)), "threads": int(m.group(2))}


_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def _precision(text: str, flag: str) -> Dict:
    m = re.fullmatch(r"(O[0-3])(?:-(bf16|fp16))?", text)
    if not m:
        raise ValueError(f"{flag}: {text!r} is not an opt level O0..O3, optionally with -bf16 or -fp16")
    if m.group(1) == "O0":
        return {"opt_level": "O0"}
    return {"opt_level": m.group(1), "amp_dtype": _DTYPES.get(m.group(2), "auto")}


def _norm(text: str, flag: str) -> Dict:
    from core.norm import NORMS
    if text not in NORMS:
        raise ValueError(f"{flag}: {text!r} is not one of {', '.join(NORMS)}")
    return {"norm": text}


def _pack(text: str, flag: str) -> Dict:
    if text not in ("png", "pack"):
        raise ValueError(f"{flag}: {text!r} is not png or pack")
    return {"pack": text}  # "pack" becomes a path in Tuner.dimensions


DIMS = {d.name: d for d in [
    Dim("procs-threads", ("nproc", "threads"), _procs_threads),
    Dim("batch-size", ("batch_size",), lambda t, f: {"batch_size": _int(t, f, 1)}),
    Dim("precision", ("opt_level", "amp_dtype", "allow_slow_precision"), _precision),
    Dim("channels-last", ("channels_last",), lambda t, f: {"channels_last": _on_off(t, f)}),
    Dim("norm", ("norm",), _norm),
    Dim("compile", ("compile",), lambda t, f: {"compile": _on_off(t, f)}),
    Dim("workers", ("workers",), lambda t, f: {"workers": _int(t, f, 0)}),
    Dim("prefetch", ("prefetch",), lambda t, f: {"prefetch": _int(t, f, 1)}),
    Dim("pack", ("pack",), _pack),
]}


def per_rank_batch(cfg: TrainConfig) -> Optional[int]:
    if cfg.batch_size:
        return cfg.batch_size
    return cfg.global_batch // cfg.nproc if cfg.global_batch % cfg.nproc == 0 else None


def device_type(cfg: TrainConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def settings(cfg: TrainConfig, dev: str) -> Dict[str, str]:
    """The value of every dimension in a resolved config, as its table label: two configs with
    the same settings are the same trial (e.g. threads 0 and the explicit core split)."""
    level = cfg.opt_level
    if level != "O0":
        dtype = cfg.amp_dtype if cfg.amp_dtype != "auto" else ("bfloat16" if dev == "cpu" else "float16")
        level += "-" + {v: k for k, v in _DTYPES.items()}[dtype]
    batch = per_rank_batch(cfg)
    return {
        "procs-threads": f"{cfg.nproc}x{cpu_threads(cfg.threads, cfg.nproc)}",
        "batch-size": f"bs{batch}" if batch else f"bs{cfg.global_batch}/{cfg.nproc}",
        "precision": level,
        "channels-last": "NHWC" if cfg.channels_last else "NCHW",
        "norm": f"norm {getattr(cfg, 'norm', 'bn')}",
        "compile": "compiled" if getattr(cfg, "compile", False) else "eager",
        "workers": f"w{cfg.workers}",
        "prefetch": f"pf{cfg.prefetch}",
        "pack": "pack" if cfg.pack else "png",
    }


def numerics_changes(cfg: TrainConfig, base: TrainConfig, dev: str) -> List[str]:
    """What makes this trial train differently from the base (not only faster or slower)."""
    now, was = settings(cfg, dev), settings(base, dev)
    notes = [now[d] for d in ("precision", "norm") if now[d] != was[d]]
    b, b0 = per_rank_batch(cfg), per_rank_batch(base)
    if b and b0 and b * cfg.nproc != b0 * base.nproc:
        notes.append(f"global batch {b * cfg.nproc} (base {b0 * base.nproc})")
    if b and b0 and b != b0 and not cfg.sync_bn:
        notes.append(f"BN statistics over {b} image{'s' if b > 1 else ''} (base {b0})")
    return notes


def default_values(name: str, base: TrainConfig, dev: str, cores: int) -> Tuple[Optional[List[Dict]], str]:
    """(values, note) of a dimension the user gave no --try-<name> for; values None = computed
    from the incumbent when the dimension's turn comes (the batch: the current one and twice it)."""
    if name == "procs-threads":
        if dev != "cpu":
            return [], "procs-threads: one rank per accelerator; give --try-procs-threads to sweep it"
        return [{"nproc": p, "threads": cores // p} for p in (1, 2, 4, 8) if p <= cores and cores % p == 0], ""
    if name == "batch-size":
        return None, ""
    if name == "precision":
        if dev == "cpu":
            ok, why = bf16_here()
            if not ok:
                return [{"opt_level": "O0"}], f"precision: bf16 opt levels left out: {why}"
            low = ["bfloat16"]
        else:
            import torch
            low = ["float16"] + (["bfloat16"] if dev == "cuda" and torch.cuda.is_bf16_supported() else [])
        # O3 (BatchNorm in low precision too, no master weights) is apex's "speed of light", not a
        # training setting: only when asked for.
        return [{"opt_level": "O0"}] + [{"opt_level": lv, "amp_dtype": d} for d in low for lv in ("O1", "O2")], ""
    if name in ("channels-last", "compile"):
        field = DIMS[name].fields[0]
        return [{field: getattr(base, field)}, {field: not getattr(base, field)}], ""
    if name == "norm":
        from core.norm import NORMS
        return [{"norm": n} for n in sorted(NORMS, key=lambda n: n != base.norm)], ""
    if name == "workers":
        return [{"workers": w} for w in sorted({base.workers} | {w for w in (0, 1, 2, 4) if w <= cores})], ""
    if name == "prefetch":
        return [{"prefetch": base.prefetch}, {"prefetch": 2 * base.prefetch}], ""
    if name == "pack":
        if base.data is not None and base.pack is None:
            return [], "pack: not swept with --data (the pack holds the decoded dataset); ask with --try-pack png,pack"
        return [{"pack": "pack"}, {"pack": "png"}] if base.pack else [{"pack": "png"}, {"pack": "pack"}], ""
    raise KeyError(name)
