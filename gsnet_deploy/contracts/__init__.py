"""On-disk contracts, torch-free: I/O names, manifests, derived-model names and sidecars, the atomic writer.

The bottom floor of the package (above ``errors``): everything that two packages must agree on
about files lives here, so that ``runtime`` (torch-free, for Jetsons) and ``export`` (torch) can
both import it without importing each other.

- ``io_names``: input/output names, dynamic axes and file names of the two graphs.
- ``onnx_manifest``: the ONNX folder's ``manifest.json`` and the checks made on opening a folder.
- ``engine_manifest``: the ``*.engine.json`` manifests and the host-compatibility checks.
- ``derived``: FP16 / INT8 Q/DQ model file names and their ``.json`` sidecars.
- ``precision``, ``model_size``: the enums those files and the CLI name.
- ``tensorrt_import``: telling real TensorRT from its type stubs.
- ``atomic``: the one atomic writer.

Nothing here imports torch, onnx, onnxruntime, TensorRT or rasterio at module level
(``tests/test_structure.py``).
"""
