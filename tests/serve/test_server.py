"""``gsnet serve`` against the real Triton Inference Server that PyTriton ships, on 127.0.0.1.

One server for the module (tiny demo model exported to ONNX, ONNX Runtime on the CPU); every test
talks to it through ``tritonclient`` over HTTP or gRPC. Free ports, bounded time, the server
stopped at the end. The SIGTERM test starts its own server.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pytriton", reason="serving needs PyTriton (pip install 'gsnet-deploy[serve]')")
pytest.importorskip("tritonclient.http", reason="serving tests need tritonclient")
if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
    pytest.skip("Triton's Python backend needs a Python with a shared libpython (see README, Serving)", allow_module_level=True)

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from gsnet_deploy.serve.client import SegmentClient
from tests.serve.conftest import declared_png

STARTUP_TIMEOUT_S = 180
CLASS_SETS = [("building", "road", "tree"), ("tree", "building", "road", "water"), ("water", "car")]


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    shapes = [(48, 64), (61, 37), (40, 40)]
    out = []
    for h, w in shapes:
        img = np.zeros((h, w, 3), np.uint8)
        img[: h // 2] = rng.integers(0, 255, 3)
        img[h // 2 :] = rng.integers(0, 255, (h - h // 2, w, 3))
        out.append(img)
    return out


test_images.__test__ = False  # type: ignore[attr-defined]


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _ready(port: int, model: str) -> bool:
    """A model's readiness (the server's own is reached before PyTriton has loaded its models)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Server:
    """A ``gsnet serve`` subprocess on free ports."""

    def __init__(self, onnx_dir: Path, log_path: Path, instances: int = 1) -> None:
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "gsnet_deploy.cli", "serve", "--onnx", str(onnx_dir),
            "--host", "127.0.0.1", "--http-port", str(self.http), "--grpc-port", str(self.grpc),
            "--metrics-port", str(self.metrics), "--instances", str(instances),
        ]  # fmt: skip
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if all(_ready(self.http, model) for model in ("gsnet_segment", "gsnet_text")):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def http_request(port: int, rgb: np.ndarray, classes: tuple[str, ...], want_probs: bool = False):
    with SegmentClient(f"127.0.0.1:{port}", timeout_s=300) as client:
        return client.segment(rgb, classes, probs=want_probs)


@pytest.fixture(scope="module")
def server(tiny_onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tiny_onnx_dir, tmp_path_factory.mktemp("serve") / "server.log", instances=2)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def expected(tiny_onnx_dir: Path) -> dict[tuple[int, tuple[str, ...]], np.ndarray]:
    """Class maps of every (image, classes) pair from the library path the CLI uses, out of the server."""
    from gsnet_deploy import Segmenter

    out = {}
    with Segmenter.from_onnx(tiny_onnx_dir) as seg:
        for i, rgb in enumerate(test_images()):
            for classes in CLASS_SETS:
                out[(i, classes)] = np.asarray(seg.segment(rgb, list(classes)).class_map, dtype=np.int32)
    # the pairs must be told apart, or a mixed-up response could pass
    maps = list(out.values())
    assert sum(not np.array_equal(a, b) for a in maps for b in maps if a is not b) > len(maps)
    return out


def test_serve_health_ready_and_metrics(server):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/gsnet_segment/ready", "/v2/models/gsnet_text/ready"):
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http}{path}", timeout=5) as r:
            assert r.status == 200, path
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=5) as r:
        assert b"nv_inference_request_success" in r.read()


