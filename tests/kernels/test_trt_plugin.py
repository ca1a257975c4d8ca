"""TensorRT plugin helpers that run without TensorRT: version gate, PTX entry trimming, AOT compile."""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
import types
import typing

import pytest

from gsnet_deploy.errors import EngineBuildError
from gsnet_deploy.kernels.trt_plugin import (
    PLUGIN_ID,
    CompiledKernel,
    define_plugin,
    plugin_supported,
    ptx_arch,
    register_plugin,
    strip_unused_entry_params,
)


@pytest.mark.parametrize(
    ("version", "expected"),
    [((10, 3), False), ((10, 8), False), ((10, 9), True), ((10, 13), True), ((11, 0), True), ((9, 9), False)],
)
def test_plugin_supported_version_gate(version: tuple[int, int], expected: bool) -> None:
    assert plugin_supported(version) is expected


def test_plugin_id_names_namespace() -> None:
    assert PLUGIN_ID == "gsnet::fused_cost_volume"


PTX = """\
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3,
\t.param .u64 .ptr .global .align 1 k_param_4
)
{
\tld.param.u64 %rd1, [k_param_0];
\tld.param.u32 %r1, [k_param_1];
\tld.param.u64 %rd2, [k_param_2];
\tret;
}
"""


def test_strip_unused_entry_params_drops_trailing_only() -> None:
    out = strip_unused_entry_params(PTX, "k")
    assert "k_param_2" in out and "k_param_3" not in out and "k_param_4" not in out
    assert "k_param_2\n)" in out  # no dangling comma
    assert out.endswith(PTX[PTX.index(")") :])


def test_strip_unused_entry_params_missing_entry() -> None:
    with pytest.raises(EngineBuildError, match="no entry 'other'"):
        strip_unused_entry_params(PTX, "other")


def test_register_plugin_without_tensorrt() -> None:
    trt_spec = importlib.util.find_spec("tensorrt")
    if trt_spec is not None:
        import tensorrt

        if hasattr(tensorrt, "Builder"):
            pytest.skip("real TensorRT installed")
    if trt_spec is None:
        pytest.skip("tensorrt (stubs) not importable")
    with pytest.raises(EngineBuildError, match="TensorRT is not installed"):
        register_plugin(90)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize(("arch", "target"), [(87, "sm_87"), (90, "sm_90a")])
