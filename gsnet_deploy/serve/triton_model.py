"""``gsnet_segment`` as a Triton Python-backend model (BLS), for a stock ``tritonserver`` container.

``gsnet export triton`` copies this file as ``gsnet_segment/1/model.py`` of the model repository,
with the torch-free parts of ``gsnet_deploy`` it needs beside it. Per request it validates the
inputs with the rules of ``gsnet serve`` (``serve/requests.py``), tokenizes the class names,
gets their embeddings from the text model (cached per vocabulary), cuts the paper protocol's
5 views, runs them through the image model, merges the logits, and answers the class map (and the
probabilities when asked). The two graphs run as their own Triton models (``onnxruntime`` or
``tensorrt_plan`` backends) called through BLS, so they get Triton's scheduling and GPU placement.
A bad request gets its own error response; the other requests of the batch are answered.

``triton_python_backend_utils`` exists only inside Triton: it is imported in ``initialize``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from gsnet_deploy.contracts.io_names import IMAGES, LOGITS, TEXT_EMBEDS, TEXT_TOKENS
from gsnet_deploy.runtime.protocol import merge_paper_logits, paper_views
from gsnet_deploy.runtime.tokenizer import BpeTokenizer
from gsnet_deploy.runtime.vocab import DEFAULT_TEMPLATE
from gsnet_deploy.serve.requests import CLASS_MAP, CLASSES, IMAGE, PIXELS, PROBS, WANT_PROBS, Limits, parse_segment_request

TEXT_CACHE_ENTRIES = 256  # vocabularies whose embeddings are kept


class TritonPythonModel:
    """The Python-backend entry points: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the model's parameters (names of the graph models, limits) from its config."""
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.text_model = params.get("text_model", "gsnet_text_encoder")
        self.image_model = params.get("image_model", "gsnet_image_graph")
        self.template = params.get("template", DEFAULT_TEMPLATE)
        self.limits = Limits(
            max_pixels=int(params.get("max_pixels", Limits.max_pixels)),
            max_classes=int(params.get("max_classes", Limits.max_classes)),
        )
        self.tokenizer = BpeTokenizer()
        self.text_cache: dict[tuple[str, ...], np.ndarray] = {}

    def _infer(self, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        """Run another model of the repository through BLS and return one output."""
        request = self.pb.InferenceRequest(
            model_name=model,
            requested_output_names=[output],
            inputs=[self.pb.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"model {model} failed: {response.error().message()}")
        return self.pb.get_output_tensor_by_name(response, output).as_numpy()

    def _text_embeds(self, prompts: list[str]) -> np.ndarray:
        key = tuple(prompts)
        if key not in self.text_cache:
            if len(self.text_cache) >= TEXT_CACHE_ENTRIES:
                self.text_cache.pop(next(iter(self.text_cache)))
            self.text_cache[key] = self._infer(self.text_model, {TEXT_TOKENS: self.tokenizer(prompts)}, TEXT_EMBEDS)
        return self.text_cache[key]

    def _answer(self, request: Any) -> Any:  # pb_utils types exist only inside Triton
        """One response: outputs, or an error for this request alone."""
        pb = self.pb
        inputs = {}
        for name in (IMAGE, PIXELS, CLASSES, WANT_PROBS):
            tensor = pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        try:
            parsed = parse_segment_request(inputs, self.limits)
            text_embeds = self._text_embeds(parsed.vocab.prompts(self.template))
            views = paper_views(parsed.rgb)
            logits = self._infer(self.image_model, {IMAGES: views.views, TEXT_EMBEDS: text_embeds}, LOGITS)
            probs = merge_paper_logits(logits, views.height, views.width)  # [N, H, W]
        except Exception as exc:  # every failure becomes this request's error response
            return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc)))
        outputs = [pb.Tensor(CLASS_MAP, np.argmax(probs, axis=0).astype(np.int32))]
        if parsed.want_probs:
            outputs.append(pb.Tensor(PROBS, probs.astype(np.float32)))
        return pb.InferenceResponse(output_tensors=outputs)

    def execute(self, requests: list[Any]) -> list[Any]:
        """Answer each request of the batch on its own."""
        return [self._answer(request) for request in requests]

    def finalize(self) -> None:
        """Nothing to free: the graphs belong to their own models."""
        self.text_cache.clear()
