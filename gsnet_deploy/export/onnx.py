"""Export GSNet's two graphs to ONNX: ``text_encoder.onnx``, ``image_graph.onnx`` and ``manifest.json``.

The text graph maps tokens ``int64 [N, 77]`` to L2-normalized ``text_embeds [N, 512]``; the image
graph maps raw RGB views ``[B, 3, 384, 384]`` and ``text_embeds [N, 512]`` to ``logits [B, N, 96, 96]``
(design.md section 2). Names and dynamic axes come from ``gsnet_deploy.contracts.io_names``.

Each graph goes through the same pipeline: ``torch.onnx.export`` (the TorchScript exporter,
``dynamo=False``, which honours ``dynamic_axes`` predictably) -> a small rewrite for shape
inference -> onnxslim -> output shapes pinned from symbolic inference -> the manifest in
``metadata_props`` -> the checks of ``graph_checks``. The folder is written atomically: both graphs
and ``manifest.json`` are one ``contracts.atomic.AtomicFiles`` set, renamed in together or not at all.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.atomic import PART_MARK, AtomicFiles
from gsnet_deploy.contracts.onnx_manifest import (
    IMAGE_ROLE,
    PAPER_ENCODER_ROLE,
    PAPER_HEAD_ROLE,
    PAPER_PROTOCOL,
    TEXT_ROLE,
    OnnxManifest,
)
from gsnet_deploy.errors import ExportError
from gsnet_deploy.export.graph_checks import MIN_OPSET, GraphReport, check_graph
from gsnet_deploy.export.onnx_save import save_onnx_atomic
from gsnet_deploy.export.protocol_onnx import PaperEncoderGraph, PaperHeadGraph, paper_example_inputs, paper_head_symbols
from gsnet_deploy.export.tile_onnx import export_tile_graphs
from gsnet_deploy.model.gsnet import GSNet

# Example sizes traced by the exporter: neither is 1, so no axis gets specialized to a broadcast.
_EXAMPLE_VIEWS = 2
_EXAMPLE_CLASSES = 3


class TextGraph(nn.Module):
    """The text graph as a module: ``tokens [N, 77] int64 -> text_embeds [N, 512]``."""

    def __init__(self, model: GSNet) -> None:
        """Wrap ``model`` (its weights are shared, not copied)."""
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalized text embeddings of BPE tokens."""
        return self.model.encode_text(tokens)


