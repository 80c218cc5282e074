"""The benchmarks' memory measure (bench/common.tensor_peak_mib) against hand-counted bytes."""
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_common", os.path.join(ROOT, "bench", "common.py"))
bench_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_common)

MIB = 2 ** 20


def test_peak_counts_what_is_held_at_once_not_what_is_allocated_in_all():
    existing = torch.ones(8 * MIB // 4)  # held before the call: not part of the call's peak

    def work():
        a = torch.empty(4 * MIB, dtype=torch.uint8)
        b = torch.empty(8 * MIB, dtype=torch.uint8)  # a + b: 12 MiB at once
        del a
        c = torch.empty(6 * MIB, dtype=torch.uint8)  # b + c: 14 MiB at once, the peak
        del b, c
        d = torch.empty(2 * MIB, dtype=torch.uint8)
        return d

    peak = bench_common.tensor_peak_mib(work)
    if peak != peak:
        pytest.skip("this torch's profiler does not expose allocation events")
    # 4 + 8 + 6 + 2 = 20 MiB were allocated in all; 14 MiB were held together (plus a few
    # bytes of bookkeeping tensors at most)
    assert 14 <= peak < 14.01
    assert existing.numel() == 8 * MIB // 4


def test_tensors_from_before_the_call_are_not_counted_even_when_freed():
    older = [torch.empty(5 * MIB, dtype=torch.uint8)]

    def work():
        older.pop()  # 5 MiB freed that the call did not allocate
        return torch.empty(3 * MIB, dtype=torch.uint8)

    peak = bench_common.tensor_peak_mib(work)
    if peak != peak:
        pytest.skip("this torch's profiler does not expose allocation events")
    assert 3 <= peak < 3.01  # the call's own allocation; the older tensor's free is not subtracted
