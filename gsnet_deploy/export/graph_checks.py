"""Checks that an exported graph is fit for TensorRT and keeps the dynamic axes we promise.

Each check returns a list of problems (empty when it passes); ``check_graph`` runs them all and
raises one ``ExportError`` naming every problem. The checks:

- the default-domain opset is at least 17;
- no ``Einsum``, ``Loop`` or ``If`` (TensorRT handles them poorly or not under dynamic shapes),
  and no ``Resize`` of a constant (a positional table interpolated at run time);
- symbolic shape inference (ONNX Runtime's sympy-based ``SymbolicShapeInference``) infers every
  tensor's shape with only the allowed symbols (``B`` and ``N``) and integers;
- ``onnx.checker.check_model(full_check=True)`` passes;
- optionally, every op is in a given TensorRT ONNX-parser support list (kept as data by the tests,
  with its source and version).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from gsnet_deploy.errors import ExportError

MIN_OPSET = 17
FORBIDDEN_OPS = ("Einsum", "Loop", "If")
RESIZE_OPS = ("Resize", "Upsample")
_MAX_LISTED = 8  # problems of one kind listed by name before "and K more"


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _nodes(sub)


def _summarize(items: list[str]) -> str:
    """``a, b, c`` or ``a, b, ... and K more``."""
    head = ", ".join(items[:_MAX_LISTED])
    return head if len(items) <= _MAX_LISTED else f"{head} and {len(items) - _MAX_LISTED} more"


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default (``ai.onnx``) opset the model imports (0 if none)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def check_opset(model: onnx.ModelProto, minimum: int = MIN_OPSET) -> list[str]:
    """The default opset is at least ``minimum``."""
    opset = default_opset(model)
    return [] if opset >= minimum else [f"opset {opset} is older than {minimum}"]


def check_forbidden_ops(model: onnx.ModelProto, forbidden: Collection[str] = FORBIDDEN_OPS) -> list[str]:
    """No node (subgraphs included) is one of ``forbidden``."""
    found = sorted({f"{n.op_type} ({n.name or 'unnamed'})" for n in _nodes(model.graph) if n.op_type in forbidden})
    return [f"forbidden ops: {_summarize(found)}"] if found else []


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Names of tensors computed from initializers and constants only (graph inputs excluded)."""
    constant = {init.name for init in graph.initializer}
    constant.add("")  # an omitted optional input
    for node in graph.node:  # nodes are topologically sorted in a valid model
        if node.op_type == "Constant" or (node.input and all(i in constant for i in node.input)):
            constant.update(node.output)
    return constant


def check_no_constant_resize(model: onnx.ModelProto) -> list[str]:
    """No ``Resize``/``Upsample`` whose data input is a constant (e.g. a positional table).

    Such a resize recomputes the same table on every run: it belongs at load time (design.md: both
    positional tables are constants for a 384 input).
    """
    constant = _constant_tensors(model.graph)
    found = sorted(
        f"{n.op_type} ({n.name or 'unnamed'})" for n in model.graph.node if n.op_type in RESIZE_OPS and n.input[0] in constant
    )
    return [f"run-time interpolation of constants: {_summarize(found)}"] if found else []


def _infer_with_values(model: onnx.ModelProto, input_values: Mapping[str, Sequence[str]]) -> onnx.ModelProto | None:
    """``SymbolicShapeInference.infer_shapes`` told that some int64 inputs hold symbols (e.g. ``out_size`` = [H, W]).

    Uses the inference's own start-values hook (``_infer_impl(start_sympy_data)``), which
    ``infer_shapes`` leaves empty; returns None when some shape stays uninferred.
    """
    import sympy
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    start = {name: [sympy.Symbol(s, integer=True, positive=True) for s in symbols] for name, symbols in input_values.items()}
    inference = SymbolicShapeInference(2**31 - 1, False, False, 0)
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl(dict(start))
    inference._update_output_from_vi()
    return inference.out_mp_ if complete else None


def check_symbolic_dims(
    model: onnx.ModelProto, allowed: Collection[str], input_values: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """Symbolic shape inference leaves only ``allowed`` symbols (and integers) in every tensor's shape.

    Uses ONNX Runtime's ``SymbolicShapeInference``, which carries products such as ``B*N`` as sympy
    expressions; a dim is accepted when its expression's free symbols are all in ``allowed``.
    ``input_values`` names int64 inputs whose values are symbols (a shape passed as data, such as
    the paper head's ``out_size`` = ``(H, W)``), so that shapes computed from them stay checkable.
    """
    import sympy
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        if input_values:
            inferred = _infer_with_values(model, input_values)
        else:
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=False, guess_output_rank=False)
    except Exception as err:
        return [f"symbolic shape inference failed ({type(err).__name__}: {err})"]
    if inferred is None:
        return ["symbolic shape inference could not infer every shape"]
    graph = inferred.graph
    infos = {vi.name: vi for vi in [*graph.value_info, *graph.output, *graph.input]}
    allowed_names = set(allowed)
    # NOTE: parse with the allowed names bound to symbols: sympify("N") alone is sympy's N() function
    local_symbols = {name: sympy.Symbol(name) for name in allowed_names}
    bad: list[str] = []
    missing: list[str] = []
    for node in graph.node:
        for out in node.output:
            if not out:
                continue
            vi = infos.get(out)
            if vi is None or not vi.type.tensor_type.HasField("shape"):
                missing.append(out)
                continue
            for dim in vi.type.tensor_type.shape.dim:
                if dim.HasField("dim_value"):
                    continue
                if not dim.HasField("dim_param"):
                    bad.append(f"{out}: unknown dim")
                    break
                try:
                    symbols = {s.name for s in sympy.sympify(dim.dim_param, locals=local_symbols).free_symbols}
                except (sympy.SympifyError, TypeError, SyntaxError, AttributeError):
                    symbols = {dim.dim_param}
                if not symbols <= allowed_names:
                    bad.append(f"{out}: {dim.dim_param}")
                    break
    problems = []
    if missing:
        problems.append(f"no inferred shape for {_summarize(sorted(missing))}")
    if bad:
        problems.append(f"dims other than {sorted(allowed_names)} and integers: {_summarize(bad)}")
    return problems


