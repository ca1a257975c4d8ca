"""TensorRT plugin helpers that run without TensorRT: version gate, PTX entry trimming, AOT compile."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from gsnet_deploy.errors import EngineBuildError
from gsnet_deploy.kernels.trt_plugin import PLUGIN_ID, plugin_supported, register_plugin, strip_unused_entry_params


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
        register_plugin()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_compile_kernel_ptx_for_tensorrt() -> None:
    # compiled in a subprocess: this folder's conftest sets TRITON_INTERPRET=1, which turns
    # the kernel into an interpreted function that triton.compile cannot take
    code = textwrap.dedent(
        """
        from gsnet_deploy.kernels.trt_plugin import compile_kernel
        k = compile_kernel("fp16", 90)
        entry = k.ptx[k.ptx.index(".entry"):]
        entry = entry[: entry.index(")")]
        print(k.name, entry.count(".param"), k.shared_mem, k.num_warps)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    name, n_params, shared, warps = run.stdout.split()
    assert name == "cost_volume_kernel"
    assert int(n_params) == 12  # 7 inputs, N, H, W, out, scratch: what TensorRT passes
    assert 0 < int(shared) <= 48 * 1024
    assert int(warps) == 8
