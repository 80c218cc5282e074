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


def cpu_bf16(flags: Set[str], capability: str) -> Tuple[bool, str]:
    """Whether bf16 training can be fast on this CPU, and why (not). bf16 needs hardware dot
    products: avx512_bf16 or amx_bf16 on x86 (bf16 on arm64); without them oneDNN emulates it
    (DESIGN.md: 14x slower than fp32 on a Zen 3). On x86 torch's own kernels must also run at
    AVX512 (torch.backends.cpu.get_cpu_capability(); ATEN_CPU_CAPABILITY can lower it), else its
    element-wise bf16 ops take the slower AVX2 path."""
    if "asimd" in flags:  # arm64 ('Features'); x86 has no such flag
        if "bf16" in flags:
            return True, "arm64 with the bf16 feature"
        return False, "this arm64 CPU lacks the bf16 feature: bf16 matmul/conv would be emulated"
    hw = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if not hw:
        return False, ("the CPU flags have neither avx512_bf16 nor amx_bf16: bf16 matmul/conv would be "
                       "emulated, far slower than fp32")
    if not capability.upper().startswith(("AVX512", "AMX")):
        return False, (f"the CPU has {', '.join(hw)} but torch runs its kernels at {capability} "
                       "(check ATEN_CPU_CAPABILITY): bf16 element-wise ops would take the slow path")
    return True, f"{', '.join(hw)} with torch kernels at {capability}"


def cpu_fp16(flags: Set[str], capability: str) -> Tuple[bool, str]:
    """Whether fp16 training can be fast on this CPU: it needs avx512_fp16 or amx_fp16 (x86) or
    fp16 arithmetic (arm64 'fphp'/'asimdhp'); elsewhere torch converts every op (measured about
    27x slower per step than fp32 on an AVX2 machine)."""
    if "asimd" in flags:
        if {"fphp", "asimdhp"} <= flags:
            return True, "arm64 with fp16 arithmetic"
        return False, "this arm64 CPU lacks fp16 arithmetic"
    hw = sorted(flags & {"avx512_fp16", "amx_fp16"})
    if not hw:
        return False, "the CPU flags have neither avx512_fp16 nor amx_fp16: fp16 ops would be converted one by one"
    if not capability.upper().startswith(("AVX512", "AMX")):
        return False, f"the CPU has {', '.join(hw)} but torch runs its kernels at {capability}"
    return True, f"{', '.join(hw)} with torch kernels at {capability}"


def low_precision_here(dtype_name: str) -> Tuple[bool, str]:
    """cpu_bf16 / cpu_fp16 ('bfloat16' / 'float16') for this machine's CPU and torch build."""
    import torch
    check = cpu_bf16 if dtype_name == "bfloat16" else cpu_fp16
    return check(cpu_flags(), torch.backends.cpu.get_cpu_capability())


def bf16_here() -> Tuple[bool, str]:
    """cpu_bf16 for this machine's CPU and torch build."""
    import torch
    return cpu_bf16(cpu_flags(), torch.backends.cpu.get_cpu_capability())


def describe() -> str:
    """One line naming the CPU, torch's kernel level and the bf16 verdict (for tables and logs)."""
    import os

    import torch
    ok, why = bf16_here()
    return (f"{cpu_model()}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} "
            f"cores, torch {torch.__version__} kernels at {torch.backends.cpu.get_cpu_capability()}, "
            f"bf16 kernels: {'yes' if ok else 'no'} ({why})")
