"""Loading torch checkpoint files that hold classes of other libraries, without running any code.

`torch.load(weights_only=True)` refuses any file holding an object of a class it does not know,
which is every mmsegmentation 1.x checkpoint (mmengine's `HistoryBuffer` objects in
`message_hub`) and 0.x checkpoints with numpy scalars in `meta` (EvalHook's `best_score`).
`safe_load` tries `weights_only=True` first and, when that refuses the file, unpickles it with
a restricted unpickler through torch.load's own `pickle_module` hook (so torch's zip and legacy
(pre-1.6) formats, and its storage handling, stay torch's):

* `find_class` is the only way a pickle obtains a callable or a class (GLOBAL, STACK_GLOBAL,
  INST all go through it; REDUCE/NEWOBJ/OBJ only call what came from it). Ours never imports
  anything: it returns an object from a fixed allow-list (tensor rebuilders, OrderedDict, numpy
  array/scalar/dtype rebuilders, torch dtypes, plain builtin types), each wrapped where its
  arguments could smuggle something in, and for every other name a fresh inert `Unresolved`
  subclass that only records what the pickle passes to it.
* The EXT1/2/4 opcodes look names up in copyreg's extension registry, which is empty unless a
  program registers extensions (nothing here does), so they cannot produce a callable either.

What was replaced is reported (`SafeLoadResult.replaced`), so callers can say what they skipped.
"""
from __future__ import annotations

import collections
import os
import pickle
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Set, Tuple

import torch


class Unresolved:
    """Inert stand-in for an object whose class is outside the allow-list.

    Holds what the pickle gave it (constructor arguments, state, items) and nothing runs:
    it defines no behaviour beyond storing those values.
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_data", {"args": args, "kwargs": kwargs, "state": None, "items": {}, "list": []})
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):  # pickle BUILD
        self._data["state"] = state

    def __setitem__(self, key, value):  # pickle SETITEM(S) on a dict subclass
        self._data["items"][key] = value

    def append(self, value):  # pickle APPEND(S) on a list subclass
        self._data["list"].append(value)

    def extend(self, values):
        self._data["list"].extend(values)

    def add(self, value):  # pickle ADDITEMS on a set subclass
        self._data["list"].append(value)

    @property
    def state(self):
        return self._data["state"]

    def __repr__(self) -> str:
        return f"<not loaded: {self.qualname}>"


@dataclass
class SafeLoadResult:
    obj: Any
    restricted: bool           # True when weights_only refused the file and the restricted unpickler read it
    replaced: Tuple[str, ...]  # fully qualified names that became Unresolved placeholders


def safe_load(path: str) -> SafeLoadResult:
    """The object in a torch checkpoint file, with no code from the file run (see module doc)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return SafeLoadResult(torch.load(path, map_location="cpu", weights_only=True), False, ())
    except pickle.UnpicklingError:
        pass  # a class weights_only does not know: read it again with the restricted unpickler
    except Exception as exc:  # corrupt or foreign files raise many different errors
        raise ValueError(unreadable(path, exc)) from exc
    replaced: Set[str] = set()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_module(replaced))
    except Exception as exc:
        with open(path, "rb") as fh:
            head = fh.read(2)
        if not head.startswith(b"PK") and head[:1] != b"\x80":  # neither torch's zip nor a pickle
            raise ValueError(unreadable(path, exc)) from exc
        raise ValueError(f"cannot read checkpoint {path!r} with the restricted unpickler: "
                         f"{type(exc).__name__}: {exc}") from exc
    return SafeLoadResult(obj, True, tuple(sorted(replaced)))


