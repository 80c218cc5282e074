"""mmsegmentation checkpoints in and out: read any DeepLabV3 checkpoint (this project's, mmseg 0.x,
mmseg 1.x, a bare state dict) with no code from it run, infer the model it holds, load it into
our model; and the meta our checkpoints carry so mmseg's own tools read them.

What mmseg writes (facts from the mmcv / mmengine / mmseg sources):
* 0.x, mmcv's `save_checkpoint` called by IterBasedRunner, with the meta of mmseg's
  tools/train.py: {'meta': {'env_info', 'seed', 'exp_name', 'mmseg_version', 'config' (the
  config as Python source text), 'CLASSES' (tuple), 'PALETTE' (list of [r, g, b]),
  'hook_msgs' ({'last_ckpt', 'best_score' (a numpy float), ...}), 'epoch', 'iter',
  'mmcv_version', 'time'}, 'state_dict': OrderedDict with a `_metadata` attribute,
  'optimizer': ...}; model-zoo files went through publish_model.py, which drops 'optimizer'.
* 1.x, mmengine's Runner.save_checkpoint: {'meta': {'epoch', 'iter', 'cfg' (config text),
  'seed', 'experiment_name', 'time', 'mmengine_version', 'dataset_meta': {'classes',
  'palette', ...}}, 'state_dict', 'message_hub': {'log_scalars': {name: HistoryBuffer},
  'runtime_info': {...}, 'resumed_keys': {...}}, 'optimizer', 'param_schedulers': [...]}.
mmseg's `init_model` (mmseg/apis/inference.py) reads classes and palette from
meta['dataset_meta'] (1.x) or meta['CLASSES'] / meta['PALETTE'] (0.x); `dataset_meta()` below
writes both. The config text is never executed: `parse_config_text` reads its literals with `ast`.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from core.norm import NORMS
from core.safe_pickle import safe_load

# layer3 blocks of each (block kind, depth), as in core/backbone.py's DEPTHS.
_DEPTH_BY_LAYER3 = {("basic", 2): 18, ("basic", 6): 34, ("bottleneck", 6): 50, ("bottleneck", 23): 101}
_OUTPUT_STRIDE = {((1, 2, 1, 1), (1, 1, 2, 4)): 8, ((1, 2, 2, 1), (1, 1, 1, 2)): 16}
_ASPP_PARTS = {"image_pool", "aspp_modules", "bottleneck", "conv_seg"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that holds a model this project does not build."""


@dataclass
class LoadedCheckpoint:
    path: str
    source: str                          # deeplab-trainer | mmseg 0.x (mmcv) | mmseg 1.x (mmengine) | state dict
    state_dict: Dict[str, torch.Tensor]
    meta: Dict[str, Any]
    settings: Dict[str, Any]             # build_model keywords: backbone, output_stride, num_classes, base_channels
    aux_head: bool                       # the file holds auxiliary_head.* weights
    classes: Optional[Tuple[str, ...]] = None
    palette: Optional[Tuple[Tuple[int, int, int], ...]] = None
    config: Dict[str, Any] = field(default_factory=dict)  # our TrainConfig dict, or the mmseg config's literals
    replaced: Tuple[str, ...] = ()       # classes the restricted unpickler left unloaded (e.g. mmengine's)
    notes: List[str] = field(default_factory=list)

    def class_names(self) -> Tuple[str, ...]:
        """The file's class names; Cityscapes' for a 19-class head without them (as mmseg's
        init_model falls back to a dataset of that many classes); else class_0, class_1, ..."""
        return self.classes or tuple(dataset_meta(self.settings["num_classes"])["dataset_meta"]["classes"])

    def colours(self) -> Tuple[Tuple[int, int, int], ...]:
        """The file's palette, with the same fallbacks as class_names()."""
        fallback = dataset_meta(self.settings["num_classes"])["dataset_meta"]["palette"]
        return self.palette or tuple(tuple(c) for c in fallback)

    def describe(self) -> str:
        s = self.settings
        text = (f"{self.source} checkpoint: DeepLabV3 {s['backbone']}-D{s['output_stride']}, "
                f"{s['num_classes']} classes, base width {s['base_channels']}"
                f"{', aux head' if self.aux_head else ''}")
        if self.replaced:
            text += f"; not loaded (not needed): {', '.join(self.replaced)}"
        return text