class ImageGraph(nn.Module):
    """The image graph as a module: ``images [B, 3, 384, 384], text_embeds [N, 512] -> logits [B, N, 96, 96]``."""

    def __init__(self, model: GSNet) -> None:
        """Wrap ``model`` (its weights are shared, not copied)."""
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Per-class logits of raw RGB views (0..255; normalization is inside the graph)."""
        return self.model.forward_image(images, text_embeds)


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote.

    Attributes:
        out_dir: the folder.
        text_path: ``out_dir/text_encoder.onnx``.
        image_path: ``out_dir/image_graph.onnx``.
        manifest_path: ``out_dir/manifest.json``.
        manifest: the manifest written to all three files.
        reports: what the graph checks saw in each graph (text, image).
    """

    out_dir: Path
    text_path: Path
    image_path: Path
    manifest_path: Path
    manifest: OnnxManifest
    reports: tuple[GraphReport, GraphReport]


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shape the exported graphs."""
    import onnxslim

    import gsnet_deploy

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxslim": onnxslim.__version__,
        "gsnet-deploy": gsnet_deploy.__version__,
    }


def make_manifest(model: GSNet, opset: int) -> OnnxManifest:
    """The manifest of ``model``'s export (normalization read from the buffers the graph bakes in).

    Raises:
        ExportError: the class transformer pools differently along its two axes (the manifest records one pooling).
    """
    cfg = model.cfg
    pool_h, pool_w = cfg.aggregator.pooling
    if pool_h != pool_w:
        raise ExportError(
            f"pooling {cfg.aggregator.pooling} differs along its axes; export a model with pooling (1, 1) or (2, 2)"
        )
    mean = [float(v) for v in model.get_buffer("pixel_mean").flatten().tolist()]
    std = [float(v) for v in model.get_buffer("pixel_std").flatten().tolist()]
    return OnnxManifest(
        model_digest=str(model.digest),
        template=cfg.template,
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
        view_size=cfg.image_size,
        logit_size=cfg.logit_size,
        embed_dim=cfg.embed_dim,
        protocol=PAPER_PROTOCOL,
        opset=opset,
        tool_versions=tool_versions(),
        pooling=int(pool_h),
    )


def _example_inputs(model: GSNet) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded example tokens ``[3, 77]`` and (views ``[2, 3, 384, 384]``, embeddings ``[3, 512]``)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    length = cfg.clip_text.context_length
    tokens = torch.randint(1, cfg.clip_text.vocab_size - 2, (_EXAMPLE_CLASSES, length), generator=gen)
    tokens[:, 0] = cfg.clip_text.vocab_size - 2  # start of text
    tokens[:, 6] = cfg.clip_text.vocab_size - 1  # end of text: the largest id, where argmax pools
    tokens[:, 7:] = 0
    images = torch.rand(_EXAMPLE_VIEWS, 3, cfg.image_size, cfg.image_size, generator=gen) * 255.0
    text = torch.nn.functional.normalize(torch.randn(_EXAMPLE_CLASSES, cfg.embed_dim, generator=gen), dim=-1)
    device = model.get_buffer("pixel_mean").device
    return tokens.to(device), (images.to(device), text.to(device))


def _torch_export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> onnx.ModelProto:
    """Run the TorchScript exporter into ``path`` and load the result."""
    with warnings.catch_warnings():
        # NOTE: the legacy exporter is chosen on purpose (dynamic_axes); its deprecation notice and the
        # tracer's warnings about Python ints are noise here: the tests run the graph at other B and N
        # (N = 1, 5, 40, 300) against PyTorch, which is what would catch a specialized shape.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*advanced indexing.*", category=UserWarning)
        try:
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as err:
            raise ExportError(
                f"torch.onnx.export failed on {path.name} ({type(err).__name__}: {err}); see the traceback with --debug."
            ) from err
    return onnx.load(str(path))


def _shape_only(model: onnx.ModelProto, max_bytes: int = 1 << 16) -> onnx.ModelProto:
    """A view of ``model`` for shape inference: initializers over ``max_bytes`` become typed inputs without data.

    NOTE: symbolic shape inference deep-copies the model and serializes it for ONNX's own inference;
    with the paper-size weights inline each call cost ~3 copies of 0.7 GB during export. Shapes never
    depend on the values of large tensors (shape operands are a few int64s), so they are left out.
    """
    graph = model.graph
    inputs = {vi.name for vi in graph.input}
    small, typed = [], []
    for init in graph.initializer:
        if len(init.raw_data) <= max_bytes and init.ByteSize() <= max_bytes:
            small.append(init)
        elif init.name not in inputs:
            typed.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    view = helper.make_model(
        helper.make_graph(
            list(graph.node), graph.name, [*graph.input, *typed], list(graph.output), small, value_info=list(graph.value_info)
        ),
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
    )
    view.functions.extend(model.functions)
    return view


def _symbolic_shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Shapes of every tensor from ONNX Runtime's symbolic shape inference (ints or expressions)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(_shape_only(model), auto_merge=False, guess_output_rank=False)
    shapes: dict[str, list[int | str]] = {}
    graph = inferred.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
    return shapes


def flatten_to_reshape(model: onnx.ModelProto) -> int:
    """Replace each ``Flatten`` whose kept side is static by the equivalent ``Reshape``; returns how many.

    ``Flatten(axis=a)`` of ``[d0, ..., dk]`` is ``Reshape`` to ``[d0*..*d(a-1), da*..*dk]``. When one
    side is all numbers, ``Reshape`` to ``[-1, P]`` (or ``[P, -1]``) is the same op. The TorchScript
    exporter emits a Flatten for the text graph's end-of-text gather (``x[arange(N), eot]``), and the
    symbolic shape inference has no rule for Flatten, so ``N`` would be lost downstream.
    """
    shapes = _symbolic_shapes(model)
    count = 0
    for index, node in enumerate(list(model.graph.node)):
        if node.op_type != "Flatten":
            continue
        shape = shapes.get(node.input[0])
        if shape is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        axis = axis + len(shape) if axis < 0 else axis
        head = [d for d in shape[:axis] if isinstance(d, int)]
        tail = [d for d in shape[axis:] if isinstance(d, int)]
        if len(tail) == len(shape) - axis:
            target = [-1, math.prod(tail)]
        elif len(head) == axis:
            target = [math.prod(head), -1]
        else:
            continue
        shape_name = f"{node.output[0]}__reshape_shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name=shape_name))
        reshape = helper.make_node("Reshape", [node.input[0], shape_name], list(node.output), name=f"{node.name}_as_reshape")
        model.graph.node.remove(node)
        model.graph.node.insert(index, reshape)
        count += 1
    return count


def _pin_output_shapes(model: onnx.ModelProto) -> None:
    """Write numbers into graph output dims that symbolic inference resolves to numbers.

    The exporter names some static output dims symbolically (the image graph's 96 x 96 comes out of a
    Reshape whose shape is computed); inference proves them constant.
    """
    shapes = _symbolic_shapes(model)
    for out in model.graph.output:
        inferred = shapes.get(out.name)
        dims = out.type.tensor_type.shape.dim
        if inferred is None or len(inferred) != len(dims):
            continue
        for dim, value in zip(dims, inferred):
            if isinstance(value, int) and not dim.HasField("dim_value"):
                dim.dim_value = value  # setting the value clears dim_param (a oneof)


def _weight_free_shape_infer(infer: Callable[[onnx.ModelProto], onnx.ModelProto]) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    """onnxslim's shape inference ``infer`` run on a weight-free view (``_shape_only``), its shapes copied back.

    onnxslim infers shapes after every optimization pass, each time on copies of the whole model
    (0.7 GB of weights per paper-size graph). The shapes do not depend on the weights' values, and
    the slimmed graphs are byte-identical either way (checked on every graph of the tiny and paper
    exports); weight-free, onnxslim's own peak drops by about 2 GiB per paper-size graph and a
    paper-size export runs in 3:08 instead of 4:20 (``benchmarks/results/export_memory_2026-11-29.md``).
    """

    def run(model: onnx.ModelProto) -> onnx.ModelProto:
        inferred = infer(_shape_only(model)).graph
        weights = {init.name for init in model.graph.initializer}
        del model.graph.value_info[:]
        model.graph.value_info.extend(vi for vi in inferred.value_info if vi.name not in weights)
        outputs = {out.name: out for out in inferred.output}
        for out in model.graph.output:
            if out.name in outputs:
                out.CopyFrom(outputs[out.name])
        return model

    return run


def _simplify(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """onnxslim: constant folding, dead-code removal and fusion of the shape arithmetic."""
    import onnxslim
    import onnxslim.core

    infer = getattr(onnxslim.core, "shape_infer", None)  # NOTE: onnxslim.slim imports it from here at each call
    if infer is not None:
        onnxslim.core.shape_infer = _weight_free_shape_infer(infer)
    try:
        return onnxslim.slim(model)
    except Exception as err:
        raise ExportError(f"onnxslim failed on {name} ({type(err).__name__}: {err}); retry with simplify=False.") from err
    finally:
        if infer is not None:
            onnxslim.core.shape_infer = infer


def _finish_graph(
    raw: onnx.ModelProto,
    path: Path,
    role: str,
    manifest: OnnxManifest,
    *,
    simplify: bool,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
    supported_ops: Collection[str] | None,
    files: AtomicFiles,
    input_values: Mapping[str, Sequence[str]] | None = None,
) -> GraphReport:
    """Rewrite, simplify, stamp with the manifest, save to ``path`` (a part of ``files``) and check one graph."""
    flatten_to_reshape(raw)
    model = _simplify(raw, path.name) if simplify else raw
    _pin_output_shapes(model)
    del model.metadata_props[:]
    for key, value in manifest.metadata_props(role).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.producer_name = "gsnet-deploy"
    model.producer_version = manifest.tool_versions.get("gsnet-deploy", "")
    save_onnx_atomic(model, path, files)
    return check_graph(
        model,
        name=path.name,
        inputs=inputs,
        outputs=outputs,
        dynamic_axes=dynamic_axes,
        supported_ops=supported_ops,
        checker_path=files.part(path),  # the saved file, before it is renamed into place
        input_values=input_values,
    )


def _export_paper_graphs(
    model: GSNet,
    out_dir: Path,
    raw_dir: Path,
    manifest: OnnxManifest,
    *,
    opset: int,
    simplify: bool,
    supported_ops: Collection[str] | None,
    files: AtomicFiles,
) -> tuple[GraphReport, GraphReport]:
    """Export, finish and check the paper protocol's encoder and head graphs as parts of ``files``."""
    encoder_args, head_args = paper_example_inputs(model)
    reports = []
    graphs = (
        (PaperEncoderGraph(model), encoder_args, io_names.PAPER_ENCODER_FILE, PAPER_ENCODER_ROLE, io_names.PAPER_ENCODER_INPUTS,
         io_names.PAPER_ENCODER_OUTPUTS, io_names.PAPER_ENCODER_DYNAMIC_AXES, None),
        (PaperHeadGraph(model), head_args, io_names.PAPER_HEAD_FILE, PAPER_HEAD_ROLE, io_names.PAPER_HEAD_INPUTS,
         io_names.PAPER_HEAD_OUTPUTS, io_names.PAPER_HEAD_DYNAMIC_AXES, paper_head_symbols()),
    )  # fmt: skip
    for module, args, name, role, inputs, outputs, axes, values in graphs:
        with torch.no_grad():
            raw = _torch_export(module, args, raw_dir / name, inputs, outputs, axes, opset)
        (raw_dir / name).unlink()
        report = _finish_graph(
            raw, out_dir / name, role, manifest, simplify=simplify, inputs=inputs, outputs=outputs,
            dynamic_axes=axes, supported_ops=supported_ops, files=files, input_values=values,
        )  # fmt: skip
        reports.append(report)
    return reports[0], reports[1]


