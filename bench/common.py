"""What the speed benchmarks share: each variant runs in a fresh child process (peak memory is a
per-process high-water mark, and one variant's allocator or compiled state must not help the
next), the peak FLOP/s of each dtype measured in the same run, and the table they print.

A child is this same script started with `--child VARIANT`; it prints one JSON line last.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def peak_rss_mib() -> float:
    from core.device import peak_rss_bytes
    return peak_rss_bytes() / 2 ** 20


def rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2 ** 20


def tensor_peak_mib(fn) -> float:
    """Run fn() once under torch.profiler's allocator accounting and return the most bytes that
    the tensors it allocated held at once (every CPU allocation and free during the call, oneDNN's
    workspaces included; tensors from before the call are not counted, even when it frees them):
    on CPU the analogue of CUDA's max_memory_allocated over one call, free of what RSS adds (pages
    glibc keeps after a free). NaN if this torch's profiler lacks the API."""
    from torch.profiler import ProfilerActivity, profile
    try:
        from torch._C._profiler import _EventType
    except ImportError:
        return float("nan")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
    except AttributeError:  # a torch whose profiler results lack the event tree
        return float("nan")
    peak = 0
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            peak = max(peak, event.extra_fields.total_allocated)  # running total of the call's own
        stack.extend(event.children)
    return peak / 2 ** 20


def run_child(script: str, argv: Sequence[str], variant: str, timeout: float = 3600.0) -> Dict:
    """Run `script --child variant argv...` and return its JSON result, or {"error": ...}."""
    cmd = [sys.executable, script, *argv, "--child", variant]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"no result within {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"variant": variant, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def measure_peaks(dtypes: Sequence[str], threads: int) -> Dict[str, float]:
    """Peak TFLOP/s of a square matmul per dtype at `threads` threads, measured now (not cached:
    a benchmark compares against what the machine does during this run)."""
    import torch

    from core.mfu import measure_peak_tflops
    torch.set_num_threads(threads)
    notes: List[str] = []
    peaks = {d: measure_peak_tflops(torch.device("cpu"), getattr(torch, d), None, force=True, log=notes.append)
             for d in dtypes}
    for note in notes:
        print("warning: " + note, file=sys.stderr)
    return peaks


def markdown(rows: List[Dict], columns: Sequence[tuple]) -> str:
    """columns: (header, key, format) triples; missing values print as '-'."""
    head = "| " + " | ".join(c[0] for c in columns) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = []
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else (fmt.format(v) if fmt else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def machine_line() -> str:
    from core.cpu import describe
    return describe()


def finish(rows: List[Dict], json_path: str, peaks: Dict[str, float]) -> int:
    """The last lines of a benchmark: failures, the fastest variant, the JSON; the exit code."""
    ok = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            print(f"{r['variant']}: failed: {r['error']}")
    if ok:
        fastest = max(ok, key=lambda r: r["images_per_s"])
        print(f"\nfastest: {fastest['variant']} at {fastest['images_per_s']:.3f} images/s"
              + (f", {fastest['speedup']:.2f}x the baseline" if "speedup" in fastest else ""))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"machine": machine_line(), "peaks_tflops": peaks, "rows": rows}, f, indent=1)
    return 0 if len(ok) == len(rows) else 1