def read_checkpoint(path: str) -> LoadedCheckpoint:
    """Read and identify a DeepLabV3 checkpoint; raises CheckpointError naming the file otherwise."""
    try:
        loaded = safe_load(path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    obj = loaded.obj
    meta = obj.get("meta") if isinstance(obj, Mapping) and isinstance(obj.get("meta"), Mapping) else {}
    sd = _unwrap_state_dict(obj, path)
    source = _source(obj, meta)
    notes: List[str] = []
    if source == "deeplab-trainer":
        config = dict(meta.get("config") or {})
    else:
        text = meta.get("cfg") or meta.get("config")
        config = parse_config_text(text) if isinstance(text, str) else {}
    settings, aux = infer_settings(sd, config, path, notes)
    classes, palette = _classes_and_palette(meta, settings["num_classes"], notes)
    return LoadedCheckpoint(path=path, source=source, state_dict=sd, meta=dict(meta), settings=settings,
                            aux_head=aux, classes=classes, palette=palette, config=config,
                            replaced=loaded.replaced, notes=notes)


def build_from_checkpoint(ckpt: LoadedCheckpoint, aux_head: bool = False) -> nn.Module:
    """Our DeepLabV3 with the checkpoint's architecture and every weight from it (strict).

    aux_head=False (inference, export, evaluation) drops the auxiliary head and its weights.
    """
    from core.model import build_model
    from core.pretrained import load_strict
    if aux_head and not ckpt.aux_head:
        raise CheckpointError(f"checkpoint {ckpt.path!r} has no auxiliary_head weights")
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG stream
        model = build_model(**ckpt.settings, aux_head=aux_head)
    sd = {k: v for k, v in ckpt.state_dict.items() if aux_head or not k.startswith("auxiliary_head.")}
    load_strict(model, sd, ckpt.path, what="model")
    return model


def load_model_weights(model: nn.Module, path: str) -> List[str]:
    """mmseg's `load_from`: put a whole-model checkpoint (any format above) into a training model.

    Backbone and decode head must match exactly (a clear error lists what differs); an auxiliary
    head missing from the file keeps its fresh initialisation, one the model lacks is skipped.
    Returns what was done, one line per fact, for the log.
    """
    from core.pretrained import load_strict
    ckpt = read_checkpoint(path)
    own = model.state_dict()
    sd = dict(ckpt.state_dict)
    lines = [f"load-from {path}: {ckpt.describe()}"]
    model_aux = any(k.startswith("auxiliary_head.") for k in own)
    if model_aux and not ckpt.aux_head:
        sd.update({k: v for k, v in own.items() if k.startswith("auxiliary_head.")})
        lines.append("  auxiliary_head is not in the file: it keeps its random initialisation")
    elif ckpt.aux_head and not model_aux:
        sd = {k: v for k, v in sd.items() if not k.startswith("auxiliary_head.")}
        lines.append("  the file's auxiliary_head is not used (the model has none)")
    try:
        load_strict(model, sd, path, what="model")
    except ValueError as exc:
        hint = _settings_hint(ckpt)
        raise CheckpointError(f"{exc}\n  {hint}" if hint else str(exc)) from exc
    return lines


def dataset_meta(num_classes: int = 19) -> Dict[str, Any]:
    """Entries for a checkpoint's `meta` that mmseg 1.x (`dataset_meta`) and 0.x (`CLASSES`,
    `PALETTE`) read for class names and colours. Plain tuples/lists: weights_only-loadable."""
    from data_loader.cityscapes import CLASSES, PALETTE
    if num_classes == len(CLASSES):
        classes, palette = tuple(CLASSES), [list(c) for c in PALETTE]
    else:
        classes = tuple(f"class_{i}" for i in range(num_classes))
        palette = [list(c) for c in default_palette(num_classes)]
    return {"dataset_meta": {"classes": classes, "palette": palette}, "CLASSES": classes, "PALETTE": palette}


def default_palette(n: int) -> Tuple[Tuple[int, int, int], ...]:
    """Distinct colours for n classes without a stored palette (the Pascal VOC bit pattern)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i + 1
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return tuple(out)


# ---- what is in the file ---------------------------------------------------------------------------

def _unwrap_state_dict(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    sd = obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), Mapping):
                sd = obj[key]
                break
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"checkpoint {path!r} holds no state dict (top-level {type(obj).__name__})")
    bad = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path!r}: state dict entries that are not tensors: {', '.join(bad[:5])}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _source(obj: Any, meta: Mapping) -> str:
    if isinstance(meta.get("config"), Mapping):  # mmseg keeps its config as text, never as a mapping
        return "deeplab-trainer"
    if "mmengine_version" in meta or "message_hub" in obj or "dataset_meta" in meta or "cfg" in meta:
        return "mmseg 1.x (mmengine)"
    if any(k in meta for k in ("mmcv_version", "mmseg_version", "CLASSES", "config")):
        return "mmseg 0.x (mmcv)"
    return "state dict"


def infer_settings(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], path: str,
                   notes: Optional[List[str]] = None) -> Tuple[Dict[str, Any], bool]:
    """build_model keywords of the DeepLabV3 in `sd` (+ output stride from the config), and
    whether it has an auxiliary head. Anything else is a CheckpointError saying what it is."""
    notes = notes if notes is not None else []
    heads = {k.split(".")[1] for k in sd if k.startswith("decode_head.") and k.count(".") >= 2}
    if not heads:
        kind = "an ImageNet backbone (give it to --pretrained)" if any(
            k.startswith(("layer1.", "backbone.layer1.")) for k in sd) else "no decode_head weights"
        raise CheckpointError(f"checkpoint {path!r} is not a DeepLabV3 segmentation model: {kind}")
    if heads != _ASPP_PARTS:
        raise CheckpointError(
            f"checkpoint {path!r} is not DeepLabV3: its decode head has {', '.join(sorted(heads))}; this project "
            f"builds DeepLabV3's ASPPHead ({', '.join(sorted(_ASPP_PARTS))}) on a ResNet")
    if "backbone.stem.0.weight" in sd:
        style = ""
    elif "backbone.conv1.weight" in sd:
        style = "-v1b"
    else:
        raise CheckpointError(f"checkpoint {path!r}: backbone is not a ResNet (no backbone.stem.* or backbone.conv1.*)")
    kind = "bottleneck" if "backbone.layer1.0.conv3.weight" in sd else "basic"
    layer3 = {int(m.group(1)) for k in sd for m in [re.match(r"backbone\.layer3\.(\d+)\.", k)] if m}
    depth = _DEPTH_BY_LAYER3.get((kind, len(layer3)))
    if depth is None or "backbone.layer4.0.conv1.weight" not in sd:
        raise CheckpointError(f"checkpoint {path!r}: a ResNet with {len(layer3)} {kind} blocks in layer3 is not "
                              f"R18/R34/R50/R101")
    settings = {"backbone": f"r{depth}{style}", "num_classes": int(sd["decode_head.conv_seg.weight"].shape[0]),
                "base_channels": int(sd["backbone.layer1.0.conv1.weight"].shape[0]),
                "output_stride": _output_stride(config, path, notes)}
    if config.get("norm") in NORMS and config.get("norm") != "bn":
        # The weights cannot tell the norms apart (same keys); ours store it, mmseg's are plain BN.
        settings["norm"] = config["norm"]
    return settings, any(k.startswith("auxiliary_head.") for k in sd)


def _output_stride(config: Mapping[str, Any], path: str, notes: List[str]) -> int:
    if isinstance(config.get("output_stride"), int):  # ours
        return config["output_stride"]
    backbone = (config.get("model") or {}).get("backbone") if isinstance(config.get("model"), Mapping) else None
    if isinstance(backbone, Mapping) and backbone.get("strides") is not None and backbone.get("dilations") is not None:
        key = (tuple(backbone["strides"]), tuple(backbone["dilations"]))
        if key not in _OUTPUT_STRIDE:
            raise CheckpointError(f"checkpoint {path!r}: backbone strides {key[0]} / dilations {key[1]} are neither "
                                  f"D8 (1,2,1,1)/(1,1,2,4) nor D16 (1,2,2,1)/(1,1,1,2)")
        return _OUTPUT_STRIDE[key]
    notes.append("output stride not stated in the file: using 8 (mmseg's DeepLabV3 R*-D8 configs)")
    return 8


def _classes_and_palette(meta: Mapping, num_classes: int, notes: List[str]):
    dm = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), Mapping) else {}
    classes = dm.get("classes", meta.get("CLASSES"))
    palette = dm.get("palette", meta.get("PALETTE"))
    try:
        classes = tuple(str(c) for c in classes) if classes is not None else None
        palette = tuple(tuple(int(v) for v in c) for c in palette) if palette is not None else None
    except (TypeError, ValueError):
        classes = palette = None
    if classes is not None and len(classes) != num_classes:
        notes.append(f"the file names {len(classes)} classes for a {num_classes}-class head: names ignored")
        classes = None
    if palette is not None and (len(palette) != num_classes or any(len(c) != 3 for c in palette)):
        notes.append("the file's palette does not fit the head: palette ignored")
        palette = None
    return classes, palette


def _settings_hint(ckpt: LoadedCheckpoint) -> str:
    s = ckpt.settings
    return (f"the file holds DeepLabV3 {s['backbone']}-D{s['output_stride']} with {s['num_classes']} classes and "
            f"base width {s['base_channels']}: use --backbone {s['backbone']} --num-classes {s['num_classes']} "
            f"--base-channels {s['base_channels']}")


# ---- config text, read without running it -----------------------------------------------------------

def parse_config_text(text: str) -> Dict[str, Any]:
    """The top-level `name = value` assignments of an mmcv/mmengine config dump (`pretty_text`),
    with only literals evaluated: constants, tuples/lists/dicts, `dict(key=...)` calls and names
    assigned earlier. Anything else (function calls, expressions, imports) becomes None."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return {}
    out: Dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = _literal(node.value, out)
    return out


def _literal(node: ast.AST, scope: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_literal(e, scope) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        return {_literal(k, scope): _literal(v, scope) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value, scope) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        value = node.operand.value
        return -value if isinstance(value, (int, float)) else None
    if isinstance(node, ast.Name):
        return {"True": True, "False": False, "None": None}.get(node.id, scope.get(node.id))
    return None


__all__ = ["CheckpointError", "LoadedCheckpoint", "build_from_checkpoint", "dataset_meta", "default_palette",
           "infer_settings", "load_model_weights", "parse_config_text", "read_checkpoint"]
