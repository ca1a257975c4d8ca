"""``gsnet export triton``: a Triton model repository that a stock ``tritonserver`` container serves as it is.

Layout (``REPO/<model>/config.pbtxt`` and ``REPO/<model>/1/<file>``):
- ``gsnet_text_encoder``: the text graph, on Triton's ``onnxruntime`` backend (``model.onnx``) or
  ``tensorrt_plan`` (``model.plan``, an engine of ``gsnet export build``);
- ``gsnet_image_graph``: the image graph, same backends;
- ``gsnet_segment``: the paper protocol as a Python-backend model (``serve/triton_model.py``)
  that calls the two graphs through BLS, with the torch-free modules of ``gsnet_deploy`` it
  imports copied beside it. Its inputs and outputs are those of ``gsnet serve``.

The graphs' first axes are views and classes, not a request batch, so they are served with
``max_batch_size: 0``; the Python model answers each request of a batch on its own.
The repository is written to a temporary folder beside ``out`` and renamed into place: a failed
export leaves nothing.
"""

from __future__ import annotations

import ast
import enum
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gsnet_deploy
from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.atomic import deferred_signals
from gsnet_deploy.errors import ExportError
from gsnet_deploy.serve.requests import CLASS_MAP, CLASSES, IMAGE, PIXELS, PROBS, WANT_PROBS, Limits

SEGMENT_MODEL = "gsnet_segment"
TEXT_MODEL = "gsnet_text_encoder"
IMAGE_MODEL = "gsnet_image_graph"
PYTHON_MODEL_ENTRY = "gsnet_deploy.serve.triton_model"


class GraphFormat(enum.Enum):
    """How the graphs are served."""

    ONNX = "onnx"  # Triton's onnxruntime backend
    ENGINE = "engine"  # Triton's tensorrt_plan backend (engines are tied to the GPU and TensorRT version)


class InstanceKind(enum.Enum):
    """Where Triton places the graph models' instances."""

    GPU = "KIND_GPU"
    CPU = "KIND_CPU"


@dataclass(frozen=True)
class RepositoryOptions:
    """What goes into the repository's configs."""

    instances: int = 1  # instances of each graph model (per GPU with KIND_GPU)
    segment_instances: int = 2  # instances of the Python protocol model (host work: decode, cut, merge)
    kind: InstanceKind = InstanceKind.GPU
    limits: Limits = field(default_factory=Limits)


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    extra = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ]{extra} }}'


