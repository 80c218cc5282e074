"""Fast data-path and evaluation kernels.

`from kernels import ops` gives the typed operations: crop-aware resize, label histogram,
photometric distortion, normalize, label lookup, confusion matrix, polygon fill, and the four
steps of BatchNorm + activation (bn_act_*, for core/norm.py). Each one runs in the C++ extension
`kernels._C` (built by `pip install -e .`) or in a pure numpy/torch reference (`kernels.reference`,
`kernels.reference_bn`) with the same signature and the same result.

The reference is selected with `kernels.use_reference(True)` or by starting the process with
the environment variable KERNELS_REFERENCE=1. Otherwise the C++ path is used, and if the
extension is not built every op raises ImportError saying how to build it: a silent fallback
would make a slow run look like a correct fast one.
"""
import os

__all__ = ["use_reference", "reference_enabled", "REFERENCE_ENV_VAR"]

REFERENCE_ENV_VAR = "KERNELS_REFERENCE"


def _env_requests_reference() -> bool:
    value = os.environ.get(REFERENCE_ENV_VAR, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{REFERENCE_ENV_VAR} must be 0 or 1 (or true/false), got {value!r}")


_use_reference = _env_requests_reference()


def use_reference(flag: bool = True) -> None:
    """Force (True) or stop forcing (False) the pure numpy/torch reference for every op."""
    if not isinstance(flag, bool):
        raise TypeError(f"use_reference: flag must be a bool, got {type(flag).__name__}")
    global _use_reference
    _use_reference = flag


def reference_enabled() -> bool:
    """True when ops dispatch to kernels.reference instead of the C++ extension."""
    return _use_reference
