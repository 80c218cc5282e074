"""ONNX export for static-shape compilers (TensorRT's trtexec, Ascend's ATC), and its checks.

Exporter: torch's default `torch.export`-based exporter (`dynamo=True`, needs onnxscript). It
emits opset 18 with every shape constant-folded: Resize gets constant `sizes`, the ASPP image
pool is a ReduceMean over constant axes plus an Expand to a constant shape, and there is no
Shape/Gather arithmetic (the older TorchScript exporter computes Resize sizes at run time from
Shape nodes, which static compilers reject or must fold themselves).

Opset: DEFAULT_OPSET = 13, the version TensorRT 8.x and Ascend's ATC have supported longest.
onnx's own version converter cannot lower this graph (no opset-14 -> 13 adapter for Relu,
and it rejects ReduceMean-18), so `lower_opset` rewrites the two ops whose signature changed
between 13 and 18 (ReduceMean: axes input -> attribute; Resize: drop the opset-18 attributes,
which must hold their defaults) and refuses any op it does not know to be unchanged. The result
is validated by onnx.checker against the target opset's schemas, and the tests compare
onnxruntime's outputs with torch's at opsets 13 and 18.
"""
from __future__ import annotations

import json
import logging
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

DEFAULT_OPSET = 13
EXPORTER_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Ops whose semantics did not change between opset 13 and 18 (only types were added).
_UNCHANGED_13_TO_18 = {"Conv", "Relu", "MaxPool", "Add", "Sub", "Mul", "Div", "Concat", "Expand", "Constant",
                       "Identity", "Reshape", "Transpose", "Sigmoid", "Clip", "Cast"}
_REDUCE_AXES_INPUT_SINCE_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                               "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
# Never in a graph for static compilers: shape arithmetic, data-dependent shapes, control flow,
# and the forms adaptive pooling takes in ONNX.
_BANNED = {"Shape", "Size", "NonZero", "Loop", "If", "Scan", "Range", "Unique", "GlobalAveragePool",
           "GlobalMaxPool", "GlobalLpPool", "BatchNormalization", "Dropout"}
# Inputs that give a shape: they must be constants for the graph to be static.
_SHAPE_INPUTS = {"Resize": (1, 2, 3), "Upsample": (1,), "Expand": (1,), "Reshape": (1,), "Tile": (1,),
                 "Slice": (1, 2, 3, 4), "ConstantOfShape": (0,), "Pad": (1, 2, 3)}


class LogitsOnly(nn.Module):
    """The model with one tensor output (the decode head's logits at input size)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def export_onnx(model: nn.Module, path: str, crop: Tuple[int, int], batch: int = 1, opset: int = DEFAULT_OPSET,
                metadata: Optional[Dict[str, str]] = None):
    """Write `model` (an eval-mode, BN-folded fp32 DeepLabV3 without aux head) as a static
    [batch, 3, H, W] -> [batch, K, H, W] ONNX graph. Returns the onnx ModelProto written."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter's dependency: fail here with a clear message)
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the 'export' extra: pip install -e '.[export]' ({exc})") from exc
    if not 13 <= opset <= EXPORTER_OPSET:
        raise ValueError(f"opset must be between 13 and {EXPORTER_OPSET}, got {opset}")
    h, w = crop
    if h < 32 or w < 32 or batch < 1:
        raise ValueError(f"crop must be at least 32x32 and batch >= 1, got crop {h}x{w}, batch {batch}")
    if getattr(model, "auxiliary_head", None) is not None:
        raise ValueError("export a model without the auxiliary head (build it with aux_head=False)")
    model = model.float().eval().to(memory_format=torch.contiguous_format)
    example = torch.zeros(batch, 3, h, w)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporter logs every optional op library it does not find
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(LogitsOnly(model), (example,), dynamo=True, opset_version=EXPORTER_OPSET,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        external_data=False, optimize=True, verbose=False)
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    if opset < EXPORTER_OPSET:
        lower_opset(proto, opset)
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    problems = static_graph_problems(proto)
    if problems:
        raise RuntimeError("the exported graph is not static:\n  " + "\n  ".join(problems))
    onnx.save(proto, path)
    return proto


