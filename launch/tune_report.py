"""What launch/tune.py writes: the ranked table (printed and tune.md), tune.json, tune.png and
best.yaml (the best trial's tuned TrainConfig fields, for `launch/run.py --config`)."""
from __future__ import annotations

import os
import platform
import shlex
from typing import Dict, List

import yaml

from core.cpu import bf16_here, cpu_model, usable_cores
from launch import tune_trial as trial_io
from profiling.report import bar_chart_png, markdown_table, write_json

COLUMNS = ["rank", "trial", "setting", "images/s", "vs base", "step ms", "data-wait", "spread", "peak mem",
           "numerics vs base", "status"]


def machine(dev: str) -> Dict[str, str]:
    import torch
    info = {"cpu": cpu_model(), "cores": str(usable_cores()),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": dev, "python": platform.python_version()}
    if dev == "cpu":
        ok, why = bf16_here()
        info["bf16"] = ("yes: " if ok else "no: ") + why
    elif dev == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def rows(trials: List[Dict], dev: str) -> List[Dict]:
    """Successful trials fastest first, then the others in trial order."""
    base = trials[0] if trials and trials[0]["status"] == "ok" else None
    ok = sorted((t for t in trials if t["status"] == "ok"), key=lambda t: -t["images_per_s"])
    result = []
    for rank, t in enumerate(ok + [t for t in trials if t["status"] != "ok"], 1):
        good = t["status"] == "ok"
        # CPU: peak RSS of the trial's largest process (wait4); accelerators: the log's peak allocation.
        mem = (t.get("peak_rss_bytes") if dev == "cpu" else t.get("log_mem_bytes")) or 0
        result.append({
            "rank": str(rank) if good else "-", "trial": str(t["trial"]), "setting": t["setting"],
            "images/s": rate(t["images_per_s"]) if good else "-",
            "vs base": f"{t['images_per_s'] / base['images_per_s']:.2f}x" if good and base else "-",
            "step ms": f"{t['step_ms']:.1f}" if good else "-",
            "data-wait": f"{100 * t['data_share']:.1f}%" if good else "-",
            "spread": f"{100 * t['spread']:.0f}%" if good else "-",
            "peak mem": f"{mem / 2 ** 30:.2f} GiB" if mem else "-",
            "numerics vs base": "; ".join(t["numerics"]) or "same",
            "status": "ok" if good else f"{t['status']}: {t['reason']}".replace("|", "/"),
        })
    return result


def rate(images_per_s: float) -> str:
    """Two decimals, or three significant digits below 1 image/s (R50 on a CPU: 0.0561)."""
    return f"{images_per_s:.2f}" if images_per_s >= 1 else f"{images_per_s:.3g}"


def best_yaml(tuner, best: Dict) -> Dict:
    """The tuned fields of the best trial, as run.py resolved them (its config.yaml)."""
    with open(os.path.join(best["work_dir"], "config.yaml")) as fh:
        resolved = yaml.safe_load(fh)
    return {f: resolved[f] for f in tuner.tuned_fields() if f in resolved}


def write(tuner, argv: List[str]) -> None:
    out, trials, best = tuner.out, tuner.trials, tuner.best()
    info = machine(tuner.dev)
    table = markdown_table(rows(trials, tuner.dev), COLUMNS, ["{}"] * len(COLUMNS)) if trials else "(no trials)"
    # For best.yaml's command: a flag wins over the YAML, so the base flags go without the tuned fields.
    base_flags = " ".join(shlex.quote(a) for a in trial_io.given_flags(tuner.given, drop=tuner.tuned_fields()))
    trial_flags = " ".join(shlex.quote(a) for a in trial_io.given_flags(tuner.given, drop=trial_io.FORCED))
    command = "python launch/tune.py " + " ".join(shlex.quote(a) for a in argv)
    lines = [
        "# launch/tune.py", "", f"    {command}", "",
        f"- machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
        f"(CPU kernels {info['cpu_capability']}), device {info['device']}"
        + (f"; bf16 {info['bf16']}" if "bf16" in info else ""),
        f"- base configuration (trial 1): {' '.join(tuner.base_settings.values())}"
        + (f"; flags: `{trial_flags}`" if trial_flags else " (the demo preset)"),
        f"- each trial: `launch/run.py` with {tuner.opts.warmup} warmup + {tuner.opts.steps} measured iterations; "
        "medians over the measured ones; images/s over all ranks; spread = interquartile range of the trial's "
        "step times / median (differences between trials below it are noise, and the load of a shared machine "
        "also changes from trial to trial); peak mem = "
        + ("peak RSS of the trial's largest process" if tuner.dev == "cpu" else "peak device memory of rank 0"),
        "- numerics vs base: settings that train differently, not only faster; check their loss curve before "
        "adopting them", "", table, ""]
    if best:
        ratio = best["images_per_s"] / trials[0]["images_per_s"] if trials[0]["status"] == "ok" else None
        lines += [f"best: trial {best['trial']} ({best['setting']}), {rate(best['images_per_s'])} images/s"
                  + (f", {ratio:.2f}x the base" if ratio else "") + f"; its settings are in {out}/best.yaml:", "",
                  f"    python launch/run.py --config {os.path.join(out, 'best.yaml')} {base_flags}".rstrip(), ""]
    else:
        lines += ["no trial succeeded: see the status column and each trial's stderr.txt", ""]
    if tuner.not_tried:
        lines += ["not tried (the budget ran out): " + "; ".join(tuner.not_tried), ""]
    lines += [f"note: {n}" for n in tuner.notes]
    text = "\n".join(lines).rstrip() + "\n"
    with open(os.path.join(out, "tune.md"), "w") as fh:
        fh.write(text)
    print("\n" + text, flush=True)

    tuned = best_yaml(tuner, best) if best else {}
    write_json(os.path.join(out, "tune.json"), {
        "command": command, "machine": info, "options": vars(tuner.opts), "base_flags": trial_flags,
        "run_flags": base_flags,
        "base_settings": tuner.base_settings, "trials": trials, "best_trial": best["trial"] if best else None,
        "best_yaml": tuned, "not_tried": tuner.not_tried, "notes": tuner.notes})
    if best:
        with open(os.path.join(out, "best.yaml"), "w") as fh:
            differs = f"# trains differently from the base: {'; '.join(best['numerics'])}\n" if best["numerics"] else ""
            fh.write(f"# launch/tune.py: trial {best['trial']} ({best['setting']}), {rate(best['images_per_s'])} "
                     f"images/s, the fastest of {len(trials)} trials on {info['cpu']}\n{differs}"
                     + f"# python launch/run.py --config best.yaml {base_flags}".rstrip() + "\n")
            fh.write(yaml.safe_dump(tuned, sort_keys=False))
        ok = [t for t in sorted(trials, key=lambda t: -t.get("images_per_s", 0)) if t["status"] == "ok"]
        base = trials[0]["images_per_s"] if trials[0]["status"] == "ok" else None
        bar_chart_png(os.path.join(out, "tune.png"),
                      [f"#{t['trial']} {t['setting']}" + (f" ({t['images_per_s'] / base:.2f}x)" if base else "")
                       for t in ok],
                      [t["images_per_s"] for t in ok],
                      f"images/s per trial (base: {' '.join(tuner.base_settings.values())}) on {info['cpu']}",
                      unit="img/s")
