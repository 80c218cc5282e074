"""A profiling run of the trainer's own steps (launch/assembly.Training), and its reports.

run_trace runs iterations exactly as launch/run.py's loop does (schedule.set_iteration(i),
next(loader), Training.step) after the same preparations (FLOPs per step and the peak FLOP/s
on rank 0, neither of which touches the RNG), so its losses are run.py's for the same config
and seed. The --warmup iterations run bare, as in training; the --steps iterations after them
are traced: engine phases (profiling/phases.py), per-module meters (profiling/hooks.py),
torch.profiler, and py-spy on the loader workers. All of that only reads clocks: the traced
iterations compute what untraced ones would (tested against run.py's log), but they run a little
slower than training (hook and profiler overhead, more so on accelerators, where every reading
synchronises the device).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Dict, List

import torch

from core import distributed as cdist
from core.config import to_dict
from core.mfu import PEAK_CACHE_NAME, _device_name, measure_peak_tflops
from profiling.flops import module_flops
from profiling.hooks import ModuleMeter, clock_for
from profiling.phases import PHASES, TOLERANCE_TEXT, AllReduceTimer, PhaseTimer
from profiling.pyspy import PySpyRecorder
from profiling.report import bar_chart_png, markdown_table, stacked_bar_chart_png, write_json, write_text

REST_ROW = "(outside these modules)"


def peak_memory(device) -> Dict[str, int]:
    """Peak resident set of this process (ru_maxrss: the whole life so far) and the current one;
    on CUDA/NPU also the caching allocator's peaks since its last reset."""
    import psutil

    from core.device import peak_rss_bytes
    out = {"rss_bytes": int(psutil.Process().memory_info().rss), "peak_rss_bytes": peak_rss_bytes()}
    if device.module is not None:
        out["max_allocated_bytes"] = int(device.module.max_memory_allocated(device.torch_device))
        out["max_reserved_bytes"] = int(device.module.max_memory_reserved(device.torch_device))
    return out


def worker_memory(pids: List[int]) -> List[Dict[str, int]]:
    import psutil
    rows = []
    for pid in pids:
        try:
            rows.append({"pid": pid, "rss_bytes": int(psutil.Process(pid).memory_info().rss)})
        except psutil.Error:
            pass
    return rows


