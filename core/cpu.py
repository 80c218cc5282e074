"""What this CPU is and what it can do fast: its model name, its feature flags, and whether
bfloat16 training can be fast on it (the same answer for the trainer's log, the MFU cache key,
tune.py's precision sweep and the benchmarks)."""
from __future__ import annotations

from typing import Set, Tuple


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> Set[str]:
    """Feature flags of the CPU ('flags' on x86, 'Features' on arm64); empty where unreadable."""
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model name", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


# What each low-precision dtype needs from the CPU: x86 flags (any of them), arm64 features (all).
# Without them oneDNN emulates the dtype: bf16 convolutions 10-30x slower than fp32 (DESIGN.md: 14x
# on a Zen 3), fp16 about 27x per step on an AVX2 machine.
_NEEDS = {"bfloat16": ({"avx512_bf16", "amx_bf16"}, {"bf16"}),
          "float16": ({"avx512_fp16", "amx_fp16"}, {"fphp", "asimdhp"})}


def cpu_kernels(dtype_name: str, flags: Set[str], capability: str) -> Tuple[bool, str]:
    """Whether training in `dtype_name` ('bfloat16' / 'float16') can be fast on a CPU with these
    flags, and why (not). On x86 torch's own kernels must also run at AVX512 or AMX
    (torch.backends.cpu.get_cpu_capability(); ATEN_CPU_CAPABILITY can lower it), else its
    element-wise ops in that dtype take the slow path."""
    x86, arm = _NEEDS[dtype_name]
    if "asimd" in flags:  # arm64 ('Features'); x86 has no such flag
        if arm <= flags:
            return True, f"arm64 with {'/'.join(sorted(arm))}"
        return False, f"this arm64 CPU lacks {'/'.join(sorted(arm - flags))}: {dtype_name} matmul/conv would be emulated"
    hw = sorted(flags & x86)
    if not hw:
        return False, (f"the CPU flags have neither {' nor '.join(sorted(x86))}: {dtype_name} matmul/conv would be "
                       "emulated, far slower than fp32")
    if not capability.upper().startswith(("AVX512", "AMX")):
        return False, (f"the CPU has {', '.join(hw)} but torch runs its kernels at {capability} "
                       f"(check ATEN_CPU_CAPABILITY): {dtype_name} element-wise ops would take the slow path")
    return True, f"{', '.join(hw)} with torch kernels at {capability}"


def cpu_bf16(flags: Set[str], capability: str) -> Tuple[bool, str]:
    return cpu_kernels("bfloat16", flags, capability)


def cpu_fp16(flags: Set[str], capability: str) -> Tuple[bool, str]:
    return cpu_kernels("float16", flags, capability)


def low_precision_here(dtype_name: str) -> Tuple[bool, str]:
    """cpu_kernels for this machine's CPU and torch build."""
    import torch
    return cpu_kernels(dtype_name, cpu_flags(), torch.backends.cpu.get_cpu_capability())


def bf16_here() -> Tuple[bool, str]:
    return low_precision_here("bfloat16")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; all of them where there is none, macOS)."""
    import os
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe() -> str:
    """One line naming the CPU, torch's kernel level and the bf16 verdict (for tables and logs)."""
    import torch
    ok, why = bf16_here()
    return (f"{cpu_model()}, {usable_cores()} "
            f"cores, torch {torch.__version__} kernels at {torch.backends.cpu.get_cpu_capability()}, "
            f"bf16 kernels: {'yes' if ok else 'no'} ({why})")