def test_serve_http_equals_segment_cli(server, tiny_onnx_dir, tmp_path):
    rgb = test_images()[0]
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb).save(tmp_path / "in" / "scene.png")
    subprocess.run(
        [sys.executable, "-m", "gsnet_deploy.cli", "segment", str(tmp_path / "in" / "scene.png"), "--onnx", str(tiny_onnx_dir),
         "--classes", "building,road,tree", "--out", str(tmp_path / "out"), "--mode", "paper", "--save-probs"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    mask = np.asarray(Image.open(tmp_path / "out" / "scene_mask.png"))
    probs = np.load(next((tmp_path / "out").glob("scene*.npy")))
    result = http_request(server.http, rgb, ("building", "road", "tree"), want_probs=True)
    assert np.array_equal(result.class_map, mask.astype(np.int32))
    np.testing.assert_allclose(result.probs, probs, atol=1e-5)


def test_serve_grpc_pixels_and_text_model(server, expected):
    rgb = test_images()[1]
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    pixels = grpcclient.InferInput("pixels", list(rgb.shape), "UINT8")
    pixels.set_data_from_numpy(rgb)
    names = grpcclient.InferInput("classes", [3], "BYTES")
    names.set_data_from_numpy(np.array([c.encode() for c in CLASS_SETS[0]], dtype=np.object_))
    result = client.infer("gsnet_segment", [pixels, names])
    assert np.array_equal(result.as_numpy("class_map"), expected[(1, CLASS_SETS[0])])
    text = grpcclient.InferInput("classes", [1, 3], "BYTES")  # gsnet_text is batched: [1, N] per request
    text.set_data_from_numpy(np.array([[c.encode() for c in CLASS_SETS[0]]], dtype=np.object_))
    embeds = client.infer("gsnet_text", [text]).as_numpy("text_embeds")[0]
    assert embeds.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, atol=1e-4)
    client.close()


def test_serve_load_no_error_no_mixup(server, expected):
    images = test_images()
    jobs = [(i % len(images), CLASS_SETS[(i // len(images)) % len(CLASS_SETS)]) for i in range(200)]

    def one(job):
        start = time.perf_counter()
        result = http_request(server.http, images[job[0]], job[1])
        return job, result.class_map, time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        done = list(pool.map(one, jobs))
    wall = time.perf_counter() - start
    latencies = np.array([d[2] for d in done]) * 1000
    for job, class_map, _ in done:
        assert np.array_equal(class_map, expected[job]), f"response for {job} does not match its request"
    print(
        f"\nload: {len(done)} requests, 16 clients, p50 {np.percentile(latencies, 50):.0f} ms, "
        f"p99 {np.percentile(latencies, 99):.0f} ms, {len(done) / wall:.1f} req/s"
    )


@pytest.mark.parametrize(
    "case", ["not-an-image", "no-classes", "10000-classes", "zero-pixels", "wrong-dtype", "declared-50000x50000"]
)
def test_serve_bad_request_is_an_error_and_server_goes_on(server, expected, case):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=60)
    names_list = [b"road"]
    if case == "no-classes":
        names_list = []
    elif case == "10000-classes":
        names_list = [f"class {i}".encode() for i in range(10_000)]
    names = httpclient.InferInput("classes", [len(names_list)], "BYTES")
    names.set_data_from_numpy(np.array(names_list, dtype=np.object_).reshape(len(names_list)))
    if case in ("not-an-image", "declared-50000x50000", "no-classes", "10000-classes"):
        data = {"not-an-image": b"GIF?? no", "declared-50000x50000": declared_png(50_000, 50_000)}.get(
            case, png(test_images()[0])
        )
        first = httpclient.InferInput("image", [1], "BYTES")
        first.set_data_from_numpy(np.array([data], dtype=np.object_))
    elif case == "zero-pixels":
        first = httpclient.InferInput("pixels", [0, 4, 3], "UINT8")
        first.set_data_from_numpy(np.zeros((0, 4, 3), np.uint8))
    else:
        first = httpclient.InferInput("pixels", [4, 4, 3], "FP32")
        first.set_data_from_numpy(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(Exception) as info:
        client.infer("gsnet_segment", [first, names])
    assert "InferenceServerException" in type(info.value).__name__
    client.close()
    good = http_request(server.http, test_images()[2], CLASS_SETS[2])
    assert np.array_equal(good.class_map, expected[(2, CLASS_SETS[2])])


def pending_requests(metrics_port: int) -> int:
    """Requests Triton has accepted for gsnet_segment and not yet started (its pending-request gauge)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("nv_inference_pending_request_count") and 'model="gsnet_segment"' in line:
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


def test_serve_sigterm_during_load_loses_no_accepted_request(tiny_onnx_dir, tmp_path, expected):
    srv = Server(tiny_onnx_dir, tmp_path / "server.log", instances=1)
    images = test_images()
    jobs = [(i % len(images), CLASS_SETS[i % len(CLASS_SETS)]) for i in range(8)]

    def one(job):
        try:
            return job, http_request(srv.http, images[job[0]], job[1]).class_map
        except Exception as exc:  # not accepted before shutdown began: allowed, not lost
            return job, exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(one, job) for job in jobs]
        deadline = time.monotonic() + 120
        while (accepted := pending_requests(srv.metrics)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert accepted >= 3, "requests never queued up"
        code = srv.stop(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert code == 0, (tmp_path / "server.log").read_text()[-2000:]
    answered = [(job, r) for job, r in results if isinstance(r, np.ndarray)]
    # every request Triton had accepted when SIGTERM came was answered, and answered right
    assert len(answered) >= accepted, [repr(r)[:200] for _, r in results if not isinstance(r, np.ndarray)]
    for job, class_map in answered:
        assert np.array_equal(class_map, expected[job])