def test_compile_kernel_ptx_for_tensorrt(arch: int, target: str) -> None:
    # catches: PTX compiled for a fixed sm_90a whatever the build GPU (fails to load on Orin, A100, L4)
    # compiled in a subprocess: this folder's conftest sets TRITON_INTERPRET=1, which turns
    # the kernel into an interpreted function that triton.compile cannot take
    code = textwrap.dedent(
        """
        from gsnet_deploy.kernels.trt_plugin import compile_kernel
        import sys
        k = compile_kernel("fp16", int(sys.argv[1]))
        entry = k.ptx[k.ptx.index(".entry"):]
        entry = entry[: entry.index(")")]
        print(k.name, entry.count(".param"), k.shared_mem, k.num_warps, k.ptx.split(".target")[1].split()[0])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-c", code, str(arch)], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    name, n_params, shared, warps, ptx_target = run.stdout.split()
    assert ptx_target == target
    assert name == "cost_volume_kernel"
    assert int(n_params) == 12  # 7 inputs, N, H, W, out, scratch: what TensorRT passes
    assert 0 < int(shared) <= 48 * 1024
    assert int(warps) == 8


# ---- the registered functions against a stand-in of tensorrt.plugin that checks what the real one checks ----


class FakeShapeExpr:
    """A ShapeExpr with a concrete value and ONLY the operators tensorrt.plugin documents (expression on the left)."""

    def __init__(self, value: int) -> None:
        self.value = value

    @staticmethod
    def _other(other: object) -> int:
        if isinstance(other, FakeShapeExpr):
            return other.value
        if isinstance(other, int):
            return other
        raise TypeError(f"unsupported operand {other!r}")

    def __add__(self, other: object) -> FakeShapeExpr:
        return FakeShapeExpr(self.value + self._other(other))

    def __sub__(self, other: object) -> FakeShapeExpr:
        return FakeShapeExpr(self.value - self._other(other))

    def __mul__(self, other: object) -> FakeShapeExpr:
        return FakeShapeExpr(self.value * self._other(other))

    def __floordiv__(self, other: object) -> FakeShapeExpr:
        return FakeShapeExpr(self.value // self._other(other))

    def __eq__(self, other: object) -> FakeShapeExpr:  # type: ignore[override]
        return FakeShapeExpr(int(self.value == self._other(other)))

    def __lt__(self, other: object) -> FakeShapeExpr:
        return FakeShapeExpr(int(self.value < self._other(other)))

    __hash__ = None  # type: ignore[assignment]


class FakeTensorDesc:
    def __init__(self, shape: tuple, dtype: str) -> None:
        self.shape_expr = tuple(s if isinstance(s, FakeShapeExpr) else FakeShapeExpr(s) for s in shape)
        self.dtype = dtype


class FakeSymExprs:
    pass


class FakeSymInt32:
    def __init__(self, value: object) -> None:
        self.value = value.value if isinstance(value, FakeShapeExpr) else value
        assert isinstance(self.value, int)


class FakeSymIntExprs(FakeSymExprs):
    def __init__(self, length: int) -> None:
        self.items: list = [None] * length

    def __setitem__(self, index: int, value: object) -> None:
        assert isinstance(value, (FakeSymInt32, int))
        self.items[index] = value


class FakeLaunch:
    _FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

    def __setattr__(self, name: str, value: object) -> None:
        if name not in self._FIELDS:
            raise AttributeError(name)
        super().__setattr__(name, value.value if isinstance(value, FakeShapeExpr) else value)


class FakeAutoTune:
    def __init__(self, types: str, layouts: str) -> None:
        self.types, self.layouts = types, layouts


def _is_desc(annotation: object) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, FakeTensorDesc)


def _check_outputs(annotation: object) -> None:
    assert typing.get_origin(annotation) is tuple, annotation
    assert all(_is_desc(a) for a in typing.get_args(annotation)), annotation


class FakeTrtp:
    """The parts of ``tensorrt.plugin`` the plugin uses, validating annotations as ``plugin/_validate.py`` does."""

    TensorDesc = FakeTensorDesc
    KernelLaunchParams = FakeLaunch
    SymExprs = FakeSymExprs
    SymIntExprs = FakeSymIntExprs
    SymInt32 = FakeSymInt32
    AutoTuneCombination = FakeAutoTune

    def __init__(self) -> None:
        self.functions: dict[tuple[str, str], typing.Callable] = {}

    @staticmethod
    def cdiv(first: object, second: object) -> FakeShapeExpr:
        if isinstance(first, int):
            if isinstance(second, int):
                raise ValueError("Both arguments cannot be 'int's")
            first = FakeShapeExpr(first)
        assert isinstance(first, FakeShapeExpr)
        s = FakeShapeExpr._other(second)
        return FakeShapeExpr(-(-first.value // s))

    @staticmethod
    def from_shape_expr(shape: tuple, dtype: str) -> FakeTensorDesc:
        return FakeTensorDesc(shape, dtype)

    def _store(self, kind: str, plugin_id: str, fn: typing.Callable) -> typing.Callable:
        if (kind, plugin_id) in self.functions:
            raise ValueError(f"Plugin {plugin_id} already has a definition")
        self.functions[kind, plugin_id] = fn
        return fn

    def register(self, plugin_id: str) -> typing.Callable:
        def wrap(fn: typing.Callable) -> typing.Callable:
            sig = inspect.signature(fn)  # what TensorRT reads: no eval_str, strings stay strings
            for name, param in sig.parameters.items():
                assert _is_desc(param.annotation), f"{name}: {param.annotation!r} is not a TensorDesc class"
            _check_outputs(sig.return_annotation)
            return self._store("register", plugin_id, fn)

        return wrap

    def autotune(self, plugin_id: str) -> typing.Callable:
        def wrap(fn: typing.Callable) -> typing.Callable:
            sig = inspect.signature(fn)
            names = list(sig.parameters)
            assert names[-1] == "outputs"
            _check_outputs(sig.parameters["outputs"].annotation)
            for name in names[:-1]:
                assert _is_desc(sig.parameters[name].annotation), name
            assert typing.get_origin(sig.return_annotation) is list
            assert all(issubclass(a, FakeAutoTune) for a in typing.get_args(sig.return_annotation))
            return self._store("autotune", plugin_id, fn)

        return wrap

    def aot_impl(self, plugin_id: str) -> typing.Callable:
        def wrap(fn: typing.Callable) -> typing.Callable:
            sig = inspect.signature(fn)
            registered = list(inspect.signature(self.functions["register", plugin_id]).parameters)
            assert list(sig.parameters) == [*registered, "outputs", "tactic"]
            for name in registered:
                assert _is_desc(sig.parameters[name].annotation), name
            _check_outputs(sig.parameters["outputs"].annotation)
            assert sig.parameters["tactic"].annotation is int
            ret = sig.return_annotation
            assert typing.get_origin(ret) is tuple, ret
            args = typing.get_args(ret)
            assert len(args) == 4 and args[0] in (str, bytes) and args[1] in (str, bytes)
            assert issubclass(args[2], FakeLaunch) and issubclass(args[3], FakeSymExprs)
            return self._store("aot_impl", plugin_id, fn)

        return wrap


FAKE_TRT = types.SimpleNamespace(float16="fp16", float32="fp32")


def _fake_compile(calls: list) -> typing.Callable:
    def compile_fn(dtype_name: str, arch: int) -> CompiledKernel:
        calls.append((dtype_name, arch))
        return CompiledKernel(name="cost_volume_kernel", ptx="// ptx", num_warps=8, shared_mem=1234)

    return compile_fn


def test_registered_functions_pass_tensorrt_plugin_validation() -> None:
    # catches: string annotations (`from __future__ import annotations`) or `Any`, which tensorrt.plugin's
    # issubclass / get_origin checks reject before any build
    trtp = FakeTrtp()
    define_plugin(trtp, FAKE_TRT, lambda: 87, _fake_compile([]))  # type: ignore[arg-type]
    assert set(trtp.functions) == {(k, PLUGIN_ID) for k in ("register", "autotune", "aot_impl")}
    for fn in trtp.functions.values():
        hints = typing.get_type_hints(fn)
        assert all(not isinstance(h, str) for h in hints.values())


@pytest.mark.parametrize(("b", "n", "h", "w"), [(5, 40, 24, 24), (1, 1, 24, 24), (3, 17, 7, 9)])
def test_plugin_shapes_and_launch_use_only_documented_operators(b: int, n: int, h: int, w: int) -> None:
    # catches: `2 * b` (int on the left: ShapeExpr has no __rmul__), bare ints in a ShapeExprs, and a scratch
    # size or grid that disagrees with the kernel's own launch (triton_cost_volume.launch_grid / scratch_numel)
    from gsnet_deploy.kernels import triton_cost_volume as tcv

    trtp = FakeTrtp()
    calls: list = []
    define_plugin(trtp, FAKE_TRT, lambda: 87, _fake_compile(calls))  # type: ignore[arg-type]
    inputs = [
        FakeTensorDesc((b, 512, h, w), "fp16"),
        FakeTensorDesc((b, 512, h, w), "fp16"),
        FakeTensorDesc((n, 512), "fp16"),
        FakeTensorDesc((128, 1, 7, 7), "fp16"),
        FakeTensorDesc((128,), "fp16"),
        FakeTensorDesc((128, 1, 7, 7), "fp16"),
        FakeTensorDesc((128,), "fp16"),
    ]
    out, scratch = trtp.functions["register", PLUGIN_ID](*inputs)
    assert [s.value for s in out.shape_expr] == [b * n, 256, h, w] and out.dtype == "fp16"
    assert [s.value for s in scratch.shape_expr] == [tcv.scratch_numel(b, n, h, w)] and scratch.dtype == "fp32"
    combos = trtp.functions["autotune", PLUGIN_ID](*inputs, (out, scratch))
    assert combos[0].types.split(", ") == ["FP32|FP16"] * 8 + ["FP32"]
    name, ptx, launch, scalars = trtp.functions["aot_impl", PLUGIN_ID](*inputs, (out, scratch), 0)
    assert (name, ptx) == ("cost_volume_kernel", "// ptx")
    assert calls == [("fp16", 87)]  # compiled for the build GPU's capability
    assert (launch.grid_x, launch.grid_y, launch.grid_z) == tcv.launch_grid(b, n, h)
    assert (launch.block_x, launch.shared_mem) == (8 * 32, 1234)
    assert [s.value for s in scalars.items] == [n, h, w]


def test_plugin_registers_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # catches: a second build in one process re-registering the plugin id (TensorRT: "already has a definition"),
    # and a retarget to another GPU being ignored
    from gsnet_deploy.kernels import trt_plugin

    monkeypatch.setattr(trt_plugin, "_REGISTRY", trt_plugin._Registry())
    trtp = FakeTrtp()
    calls: list = []
    for arch in (90, 90, 87):
        trt_plugin.ensure_registered(trtp, FAKE_TRT, arch, _fake_compile(calls))  # type: ignore[arg-type]
    desc = FakeTensorDesc((1, 512, 24, 24), "fp32")
    trtp.functions["aot_impl", PLUGIN_ID](desc, desc, FakeTensorDesc((2, 512), "fp32"), desc, desc, desc, desc, (), 0)
    assert calls == [("fp32", 87)]


@pytest.mark.parametrize(("capability", "arch"), [((8, 7), 87), ((9, 0), 90), ((8, 0), 80), ((12, 0), 120)])
def test_ptx_arch(capability: tuple[int, int], arch: int) -> None:
    assert ptx_arch(capability) == arch


def test_ptx_arch_refuses_old_gpu() -> None:
    with pytest.raises(EngineBuildError, match=r"6\.1"):
        ptx_arch((6, 1))
