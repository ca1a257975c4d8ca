"""``gsnet serve``: GSNet behind NVIDIA Triton Inference Server, through PyTriton.

PyTriton starts the real ``tritonserver`` binary its wheel ships and binds Python callables to
it as models, so clients get Triton's HTTP/gRPC inference protocol, its health and readiness
endpoints (``/v2/health/live``, ``/v2/health/ready``) and its Prometheus metrics (``/metrics`` on
the metrics port) without a server of our own.

Models:
- ``gsnet_segment``: one image (``image`` bytes or ``pixels``) + ``classes`` (+ ``want_probs``)
  -> ``class_map`` INT32 ``[H, W]`` (+ ``probs`` FP32 ``[N, H, W]`` when asked). Requests are not
  batched together: every image has its own size, and the paper protocol already runs an image's
  five views as one batch. Throughput comes from ``--instances`` (each opens its own backend).
- ``gsnet_text``: ``classes`` BYTES ``[1, N]`` -> ``text_embeds`` FP32 ``[1, N, 512]`` (cached per
  vocabulary; batched: Triton groups requests of the same N, up to ``--max-batch``).

A bad request (see ``serve/requests.py``) gets an error response naming the problem; the server
goes on serving. SIGTERM (``docker stop``, Kubernetes) and SIGINT stop accepting requests, let the
ones in flight finish (up to ``exit_timeout_s``) and exit 0.

PyTriton's Python-backend stub embeds the shared ``libpython`` of the interpreter's version: the
environment must come from a Python built with ``--enable-shared`` whose standard library matches
it (Debian's ``python3.11`` does; a pyenv Python without a shared libpython fails at model load
with ``'_thread.RLock' object has no attribute '_recursion_count'``). ``check_python`` says so up front.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import numpy as np

from gsnet_deploy.errors import GSNetError
from gsnet_deploy.runtime.vocab import Vocabulary
from gsnet_deploy.serve.requests import (
    CLASS_MAP,
    CLASSES,
    IMAGE,
    PIXELS,
    PROBS,
    TEXT_EMBEDS,
    WANT_PROBS,
    Limits,
    RequestError,
    parse_class_names,
    parse_segment_request,
)

SEGMENT_MODEL = "gsnet_segment"
TEXT_MODEL = "gsnet_text"
STARTUP_ATTEMPTS = 3


class ServeError(GSNetError):
    """The server cannot start (missing package, unusable Python, port in use)."""


class Predictor(Protocol):
    """What the server needs from a model: text embeddings and a segmentation (``gsnet_deploy.Segmenter``)."""

    def encode_classes(self, classes: Vocabulary) -> np.ndarray:
        """Text embeddings ``[N, 512]`` of a vocabulary."""
        ...

    def segment(self, image: np.ndarray, classes: Vocabulary, probs: bool = False) -> Any:
        """A result with ``class_map`` ``[H, W]`` and ``probs`` ``[N, H, W]`` or None."""
        ...

    def close(self) -> None:
        """Free the backend."""
        ...


@dataclass(frozen=True)
class ServeOptions:
    """Where and how to serve (parsed once by the CLI)."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1  # model instances of gsnet_segment (each its own backend)
    max_batch: int = 8  # dynamic batching of gsnet_text requests
    exit_timeout_s: int = 60  # how long SIGTERM waits for requests in flight
    triton_log: Path | None = None  # tritonserver's own log (None: a file in the temp folder, printed at start)
    limits: Limits = field(default_factory=Limits)


def check_python() -> None:
    """Refuse an interpreter whose libpython is static: the Triton Python backend stub cannot load it.

    Raises:
        ServeError: the interpreter was built without a shared libpython.

    """
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise ServeError(
            f"this Python ({sys.executable}) has no shared libpython, which Triton's Python backend needs; "
            "create the environment from a Python built with --enable-shared (e.g. Debian's /usr/bin/python3.11)"
        )


def _segment_outputs(predictor: Predictor, inputs: Mapping[str, np.ndarray], limits: Limits) -> dict[str, np.ndarray]:
    """Answer one ``gsnet_segment`` request."""
    request = parse_segment_request(inputs, limits)
    result = predictor.segment(request.rgb, request.vocab, probs=request.want_probs)
    outputs = {CLASS_MAP: np.ascontiguousarray(result.class_map, dtype=np.int32)}
    if request.want_probs:
        outputs[PROBS] = np.ascontiguousarray(result.probs, dtype=np.float32)
    return outputs


