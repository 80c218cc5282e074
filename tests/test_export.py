"""ONNX export: onnxruntime agrees with torch on random and real images at opset 13 and 18, the
graph is static (no shape arithmetic, adaptive pooling or run-time resize sizes), BN folded and
without the aux head; the checker itself catches a dynamic graph; the CLI on an mmseg 1.x file."""
import glob
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from core.blocks import fuse_for_inference
from core.mmseg_io import build_from_checkpoint, read_checkpoint
from core.onnx_export import compare_with_onnxruntime, export_onnx, lower_opset, static_graph_problems
from inference_data import fitted_model, make_dataset, save_project_checkpoint
from launch import export
from mmseg_files import mmengine_file

CROP = (64, 128)  # the synthetic images' size, so real images feed the graph unresized


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # shared machine: no spin-waiting on a busy second core
    root = make_dataset(str(tmp_path_factory.mktemp("cityscapes")), num_train=4, num_val=3)
    ckpt = save_project_checkpoint(fitted_model(root), str(tmp_path_factory.mktemp("ckpt") / "iter_1.pt"))
    model = fuse_for_inference(build_from_checkpoint(read_checkpoint(ckpt)))
    yield root, ckpt, model, tmp_path_factory.mktemp("onnx")
    torch.set_num_threads(before)


def real_images(root):
    from core.engine import to_model_input
    from data_loader.decode import read_image_bgr
    paths = sorted(glob.glob(os.path.join(root, "leftImg8bit", "*", "*", "*.png")))
    bgr = torch.from_numpy(np.stack([read_image_bgr(p) for p in paths]))
    return to_model_input(bgr, torch.device("cpu"), channels_last=False).contiguous()


@pytest.mark.parametrize("opset", [13, 18])
def test_onnxruntime_agrees_with_torch(setup, opset):
    root, _, model, out = setup
    path = str(out / f"m{opset}.onnx")
    proto = export_onnx(model, path, CROP, opset=opset, metadata={"mean_rgb": "[123.675, 116.28, 103.53]"})
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    random = compare_with_onnxruntime(model, path, torch.randn(2, 3, *CROP, generator=torch.Generator().manual_seed(0)))
    images = compare_with_onnxruntime(model, path, real_images(root))
    print(f"opset {opset}: random max|diff| {random['max_abs_diff']:.3g} agreement {random['argmax_agreement']:.5f}; "
          f"images max|diff| {images['max_abs_diff']:.3g} agreement {images['argmax_agreement']:.5f}")
    for stats in (random, images):
        assert stats["max_abs_diff"] < 1e-3 and stats["argmax_agreement"] >= 0.999

    graph = onnx.load(path)
    ops = {n.op_type for n in graph.graph.node}
    assert ops <= {"Conv", "Relu", "MaxPool", "Add", "Concat", "ReduceMean", "Expand", "Resize"}, ops
    assert static_graph_problems(graph) == []
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [dims(v) for v in graph.graph.input] == [[1, 3, *CROP]]
    assert [dims(v) for v in graph.graph.output] == [[1, 19, *CROP]]  # one output: no aux head
    assert not any("auxiliary" in t.name for t in graph.graph.initializer)
    assert {p.key for p in graph.metadata_props} == {"mean_rgb"}


def test_static_checker_catches_run_time_shapes_and_adaptive_pooling():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 16, 16])
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Mul", ["s", "two"], ["size"]),
             helper.make_node("Resize", ["x", "", "", "size"], ["r"], mode="linear"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Add", ["r", "g"], ["y"])]
    two = helper.make_tensor("two", TensorProto.INT64, [4], [1, 1, 2, 2])
    model = helper.make_model(helper.make_graph(nodes, "dyn", [x], [y], [two]),
                              opset_imports=[helper.make_opsetid("", 18)])
    problems = "\n".join(static_graph_problems(model))
    for expected in ("graph output y has a non-static shape", "Shape node", "GlobalAveragePool node",
                     "Resize node", "is computed at run time"):
        assert expected in problems
    with pytest.raises(ValueError, match="cannot lower Shape"):
        lower_opset(model, 13)


def test_cli_exports_an_mmseg_file_and_states_the_numbers(setup, capsys):
    root, _, _, out = setup
    mm = mmengine_file(str(out / "deeplabv3_mmseg1x.pth"), fitted_model(root))
    path = str(out / "cli.onnx")
    assert export.main(["--checkpoint", mm, "--crop", "64x128", "--out", path,
                        "--check-images", os.path.join(root, "leftImg8bit", "val")]) == 0
    text = capsys.readouterr().out
    assert "mmseg 1.x (mmengine)" in text and "opset 13" in text and "BN folded, no aux head" in text
    assert "on 3 images inputs" in text and "argmax agreement 100.000%" in text
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert '"road"' in meta["classes"] and meta["mean_rgb"] == "[123.675, 116.28, 103.53]"

    assert export.main(["--checkpoint", mm, "--crop", "16x16", "--out", path]) == 2
    assert "at least 32x32" in capsys.readouterr().err
