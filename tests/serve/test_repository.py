"""``gsnet export triton``: configs checked with Triton's own protobuf types, and the repository run by a real server.

The ``tritonserver`` bundled with PyTriton has only the Python backend, so the Python protocol
model ``gsnet_segment`` is loaded as exported, and the two graph models (``onnxruntime`` in the
repository) are swapped for Python stand-ins that run the same ``model.onnx`` with ONNX Runtime.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsnet_deploy.errors import ExportError
from gsnet_deploy.serve.repository import (
    IMAGE_MODEL,
    SEGMENT_MODEL,
    TEXT_MODEL,
    GraphFormat,
    InstanceKind,
    RepositoryOptions,
    export_triton_repository,
    python_model_modules,
)

STANDIN = Path(__file__).with_name("ort_standin_model.py")


def parse_config(path: Path):
    text_format = pytest.importorskip("google.protobuf.text_format")
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(tiny_onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    return export_triton_repository(tiny_onnx_dir, GraphFormat.ONNX, out, RepositoryOptions(kind=InstanceKind.CPU))


def test_repository_configs_parse_and_match_graphs(repo, tiny_onnx_dir):
    onnx = pytest.importorskip("onnx")
    for name, graph_file in ((TEXT_MODEL, "text_encoder.onnx"), (IMAGE_MODEL, "image_graph.onnx")):
        config = parse_config(repo / name / "config.pbtxt")
        assert config.name == name and config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
        graph = onnx.load(str(tiny_onnx_dir / graph_file), load_external_data=False).graph
        for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
            assert [t.name for t in declared] == [t.name for t in actual]
            for t, a in zip(declared, actual, strict=True):
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in a.type.tensor_type.shape.dim]
                assert list(t.dims) == dims, (name, t.name)
        assert (repo / name / "1" / "model.onnx").read_bytes() == (tiny_onnx_dir / graph_file).read_bytes()
    segment = parse_config(repo / SEGMENT_MODEL / "config.pbtxt")
    assert segment.backend == "python"
    assert {p: segment.parameters[p].string_value for p in ("text_model", "image_model")} == {
        "text_model": TEXT_MODEL,
        "image_model": IMAGE_MODEL,
    }


def test_repository_python_model_is_torch_free_and_complete(repo):
    modules = python_model_modules()
    assert not any(m.startswith(("gsnet_deploy.model", "gsnet_deploy.export", "gsnet_deploy.calib")) for m in modules)
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('torch', 'onnx', 'rasterio'):\n"
        "        raise ImportError('blocked ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        f"sys.path.insert(0, {str(repo / SEGMENT_MODEL / '1')!r})\n"
        "import model, gsnet_deploy\n"
        f"assert gsnet_deploy.__file__.startswith({str(repo)!r}), gsnet_deploy.__file__\n"
        "from gsnet_deploy.runtime.tokenizer import BpeTokenizer\n"
        "print(BpeTokenizer()(['a road']).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "(1, 77)" in out.stdout


def test_repository_refuses_nonempty_out_and_missing_graph(tiny_onnx_dir, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_triton_repository(tiny_onnx_dir, GraphFormat.ONNX, tmp_path / "busy", RepositoryOptions())
    with pytest.raises(ExportError, match=r"image_graph\.engine"):
        export_triton_repository(tiny_onnx_dir, GraphFormat.ENGINE, tmp_path / "new", RepositoryOptions())
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]


def _bundled_server(repo: Path, workdir: Path, ports: list[int]) -> subprocess.Popen:
    pytriton = pytest.importorskip("pytriton")
    from pytriton.utils.distribution import get_libs_path, get_stub_path

    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip("Triton's Python backend needs a Python with a shared libpython")
    dist = Path(pytriton.__file__).parent / "tritonserver"
    server_dir = workdir / "tritonserver"
    shutil.copytree(dist, server_dir, ignore=shutil.ignore_patterns("python_backend_stubs", "triton_python_backend_stub"))
    shutil.copy(
        get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"),
        server_dir / "backends" / "python" / "triton_python_backend_stub",
    )
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [env.get("LD_LIBRARY_PATH"), str(get_libs_path())]))
    # the stub's embedded Python finds this environment's packages through the interpreter on PATH (as under PyTriton)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    cmd = [
        str(server_dir / "bin" / "tritonserver"), "--model-repository", str(repo),
        "--backend-directory", str(server_dir / "backends"), "--http-port", str(ports[0]),
        "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--allow-gpu-metrics", "false",
        "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--metrics-address", "127.0.0.1",
    ]  # fmt: skip
    log = (workdir / "tritonserver.log").open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_repository_served_by_real_tritonserver(repo, tiny_onnx_dir, tmp_path):
    httpclient = pytest.importorskip("tritonclient.http")
    from gsnet_deploy import Segmenter
    from tests.serve.test_server import free_ports

    served = tmp_path / "repo"
    shutil.copytree(repo, served)
    for name in (TEXT_MODEL, IMAGE_MODEL):  # the bundled server has no onnxruntime backend: Python stand-ins
        config = (served / name / "config.pbtxt").read_text().replace('platform: "onnxruntime_onnx"', 'backend: "python"')
        (served / name / "config.pbtxt").write_text(config)
        shutil.copy(STANDIN, served / name / "1" / "model.py")
    ports = free_ports(3)
    proc = _bundled_server(served, tmp_path, ports)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "tritonserver.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "tritonserver.log").read_text()[-3000:]
            time.sleep(0.5)
        rgb = np.random.default_rng(3).integers(0, 255, (50, 70, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}", network_timeout=120)
        image = httpclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([buf.getvalue()], dtype=np.object_))
        names = httpclient.InferInput("classes", [3], "BYTES")
        names.set_data_from_numpy(np.array([b"building", b"road", b"tree"], dtype=np.object_))
        flag = httpclient.InferInput("want_probs", [1], "BOOL")
        flag.set_data_from_numpy(np.array([True]))
        result = client.infer(SEGMENT_MODEL, [image, names, flag])
        with Segmenter.from_onnx(tiny_onnx_dir) as seg:
            expected = seg.segment(rgb, ["building", "road", "tree"], probs=True)
        assert np.array_equal(result.as_numpy("class_map"), np.asarray(expected.class_map, dtype=np.int32))
        np.testing.assert_allclose(result.as_numpy("probs"), expected.probs, atol=1e-5)
        bad = httpclient.InferInput("image", [1], "BYTES")
        bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
        with pytest.raises(Exception, match="not a readable"):
            client.infer(SEGMENT_MODEL, [bad, names])
        again = client.infer(SEGMENT_MODEL, [image, names])
        assert np.array_equal(again.as_numpy("class_map"), result.as_numpy("class_map"))
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
