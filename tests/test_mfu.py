"""The peak FLOP/s behind every MFU figure: cached only when measured on a quiet machine, keyed by
what determines it, re-measurable; and a busy machine is detected for real (other processes
burning the cores while it measures)."""
import json
import os
import subprocess
import sys

import torch

from core.mfu import cache_key, count_train_step_flops, measure_peak_tflops

CPU = torch.device("cpu")


def test_a_clean_measurement_is_cached_under_the_cpu_model_and_isa_and_can_be_redone(tmp_path):
    cache = str(tmp_path / "sub" / "peak.json")
    # clean_share=0 declares every round clean, so this test does not depend on the machine being quiet.
    first = measure_peak_tflops(CPU, torch.float32, cache, clean_share=0.0)
    assert first > 0
    stored = json.load(open(cache))
    key = cache_key(CPU, torch.float32)
    assert list(stored) == [key] and stored[key]["clean"] and stored[key]["tflops"] == first
    with open("/proc/cpuinfo") as f:
        model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    assert model in key and torch.backends.cpu.get_cpu_capability() in key
    assert f"threads={torch.get_num_threads()}" in key and "float32" in key
    stored[key]["tflops"] = 123.0  # the cached value is what later runs use, without measuring
    json.dump(stored, open(cache, "w"))
    assert measure_peak_tflops(CPU, torch.float32, cache) == 123.0
    again = measure_peak_tflops(CPU, torch.float32, cache, force=True, clean_share=0.0)  # --measure-peak
    assert again != 123.0 and json.load(open(cache))[key]["tflops"] == again
    assert cache_key(CPU, torch.bfloat16) != key  # each dtype has its own peak


BURN = "import time\nend = time.time() + 30\nwhile time.time() < end: pass\n"


def test_a_peak_measured_while_other_processes_use_the_cores_is_flagged_and_not_cached(tmp_path):
    cache = str(tmp_path / "peak.json")
    cores = len(os.sched_getaffinity(0))
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(cores)]
    warnings = []
    try:
        threads = torch.get_num_threads()
        torch.set_num_threads(cores)
        try:
            measure_peak_tflops(CPU, torch.float32, cache, log=warnings.append)
        finally:
            torch.set_num_threads(threads)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert not os.path.exists(cache)
    assert len(warnings) == 1 and "another process was busy" in warnings[0] and "not cached" in warnings[0]


def test_flops_of_a_train_step_match_a_hand_count_for_one_conv():
    # conv 3->8, 3x3, stride 1, pad 1 on 1x3x8x8: forward 2*8*8*8*27 MACs-as-FLOPs; the backward
    # computes the weight gradient only (the input needs none): the same count again.
    build = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False))  # noqa: E731

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = build()

        def forward(self, x):
            return {"out": self.net(x)}

    fwd = 2 * 8 * 8 * 8 * 27
    assert count_train_step_flops(Wrap, 1, (8, 8)) == 2 * fwd