def _io(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _graph_config(name: str, platform: str, inputs: list[str], outputs: list[str], options: RepositoryOptions) -> str:
    return (
        f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: 0\n'
        + _io("input", inputs)
        + _io("output", outputs)
        + f"instance_group [ {{ count: {options.instances} kind: {options.kind.value} }} ]\n"
        + "version_policy: { latest: { num_versions: 1 } }\n"
    )


def text_config(platform: str, options: RepositoryOptions) -> str:
    """``config.pbtxt`` of the text graph: tokens INT64 ``[N, 77]`` -> text_embeds FP32 ``[N, 512]``."""
    return _graph_config(
        TEXT_MODEL, platform,
        [_tensor(io_names.TEXT_TOKENS, "TYPE_INT64", [-1, 77])],
        [_tensor(io_names.TEXT_EMBEDS, "TYPE_FP32", [-1, 512])],
        options,
    )  # fmt: skip


def image_config(platform: str, options: RepositoryOptions) -> str:
    """``config.pbtxt`` of the image graph: images ``[B, 3, 384, 384]``, text_embeds ``[N, 512]`` -> logits ``[B, N, 96, 96]``."""
    return _graph_config(
        IMAGE_MODEL, platform,
        [_tensor(io_names.IMAGES, "TYPE_FP32", [-1, 3, 384, 384]), _tensor(io_names.TEXT_EMBEDS, "TYPE_FP32", [-1, 512])],
        [_tensor(io_names.LOGITS, "TYPE_FP32", [-1, -1, 96, 96])],
        options,
    )  # fmt: skip


def segment_config(options: RepositoryOptions) -> str:
    """``config.pbtxt`` of the Python protocol model (same inputs and outputs as ``gsnet serve``)."""
    params = {
        "text_model": TEXT_MODEL,
        "image_model": IMAGE_MODEL,
        "max_pixels": str(options.limits.max_pixels),
        "max_classes": str(options.limits.max_classes),
    }
    parameters = "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items())
    return (
        f'name: "{SEGMENT_MODEL}"\nbackend: "python"\nmax_batch_size: 0\n'
        + _io(
            "input",
            [
                _tensor(IMAGE, "TYPE_STRING", [1], optional=True),
                _tensor(PIXELS, "TYPE_UINT8", [-1, -1, -1], optional=True),
                _tensor(CLASSES, "TYPE_STRING", [-1]),
                _tensor(WANT_PROBS, "TYPE_BOOL", [1], optional=True),
            ],
        )
        + _io("output", [_tensor(CLASS_MAP, "TYPE_INT32", [-1, -1]), _tensor(PROBS, "TYPE_FP32", [-1, -1, -1])])
        + f"instance_group [ {{ count: {options.segment_instances} kind: KIND_CPU }} ]\n"
        + "version_policy: { latest: { num_versions: 1 } }\n"
        + parameters
    )


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ExportError(f"cannot find module {module} to copy into the Triton model")
    return Path(spec.origin)


def python_model_modules(entry: str = PYTHON_MODEL_ENTRY) -> list[str]:
    """Every ``gsnet_deploy`` module the Python model imports at module level, transitively (with parent packages)."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        tree = ast.parse(_module_file(module).read_text(encoding="utf-8"))
        for node in tree.body:  # module-level imports only: lazy ones inside functions are not needed here
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gsnet_deploy"):
                todo.append(node.module)
                if _module_file(node.module).name == "__init__.py":  # "from gsnet_deploy.runtime import raster"
                    todo.extend(
                        f"{node.module}.{alias.name}"
                        for alias in node.names
                        if importlib.util.find_spec(f"{node.module}.{alias.name}") is not None
                    )
            elif isinstance(node, ast.Import):
                todo.extend(a.name for a in node.names if a.name.startswith("gsnet_deploy"))
    return sorted(seen)


def _copy_python_model(dest: Path) -> None:
    """``model.py`` and the ``gsnet_deploy`` modules it needs (with the tokenizer's vocabulary file)."""
    dest.mkdir(parents=True)
    shutil.copyfile(_module_file(PYTHON_MODEL_ENTRY), dest / "model.py")
    package_root = Path(gsnet_deploy.__file__).parent
    for module in python_model_modules():
        src = _module_file(module)
        target = dest / src.relative_to(package_root.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    assets = package_root / "runtime" / "assets"
    shutil.copytree(assets, dest / "gsnet_deploy" / "runtime" / "assets")


def _graph_files(source: Path, fmt: GraphFormat) -> tuple[Path, Path]:
    if fmt is GraphFormat.ONNX:
        files = (source / io_names.TEXT_GRAPH_FILE, source / io_names.IMAGE_GRAPH_FILE)
        hint = "make it with 'gsnet export onnx --out DIR'"
    else:
        files = (source / "text_encoder.engine", source / "image_graph.engine")
        hint = "make it with 'gsnet export build --out DIR'"
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"{source} has no {', '.join(missing)}; {hint}")
    return files


def export_triton_repository(source: Path, fmt: GraphFormat, out: Path, options: RepositoryOptions) -> Path:
    """Write the model repository for the graphs in ``source`` to ``out`` (a new or empty folder).

    Raises:
        ExportError: ``source`` lacks a graph, or ``out`` exists and is not empty, or cannot be written.

    """
    source, out = Path(source), Path(out)
    text_file, image_file = _graph_files(source, fmt)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty; pass a new folder to --out")
    platform, model_file = ("onnxruntime_onnx", "model.onnx") if fmt is GraphFormat.ONNX else ("tensorrt_plan", "model.plan")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write {out} ({exc.strerror or exc}); pass a writable --out") from exc
    try:
        for name, config, src in (
            (TEXT_MODEL, text_config(platform, options), text_file),
            (IMAGE_MODEL, image_config(platform, options), image_file),
        ):
            (tmp / name / "1").mkdir(parents=True)
            shutil.copyfile(src, tmp / name / "1" / model_file)
            (tmp / name / "config.pbtxt").write_text(config, encoding="utf-8")
        _copy_python_model(tmp / SEGMENT_MODEL / "1")
        (tmp / SEGMENT_MODEL / "config.pbtxt").write_text(segment_config(options), encoding="utf-8")
        tmp.chmod(0o755)
        with deferred_signals():
            if out.exists():
                out.rmdir()
            tmp.rename(out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write {out} ({exc.strerror or exc}); check free space and permissions") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
