"""Optimization profiles of the engines: ranges of the symbolic dims and of the shape-tensor values.

Text and image graphs: B (views) and N (classes). Paper graphs (``paper_encoder`` / ``paper_head``):
h, w of the image after ``ResizeShortestEdge`` (short edge 640, long edge capped at 2560, so each
side is 1..2560, tuned for 640x960), N as above, and the head's ``out_size`` input, a *shape
tensor* whose two values (H, W) set the output shapes: its value range goes into the profile
(``IOptimizationProfile.set_shape_input``). The encoder's features have static shapes (5 views
of 384 px whatever h and w are), so the head's feature inputs are static and equal to them.

The output side is capped at ``OUT_SIDE_MAX`` = 2880: the largest multiple of 64 for which the
head's ``[N, H, W]`` tensors at N = 256 stay below 2**31 elements (256 * 2880**2 = 2.12e9), the
int32 element-index limit of many TensorRT kernels before 10.11's large-tensor work (Jetson runs
10.3). A larger original image gets a one-line error before anything runs; such images belong to
tiled mode anyway.

Tile graphs (``tile_blend`` / ``tile_emit``, tiled mode's blending): the strip ``[N + 1, R, W]``
with R up to one window (384) and W the image width, capped at ``TILE_WIDTH_MAX`` = 21,760 for the
same 2**31 reason (257 * 384 * 21,760 = 2.15e9 - 1 at most); a wider image is blended on the host
(``runtime.tiled`` says so). Their shape tensors: ``place`` (view index, strip row, column, window
height and width) and ``count`` (rows emitted, at most ``EMIT_ROWS``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.engine_manifest import Profile, ShapeRange
from gsnet_deploy.errors import EngineBuildError
from gsnet_deploy.export.dla import DLA_VIEWS
from gsnet_deploy.runtime.tiling import EMIT_ROWS, WINDOW

VIEWS_MIN, VIEWS_OPT, VIEWS_MAX = 1, 5, 8  # B: 5 = the paper protocol's views of one image
CLASSES_MIN, CLASSES_MAX = 1, 256  # N: the class transformer pads the class axis to 256
DEFAULT_CLASSES_OPT = 40
RESIZED_SIDE_MAX = 2560  # ResizeShortestEdge's long-edge cap: h, w of the paper encoder's image
RESIZED_OPT = (640, 960)  # h, w the paper engines are tuned for (a 2:3 image at the protocol's short edge)
OUT_SIDE_MAX = 2880  # H, W of the paper head's output (see the module docstring)
OUT_OPT = RESIZED_OPT  # H, W the paper head is tuned for
TILE_WIDTH_MAX = 21_760  # W of the tile graphs' strip: (256 + 1) * 384 * W < 2**31 (see the module docstring)
TILE_WIDTH_OPT = 2048
# shape-tensor inputs: input name -> the symbolic dims its values are (out_size holds (H, W))
SHAPE_INPUTS: dict[str, tuple[str, ...]] = {io_names.OUT_SIZE: (io_names.OUT_HEIGHT, io_names.OUT_WIDTH)}
TILE_SHAPE_INPUTS: dict[str, tuple[str, ...]] = {
    io_names.TILE_PLACE: io_names.PLACE_VALUES,
    io_names.TILE_COUNT: (io_names.EMIT_COUNT,),
}


@dataclass(frozen=True)
class DimRange:
    """Min / opt / max of one symbolic dimension."""

    min: int
    opt: int
    max: int


def dim_ranges(
    classes_opt: int = DEFAULT_CLASSES_OPT, *, fixed: bool = False, fixed_views: int = DLA_VIEWS
) -> dict[str, DimRange]:
    """Ranges of the symbolic dims: views B 1/5/8 and classes N 1/``classes_opt``/256, or fixed (DLA).

    Raises:
        EngineBuildError: ``classes_opt`` outside 1..256.

    """
    if not CLASSES_MIN <= classes_opt <= CLASSES_MAX:
        raise EngineBuildError(
            f"--classes-opt must be between {CLASSES_MIN} and {CLASSES_MAX}, got {classes_opt}; pass the "
            "class count "
            "you run most often."
        )
    if fixed:
        return {
            io_names.VIEWS: DimRange(fixed_views, fixed_views, fixed_views),
            io_names.CLASSES: DimRange(classes_opt, classes_opt, classes_opt),
        }
    return {
        io_names.VIEWS: DimRange(VIEWS_MIN, VIEWS_OPT, VIEWS_MAX),
        io_names.CLASSES: DimRange(CLASSES_MIN, classes_opt, CLASSES_MAX),
    }


def paper_dim_ranges(classes_opt: int = DEFAULT_CLASSES_OPT) -> dict[str, DimRange]:
    """Ranges of the paper graphs' symbolic dims: h, w 1/640,960/2560; N 1/``classes_opt``/256; H, W 1/640,960/2880.

    Raises:
        EngineBuildError: ``classes_opt`` outside 1..256.

    """
    classes = dim_ranges(classes_opt)[io_names.CLASSES]
    return {
        io_names.IMAGE_HEIGHT: DimRange(1, RESIZED_OPT[0], RESIZED_SIDE_MAX),
        io_names.IMAGE_WIDTH: DimRange(1, RESIZED_OPT[1], RESIZED_SIDE_MAX),
        io_names.CLASSES: classes,
        io_names.OUT_HEIGHT: DimRange(1, OUT_OPT[0], OUT_SIDE_MAX),
        io_names.OUT_WIDTH: DimRange(1, OUT_OPT[1], OUT_SIDE_MAX),
    }


def tile_dim_ranges(classes_opt: int = DEFAULT_CLASSES_OPT) -> dict[str, DimRange]:
    """Ranges of the tile graphs' dims and shape-tensor values (views and classes as the image engine's).

    Raises:
        EngineBuildError: ``classes_opt`` outside 1..256.

    """
    dims = dim_ranges(classes_opt)
    classes = dims[io_names.CLASSES]
    view, row, col, height, width = io_names.PLACE_VALUES
    return {
        **dims,
        io_names.STRIP_CHANNELS: DimRange(classes.min + 1, classes.opt + 1, classes.max + 1),
        io_names.STRIP_ROWS: DimRange(1, WINDOW, WINDOW),
        io_names.STRIP_WIDTH: DimRange(1, TILE_WIDTH_OPT, TILE_WIDTH_MAX),
        io_names.EMIT_COUNT: DimRange(1, EMIT_ROWS, EMIT_ROWS),
        view: DimRange(0, 0, VIEWS_MAX - 1),
        row: DimRange(0, 0, WINDOW - 1),
        col: DimRange(0, 0, TILE_WIDTH_MAX - 1),
        height: DimRange(1, WINDOW, WINDOW),
        width: DimRange(1, WINDOW, WINDOW),
    }


def _ranges(name: str, dims_of: Sequence[int | str], dims: Mapping[str, DimRange], what: str) -> ShapeRange:
    """The ShapeRange of a sequence of static ints and symbolic dim names."""
    ranges: list[DimRange] = []
    for dim in dims_of:
        if isinstance(dim, int) and dim > 0:
            ranges.append(DimRange(dim, dim, dim))
            continue
        if dim not in dims:
            raise EngineBuildError(
                f"Input {name!r} has a dynamic {what} {dim!r} without a profile range; export the graph with the "
                f"dynamic axes of gsnet_deploy.contracts.io_names ({', '.join(dims)})."
            )
        ranges.append(dims[str(dim)])
    return ShapeRange(tuple(r.min for r in ranges), tuple(r.opt for r in ranges), tuple(r.max for r in ranges))


def profile_for(
    inputs: Mapping[str, Sequence[int | str]],
    dims: Mapping[str, DimRange],
    shape_inputs: Mapping[str, Sequence[str]] | None = None,
) -> Profile:
    """One optimization profile for a graph whose inputs have these (possibly symbolic) shapes (pure).

    Args:
        inputs: input name -> shape with ints for static dims and names (``"B"``, ``"N"``) for symbolic ones.
        dims: range of each symbolic dim name.
        shape_inputs: shape-tensor inputs -> the symbolic dims their values are (None: ``SHAPE_INPUTS``);
            only those among ``inputs`` are used.

    Raises:
        EngineBuildError: a symbolic dim has no range.

    """
    shape_inputs = SHAPE_INPUTS if shape_inputs is None else shape_inputs
    shapes = {name: _ranges(name, shape, dims, "dimension") for name, shape in inputs.items()}
    values = {name: _ranges(name, symbols, dims, "value") for name, symbols in shape_inputs.items() if name in inputs}
    return Profile(shapes=shapes, values=values)


def onnx_input_shapes(path: Path) -> dict[str, tuple[int | str, ...]]:
    """Graph input shapes of an ONNX file (symbolic dims as their names), read without its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    shapes: dict[str, tuple[int | str, ...]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
    return shapes


def onnx_output_shapes(path: Path) -> dict[str, tuple[int | str, ...]]:
    """Graph output shapes of an ONNX file (symbolic dims as their names), read without its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        value.name: tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim)
        for value in model.graph.output
    }


def static_output_shapes(path: Path, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the outputs ``names`` of an ONNX file, which must be static (the paper encoder's features).

    Raises:
        EngineBuildError: an output is missing or has a symbolic dimension.

    """
    found = onnx_output_shapes(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        shape = found.get(name)
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
            raise EngineBuildError(
                f"{Path(path).name} has no static output {name!r} (found {shape}); re-export the folder with `gsnet export onnx`."
            )
        shapes[name] = tuple(int(d) for d in shape)
    return shapes
