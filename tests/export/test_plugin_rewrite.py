"""ONNX rewrite of the exported cost-volume subgraph into one gsnet::fused_cost_volume node."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch

from gsnet_deploy.export.plugin_rewrite import PLUGIN_DOMAIN, PLUGIN_OP, replace_cost_volume_with_plugin
from gsnet_deploy.kernels import fused_cost_volume


class CostVolumeThenConv(torch.nn.Module):
    """The QGFF front end inside a larger graph: a conv before the features and one after."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = torch.nn.Conv2d(512, 512, 1)
        self.conv_clip = torch.nn.Conv2d(1, 128, 7, padding=3)
        self.conv_dino = torch.nn.Conv2d(1, 128, 7, padding=3)
        self.fuse = torch.nn.Conv2d(256, 8, 3, padding=1)

    def forward(self, e_clip: torch.Tensor, e_dino: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        e_dino = self.pre(e_dino)
        x = fused_cost_volume(
            e_clip, e_dino, text, self.conv_clip.weight, self.conv_clip.bias, self.conv_dino.weight, self.conv_dino.bias
        )
        return self.fuse(x)


def export(module: torch.nn.Module, path) -> onnx.ModelProto:
    args = (torch.randn(2, 512, 6, 6), torch.randn(2, 512, 6, 6), torch.randn(3, 512))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            opset_version=17,
            dynamo=False,
            input_names=["e_clip", "e_dino", "text"],
            output_names=["out"],
            dynamic_axes={"e_clip": {0: "B"}, "e_dino": {0: "B"}, "text": {0: "N"}, "out": {0: "BN"}},
        )
    return onnx.load(str(path))


def node_key(node: onnx.NodeProto) -> tuple:
    return (node.op_type, node.domain, tuple(node.input), tuple(node.output), node.SerializeToString(deterministic=True))


def test_plugin_rewrite_replaces_region(tmp_path) -> None:
    model = export(CostVolumeThenConv(), tmp_path / "m.onnx")
    fuse = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[1] == "fuse.weight")
    region_out = fuse.input[0]
    pre = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[1] == "pre.weight")

    new, replaced = replace_cost_volume_with_plugin(model)

    assert replaced
    plugins = [n for n in new.graph.node if n.domain == PLUGIN_DOMAIN]
    assert len(plugins) == 1
    plugin = plugins[0]
    assert plugin.op_type == PLUGIN_OP
    assert list(plugin.input) == ["e_clip", pre.output[0], "text", "conv_clip.weight", "conv_clip.bias",
                                  "conv_dino.weight", "conv_dino.bias"]  # fmt: skip
    assert plugin.output[0] == region_out
    # the cost-volume ops are gone; only the plugin, `pre` and `fuse` remain
    ops = sorted(n.op_type for n in new.graph.node)
    assert ops == ["Conv", "Conv", PLUGIN_OP]
    kept = {node_key(n) for n in new.graph.node if n.domain != PLUGIN_DOMAIN}
    assert kept == {node_key(pre), node_key(fuse)}
    # initializers: the same tensors, untouched
    old_init = {t.name: t.SerializeToString() for t in model.graph.initializer}
    new_init = {t.name: t.SerializeToString() for t in new.graph.initializer}
    assert new_init == old_init
    assert [i.name for i in new.graph.input] == ["e_clip", "e_dino", "text"]
    assert [o.name for o in new.graph.output] == ["out"]
    assert any(op.domain == PLUGIN_DOMAIN for op in new.opset_import)
    onnx.checker.check_model(new)
    # the input model was not modified
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == 2


class NoCostVolume(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = torch.nn.Conv2d(1, 128, 7, padding=3)
        self.conv_b = torch.nn.Conv2d(1, 128, 7, padding=3)

    def forward(self, e_clip: torch.Tensor, e_dino: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # same Conv/Sigmoid/Concat tail, but no normalized matmul in front of it
        x = e_clip[:, :1] + e_dino[:, :1] + text.sum()
        return torch.cat([torch.sigmoid(self.conv_a(x)), torch.sigmoid(self.conv_b(x))], dim=1)


def test_plugin_rewrite_leaves_other_graphs_alone(tmp_path) -> None:
    model = export(NoCostVolume(), tmp_path / "n.onnx")
    new, replaced = replace_cost_volume_with_plugin(model)
    assert not replaced
    assert new is model
    assert new.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("pads", [2, 3])
def test_plugin_rewrite_requires_padding_three(tmp_path, pads: int) -> None:
    module = CostVolumeThenConv()
    model = export(module, tmp_path / "p.onnx")
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] == "conv_dino.weight":
            for attr in node.attribute:
                if attr.name == "pads":
                    attr.ints[:] = [pads] * 4
    _, replaced = replace_cost_volume_with_plugin(model)
    assert replaced == (pads == 3)
