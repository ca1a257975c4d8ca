"""CLIP's byte-pair-encoding tokenizer without torch (the runtime's text front end).

The algorithm of OpenAI CLIP's ``simple_tokenizer`` (MIT): text is cleaned (ftfy, HTML unescape,
whitespace collapsed, lower-cased), split with CLIP's regular expression, each piece mapped to
printable unicode byte symbols and merged by the ranked BPE merges. The vocabulary file
``assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI's (MIT licence), as shipped by open_clip.
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from importlib import resources
from pathlib import Path

import ftfy
import numpy as np
import regex

CONTEXT_LENGTH = 77
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
_NUM_MERGES = 49152 - 256 - 2
_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def default_vocab_path() -> Path:
    """The BPE merges file shipped with the package."""
    return Path(str(resources.files("gsnet_deploy.runtime").joinpath("assets/bpe_simple_vocab_16e6.txt.gz")))


@lru_cache
def _byte_symbols() -> dict[int, str]:
    """CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def clean_text(text: str) -> str:
    """Fix mojibake, unescape HTML twice, collapse whitespace and lower-case (CLIP's cleaning)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class BpeTokenizer:
    """CLIP's BPE tokenizer, built from an explicit merges file (no module-level instance)."""

    def __init__(self, vocab_path: str | Path | None = None, context_length: int = CONTEXT_LENGTH) -> None:
        """Load the merges from ``vocab_path`` (default: the packaged OpenAI file)."""
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        symbols = list(_byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.context_length = context_length
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self._cache: dict[str, list[str]] = {SOT: [SOT], EOT: [EOT]}

    def _bpe(self, piece: str) -> list[str]:
        """Merge the byte symbols of one pre-split piece by rank until no merge applies."""
        if piece in self._cache:
            return self._cache[piece]
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens."""
        byte_map = _byte_symbols()
        ids: list[int] = []
        for piece in _SPLIT.findall(clean_text(text)):
            symbols = "".join(byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[tok] for tok in self._bpe(symbols))
        return ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Tokenize prompts to int64 ``[len(texts), context_length]``, zero-padded.

        A prompt longer than the context is cut and its last token made end-of-text (open_clip's
        rule; the class names GSNet sees never come close to 77 tokens).
        """
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = ids
        return out
