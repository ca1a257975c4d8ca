"""Optimization profiles of the two engines: ranges of the symbolic dims B (views) and N (classes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.engine_manifest import Profile, ShapeRange
from gsnet_deploy.errors import EngineBuildError
from gsnet_deploy.export.dla import DLA_VIEWS

VIEWS_MIN, VIEWS_OPT, VIEWS_MAX = 1, 5, 8  # B: 5 = the paper protocol's views of one image
CLASSES_MIN, CLASSES_MAX = 1, 256  # N: the class transformer pads the class axis to 256
DEFAULT_CLASSES_OPT = 40


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


def profile_for(inputs: Mapping[str, Sequence[int | str]], dims: Mapping[str, DimRange]) -> Profile:
    """One optimization profile for a graph whose inputs have these (possibly symbolic) shapes (pure).

    Args:
        inputs: input name -> shape with ints for static dims and names (``"B"``, ``"N"``) for symbolic ones.
        dims: range of each symbolic dim name.

    Raises:
        EngineBuildError: a symbolic dim has no range.

    """
    shapes: dict[str, ShapeRange] = {}
    for name, shape in inputs.items():
        ranges: list[DimRange] = []
        for dim in shape:
            if isinstance(dim, int) and dim > 0:
                ranges.append(DimRange(dim, dim, dim))
                continue
            if dim not in dims:
                raise EngineBuildError(
                    f"Input {name!r} has a dynamic dimension {dim!r} without a profile range; export the "
                    "graph with the "
                    f"dynamic axes of gsnet_deploy.contracts.io_names ({', '.join(dims)})."
                )
            ranges.append(dims[str(dim)])
        shapes[name] = ShapeRange(tuple(r.min for r in ranges), tuple(r.opt for r in ranges), tuple(r.max for r in ranges))
    return Profile(shapes=shapes)


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
