"""Vocabularies: class lists from the command line or a file, prompts, and the text-embedding cache.

A vocabulary is an ordered tuple of class names. A name may carry synonyms separated by ``", "``
(``"low vegetation, grass"``); like the official code, GSNet prompts with the first one only.
Text embeddings depend only on (prompt texts, template, model weights), so they are computed once
and cached on disk under a hash of the three.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gsnet_deploy.contracts.atomic import write_with
from gsnet_deploy.errors import VocabularyError

DEFAULT_TEMPLATE = "A photo of a {} in the scene"
SYNONYM_SEPARATOR = ", "  # the official code's rule: "a, b" is class "a" with synonym "b"


@dataclass(frozen=True)
class Vocabulary:
    """An ordered, validated list of class names."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        """Refuse empty vocabularies, blank names and duplicates."""
        if not self.names:
            raise VocabularyError("the vocabulary is empty; pass at least one class name with --classes or --classes-file")
        seen: dict[str, int] = {}
        for i, name in enumerate(self.names):
            if not name.strip():
                raise VocabularyError(f"class {i + 1} of the vocabulary is blank; remove it or give it a name")
            key = prompt_name(name).strip().lower()
            if key in seen:
                raise VocabularyError(
                    f"class names {seen[key] + 1} and {i + 1} ({self.names[seen[key]]!r}, {name!r}) give the same prompt; "
                    "remove the duplicate"
                )
            seen[key] = i

    def __len__(self) -> int:
        """Number of classes."""
        return len(self.names)

    @property
    def display_names(self) -> tuple[str, ...]:
        """The names as shown in legends: the first synonym of each class."""
        return tuple(prompt_name(n) for n in self.names)

    def prompts(self, template: str = DEFAULT_TEMPLATE) -> list[str]:
        """The prompt text of each class (first synonym put into the template)."""
        return [template.format(prompt_name(n)) for n in self.names]


def prompt_name(name: str) -> str:
    """The part of a class name the model is prompted with: the text before the first ``", "``."""
    return name.split(SYNONYM_SEPARATOR)[0].strip() if SYNONYM_SEPARATOR in name else name.strip()


def parse_classes(text: str) -> Vocabulary:
    """Vocabulary from ``--classes "building,road,tree"`` (comma-separated, spaces trimmed)."""
    if not text.strip():
        raise VocabularyError("--classes is empty; pass class names separated by commas, e.g. --classes 'building,road'")
    return Vocabulary(tuple(part.strip() for part in text.split(",")))


def read_classes_file(path: str | Path) -> Vocabulary:
    """Vocabulary from a file: a JSON list of names (like the official ``datasets/*.json``) or one class per line.

    In the line format a line ``low vegetation, grass`` is one class with a synonym; empty lines
    and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VocabularyError(f"cannot read class file {path} ({exc}); pass a UTF-8 text or JSON file") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            names = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise VocabularyError(
                f"class file {path} looks like JSON but does not parse ({exc.msg} at line {exc.lineno})"
            ) from exc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise VocabularyError(f"class file {path} must hold a JSON list of strings")
        return Vocabulary(tuple(names))
    lines = [line.strip() for line in text.splitlines()]
    return Vocabulary(tuple(line for line in lines if line and not line.startswith("#")))


def text_cache_key(prompts: Sequence[str], template: str, model_digest: str) -> str:
    """Hash of what determines text embeddings: prompt texts, template and model weights."""
    payload = json.dumps({"prompts": list(prompts), "template": template, "model": model_digest}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class TextEmbeddingCache:
    """Text embeddings on disk, one ``.npy`` per (vocabulary, template, model digest).

    Best effort: a cache that cannot be written (read-only home in a container or HPC job) is
    reported once through ``warn`` and the run goes on without it.
    """

    def __init__(self, directory: str | Path | None, warn: Callable[[str], None] = _warn_stderr) -> None:
        """Use ``directory`` (created on first write); None disables caching."""
        self.directory = Path(directory) if directory is not None else None
        self.hits = 0
        self.misses = 0
        self._warn = warn
        self._warned = False

    def get_or_compute(
        self, vocab: Vocabulary, template: str, model_digest: str, compute: Callable[[list[str]], np.ndarray]
    ) -> np.ndarray:
        """Cached embeddings ``[N, D]`` float32, or ``compute(prompts)`` stored for next time."""
        prompts = vocab.prompts(template)
        path = None
        if self.directory is not None:
            path = self.directory / f"{text_cache_key(prompts, template, model_digest)}.npy"
            if path.is_file():
                try:
                    cached = np.load(path, allow_pickle=False)
                    if cached.shape[0] == len(prompts):
                        self.hits += 1
                        return cached
                except (OSError, ValueError):
                    pass  # a damaged cache entry is recomputed and overwritten
        self.misses += 1
        embeds = np.ascontiguousarray(compute(prompts), dtype=np.float32)
        if path is not None:
            try:
                _save_npy(path, embeds)
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    self._warn(
                        f"cannot write the text-embedding cache in {self.directory} ({exc.strerror or exc}); "
                        "continuing without it (set GSNET_CACHE_DIR to a writable folder or pass --no-cache)"
                    )
        return embeds


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (``contracts.atomic``)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    write_with(path, write)