def unreadable(path: str, exc: BaseException) -> str:
    """Why torch.load failed on `path`, in the user's terms: empty, truncated, or not a checkpoint."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if size == 0:
        what = "is empty (0 bytes): a copy or a save that never finished?"
    elif head.startswith(b"PK"):
        what = (f"is a damaged or truncated torch.save archive ({size} bytes): a copy or a save that did not "
                "finish? (checkpoints written by this trainer are renamed into place only once complete)")
    elif head[:1] == b"\x80":
        what = f"is a truncated or damaged pickle ({size} bytes)"
    else:
        what = f"is not a torch checkpoint ({size} bytes; expected a file written by torch.save)"
    return f"cannot read checkpoint {path!r}: it {what} [{type(exc).__name__}: {exc}]"


# ---- the allow-list --------------------------------------------------------------------------------

def _restricted_module(replaced: Set[str]) -> types.ModuleType:
    allowed = _allowed_globals()
    placeholders: Dict[Tuple[str, str], type] = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            module = _PY2_MODULES.get(module, module)  # protocol 2 writes builtins as __builtin__
            found = allowed.get((module, name))
            if found is not None:
                return found
            qualname = f"{module}.{name}"
            replaced.add(qualname)
            if (module, name) not in placeholders:
                placeholders[(module, name)] = type(str(name).split(".")[-1] or "Unresolved", (Unresolved,),
                                                    {"qualname": qualname, "__module__": __name__})
            return placeholders[(module, name)]

    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    # torch.load only uses `Unpickler`, `load` and `__name__` of the pickle module it is given.
    module = types.ModuleType("deeplab_restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = load
    return module


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_ALLOWED_CACHE: Dict[Tuple[str, str], Any] = {}


def _reject(what: str):
    raise pickle.UnpicklingError(f"refused to rebuild {what} from a checkpoint")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    # Backward hooks would be callables chosen by the file: dropped.
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           collections.OrderedDict(), metadata)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks=None, state=None):
    # Also stands in for _rebuild_parameter_with_state: Python attributes set on a saved
    # Parameter are not needed to read its values.
    if not isinstance(data, torch.Tensor):
        _reject(f"a Parameter from {type(data).__name__}")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


_TENSOR_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensor subclasses: only plain Tensor/Parameter, through one of the rebuilders above.
    if func not in _TENSOR_REBUILDERS or new_type not in (torch.Tensor, torch.nn.Parameter):
        _reject(f"a tensor of type {getattr(new_type, 'qualname', new_type)!r}")
    out = func(*args)
    if new_type is torch.nn.Parameter and not isinstance(out, torch.nn.Parameter):
        out = torch.nn.Parameter(out)
    return out


def _codecs_encode(text, encoding="utf-8"):
    # How protocol 2 stores bytes: _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        _reject("bytes with an unexpected codec")
    return text.encode("latin1")


def _device(spec, index=None):
    if not isinstance(spec, str) or (index is not None and not isinstance(index, int)):
        _reject("a torch.device")
    return torch.device(spec) if index is None else torch.device(spec, index)


def _defaultdict(factory=None, *args):
    if factory is not None and factory not in _SAFE_BUILTIN_TYPES:
        factory = None  # a default_factory is code chosen by the file: the dict keeps its items only
    return collections.defaultdict(factory, *args)


# Builtin types a pickle may call by name (sets and frozensets are REDUCE(set, [items]) under
# protocol 2). bytes/bytearray are left out: bytes(10**12) would be a memory bomb, and protocol 2
# stores bytes through _codecs.encode anyway.
_SAFE_BUILTIN_TYPES = (set, frozenset, list, dict, tuple, int, float, complex, str, bool, slice)


def _numpy_globals() -> Dict[Tuple[str, str], Callable]:
    import numpy as np
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray

    def reconstruct(subtype, shape, dtype):
        if subtype is not np.ndarray:
            _reject(f"a numpy array subclass {getattr(subtype, 'qualname', subtype)!r}")
        return multiarray._reconstruct(np.ndarray, shape, dtype)

    def scalar(dtype, data=None):
        if not isinstance(dtype, np.dtype):
            _reject("a numpy scalar without a dtype")
        return multiarray.scalar(dtype) if data is None else multiarray.scalar(dtype, data)

    def dtype(spec, align=False, copy=False):
        # Only a type string: np.dtype(obj) would read attributes of arbitrary objects.
        if not isinstance(spec, str):
            _reject("a numpy dtype from a non-string")
        return np.dtype(spec, align=bool(align), copy=bool(copy))

    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # written by numpy 1.x / 2.x
        out[(mod, "_reconstruct")] = reconstruct
        out[(mod, "scalar")] = scalar
    return out


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    if _ALLOWED_CACHE:
        return _ALLOWED_CACHE
    allowed: Dict[Tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): _defaultdict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): _device,
        ("_codecs", "encode"): _codecs_encode,
    }
    for t in _SAFE_BUILTIN_TYPES:
        allowed[("builtins", t.__name__)] = t
    for name in dir(torch):  # dtypes pickle by name: GLOBAL torch float16
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    try:
        allowed.update(_numpy_globals())
    except ImportError:  # numpy is a dependency of the project, but keep torch-only files readable
        pass
    _ALLOWED_CACHE.update(allowed)
    return _ALLOWED_CACHE
