#!/usr/bin/env python
"""Throughput tuning from real training runs: which settings make launch/run.py fastest here.

    python launch/tune.py --budget-min 10                 # the demo model, as `python launch/run.py` trains it
    python launch/tune.py --backbone r50 --base-channels 64 --crop 256x512 --global-batch 2 \\
        --warmup 1 --steps 3 --sweep procs-threads,precision,channels-last
    python launch/tune.py --data /data/cityscapes --nproc 8 --try-pack png,pack --grid

Every launch/run.py flag sets the base configuration (without --data: the demo preset). Each trial
is a real `launch/run.py` subprocess with the base flags, the trial's overrides and `--iters
WARMUP+STEPS --no-evaluate --no-checkpoints --log-interval 1`; its log.jsonl after the warmup gives
the median step time, the data-wait share, images/s (global) and memory. Trials run one at a time
(they would compete for the cores). A trial that fails (out of memory, a setting run.py rejects,
a timeout) is reported with its reason and the sweep goes on.

The search is greedy by default: one dimension at a time, the others at the best so far, in the
--sweep order. The default order puts first what changes the cost of every op and decides what
the later dimensions see: processes x threads (how the cores are split), the per-process batch
(work per op call), the opt level (the largest factor where the CPU has bf16 kernels), then
channels_last (its gain depends on the dtype: oneDNN's bf16 kernels prefer NHWC), the norm and
torch.compile (whose cold compile makes its trials the slowest: under a budget it comes after the
cheap ones). The data side comes last: whether loader workers, prefetch depth or the pack matter
depends on the step time the compute settled on, and on a CPU a worker takes a core from compute.
--grid runs the full product instead. Opt level, norm and batch change what training computes, not
only its speed: the table says so, and their loss curves need checking before adopting them.

Writes to --out: tune.md (the ranked table), tune.json, tune.png and best.yaml, the best trial's
tuned fields, for `python launch/run.py --config OUT/best.yaml` (+ the same base flags).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from core.config import TrainConfig, _f, build_parser, field_names, parse_config  # noqa: E402
from core.cpu import low_precision_here  # noqa: E402
from launch import tune_trial as trial_io  # noqa: E402
from launch.dist import cpu_threads  # noqa: E402
from launch.tune_space import (DIMS, ORDER, Dim, default_values, device_type,  # noqa: E402
                               numerics_changes, per_rank_batch, settings)

PROG = "launch/tune.py"


@dataclass
class TuneOptions:
    out: str = _f("work/tune", "folder for tune.md, tune.json, tune.png, best.yaml and each trial's work dir trial_<n>")
    warmup: int = _f(3, "iterations per trial before measuring (first steps build caches, kernels, compiled graphs)")
    steps: int = _f(10, "measured iterations per trial (medians over these)")
    budget_min: float = _f(0.0, "wall-time budget in minutes: no trial starts that would likely end past it (0: none)")
    trial_timeout: float = _f(0.0, "seconds before a trial's processes are stopped (0: 5x the median successful "
                              "trial, at least 300 s; 1800 s until one succeeded); after the base trial, never "
                              "past the budget")
    grid: bool = _f(False, "run every combination of the swept values instead of the greedy search")
    sweep: str = _f(",".join(ORDER), "dimensions to tune, comma-separated, in the order of the greedy search")
    # One --try-<dimension> per dimension, named after the trainer flag it varies; None: a default
    # derived from this machine and the base (see launch/tune_space.py).
    try_procs_threads: Optional[str] = _f(None, "ranks x threads per rank, e.g. 1x2,2x1; None: the cores split "
                                          "over 1, 2, 4, 8 ranks (CPU only)")
    try_batch_size: Optional[str] = _f(None, "images per process, e.g. 2,4; None: the current one and twice it")
    try_precision: Optional[str] = _f(None, "opt levels, optionally with a dtype: O0,O1-bf16,O2-fp16; None: O0, O1 "
                                      "and O2 in the dtypes this hardware has kernels for")
    try_channels_last: Optional[str] = _f(None, "on,off; None: both")
    try_norm: Optional[str] = _f(None, "norm choices; None: all of core.norm.NORMS")
    try_compile: Optional[str] = _f(None, "on,off; None: both")
    try_workers: Optional[str] = _f(None, "loader workers per rank; None: the base's and 0, 1, 2, 4 up to the cores")
    try_prefetch: Optional[str] = _f(None, "batches each worker prepares ahead; None: the base's and twice it")
    try_pack: Optional[str] = _f(None, "png,pack: decode PNGs or read a pre-decoded pack built once in OUT/pack; "
                                 "None: both on the synthetic set, neither with --data (a pack is the decoded set)")


# ---- the tuner ------------------------------------------------------------------------------------

class OutOfBudget(Exception):
    pass


class Tuner:
    def __init__(self, given: Dict, base: TrainConfig, opts: TuneOptions):
        self.given, self.base, self.opts = given, base, opts
        self.out = os.path.abspath(opts.out)
        self.dev = device_type(base)
        self.base_settings = settings(base, self.dev)
        self.trials: List[Dict] = []
        self.by_key: Dict[Tuple, Dict] = {}
        self.notes: List[str] = []
        self.not_tried: List[str] = []
        self.pack_dir = base.pack or os.path.join(self.out, "pack")
        self.pack_ready = base.pack is not None
        self.planned = 0
        self.t0 = time.monotonic()
        self.dims = self.dimensions()

    def dimensions(self) -> List[Tuple[Dim, Optional[List[Dict]]]]:
        names = [n.strip() for n in self.opts.sweep.split(",") if n.strip()]
        unknown = [n for n in names if n not in DIMS]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"--sweep: {unknown or names} must be distinct names from {', '.join(ORDER)}")
        cores = cpu_threads(0, 1)
        dims = []
        for name in names:
            dim, text = DIMS[name], getattr(self.opts, "try_" + name.replace("-", "_"))
            flag = f"--try-{name}"
            if text is None:
                values, note = default_values(name, self.base, self.dev, cores)
                if note:
                    self.notes.append(note)
            else:
                values = [dim.parse(v.strip(), flag) for v in text.split(",") if v.strip()]
                if not values:
                    raise ValueError(f"{flag}: give at least one value")
                if name == "precision" and self.dev == "cpu":
                    values = [self._insisted(v) for v in values]
            if name == "pack" and values:
                values = self._pack_values(values)
            dims.append((dim, values))
        return dims

    def _insisted(self, value: Dict) -> Dict:
        """A low-precision level asked for by name on a CPU without kernels for its dtype: run.py
        refuses it unless insisted on, and asking for it by name is insisting."""
        if value["opt_level"] == "O0":
            return value
        dtype = {"auto": "bfloat16"}.get(value.get("amp_dtype", "auto"), value.get("amp_dtype"))
        ok, why = low_precision_here(dtype)
        if ok:
            return value
        self.notes.append(f"precision: {value['opt_level']}-{dtype} runs as asked (--allow-slow-precision), but "
                          f"expect it 10-30x slower than fp32: {why}")
        return dict(value, allow_slow_precision=True)

    def _pack_values(self, values: List[Dict]) -> List[Dict]:
        result = []
        for v in values:
            if v["pack"] == "png" and self.base.pack and "pack" not in self.given:
                self.notes.append("pack: png left out: the base's pack comes from --config, which a flag cannot unset")
                continue
            result.append({"pack": self.pack_dir if v["pack"] == "pack" else None})
        return result

    # ---- one trial ---------------------------------------------------------------------------
    def resolve(self, overrides: Dict) -> Tuple[List[str], Optional[TrainConfig], str]:
        n = len(self.trials) + 1
        argv = trial_io.trial_argv(self.given, overrides, self.opts.warmup + self.opts.steps,
                                   os.path.join(self.out, f"trial_{n}"))
        try:
            return argv, parse_config(argv), ""
        except (ValueError, FileNotFoundError) as exc:  # run.py would reject it the same way
            return argv, None, str(exc)
        except SystemExit:  # argparse said why on stderr
            return argv, None, "launch/run.py's parser rejects these flags (its message is above)"

    def label(self, cfg: Optional[TrainConfig], overrides: Dict) -> str:
        if cfg is None:
            return " ".join(f"{k}={v}" for k, v in overrides.items())
        now = settings(cfg, self.dev)
        diff = [v for k, v in now.items() if v != self.base_settings[k]]
        return " ".join(diff) or "base"

    def key(self, overrides: Dict, cfg: Optional[TrainConfig] = None) -> Tuple:
        """Two overrides that resolve to the same settings are one trial."""
        cfg = cfg or self.resolve(overrides)[1]
        return tuple(settings(cfg, self.dev).values()) if cfg else tuple(sorted(map(str, overrides.items())))

    def settings_of(self, overrides: Dict) -> Dict[str, str]:
        cfg = self.resolve(overrides)[1]
        return settings(cfg, self.dev) if cfg else {}

    def measure(self, overrides: Dict) -> Dict:
        """The trial of these overrides (an earlier one with the same settings is not run again);
        OutOfBudget when it would likely end past the budget."""
        argv, cfg, error = self.resolve(overrides)
        key = self.key(overrides, cfg)
        if key in self.by_key:
            return self.by_key[key]
        budget = self.opts.budget_min * 60
        if budget and self.trials and time.monotonic() - self.t0 + self.estimate() > budget:
            raise OutOfBudget()
        n = len(self.trials) + 1
        rec = {"trial": n, "setting": self.label(cfg, overrides), "overrides": overrides,
               "settings": settings(cfg, self.dev) if cfg else {}, "work_dir": os.path.join(self.out, f"trial_{n}"),
               "command": "python launch/run.py " + " ".join(argv), "status": "running", "reason": "",
               "wall_s": 0.0, "numerics": numerics_changes(cfg, self.base, self.dev) if cfg else []}
        if not error and cfg.pack and cfg.pack == self.pack_dir and not self.pack_ready:
            error = self.build_pack()
        timeout = self.opts.trial_timeout or self.auto_timeout()
        if budget and self.trials:  # the base runs whatever the budget: nothing compares without it
            timeout = min(timeout, max(budget - (time.monotonic() - self.t0), 1.0))
        self.trials.append(rec)
        self.by_key[key] = rec
        print(f"[tune] {n}/{self.total()} {rec['setting']}: running (time share {timeout:.0f} s)", flush=True)
        if error:
            rec.update(status="failed", reason=error)
        else:
            started = time.monotonic()
            try:
                self.run(rec, argv, timeout)
            except KeyboardInterrupt as exc:  # its processes are stopped; the report still gets written
                rec.update(status="interrupted", reason=str(exc) or "SIGINT", wall_s=time.monotonic() - started)
                raise
        self.progress(rec)
        return rec

    def run(self, rec: Dict, argv: List[str], timeout: float) -> None:
        done = trial_io.run_process([trial_io.RUN, *argv], rec["work_dir"], timeout)
        rec.update(status="ok", wall_s=done.wall_s, peak_rss_bytes=done.peak_rss_bytes)
        if done.timed_out:
            rec.update(status="timeout", reason=f"stopped after {timeout:.0f} s (its time share)")
        elif done.returncode != 0:
            status, reason = trial_io.failure_reason(done.returncode,
                                                     trial_io.tail(os.path.join(rec["work_dir"], "stderr.txt")))
            rec.update(status=status, reason=reason)
        if rec["status"] == "ok":
            try:
                rec.update(trial_io.read_metrics(os.path.join(rec["work_dir"], "log.jsonl"), self.opts.warmup))
            except trial_io.NoMeasurement as exc:
                rec.update(status="failed", reason=str(exc))
            if rec["status"] == "ok" and rec["measured_iters"] < self.opts.steps:  # e.g. stopped by a signal
                rec.update(status="failed", reason=f"stopped early: {rec['measured_iters']} of {self.opts.steps} "
                                                   "measured iterations")
        if rec.get("recompiled"):
            self.notes.append(f"trial {rec['trial']}: torch.compile built new graphs after the warmup; "
                              "its step time includes compilation (raise --warmup)")

    def build_pack(self) -> str:
        """The pack of the dataset in OUT/pack (train and val: best.yaml may evaluate), built once,
        reused while the loader would accept it; returns an error message or ''."""
        from data_loader.cityscapes import DatasetError
        from data_loader.pack import PackReader
        from data_loader.synthetic import default_dataset
        root = os.path.abspath(self.base.data) if self.base.data else default_dataset(self.base.cache_dir)
        self.pack_ready = True
        try:
            for split in ("train", "val"):
                PackReader(self.pack_dir, split, root)
            self.notes.append(f"pack: reused {self.pack_dir}")
            return ""
        except (DatasetError, OSError):  # missing, stale or corrupt (PackError is a DatasetError)
            pass
        print(f"[tune] building the pack of {root} in {self.pack_dir}", flush=True)
        done = trial_io.run_process(["-m", "data_loader.pack", root, "--out", self.pack_dir],
                                    os.path.join(self.out, "pack_build"), None, cwd=_ROOT)
        if done.returncode != 0:
            self.pack_ready = False
            log = trial_io.tail(os.path.join(self.out, "pack_build", "stderr.txt"))
            return "building the pack failed: " + trial_io.failure_reason(done.returncode, log)[1]
        self.notes.append(f"pack: built {self.pack_dir} in {done.wall_s:.0f} s (counted in the elapsed time)")
        return ""

    def estimate(self) -> float:
        ok = [t["wall_s"] for t in self.trials if t["status"] == "ok"]
        return statistics.median(ok or [t["wall_s"] for t in self.trials] or [0.0])

    def auto_timeout(self) -> float:
        ok = [t["wall_s"] for t in self.trials if t["status"] == "ok"]
        return max(300.0, 5 * statistics.median(ok)) if ok else 1800.0

    def total(self) -> int:
        return max(self.planned, len(self.trials))

    def progress(self, rec: Dict) -> None:
        elapsed = time.monotonic() - self.t0
        left = max(self.total() - len(self.trials), 0) * self.estimate()
        if self.opts.budget_min:
            left = min(left, max(self.opts.budget_min * 60 - elapsed, 0))
        base = self.trials[0]
        if rec["status"] == "ok":
            ratio = f" ({rec['images_per_s'] / base['images_per_s']:.2f}x base)" if base["status"] == "ok" else ""
            what = (f"{rec['images_per_s']:.3g} img/s{ratio}, step {rec['step_ms']:.0f} ms, "
                    f"data-wait {100 * rec['data_share']:.1f}%")
        else:
            what = f"{rec['status'].upper()}: {rec['reason']}"
        print(f"[tune] {rec['trial']}/{self.total()} {rec['setting']}: {what}; trial {rec['wall_s']:.0f} s, "
              f"elapsed {_mmss(elapsed)}, ETA {_mmss(left)}", flush=True)

    # ---- the search --------------------------------------------------------------------------
    def values(self, dim: Dim, values: Optional[List[Dict]], incumbent: Dict) -> List[Dict]:
        if values is not None:
            return values
        _, cfg, _ = self.resolve(incumbent)
        b = per_rank_batch(cfg) if cfg else None
        return [{"batch_size": b}, {"batch_size": 2 * b}] if b else []

    def grid_plan(self) -> List[Dict]:
        """Every combination of the swept values, one per distinct setting."""
        combos: Dict[Tuple, Dict] = {}
        product = [{}]
        for dim, values in self.dims:
            product = [{**c, **v} for c in product for v in self.values(dim, values, {})] or product
        for combo in product:
            combos.setdefault(self.key(combo), combo)
        return list(combos.values())

    def untried(self, dim: Dim, values: List[Dict], incumbent: Dict) -> List[str]:
        keys = {self.key({**incumbent, **v}): self.settings_of({**incumbent, **v}).get(dim.name, str(v))
                for v in values}
        return [f"{dim.name} {label}" for key, label in keys.items() if key not in self.by_key]

    def search(self) -> None:
        if self.opts.grid:
            plan = self.grid_plan()
            self.planned = len(plan)
            print(f"[tune] grid: {self.planned} trials of {self.opts.warmup}+{self.opts.steps} iterations", flush=True)
            for i, combo in enumerate(plan):
                try:
                    self.measure(combo)
                except OutOfBudget:
                    self.not_tried = [self.label(self.resolve(c)[1], c) for c in plan[i:]]
                    return
            return
        # Greedy: the base, then each value of each dimension that differs from the base's.
        self.planned = 1 + sum(self.settings_of(v).get(d.name) != self.base_settings[d.name]
                               for d, vals in self.dims for v in self.values(d, vals, {}))
        print(f"[tune] greedy over {', '.join(d.name for d, _ in self.dims) or 'nothing'}: about "
              f"{self.planned} trials of {self.opts.warmup}+{self.opts.steps} iterations", flush=True)
        incumbent, best = {}, self.measure({})
        for i, (dim, values) in enumerate(self.dims):
            candidates = self.values(dim, values, incumbent)
            for j, value in enumerate(candidates):
                try:
                    rec = self.measure({**incumbent, **value})
                except OutOfBudget:
                    self.not_tried = self.untried(dim, candidates[j:], incumbent)
                    for later, vals in self.dims[i + 1:]:
                        self.not_tried += self.untried(later, self.values(later, vals, incumbent), incumbent)
                    return
                if rec["status"] == "ok" and (best["status"] != "ok" or rec["images_per_s"] > best["images_per_s"]):
                    best = rec
            incumbent = dict(best["overrides"])

    def best(self) -> Optional[Dict]:
        ok = [t for t in self.trials if t["status"] == "ok"]
        return max(ok, key=lambda t: t["images_per_s"]) if ok else None

    def tuned_fields(self) -> List[str]:
        return [f for dim, _ in self.dims for f in dim.fields]


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _mmss(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def parse(argv: List[str]) -> Tuple[Dict, TrainConfig, TuneOptions]:
    """(the trainer flags the user gave, the resolved base TrainConfig, TuneOptions), from the
    trainer's own parser plus TuneOptions."""
    described = dict(prog=PROG, description=__doc__.split("\n")[0])
    given = vars(build_parser(TuneOptions, **described).parse_args(argv))  # what parse_config parses too
    given = {k: v for k, v in given.items() if k in field_names()}
    base, opts = parse_config(argv, extra=TuneOptions, **described)
    for name, bad in (("eval_only", base.eval_only), ("resume", base.resume), ("nnodes", base.nnodes > 1)):
        if bad:
            raise ValueError(f"--{name.replace('_', '-')}: tune.py measures training steps of a new run on this node")
    if opts.steps < 1 or opts.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {opts.steps} and {opts.warmup}")
    if opts.budget_min < 0 or opts.trial_timeout < 0:
        raise ValueError("--budget-min and --trial-timeout must be >= 0")
    return given, base, opts


def main(argv: Optional[List[str]] = None) -> int:
    from launch import tune_report
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        given, base, opts = parse(argv)
        tuner = Tuner(given, base, opts)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tune.py: error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(tuner.out, exist_ok=True)
    for name in os.listdir(tuner.out):  # a previous tune's trials: their log.jsonl would be appended to
        if re.fullmatch(r"trial_\d+|pack_build|tune\.(md|json|png)|best\.yaml", name):
            path = os.path.join(tuner.out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for note in tuner.notes:
        print(f"[tune] note: {note}", flush=True)
    # SIGTERM (a scheduler, `kill`) stops like Ctrl-C: the running trial is in a session of its own
    # and would otherwise outlive the tuner.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        tuner.search()
    except KeyboardInterrupt as exc:
        tuner.notes.append(f"interrupted by {exc or 'SIGINT'}: the table holds the trials that finished")
    tune_report.write(tuner, argv)
    return 0 if tuner.best() else 1


if __name__ == "__main__":
    sys.exit(main())