def run_trace(cfg, opts, env, device, training) -> Dict:
    main = env.is_main
    say = (lambda text: print(text, flush=True)) if main else (lambda text: None)
    os.makedirs(opts.out, exist_ok=True)
    # What run.py does between build_training and its loop, in the same order (rank 0 only).
    flops_per_step = training.flops_per_step() if main else 0
    flops_skipped = training.flops_skipped_per_step() if main else 0
    peak_tflops = 0.0
    if main:
        from data_loader.synthetic import cache_root
        peak_tflops = cfg.peak_tflops or measure_peak_tflops(
            device.torch_device, training.amp.compute_dtype, os.path.join(cache_root(cfg.cache_dir), PEAK_CACHE_NAME),
            force=cfg.measure_peak, log=say)
    # The DDP module under torch.compile's wrapper (--compile) is the one whose reducer runs the hook.
    comm = AllReduceTimer(getattr(training.ddp_model, "_orig_mod", training.ddp_model)) if env.distributed else None
    say(f"[trace] {cfg.backbone} base {cfg.base_channels} OS{cfg.output_stride}, crop {cfg.crop[0]}x{cfg.crop[1]}, "
        f"batch {training.batch_size}/rank x {env.world_size} rank(s), {cfg.opt_level}, device {device.torch_device}, "
        f"{torch.get_num_threads()} threads, {cfg.workers} loader worker(s); warmup {opts.warmup}, traced {opts.steps}")

    loader_it = iter(training.loader)
    losses = []
    for i in range(opts.warmup):  # run.py's loop body, nothing attached
        lr = training.schedule.set_iteration(i)
        batch = next(loader_it)
        result = training.step(batch)
        losses.append({"iter": i + 1, "loss": result.loss, **result.parts, "lr": lr, "skipped": result.skipped,
                       "traced": False})
    memory_training = peak_memory(device)  # the untraced steps' peak: what training needs
    if device.module is not None:
        device.module.reset_peak_memory_stats(device.torch_device)
    if comm is not None:
        comm.discard()

    clock = clock_for(device)
    phases = PhaseTimer(clock, annotate=True)
    step_rows = []
    prefix = "loader_worker" if not env.distributed else f"rank{env.rank}_loader_worker"
    worker_pids = getattr(training.loader, "worker_pids", [])
    spy = PySpyRecorder(worker_pids, opts.out, opts.py_spy_rate, prefix) if opts.py_spy else None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # Under --compile the modules run fused inside compiled graphs: there is no per-module time to
    # take, and hooks added now would make dynamo recompile. The module table then has FLOPs only.
    meter = ModuleMeter(training.model, opts.depth, clock) if not cfg.compile else None
    try:
        if spy is not None:
            for rec in spy.start():
                if rec["message"]:
                    say(f"[trace] {rec['message']}")
        with torch.profiler.profile(activities=activities) as prof:
            for k in range(opts.steps):
                i = opts.warmup + k
                lr = training.schedule.set_iteration(i)
                with torch.profiler.record_function(f"step_{k}"):
                    phases.start_step()
                    batch = next(loader_it)
                    phases.mark("data_wait")
                    result = training.step(batch, timer=phases)
                    row = dict(phases.end_step())
                if meter is not None:
                    meter.flush()
                allreduce = comm.end_step() if comm is not None else None
                losses.append({"iter": i + 1, "loss": result.loss, **result.parts, "lr": lr,
                               "skipped": result.skipped, "traced": True})
                row.update(iter=i + 1, loss=result.loss, **({"allreduce": allreduce} if allreduce else {}))
                step_rows.append(row)
                say(f"[trace] step {k + 1}/{opts.steps} (iter {i + 1})  loss {result.loss:.4f}  "
                    f"step {row['step_ms']:.1f} ms = " + " + ".join(f"{p} {row[p]:.1f}" for p in PHASES)
                    + ("" if row["within_tolerance"] else f"  [sum {row['sum_ms']:.1f} ms: outside {TOLERANCE_TEXT}]"))
        workers = worker_memory(worker_pids)
    finally:
        if meter is not None:
            meter.remove()
        if spy is not None:
            spy.stop()
    memory_traced = peak_memory(device)
    summary = phases.summary()
    per_rank = cdist.gather_to_main({"rank": env.rank, "breakdown": summary,
                                     "allreduce": comm.summary() if comm is not None else {}})
    if not main:
        return {}
    # the plain model's FLOPs, as Assembly.flops_per_step counts them (flops_skipped says what the step skips)
    build = functools.partial(_build_model, dataclasses.replace(cfg, pretrained=None, load_from=None, atrous=False))
    flops = module_flops(build, training.batch_size, cfg.crop, opts.depth)
    result = {
        "config": to_dict(cfg), "options": dataclasses.asdict(opts), "world_size": env.world_size,
        "device": str(device.torch_device), "threads": torch.get_num_threads(),
        "cpu": {"name": _device_name(torch.device("cpu")).split(":", 1)[1],
                "capability": torch.backends.cpu.get_cpu_capability()},
        "losses": losses, "steps": step_rows, "breakdown": summary, "ranks": per_rank,
        "allreduce": comm.summary() if comm is not None else None,
        "flops_per_step": flops_per_step, "flops_skipped": flops_skipped, "peak_tflops": peak_tflops, "flops": flops,
        "memory": {"training": memory_training, "traced": memory_traced, "loader_workers": workers},
        "py_spy": spy.results() if spy is not None else None,
    }
    _write_reports(result, prof, meter, training, opts, say)
    return result


def _build_model(cfg):
    from launch.assembly import build_model
    return build_model(cfg)


def module_rows(times: Dict[str, dict], flops: Dict, phases_ms: Dict[str, float], step_ms: float) -> List[dict]:
    """One row per module (times {name: {"forward": ms, "backward": ms}}, None where not timed)
    plus what the forward/backward phases spent outside the modules."""
    def rate(n, ms):
        return n / (ms * 1e-3) / 1e9 if ms is not None and ms > 0 and n > 0 else None

    def row(name, fwd_ms, bwd_ms, fwd_flop, bwd_flop):
        timed = fwd_ms is not None
        return {"module": name, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_gflop": fwd_flop / 1e9,
                "bwd_gflop": bwd_flop / 1e9, "fwd_gflops": rate(fwd_flop, fwd_ms), "bwd_gflops": rate(bwd_flop, bwd_ms),
                "gflops": rate(fwd_flop + bwd_flop, fwd_ms + bwd_ms) if timed else None,
                "share": (fwd_ms + bwd_ms) / step_ms if timed and step_ms > 0 else None}
    rows = []
    for name, t in times.items():
        f = flops["modules"].get(name, {"forward": 0, "backward": 0})
        rows.append(row(name, t["forward"], t["backward"], f["forward"], f["backward"]))
    timed = all(r["fwd_ms"] is not None for r in rows)
    rows.append(row(REST_ROW, phases_ms.get("forward", 0.0) - sum(r["fwd_ms"] for r in rows) if timed else None,
                    phases_ms.get("backward", 0.0) - sum(r["bwd_ms"] for r in rows) if timed else None,
                    flops["forward_total"] - sum(f["forward"] for f in flops["modules"].values()),
                    flops["backward_total"] - sum(f["backward"] for f in flops["modules"].values())))
    return rows


