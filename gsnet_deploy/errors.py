"""User-facing errors: one base class, one subclass per failure domain.

A message is one sentence: what failed, the offending value, and what to do. The CLI prints
``GSNetError`` messages without a traceback (``--debug`` shows it).
"""


class GSNetError(Exception):
    """Base class of every error meant for a user."""


class CheckpointError(GSNetError):
    """A checkpoint file is unreadable, not a GSNet checkpoint, or does not fit the model."""


class VocabularyError(GSNetError):
    """A class list is empty, has blank or duplicate names, or cannot be read."""


class ImageError(GSNetError):
    """An input image cannot be read or has an unusable size or layout."""


class RasterError(ImageError):
    """A raster (GeoTIFF or other rasterio format) cannot be read or written."""


class ExportError(GSNetError):
    """ONNX export, ONNX graph checks or an ONNX model directory failed."""


class EngineBuildError(GSNetError):
    """A TensorRT engine cannot be built, or a built engine does not fit this host."""


class BackendError(GSNetError):
    """An inference backend is unavailable or was given inputs it cannot run."""


class DeviceBlendUnavailable(BackendError):
    """A backend cannot blend this image's tiled windows on its device (tiled mode then blends on the host)."""


class DatasetError(GSNetError):
    """An evaluation dataset is missing, malformed or inconsistent."""
