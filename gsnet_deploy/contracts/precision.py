"""Engine precisions offered by ``gsnet export build --precision``."""

from __future__ import annotations

import enum


class Precision(enum.Enum):
    """What the user asks the TensorRT build for.

    Members:
        FP16: FP16 kernels wherever ModelOpt AutoCast (TensorRT >= 10.12) or the builder (older 10.x)
            allows them; sensitive ops stay in FP32.
        INT8: the image graph from its Q/DQ model (INT8 where the Q/DQ nodes say, FP32 elsewhere);
            the text graph stays FP32.
        BEST: the image graph from its Q/DQ model with FP16 elsewhere; the text graph in FP16.
    """

    FP16 = "fp16"
    INT8 = "int8"
    BEST = "best"

    @property
    def needs_qdq(self) -> bool:
        """Whether this precision builds the image graph from a Q/DQ (INT8) model."""
        return self in (Precision.INT8, Precision.BEST)
