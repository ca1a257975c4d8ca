"""Turn backends into ``gsnet eval`` predictors: RGB uint8 image -> class-index map (paper protocol)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from gsnet_deploy.backends import BackendKind, BackendOptions, open_backend
from gsnet_deploy.errors import BackendError
from gsnet_deploy.eval.datasets import DatasetSpec
from gsnet_deploy.runtime.segment import encode_vocabulary, segment_paper
from gsnet_deploy.runtime.vocab import DEFAULT_TEMPLATE, TextEmbeddingCache, Vocabulary

Predictor = Callable[[np.ndarray], np.ndarray]


def parse_compare_spec(spec: str, base: BackendOptions) -> BackendOptions:
    """``torch``, ``torch-fp16``, ``onnxruntime[:DIR]`` or ``tensorrt[:DIR]`` on top of the common options."""
    kind_text, _, folder = spec.partition(":")
    fp16 = kind_text.endswith("-fp16")
    kind_text = kind_text.removesuffix("-fp16")
    try:
        kind = BackendKind(kind_text)
    except ValueError as exc:
        choices = "torch, torch-fp16, onnxruntime[:DIR], tensorrt[:DIR]"
        raise BackendError(f"--compare entry {spec!r} is not a backend; use one of {choices}") from exc
    opts = replace(base, kind=kind, fp16=fp16)
    if folder:
        opts = replace(opts, onnx_dir=Path(folder)) if kind is BackendKind.ONNXRUNTIME else replace(opts, engine_dir=Path(folder))
    if kind is BackendKind.TORCH:
        opts = replace(opts, onnx_dir=None, engine_dir=None)
    elif kind is BackendKind.ONNXRUNTIME:
        opts = replace(opts, engine_dir=None)
    else:
        opts = replace(opts, onnx_dir=None)
    return opts


@contextlib.contextmanager
def backend_predictors(
    base: BackendOptions, spec: DatasetSpec, compare: Sequence[str] | None = None, cache: TextEmbeddingCache | None = None
) -> Iterator[dict[str, Predictor]]:
    """Open one backend (or the two of ``compare``) and yield name -> predictor."""
    specs = {s: parse_compare_spec(s, base) for s in compare} if compare else {base.resolved_kind().value: base}
    vocab = Vocabulary(tuple(spec.vocabulary))
    cache = cache or TextEmbeddingCache(None)
    with contextlib.ExitStack() as stack:
        predictors: dict[str, Predictor] = {}
        for name, opts in specs.items():
            backend = stack.enter_context(open_backend(opts))
            embeds = encode_vocabulary(backend, vocab, DEFAULT_TEMPLATE, cache)

            def predict(rgb: np.ndarray, backend=backend, embeds=embeds) -> np.ndarray:  # noqa: ANN001
                return segment_paper(backend, rgb, embeds).argmax(axis=0)

            predictors[name] = predict
        yield predictors