def check_io(
    model: onnx.ModelProto,
    inputs: Collection[str],
    outputs: Collection[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> list[str]:
    """Graph inputs/outputs are exactly ``inputs``/``outputs`` (in order), symbolic exactly on ``dynamic_axes``.

    Every axis named in ``dynamic_axes`` must carry that symbol; every other axis must be a number.
    """
    problems: list[str] = []
    graph_inputs = [i.name for i in model.graph.input if i.name not in {init.name for init in model.graph.initializer}]
    graph_outputs = [o.name for o in model.graph.output]
    if graph_inputs != list(inputs):
        problems.append(f"inputs are {graph_inputs}, expected {list(inputs)}")
    if graph_outputs != list(outputs):
        problems.append(f"outputs are {graph_outputs}, expected {list(outputs)}")
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name not in (*inputs, *outputs):
            continue
        expected = dynamic_axes.get(vi.name, {})
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if axis in expected:
                if dim.dim_param != expected[axis]:
                    found = dim.dim_param or dim.dim_value
                    problems.append(f"{vi.name} axis {axis} is {found!r}, expected symbol {expected[axis]!r}")
            elif not dim.HasField("dim_value"):
                problems.append(f"{vi.name} axis {axis} is {dim.dim_param or '?'!r}, expected a number")
    return problems


def check_onnx_checker(model: onnx.ModelProto | str | Path) -> list[str]:
    """``onnx.checker.check_model(full_check=True)`` passes (pass a path for models over 2 GB)."""
    target = str(model) if isinstance(model, (str, Path)) else model
    try:
        onnx.checker.check_model(target, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return [f"onnx.checker failed: {first}"]
    return []


def check_supported_ops(model: onnx.ModelProto, supported: Collection[str]) -> list[str]:
    """Every default-domain op of the model is in ``supported`` (e.g. TensorRT's ONNX-parser list)."""
    ops = {n.op_type for n in _nodes(model.graph) if n.domain in ("", "ai.onnx")}
    custom = {f"{n.domain}::{n.op_type}" for n in _nodes(model.graph) if n.domain not in ("", "ai.onnx")}
    unsupported = sorted(ops - set(supported)) + sorted(custom)
    return [f"ops outside the support list: {_summarize(unsupported)}"] if unsupported else []


@dataclass(frozen=True)
class GraphReport:
    """What ``check_graph`` looked at: the graph's name, opset and op types (sorted)."""

    name: str
    opset: int
    op_types: tuple[str, ...]


def check_graph(
    model: onnx.ModelProto,
    *,
    name: str,
    inputs: Collection[str],
    outputs: Collection[str],
    dynamic_axes: dict[str, dict[int, str]],
    supported_ops: Collection[str] | None = None,
    checker_path: str | Path | None = None,
    input_values: Mapping[str, Sequence[str]] | None = None,
) -> GraphReport:
    """Run every check on ``model`` and raise one error listing what failed.

    Args:
        model: the graph to check.
        name: its name in messages (e.g. ``image_graph.onnx``).
        inputs: expected graph input names, in order (``io_names.IMAGE_INPUTS``).
        outputs: expected graph output names, in order.
        dynamic_axes: the symbolic axes of inputs/outputs (``io_names.IMAGE_DYNAMIC_AXES``); their
            symbols are the only ones allowed to remain anywhere in the graph.
        supported_ops: op types allowed (None: not checked).
        checker_path: run ``onnx.checker`` on this saved file instead of the in-memory model.
        input_values: int64 inputs holding symbols (``{"out_size": ("H", "W")}``); those symbols
            are allowed too.

    Returns:
        A short report of the graph.

    Raises:
        ExportError: any check failed; the message lists every problem.
    """
    dynamic_dims = {symbol for axes in dynamic_axes.values() for symbol in axes.values()}
    dynamic_dims |= {symbol for symbols in (input_values or {}).values() for symbol in symbols}
    problems = [
        *check_io(model, inputs, outputs, dynamic_axes),
        *check_opset(model),
        *check_forbidden_ops(model),
        *check_no_constant_resize(model),
        *check_symbolic_dims(model, dynamic_dims, input_values),
        *check_onnx_checker(checker_path if checker_path is not None else model),
    ]
    if supported_ops is not None:
        problems += check_supported_ops(model, supported_ops)
    if problems:
        raise ExportError(f"{name} fails the graph checks: {'; '.join(problems)}; fix the export before deploying it.")
    return GraphReport(name=name, opset=default_opset(model), op_types=tuple(sorted({n.op_type for n in _nodes(model.graph)})))
