"""cpu, cuda and npu behind one small interface.

torch_npu is imported only when an NPU is asked for; asking for one where torch_npu is not
installed (or no NPU is visible) is a clear error, never a silent fallback to the CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

_DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
# bf16 on CPU (no loss scaling needed, fast on AVX512-BF16/AMX); fp16 on accelerators, whose
# matmul units are built for it, with a dynamic loss scale.
_AUTOCAST_DTYPES = {"cpu": torch.bfloat16, "cuda": torch.float16, "npu": torch.float16}


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far (ru_maxrss); the current RSS where
    getrusage does not exist (Windows)."""
    import sys
    try:
        import resource
    except ImportError:
        import psutil
        return int(psutil.Process().memory_info().rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def _import_torch_npu():
    try:
        import torch_npu  # noqa: F401  (registers the 'npu' device with torch)
    except ImportError as exc:
        raise RuntimeError("--device npu needs the torch_npu package (Ascend PyTorch adapter) and the CANN "
                           "toolkit; it is not installed on this machine. Install the torch_npu build matching "
                           f"your torch ({torch.__version__}) on an Ascend host, or use --device cpu/cuda.") from exc
    if not torch.npu.is_available():
        raise RuntimeError("torch_npu is installed but no Ascend NPU is visible (check ASCEND_RT_VISIBLE_DEVICES "
                           "and the driver)")


@dataclass
class Device:
    type: str
    index: Optional[int] = None

    def __post_init__(self):
        if self.type not in _DIST_BACKENDS:
            raise ValueError(f"device must be one of cpu, cuda, npu; got {self.type!r}")
        if self.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        if self.type == "npu":
            _import_torch_npu()

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type if self.index is None or self.type == "cpu" else f"{self.type}:{self.index}")

    @property
    def dist_backend(self) -> str:
        return _DIST_BACKENDS[self.type]

    @property
    def autocast_dtype(self) -> torch.dtype:
        return _AUTOCAST_DTYPES[self.type]

    @property
    def module(self):
        """torch.cuda / torch.npu, or None on the CPU."""
        return getattr(torch, self.type) if self.type != "cpu" else None

    def set_current(self) -> None:
        if self.module is not None and self.index is not None:
            self.module.set_device(self.index)

    def synchronize(self) -> None:
        if self.module is not None:
            self.module.synchronize()

    def max_memory_bytes(self) -> int:
        """Peak device memory on accelerators; on the CPU the peak resident set size of this
        process so far (the current RSS would miss the activations, freed by the time it is read)."""
        if self.module is not None:
            return int(self.module.max_memory_allocated())
        return peak_rss_bytes()

    def timer(self) -> "EventTimer":
        return EventTimer(self)


class EventTimer:
    """Elapsed milliseconds of device work: device events on accelerators, perf_counter on CPU.

    `stop()` synchronises (on the stop event only), so call it where a sync point is acceptable.
    """

    def __init__(self, device: Device):
        self.device = device
        self._start = self._end = None
        self._t0 = 0.0

    def start(self) -> "EventTimer":
        mod = self.device.module
        if mod is not None:
            self._start, self._end = mod.Event(enable_timing=True), mod.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        if self._start is not None:
            self._end.record()
            self._end.synchronize()
            return float(self._start.elapsed_time(self._end))
        return (time.perf_counter() - self._t0) * 1000.0

    def __enter__(self) -> "EventTimer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.elapsed_ms = self.stop()


def get_device(name: str = "cpu", local_rank: Optional[int] = None) -> Device:
    """'cpu', 'cuda', 'cuda:1', 'npu', 'npu:0'; accelerators default to the local rank's device."""
    kind, _, idx = name.partition(":")
    index = int(idx) if idx else (local_rank if kind != "cpu" else None)
    if kind != "cpu" and index is None:
        index = 0
    return Device(kind, index)
