"""Class names to text embeddings with the PyTorch model (the text graph, run once per vocabulary).

Tokenization is the runtime's torch-free BPE tokenizer (``runtime.tokenizer``), so every backend
tokenizes identically; prompts follow the official template and synonym rule (``runtime.vocab``).
"""

from __future__ import annotations

import numpy as np
import torch

from gsnet_deploy.model.gsnet import GSNet
from gsnet_deploy.runtime.tokenizer import BpeTokenizer
from gsnet_deploy.runtime.vocab import Vocabulary


@torch.no_grad()
def encode_prompts(model: GSNet, prompts: list[str], tokenizer: BpeTokenizer) -> np.ndarray:
    """L2-normalized embeddings ``[N, 512]`` float32 of prompt texts."""
    device = next(model.parameters()).device
    tokens = torch.from_numpy(tokenizer(prompts)).to(device)  # [N, 77]
    return model.encode_text(tokens).float().cpu().numpy()


def encode_class_names(model: GSNet, vocab: Vocabulary, template: str, tokenizer: BpeTokenizer) -> np.ndarray:
    """Embeddings ``[N, 512]`` of a vocabulary's prompts (first synonym in the template)."""
    return encode_prompts(model, vocab.prompts(template), tokenizer)