def lower_opset(proto, target: int) -> None:
    """Rewrite an opset-18 graph in place to `target` (13..17); see the module doc."""
    from onnx import helper, numpy_helper
    graph = proto.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise ValueError(f"cannot lower node {node.name} of domain {node.domain!r}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in _REDUCE_AXES_INPUT_SINCE_18:
            if attrs.get("noop_with_empty_axes", 0):
                raise ValueError(f"{node.name}: noop_with_empty_axes=1 has no opset-{target} form")
            if len(node.input) > 1 and node.input[1]:
                if node.input[1] not in consts:
                    raise ValueError(f"{node.name}: axes are not a constant")
                axes = [int(a) for a in np.asarray(consts[node.input[1]]).reshape(-1)]
                del node.input[1:]
                node.attribute.append(helper.make_attribute("axes", axes))
            _drop_attributes(node, {"noop_with_empty_axes"})
        elif node.op_type == "Resize":
            policy = attrs.get("keep_aspect_ratio_policy", b"stretch")
            if attrs.get("antialias", 0) or policy not in (b"stretch", "stretch") or "axes" in attrs:
                raise ValueError(f"{node.name}: Resize uses opset-18 features "
                                 f"(antialias / keep_aspect_ratio_policy / axes)")
            _drop_attributes(node, {"antialias", "keep_aspect_ratio_policy"})
        elif node.op_type not in _UNCHANGED_13_TO_18:
            raise ValueError(f"cannot lower {node.op_type} ({node.name}) from opset {EXPORTER_OPSET} to {target}")
    used = {name for node in graph.node for name in node.input}
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)  # the axes moved into attributes
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = target


def _drop_attributes(node, names) -> None:
    for attr in [a for a in node.attribute if a.name in names]:
        node.attribute.remove(attr)


def static_graph_problems(proto) -> List[str]:
    """What a static-shape compiler would reject: non-static input/output/intermediate shapes,
    shape arithmetic or control-flow ops, adaptive/global pooling, shape inputs that are not
    constants, and BatchNormalization/Dropout left in an inference graph."""
    import onnx
    graph = proto.graph
    problems = []
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            dims = v.type.tensor_type.shape.dim
            if not dims or any(not d.HasField("dim_value") or d.dim_value < 1 for d in dims):
                problems.append(f"graph {kind} {v.name} has a non-static shape")
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        if node.op_type in _BANNED or "Adaptive" in node.op_type:
            problems.append(f"{node.op_type} node {node.name}")
        for i in _SHAPE_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] and node.input[i] not in constants:
                problems.append(f"{node.op_type} node {node.name}: input {i} ({node.input[i]}) is computed at run time")
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    for v in inferred.graph.value_info:
        dims = v.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            problems.append(f"intermediate {v.name} has a non-static shape")
    return problems


def op_counts(proto) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def compare_with_onnxruntime(model: nn.Module, path: str, inputs: torch.Tensor) -> Dict[str, float]:
    """Run `inputs` [N,3,H,W] (one at a time if the graph's batch is 1) through torch and
    onnxruntime: max |logit difference| and the share of pixels whose argmax agrees."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("checking the export needs onnxruntime: pip install -e '.[export]'") from exc
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    batch = session.get_inputs()[0].shape[0]
    max_abs, agree, total = 0.0, 0, 0
    model = model.float().eval()
    for i in range(0, inputs.shape[0], batch):
        x = inputs[i:i + batch]
        if x.shape[0] != batch:  # pad the last chunk to the graph's static batch
            x = torch.cat([x, x[-1:].expand(batch - x.shape[0], -1, -1, -1)])
        with torch.no_grad():
            ref = model(x)["out"].float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.contiguous().numpy()})[0]
        n = min(batch, inputs.shape[0] - i)
        max_abs = max(max_abs, float(np.abs(got[:n] - ref[:n]).max()))
        agree += int((got[:n].argmax(1) == ref[:n].argmax(1)).sum())
        total += got[:n].argmax(1).size
    return {"max_abs_diff": max_abs, "argmax_agreement": agree / total, "pixels": total}


def export_metadata(mean: Sequence[float], std: Sequence[float], classes: Optional[Sequence[str]],
                    palette: Optional[Sequence[Sequence[int]]], crop: Tuple[int, int]) -> Dict[str, str]:
    """ONNX metadata_props saying how to feed the graph and read its output."""
    meta = {"input": f"{INPUT_NAME}: float32 [B,3,{crop[0]},{crop[1]}] RGB, (pixel - mean) / std",
            "output": f"{OUTPUT_NAME}: float32 [B,K,{crop[0]},{crop[1]}] class scores; argmax over K = trainId",
            "mean_rgb": json.dumps(list(mean)), "std_rgb": json.dumps(list(std))}
    if classes is not None:
        meta["classes"] = json.dumps(list(classes))
    if palette is not None:
        meta["palette"] = json.dumps([list(c) for c in palette])
    return meta
