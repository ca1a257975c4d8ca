"""Activation ranges for the Q/DQ model, collected view by view in bounded memory.

Why not ModelOpt's own calibration on the paper-size model: its ONNX PTQ (ONNX Runtime's
calibrators) runs an augmented graph that returns every input and output of every quantized node
for a whole feed at once (5 views x 40 classes: the per-class decoder tensors alone are ~0.5 GB
each), and its GEMV check first runs the graph returning every MatMul output (DINO's 12 attention
maps, ~1.3 GB each for 5 views). That is what the OOM killer stopped at 24 GB.

Here, instead:
- ``calib.qdq`` lists the quantized layers from the FP32 graph itself (no ModelOpt pass);
- the FP32 graph runs one view at a time returning only those layers' activation inputs: their
  absolute maxima reduced inside the graph (``stats_session(reduce=True)``, ``collect_amax``) for
  ``max``, or the tensors folded into per-tensor histograms of absolute values that never grow
  (``AbsHistogram``, ``collect_histograms``) for ``entropy``;
- the scales are ``amax / 127`` (symmetric INT8, as ModelOpt writes them).

Peak memory is one view's inference plus the model, whatever the number of views.
Methods: ``max`` (absolute maximum) and ``entropy`` (KL-divergence threshold over a 2048-bin
histogram of ``|x|`` quantized to 128 levels, the classic TensorRT entropy calibration).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gsnet_deploy.errors import ExportError

if TYPE_CHECKING:
    import onnx

HIST_BINS = 2048  # histogram bins over [0, top]; a power of two so that widening merges whole bins
QUANT_LEVELS = 128  # INT8 magnitudes 0..127
ENTROPY_START = 128  # smallest candidate threshold, in bins
ENTROPY_STRIDE = 8  # candidate thresholds every 8 bins (0.4 % of the range): 240 candidates, not 1920
INT8_MAX = 127.0
_CHUNK = 1 << 22  # elements per bincount pass: bounds the int64 index temporary at 32 MiB


@dataclass
class AbsHistogram:
    """Histogram of ``|x|`` over ``[0, top]`` in ``bins`` equal bins, widened by powers of two as values grow.

    Widening doubles ``top`` (as often as needed) and merges adjacent bin pairs, so every earlier
    bin falls exactly into one new bin: the counts equal those of a single histogram of all the
    values over the final range.
    """

    bins: int = HIST_BINS
    top: float = 0.0
    amax: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if self.bins < 2 or self.bins & (self.bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {self.bins}")
        if self.counts.size == 0:
            self.counts = np.zeros(self.bins, dtype=np.int64)

    def _widen(self, amax: float) -> None:
        if self.top == 0.0:
            self.top = amax
            return
        factor = 1
        while self.top * factor < amax:
            factor *= 2
        if factor == 1:
            return
        if factor >= self.bins:  # everything seen so far lands in the first bin
            total = int(self.counts.sum())
            self.counts[:] = 0
            self.counts[0] = total
        else:
            merged = self.counts.reshape(self.bins // factor, factor).sum(axis=1)  # [bins / factor]
            self.counts[:] = 0
            self.counts[: merged.size] = merged
        self.top *= factor

    def update(self, values: np.ndarray) -> None:
        """Add the absolute values of ``values`` (any shape, float)."""
        flat = np.asarray(values).reshape(-1)
        if flat.size == 0:
            return
        amax = float(np.max(np.abs(flat)))
        if not math.isfinite(amax):
            raise ExportError("A calibrated activation holds inf or NaN; check the FP32 model on the calibration views.")
        self.amax = max(self.amax, amax)
        if amax == 0.0 and self.top == 0.0:
            self.counts[0] += flat.size  # all zeros so far: no range yet
            return
        self._widen(amax)
        per_bin = self.bins / self.top
        for start in range(0, flat.size, _CHUNK):
            part = np.abs(flat[start : start + _CHUNK]).astype(np.float64)
            index = np.minimum((part * per_bin).astype(np.int64), self.bins - 1)
            self.counts += np.bincount(index, minlength=self.bins)


def entropy_amax(
    counts: np.ndarray,
    top: float,
    *,
    levels: int = QUANT_LEVELS,
    start: int = ENTROPY_START,
    stride: int = ENTROPY_STRIDE,
) -> float:
    """The clipping threshold that minimizes KL(P || Q) between the histogram and its ``levels``-level quantization.

    For each candidate ``i`` (bins ``start, start + stride, ..., len(counts)``): P is the first ``i``
    bins with everything above added to bin ``i - 1``; Q splits those ``i`` bins into ``levels``
    groups and spreads each group's total evenly over its non-empty bins. Returns ``i * top / bins``
    of the best candidate (the histogram's top when it has fewer than ``start`` bins in use).
    """
    counts = np.asarray(counts, dtype=np.float64)
    bins = counts.size
    if top <= 0.0 or counts.sum() == 0:
        return 0.0
    last_used = int(np.nonzero(counts)[0][-1]) + 1
    if last_used <= start:
        return last_used * top / bins
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = counts[i:].sum()
    best_i, best_kl = bins, math.inf
    for i in range(start, bins + 1, stride):
        p = counts[:i].copy()
        p[i - 1] += tail[i]
        src = counts[:i]
        nonzero = src > 0
        edges = (np.arange(levels) * i) // levels  # group starts; strictly increasing because i >= levels
        totals = np.add.reduceat(src, edges)
        used = np.add.reduceat(nonzero.astype(np.float64), edges)
        sizes = np.diff(np.append(edges, i))
        q = np.repeat(np.divide(totals, used, out=np.zeros_like(totals), where=used > 0), sizes) * nonzero
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0.0:
            continue
        mask = p > 0
        if np.any(q[mask] == 0):
            continue  # P has mass where Q has none: infinite divergence
        kl = float(np.sum(p[mask] / p_sum * np.log((p[mask] / p_sum) / (q[mask] / q_sum))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i * top / bins


def scale_of(hist: AbsHistogram, method: str) -> float:
    """INT8 scale ``amax / 127`` of one tensor's histogram; ``method`` is ``"max"`` or ``"entropy"``."""
    amax = hist.amax if method == "max" else entropy_amax(hist.counts, hist.top)
    if amax <= 0.0:
        amax = hist.amax if hist.amax > 0.0 else 1.0  # an all-zero tensor: any positive scale is exact
    return amax / INT8_MAX


AMAX_SUFFIX = "__absmax"  # output name of a tensor's in-graph absolute maximum (stats_session(reduce=True))


def stats_session(model_path: Path, tensors: Sequence[str], work_dir: Path, *, threads: int = 0, reduce: bool = False) -> object:
    """ONNX Runtime CPU session of ``model_path`` that returns ``tensors`` (and nothing else).

    The model with the extra outputs is written to ``work_dir`` (weights stay in one copy: the proto
    is dropped before the session loads the file). The CPU memory arena is off so that memory freed
    between views goes back to the system instead of staying reserved at its peak.

    With ``reduce``, each tensor's absolute maximum is computed inside the graph (``Abs -> ReduceMax``)
    and returned as ``<tensor>__absmax`` instead of the tensor (``collect_amax``): no tensor is copied
    out to Python and no histogram is folded. (The peak is not what this saves: on the paper graph with
    two views it stayed under the 6.75 GiB bound of ``tests/calib/test_paper_memory.py`` either way.)
    """
    import onnx
    from onnx import helper

    from gsnet_deploy.runtime.ort_session import open_session

    model = onnx.load(str(model_path))
    known = {vi.name for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    known |= {out for node in model.graph.node for out in node.output}
    missing = [t for t in tensors if t not in known]
    if missing:
        raise ExportError(f"Calibrated tensor {missing[0]!r} is not in {model_path.name}; the Q/DQ model is for another graph.")
    del model.graph.output[:]
    for index, name in enumerate(tensors):
        if reduce:
            model.graph.node.extend(
                [
                    helper.make_node("Abs", [name], [f"__amax{index}_abs"], name=f"__amax{index}_Abs"),
                    helper.make_node(
                        "ReduceMax", [f"__amax{index}_abs"], [name + AMAX_SUFFIX], name=f"__amax{index}_ReduceMax", keepdims=0
                    ),
                ]
            )
        model.graph.output.append(onnx.ValueInfoProto(name=name + AMAX_SUFFIX if reduce else name))
    path = Path(work_dir) / "stats_model.onnx"
    large = model.ByteSize() > 1_900_000_000
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True, location=path.name + ".data")
    del model
    return open_session(path, threads=threads, memory_arena=False, quiet=True)


def collect_histograms(
    session: object,
    tensors: Sequence[str],
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    total: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, AbsHistogram]:
    """Run ``session`` on each feed and fold the returned tensors into one ``AbsHistogram`` each.

    Args:
        session: from ``stats_session`` (returns ``tensors`` in this order).
        tensors: the tensor names.
        feeds: input dicts, e.g. one view with all text embeddings each; consumed lazily.
        total: number of feeds, for the progress callback's caller.
        progress: called with the number of feeds done after each one.

    """
    del total
    hists = {name: AbsHistogram() for name in tensors}
    run = session.run  # type: ignore[attr-defined]
    for done, feed in enumerate(feeds, start=1):
        outputs = run(list(tensors), feed)
        for name, value in zip(tensors, outputs):
            hists[name].update(value)
        del outputs
        if progress is not None:
            progress(done)
    return hists


def collect_amax(
    session: object,
    tensors: Sequence[str],
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Absolute maximum of each tensor over all feeds, from a ``stats_session(..., reduce=True)``.

    Raises:
        ExportError: a tensor holds inf or NaN.

    """
    amax = dict.fromkeys(tensors, 0.0)
    names = [t + AMAX_SUFFIX for t in tensors]
    run = session.run  # type: ignore[attr-defined]
    for done, feed in enumerate(feeds, start=1):
        for name, value in zip(tensors, run(names, feed)):
            value = float(value)
            if not math.isfinite(value):
                raise ExportError(f"Activation {name!r} holds inf or NaN; check the FP32 model on the calibration views.")
            amax[name] = max(amax[name], value)
        if progress is not None:
            progress(done)
    return amax


class Progress:
    """One stderr progress bar with an ETA (tqdm), or nothing when ``enabled`` is False."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, unit: str = "view") -> None:
        """Start the bar."""
        self._bar = None
        self._start = time.monotonic()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True)
        self._done = 0

    def __call__(self, done: int) -> None:
        """Move the bar to ``done``."""
        if self._bar is not None:
            self._bar.update(done - self._done)
        self._done = done

    def close(self) -> float:
        """Close the bar; returns the seconds since it started."""
        if self._bar is not None:
            self._bar.close()
        return time.monotonic() - self._start


FLOAT_ELEM_TYPES = (1, 10, 11)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE


@dataclass(frozen=True)
class TensorRange:
    """Range of one tensor over all streamed feeds, and its shape in the first feed."""

    absmax: float
    min: float
    max: float
    shape: tuple[int, ...]


def tensor_ranges(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, TensorRange]:
    """Absmax, min, max and shape of every float tensor of ``model`` (inputs and node outputs), feed by feed.

    The reductions run inside the graph (``Abs -> ReduceMax``, ``ReduceMin``, ``ReduceMax``, ``Shape``),
    so each run returns four small values per tensor instead of the tensor: peak memory is one plain
    inference of one feed, however many tensors and feeds. ``model`` must carry element types in
    ``value_info`` (run shape inference first); it is extended in place for serialization and restored.

    Raises:
        ExportError: the model is over protobuf's 2 GiB limit with its weights inline.

    """
    from onnx import helper

    from gsnet_deploy.runtime.ort_session import open_session

    graph = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*graph.input, *graph.value_info, *graph.output)}
    names = [vi.name for vi in graph.input] + [out for node in graph.node for out in node.output if out]
    names = [n for n in dict.fromkeys(names) if types.get(n) in FLOAT_ELEM_TYPES]
    saved_nodes, saved_outputs = list(graph.node), list(graph.output)
    outputs: list[str] = []
    reductions: dict[str, list[onnx.NodeProto]] = {}
    for index, name in enumerate(names):
        stem = f"__range{index}"
        reductions[name] = [
            helper.make_node("Abs", [name], [f"{stem}_abs"], name=f"{stem}_Abs"),
            helper.make_node("ReduceMax", [f"{stem}_abs"], [f"{stem}_absmax"], name=f"{stem}_AbsMax", keepdims=0),
            helper.make_node("ReduceMin", [name], [f"{stem}_min"], name=f"{stem}_Min", keepdims=0),
            helper.make_node("ReduceMax", [name], [f"{stem}_max"], name=f"{stem}_Max", keepdims=0),
            helper.make_node("Shape", [name], [f"{stem}_shape"], name=f"{stem}_Shape"),
        ]
        outputs += [f"{stem}_absmax", f"{stem}_min", f"{stem}_max", f"{stem}_shape"]
    # NOTE: each tensor's reductions right after its producer, run in that order (priority_order): with them
    # appended at the end, ONNX Runtime's default order kept every tensor alive until the end of the run (tiny
    # graph, N=40: 2.1 GiB vs 0.48 GiB plain; the paper-size graph was OOM-killed above 15 GiB). Now 0.47 GiB.
    order = [node for name in (vi.name for vi in graph.input) for node in reductions.get(name, ())]
    for node in saved_nodes:
        order.append(node)
        order.extend(n for out in node.output for n in reductions.get(out, ()))
    del graph.node[:]
    graph.node.extend(order)
    del order, reductions
    del graph.output[:]
    graph.output.extend(onnx_value(name) for name in outputs)
    try:
        if model.ByteSize() > 2_000_000_000:
            raise ExportError("The model is over 2 GiB with its weights inline; range collection needs it under 2 GiB.")
        payload = model.SerializeToString()
    finally:
        del graph.node[:]
        graph.node.extend(saved_nodes)
        del graph.output[:]
        graph.output.extend(saved_outputs)
    session = open_session(payload, memory_arena=False, quiet=True, priority_order=True, fuse_quantized=False)
    del payload
    ranges: dict[str, TensorRange] = {}
    for done, feed in enumerate(feeds, start=1):
        values = session.run(outputs, feed)
        for index, name in enumerate(names):
            absmax, low, high, shape = values[4 * index : 4 * index + 4]
            if np.asarray(shape).prod() == 0:
                absmax = low = high = 0.0  # an empty tensor reduces to -inf / inf
            old = ranges.get(name)
            new = TensorRange(float(absmax), float(low), float(high), tuple(int(d) for d in np.asarray(shape)))
            if old is not None:
                new = TensorRange(max(old.absmax, new.absmax), min(old.min, new.min), max(old.max, new.max), old.shape)
            ranges[name] = new
        if progress is not None:
            progress(done)
    return ranges


def onnx_value(name: str) -> onnx.ValueInfoProto:
    """A graph output of unknown type and shape named ``name``."""
    import onnx

    return onnx.ValueInfoProto(name=name)
