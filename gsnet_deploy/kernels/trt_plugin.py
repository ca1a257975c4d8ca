"""TensorRT plugin ``gsnet::fused_cost_volume``: the Triton cost-volume kernel, compiled ahead of time.

Registered as a Quickly Deployable Plugin (``tensorrt.plugin``): ``register`` describes the
outputs, ``autotune`` the dtypes, and ``aot_impl`` returns the PTX that ``triton.compile`` made
from ``triton_cost_volume.cost_volume_kernel`` plus its launch parameters, so the engine
carries the kernel and no Python runs at inference. AOT plugins need TensorRT 10.9 or newer
(``plugin_supported``); ``export build --plugin`` refuses older versions.

Plugin I/O (matches the ONNX node written by ``export/plugin_rewrite.py``):
inputs ``e_clip, e_dino [B, 512, H, W]``, ``text [N, 512]``, ``w_clip, w_dino [128, 1, 7, 7]``,
``b_clip, b_dino [128]``, all float32 or all float16; outputs ``[B*N, 256, H, W]`` in that dtype
and the kernel's fp32 scratch (an AOT plugin gets no workspace, so the scratch is an output that
nothing reads). The kernel's arguments are ordered inputs, scalars (N, H, W), outputs, which
is the order TensorRT passes them.

What ``tensorrt.plugin`` checks (TensorRT 10.9-11.x ``plugin/_validate.py``), and so what this
module keeps to:

- It reads the registered functions' annotations with ``inspect.signature`` and tests them with
  ``issubclass`` and ``typing.get_origin``: they must be the real ``TensorDesc`` /
  ``KernelLaunchParams`` / ``SymIntExprs`` classes, never strings. This module therefore has no
  ``from __future__ import annotations``, and the functions are defined inside ``define_plugin``
  where ``trtp`` is the imported module.
- ``ShapeExpr`` implements ``+ - * // == <`` with the expression on the LEFT (no reflected
  operators: ``2 * b`` raises ``TypeError``), plus ``trtp.cdiv`` / ``trtp.max`` / ``trtp.min``.
- A plugin id can be registered once per process (a second ``register`` raises "already has a
  definition"); ``register_plugin`` registers once and only updates the target architecture.

NOTE: ``tensorrt-stubs`` 10.13 has no ``tensorrt.plugin`` module, so ``trtp`` is untyped here.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from gsnet_deploy.contracts.tensorrt_import import require_tensorrt
from gsnet_deploy.errors import EngineBuildError

PLUGIN_NAMESPACE = "gsnet"
PLUGIN_NAME = "fused_cost_volume"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
MIN_AOT_VERSION = (10, 9)
MAX_STATIC_SHARED = 48 * 1024  # the launch cannot raise the dynamic shared-memory limit
_PTX_TYPES = {"fp16": "*fp16", "fp32": "*fp32"}


def plugin_supported(trt_version: tuple[int, ...]) -> bool:
    """Whether a TensorRT of this (major, minor) version runs AOT Quickly Deployable Plugins."""
    return tuple(trt_version[:2]) >= MIN_AOT_VERSION


def ptx_arch(compute_capability: tuple[int, int]) -> int:
    """Triton's CUDA target for a GPU of this compute capability: (8, 7) -> 87, (9, 0) -> 90.

    The AOT kernel is compiled for the build GPU only. Triton emits arch-specific PTX for some
    targets (``sm_90a`` on Hopper), which no other GPU can load, so an engine with the plugin is
    never hardware-compatible (``export build`` refuses that combination).
    """
    major, minor = compute_capability
    if major < 7 or not 0 <= minor <= 9:
        raise EngineBuildError(
            f"GPU compute capability {major}.{minor} cannot run the cost-volume plugin; build without --plugin."
        )
    return major * 10 + minor


@dataclass(frozen=True)
class CompiledKernel:
    """PTX of ``cost_volume_kernel`` for one dtype, and what a launch needs."""

    name: str
    ptx: str
    num_warps: int
    shared_mem: int


def strip_unused_entry_params(ptx: str, kernel_name: str) -> str:
    """Drop trailing entry parameters the kernel body never reads.

    Triton 3.x appends scratch pointers (global and profile scratch) to every kernel; TensorRT
    passes exactly inputs, scalars and outputs, so unused trailing parameters must go.

    Args:
        ptx: PTX text from ``triton.compile``.
        kernel_name: the ``.entry`` name.

    Returns:
        The PTX with the unused trailing ``.param`` lines removed.

    Raises:
        EngineBuildError: the entry is missing or a trailing scratch parameter is used.
    """
    head = re.search(rf"\.entry\s+{re.escape(kernel_name)}\s*\(", ptx)
    if head is None:
        raise EngineBuildError(f"PTX has no entry {kernel_name!r}; rebuild the plugin kernel with Triton.")
    close = ptx.index(")", head.end())
    params = [p.strip() for p in ptx[head.end() : close].split(",") if p.strip()]
    body = ptx[close:]
    keep = len(params)
    while keep > 0:
        name = params[keep - 1].split()[-1]
        if re.search(rf"\[{re.escape(name)}\]", body):
            break
        keep -= 1
    new_params = ",\n\t".join(params[:keep])
    return ptx[: head.end()] + "\n\t" + new_params + "\n" + ptx[close:]


def compile_kernel(dtype_name: str, arch: int) -> CompiledKernel:
    """Compile ``cost_volume_kernel`` to PTX with Triton (no GPU needed).

    Args:
        dtype_name: ``"fp16"`` or ``"fp32"``, the dtype of every input and of the output.
        arch: CUDA compute capability of the build GPU as an int (``ptx_arch``: 90 for H100,
            87 for Jetson Orin, 80 for A100).

    Returns:
        The kernel name, PTX with 12 entry parameters, warps and shared memory.

    Raises:
        EngineBuildError: unknown dtype, or the kernel needs more than 48 KB shared memory.
    """
    if dtype_name not in _PTX_TYPES:
        raise EngineBuildError(f"cost-volume plugin dtype {dtype_name!r} is not supported; use fp16 or fp32.")
    import torch
    import triton  # type: ignore[import-untyped]
    from triton.backends.compiler import GPUTarget  # type: ignore[import-untyped]

    from gsnet_deploy.kernels import triton_cost_volume as tcv

    ptr = _PTX_TYPES[dtype_name]
    signature: dict[str, str] = dict.fromkeys(tcv.cost_volume_kernel.arg_names, "constexpr")
    for name in ("e_clip_ptr", "e_dino_ptr", "text_ptr", "w_clip_ptr", "b_clip_ptr", "w_dino_ptr", "b_dino_ptr", "out_ptr"):
        signature[name] = ptr
    signature.update({"N": "i32", "H": "i32", "W": "i32", "scratch_ptr": "*fp32"})
    dtype = torch.float16 if dtype_name == "fp16" else torch.float32
    source = triton.compiler.ASTSource(fn=tcv.cost_volume_kernel, signature=signature, constexprs=tcv.kernel_constexprs(dtype))
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": tcv.NUM_WARPS, "num_stages": tcv.NUM_STAGES},
    )
    meta = compiled.metadata
    if meta.shared > MAX_STATIC_SHARED:
        raise EngineBuildError(
            f"cost-volume kernel ({dtype_name}, sm_{arch}) needs {meta.shared} bytes of shared memory, over "
            f"{MAX_STATIC_SHARED}; build without the plugin."
        )
    ptx = strip_unused_entry_params(compiled.asm["ptx"], meta.name)
    return CompiledKernel(name=meta.name, ptx=ptx, num_warps=meta.num_warps, shared_mem=meta.shared)


def define_plugin(
    trtp: ModuleType,
    trt: ModuleType,
    target_arch: Callable[[], int],
    compile_fn: Callable[[str, int], CompiledKernel] = compile_kernel,
) -> None:
    """Register the plugin's description, dtype combinations and AOT kernel with ``trtp``.

    Args:
        trtp: the ``tensorrt.plugin`` module (tests pass a stand-in with the same classes).
        trt: the ``tensorrt`` module (``float16`` / ``float32`` dtypes).
        target_arch: returns the compute capability to compile for, read when TensorRT asks for the
            kernel (so a later build in the same process may target another GPU).
        compile_fn: ``compile_kernel`` (tests pass a stand-in).
    """
    from gsnet_deploy.kernels import triton_cost_volume as tcv

    tensor_desc = trtp.TensorDesc
    channels = 2 * tcv.CONV_CHANNELS
    scratch_per_program = tcv.CLASS_BLOCK * (tcv.ROWS + 2 * tcv.HALO)  # times (W + 2 * HALO)

    # Every ShapeExpr expression below keeps the expression on the left of the operator.
    @trtp.register(PLUGIN_ID)
    def _describe(
        e_clip: tensor_desc,
        e_dino: tensor_desc,
        text: tensor_desc,
        w_clip: tensor_desc,
        b_clip: tensor_desc,
        w_dino: tensor_desc,
        b_dino: tensor_desc,
    ) -> tuple[tensor_desc, tensor_desc]:
        b, h, w = e_clip.shape_expr[0], e_clip.shape_expr[2], e_clip.shape_expr[3]
        n = text.shape_expr[0]
        out = trtp.from_shape_expr((b * n, channels, h, w), dtype=e_clip.dtype)  # [B*N, 256, H, W]
        programs = trtp.cdiv(h, tcv.ROWS) * trtp.cdiv(n, tcv.CLASS_BLOCK) * b * 2
        scratch = trtp.from_shape_expr((programs * scratch_per_program * (w + 2 * tcv.HALO),), dtype=trt.float32)
        return out, scratch

    @trtp.autotune(PLUGIN_ID)
    def _tune(
        e_clip: tensor_desc,
        e_dino: tensor_desc,
        text: tensor_desc,
        w_clip: tensor_desc,
        b_clip: tensor_desc,
        w_dino: tensor_desc,
        b_dino: tensor_desc,
        outputs: tuple[tensor_desc, tensor_desc],
    ) -> list[trtp.AutoTuneCombination]:
        same = ", ".join(["FP32|FP16"] * 8)  # seven inputs and the output share one dtype
        return [trtp.AutoTuneCombination(f"{same}, FP32", "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(
        e_clip: tensor_desc,
        e_dino: tensor_desc,
        text: tensor_desc,
        w_clip: tensor_desc,
        b_clip: tensor_desc,
        w_dino: tensor_desc,
        b_dino: tensor_desc,
        outputs: tuple[tensor_desc, tensor_desc],
        tactic: int,
    ) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        kernel = compile_fn("fp16" if e_clip.dtype == trt.float16 else "fp32", target_arch())
        b, h, w = e_clip.shape_expr[0], e_clip.shape_expr[2], e_clip.shape_expr[3]
        n = text.shape_expr[0]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(h, tcv.ROWS)
        launch.grid_y = trtp.cdiv(n, tcv.CLASS_BLOCK)
        launch.grid_z = b * 2
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared_mem
        scalars = trtp.SymIntExprs(3)  # N, H, W: between the input and the output pointers
        scalars[0] = trtp.SymInt32(n)
        scalars[1] = trtp.SymInt32(h)
        scalars[2] = trtp.SymInt32(w)
        return kernel.name, kernel.ptx, launch, scalars


@dataclass
class _Registry:
    """What this process has registered: the plugin once, and the GPU its kernel targets."""

    defined: bool = False
    arch: int = 0


_REGISTRY = _Registry()


def ensure_registered(
    trtp: ModuleType,
    trt: ModuleType,
    arch: int,
    compile_fn: Callable[[str, int], CompiledKernel] = compile_kernel,
) -> None:
    """Register the plugin with ``trtp`` the first time; afterwards only retarget it to ``arch``."""
    _REGISTRY.arch = arch
    if _REGISTRY.defined:
        return
    define_plugin(trtp, trt, lambda: _REGISTRY.arch, compile_fn)
    _REGISTRY.defined = True


def register_plugin(arch: int) -> None:
    """Register ``gsnet::fused_cost_volume`` with TensorRT's plugin registry (once per process).

    Args:
        arch: compute capability of the build GPU (``ptx_arch``); the AOT kernel is compiled for it.

    Raises:
        EngineBuildError: TensorRT is missing or older than 10.9.
    """
    trt = require_tensorrt(EngineBuildError, "install tensorrt>=10.9 for the plugin.")
    version = tuple(int(v) for v in trt.__version__.split(".")[:2])
    if not plugin_supported(version):
        raise EngineBuildError(f"TensorRT {trt.__version__} has no AOT plugins; use 10.9 or newer, or build without the plugin.")
    import tensorrt.plugin as trtp  # type: ignore[import-untyped,import-not-found]  # not in the stubs

    ensure_registered(trtp, trt, arch)