def _export_into(
    model: GSNet,
    out_dir: Path,
    manifest: OnnxManifest,
    *,
    opset: int,
    simplify: bool,
    supported_ops: Collection[str] | None,
) -> tuple[GraphReport, GraphReport]:
    """Export, finish and check both graphs, then commit them with ``manifest.json`` into ``out_dir``.

    The exporter's raw graphs go to a private folder; the finished files join one ``AtomicFiles``
    set, renamed into ``out_dir`` together (signals held) only after both graphs passed their checks.
    """
    tokens, image_args = _example_inputs(model)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", suffix=PART_MARK, dir=out_dir.parent) as tmp:
        raw_dir = Path(tmp)
        with AtomicFiles() as files:
            with torch.no_grad():
                raw_text = _torch_export(
                    TextGraph(model), (tokens,), raw_dir / io_names.TEXT_GRAPH_FILE,
                    io_names.TEXT_INPUTS, io_names.TEXT_OUTPUTS, io_names.TEXT_DYNAMIC_AXES, opset,
                )  # fmt: skip
                raw_image = _torch_export(
                    ImageGraph(model), image_args, raw_dir / io_names.IMAGE_GRAPH_FILE,
                    io_names.IMAGE_INPUTS, io_names.IMAGE_OUTPUTS, io_names.IMAGE_DYNAMIC_AXES, opset,
                )  # fmt: skip
            for raw in raw_dir.iterdir():
                raw.unlink()  # both graphs are in memory now; free the disk before writing the finished ones
            text_report = _finish_graph(
                raw_text, out_dir / io_names.TEXT_GRAPH_FILE, TEXT_ROLE, manifest, simplify=simplify,
                inputs=io_names.TEXT_INPUTS, outputs=io_names.TEXT_OUTPUTS, dynamic_axes=io_names.TEXT_DYNAMIC_AXES,
                supported_ops=supported_ops, files=files,
            )  # fmt: skip
            del raw_text
            image_report = _finish_graph(
                raw_image, out_dir / io_names.IMAGE_GRAPH_FILE, IMAGE_ROLE, manifest, simplify=simplify,
                inputs=io_names.IMAGE_INPUTS, outputs=io_names.IMAGE_OUTPUTS, dynamic_axes=io_names.IMAGE_DYNAMIC_AXES,
                supported_ops=supported_ops, files=files,
            )  # fmt: skip
            del raw_image
            _export_paper_graphs(model, out_dir, raw_dir, manifest, opset=opset, simplify=simplify,
                                 supported_ops=supported_ops, files=files)  # fmt: skip
            export_tile_graphs(out_dir, opset, files, supported_ops)  # tiled mode's device blending (weight-free)
            files.part(out_dir / io_names.MANIFEST_FILE).write_text(
                json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
    return text_report, image_report


def export_onnx(
    model: GSNet,
    out_dir: str | Path,
    *,
    opset: int = MIN_OPSET,
    simplify: bool = True,
    supported_ops: Collection[str] | None = None,
) -> OnnxExport:
    """Export ``model``'s text graph and image graph with their manifest into ``out_dir``.

    Args:
        model: GSNet from ``build_gsnet`` (its ``digest`` names the weights); exported on its device.
        out_dir: destination folder (created; existing graph files and manifest are replaced).
        opset: ONNX opset, 17 or newer.
        simplify: run onnxslim on both graphs (the checks run on the result either way).
        supported_ops: if given, every op must be in it (e.g. TensorRT's ONNX-parser list).

    Returns:
        Paths, manifest and graph reports of what was written.

    Raises:
        ExportError: the opset is too old, out_dir is a file, the exporter or onnxslim failed, or a
            graph fails the checks of ``graph_checks`` (nothing is written to ``out_dir`` then).
    """
    out_dir = Path(out_dir)
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old for the TensorRT path; pass opset {MIN_OPSET} or newer.")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} is a file; pass a folder for the ONNX graphs.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(model, opset)
    model = model.eval()
    created = not out_dir.exists()
    out_dir.mkdir(exist_ok=True)
    try:
        text_report, image_report = _export_into(
            model, out_dir, manifest, opset=opset, simplify=simplify, supported_ops=supported_ops
        )
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # a failed export leaves no trace, not even the new (empty) folder
        raise
    return OnnxExport(
        out_dir=out_dir,
        text_path=out_dir / io_names.TEXT_GRAPH_FILE,
        image_path=out_dir / io_names.IMAGE_GRAPH_FILE,
        manifest_path=out_dir / io_names.MANIFEST_FILE,
        manifest=manifest,
        reports=(text_report, image_report),
    )
