"""Test stand-in: a graph model of the repository served by Triton's Python backend through ONNX Runtime.

The ``tritonserver`` that PyTriton bundles has only the Python backend, not ``onnxruntime``; the
serving tests swap each graph model's config for this file so that the real server can run the
repository's Python protocol model (``gsnet_segment``) end to end, BLS calls included.
"""

import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {i.name: pb_utils.get_input_tensor_by_name(request, i.name).as_numpy() for i in self.session.get_inputs()}
            values = self.session.run(None, feeds)
            tensors = [pb_utils.Tensor(o.name, v) for o, v in zip(self.session.get_outputs(), values)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