def op_rows(prof, steps: int, top: int, cuda: bool) -> List[dict]:
    """Per-op self time per step from torch.profiler (our own step/phase ranges left out)."""
    ours = set(PHASES) | {f"step_{k}" for k in range(steps)}
    events = [e for e in prof.key_averages() if e.key not in ours and not e.key.startswith("ProfilerStep")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = [{"op": e.key, "calls": e.count / steps, "self_ms": e.self_cpu_time_total / 1000.0 / steps,
             "share": e.self_cpu_time_total / total,
             **({"device_self_ms": e.self_device_time_total / 1000.0 / steps} if cuda else {})} for e in events]
    rows.sort(key=lambda r: -r["self_ms"])
    return rows[:top]


def _write_reports(result: Dict, prof, meter, training, opts, say) -> None:
    out, steps, cfg = opts.out, opts.steps, training.cfg
    summary = result["breakdown"]
    step_ms = summary["step_ms"]
    tag = (f"{cfg.backbone}/{cfg.base_channels} OS{cfg.output_stride}, {cfg.crop[0]}x{cfg.crop[1]}, "
           f"batch {training.batch_size}, {cfg.opt_level}")
    files = {}

    def path(name):
        files[name] = os.path.join(out, name)
        return files[name]

    prof.export_chrome_trace(path("trace.json"))
    cuda = training.device.type == "cuda"
    ops = op_rows(prof, steps, opts.top, cuda)
    write_json(path("ops.json"), ops)
    ops_md = markdown_table(ops, ["op", "calls", "self_ms", "share"] + (["device_self_ms"] if cuda else []),
                            ["{}", "{:.0f}", "{:.2f}", "{:.1%}"] + (["{:.2f}"] if cuda else []),
                            ["op", "calls/step", "self ms/step", "share"] + (["device ms/step"] if cuda else []))
    write_text(path("ops.md"), ops_md)
    bar_chart_png(path("ops.png"), [r["op"] for r in ops], [r["self_ms"] for r in ops],
                  f"self time per step by op, top {len(ops)} ({tag})")

    if meter is not None:
        times = {r["module"]: r for r in meter.table(steps)}
    else:  # --compile: FLOPs only
        times = {name: {"forward": None, "backward": None} for name in result["flops"]["modules"]}
    modules = module_rows(times, result["flops"], summary["phases_ms"], step_ms)
    write_json(path("modules.json"), {"depth": opts.depth, "rows": modules, "flops": result["flops"]})
    mod_md = markdown_table(
        modules, ["module", "fwd_ms", "bwd_ms", "fwd_gflop", "bwd_gflop", "fwd_gflops", "bwd_gflops", "share"],
        ["{}", "{:.2f}", "{:.2f}", "{:.3f}", "{:.3f}", "{:.1f}", "{:.1f}", "{:.1%}"],
        ["module", "fwd ms", "bwd ms", "fwd GFLOP", "bwd GFLOP", "fwd GFLOP/s", "bwd GFLOP/s", "share of step"])
    mod_md += (f"\n\nPer step, mean of {steps} traced steps. {REST_ROW}: the rest of the forward phase (loss, final "
               "upsampling, the meters' own bookkeeping) and of the backward phase (their backward, gradient "
               "accumulation, DDP's wait for the last buckets).")
    if meter is None:
        mod_md += "\n--compile: the modules run fused in compiled graphs, so only their FLOPs are listed."
    write_text(path("modules.md"), mod_md)
    key, unit, what = ("ms", "ms", "time") if meter is not None else ("gflop", "GFLOP", "FLOPs")
    stacked_bar_chart_png(path("modules.png"), [r["module"] for r in modules],
                          {"forward": [max(r[f"fwd_{key}"], 0.0) for r in modules],
                           "backward": [max(r[f"bwd_{key}"], 0.0) for r in modules]},
                          f"{what} per step by module, depth {opts.depth} ({tag})", unit=unit)

    write_json(path("steps.json"), {"tolerance": TOLERANCE_TEXT, "summary": summary, "steps": result["steps"],
                                    "losses": result["losses"], "allreduce": result["allreduce"]})
    breakdown = [{"phase": p, "ms": v, "share": v / step_ms if step_ms else 0.0}
                 for p, v in summary["phases_ms"].items()]
    rows = breakdown + [{"phase": "sum of phases", "ms": summary["sum_ms"], "share": summary["sum_ms"] / step_ms},
                        {"phase": "step (measured)", "ms": step_ms, "share": 1.0}]
    br_md = markdown_table(rows, ["phase", "ms", "share"], ["{}", "{:.2f}", "{:.1%}"], ["phase", "ms/step", "share"])
    verdict = "within" if summary["mean_within_tolerance"] else "OUTSIDE"
    br_md += (f"\n\nSum of phases vs measured step: {verdict} the tolerance ({TOLERANCE_TEXT}) on the mean; "
              f"{summary['steps_within_tolerance']}/{summary['steps']} steps within it individually.")
    if result["allreduce"]:
        a = result["allreduce"]
        br_md += (f"\nDDP gradient all-reduce (inside backward, overlapped, not added): {a['buckets']:.0f} buckets, "
                  f"{a['allreduce_ms']:.2f} ms summed over buckets, {a['span_ms']:.2f} ms from first to last.")
    write_text(path("breakdown.md"), br_md)
    bar_chart_png(path("breakdown.png"), [r["phase"] for r in rows], [r["ms"] for r in rows],
                  f"step breakdown, mean of {steps} steps ({tag})")

    step_s = step_ms / 1000.0
    global_batch = training.batch_size * result["world_size"]
    real_flops = result["flops_per_step"] - result["flops_skipped"]
    summary_json = {
        "images_per_s": global_batch / step_s if step_s > 0 else 0.0, "step_ms": step_ms,
        "flops_per_step": result["flops_per_step"], "flops_counted_by_modules": result["flops"]["total"],
        # The module table counts every tap of the dilated convs; the padding-aware ones skip some:
        # achieved FLOP/s and MFU count only the work really done (as run.py's log line).
        "flops_skipped_per_step": result["flops_skipped"],
        "achieved_tflops": real_flops / step_s / 1e12 if step_s > 0 else 0.0,
        "peak_tflops": result["peak_tflops"],
        "mfu": (real_flops / step_s / (result["peak_tflops"] * 1e12)
                if step_s > 0 and result["peak_tflops"] > 0 else 0.0),
        "breakdown_within_tolerance": summary["mean_within_tolerance"], "tolerance": TOLERANCE_TEXT,
        **{k: result[k] for k in ("world_size", "device", "threads", "cpu", "memory", "py_spy", "allreduce",
                                  "ranks", "config", "options")},
    }
    files["summary.json"] = os.path.join(out, "summary.json")
    summary_json["files"] = dict(files)
    write_json(files["summary.json"], summary_json)

    say("\nper-op self time (top %d):\n%s" % (len(ops), ops_md))
    say("\nper-module time and FLOPs:\n" + mod_md)
    say("\nstep breakdown:\n" + br_md)
    mem = result["memory"]
    gib = 2.0 ** 30
    mem_txt = (f"peak RSS {mem['training']['peak_rss_bytes'] / gib:.2f} GiB untraced, "
               f"{mem['traced']['peak_rss_bytes'] / gib:.2f} GiB traced")
    if "max_allocated_bytes" in mem["traced"]:
        mem_txt += (f"; device max allocated {mem['training']['max_allocated_bytes'] / gib:.2f} GiB "
                    f"(reserved {mem['training']['max_reserved_bytes'] / gib:.2f})")
    say(f"\n{summary_json['images_per_s']:.2f} images/s, {summary_json['achieved_tflops'] * 1e3:.1f} GFLOP/s "
        f"achieved of {result['peak_tflops'] * 1e3:.1f} peak: MFU {summary_json['mfu']:.1%} "
        f"({result['flops_per_step'] / 1e9:.2f} GFLOP/step/rank); {mem_txt}")
    for rec in result["py_spy"] or []:
        say(f"py-spy: {rec['svg']} ({rec.get('samples', 0)} samples)" if rec["ok"] else f"py-spy: {rec['message']}")
    say("\nfiles:\n" + "\n".join(f"  {name:<13} {p}" for name, p in files.items()))