class SegmentCallable:
    """The inference callable of one ``gsnet_segment`` instance (PyTriton calls it with a list of requests)."""

    def __init__(self, predictor: Predictor, limits: Limits) -> None:
        self.predictor, self.limits = predictor, limits
        self._lock = threading.Lock()  # a backend runs one request at a time

    def __call__(self, requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Answer each request; a bad one raises ``RequestError`` (its error response) and nothing else changes."""
        with self._lock:
            return [_segment_outputs(self.predictor, request.data, self.limits) for request in requests]


class TextCallable:
    """The inference callable of ``gsnet_text``: class names -> embeddings.

    The model is batched (``classes`` ``[1, N]`` per request, ``text_embeds`` ``[1, N, 512]``): with
    ``--max-batch`` > 1 Triton groups requests of the same class count into one call; a bad request
    then fails its group.
    """

    def __init__(self, predictor: Predictor, limits: Limits) -> None:
        self.predictor, self.limits = predictor, limits
        self._lock = threading.Lock()

    def __call__(self, requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Embeddings of each request's vocabulary."""
        with self._lock:
            out = []
            for request in requests:
                vocab = parse_class_names(request.data[CLASSES], self.limits)
                embeds = np.ascontiguousarray(self.predictor.encode_classes(vocab), dtype=np.float32)  # [N, 512]
                out.append({TEXT_EMBEDS: embeds[None]})  # [1, N, 512]
            return out


class _Stop(Exception):
    """Raised in the main thread by SIGTERM so that serving stops the way Ctrl-C stops it."""


def _bind_models(triton: Any, predictors: list[Predictor], options: ServeOptions) -> None:
    """Bind ``gsnet_segment`` (one instance per predictor) and ``gsnet_text`` to a PyTriton ``Triton``."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    triton.bind(
        model_name=SEGMENT_MODEL,
        infer_func=[SegmentCallable(p, options.limits) for p in predictors],
        inputs=[
            Tensor(name=IMAGE, dtype=np.bytes_, shape=(1,), optional=True),
            Tensor(name=PIXELS, dtype=np.uint8, shape=(-1, -1, -1), optional=True),
            Tensor(name=CLASSES, dtype=np.bytes_, shape=(-1,)),
            Tensor(name=WANT_PROBS, dtype=np.bool_, shape=(1,), optional=True),
        ],
        outputs=[
            Tensor(name=CLASS_MAP, dtype=np.int32, shape=(-1, -1)),
            Tensor(name=PROBS, dtype=np.float32, shape=(-1, -1, -1)),
        ],
        config=ModelConfig(batching=False),
        strict=False,
    )
    triton.bind(
        model_name=TEXT_MODEL,
        infer_func=TextCallable(predictors[0], options.limits),
        inputs=[Tensor(name=CLASSES, dtype=np.bytes_, shape=(-1,))],
        outputs=[Tensor(name=TEXT_EMBEDS, dtype=np.float32, shape=(-1, -1))],
        config=ModelConfig(
            batching=True,
            max_batch_size=max(1, options.max_batch),
            batcher=DynamicBatcher(max_queue_delay_microseconds=2000),
        ),
        strict=False,
    )


def serve(
    open_predictor: Callable[[], Predictor],
    options: ServeOptions,
    on_ready: Callable[[], None] | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> int:
    """Serve until SIGINT or SIGTERM; requests in flight finish first. Returns the exit status (0).

    Args:
        open_predictor: opens one model instance (called ``options.instances`` times).
        options: ports, instances, limits.
        on_ready: called once the models are loaded and the endpoints answer.
        log: where one-line status messages go.

    Raises:
        ServeError: PyTriton is missing or this Python cannot host Triton's Python backend.

    """
    check_python()
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise ServeError("serving needs PyTriton: pip install 'gsnet-deploy[serve]'") from exc

    triton_log = options.triton_log or Path(tempfile.gettempdir()) / f"gsnet-serve-{os.getpid()}-triton.log"
    predictors = [open_predictor() for _ in range(max(1, options.instances))]
    config = TritonConfig(
        http_address=options.host, http_port=options.http_port,
        grpc_address=options.host, grpc_port=options.grpc_port,
        metrics_address=options.host, metrics_port=options.metrics_port,
        exit_timeout_secs=options.exit_timeout_s, allow_gpu_metrics=False, log_file=triton_log, log_verbose=0,
    )  # fmt: skip
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Stop()

    logging.getLogger("pytriton").setLevel(logging.WARNING)
    try:
        signal.signal(signal.SIGTERM, on_term)
        for attempt in range(1, STARTUP_ATTEMPTS + 1):
            with Triton(config=config) as triton:
                try:
                    _bind_models(triton, predictors, options)
                    triton.connect()
                except _Stop:
                    raise
                except Exception as exc:  # PyTriton raises several types when a model fails to load
                    # NOTE: PyTriton's stub-to-process handshake has a 1-second timeout; on a saturated
                    # host a model can fail to load once and load on the next try
                    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                    if attempt == STARTUP_ATTEMPTS:
                        raise ServeError(
                            f"Triton could not load the models after {attempt} attempts ({reason}); see {triton_log}"
                        ) from exc
                    log(f"Triton could not load the models ({reason}); retrying ({attempt}/{STARTUP_ATTEMPTS})")
                    continue
                log(
                    f"serving {SEGMENT_MODEL} ({len(predictors)} instance(s)) and {TEXT_MODEL}: "
                    f"http://{options.host}:{options.http_port} grpc {options.host}:{options.grpc_port} "
                    f"metrics http://{options.host}:{options.metrics_port}/metrics; Triton's log: {triton_log}"
                )
                if on_ready is not None:
                    on_ready()
                try:
                    triton.serve()
                except _Stop:
                    log("SIGTERM: finishing requests in flight, then stopping")
                break
    except _Stop:
        log("SIGTERM before the server was ready: stopping")
    finally:
        signal.signal(signal.SIGTERM, previous)
        for predictor in predictors:
            predictor.close()
    return 0


__all__ = ["SEGMENT_MODEL", "TEXT_MODEL", "RequestError", "ServeError", "ServeOptions", "serve"]
