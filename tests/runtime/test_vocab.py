"""Vocabularies, prompts, the BPE tokenizer and the text-embedding cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gsnet_deploy.errors import VocabularyError
from gsnet_deploy.runtime.tokenizer import BpeTokenizer
from gsnet_deploy.runtime.vocab import TextEmbeddingCache, Vocabulary, parse_classes, read_classes_file


def test_tokenizer_equals_open_clip() -> None:
    open_clip = pytest.importorskip("open_clip")
    texts = [
        "A photo of a impervious surface in the scene",
        "A photo of a Low Vegetation in the scene",
        "Héllo  WORLD's &amp; café!! 42",
        "flooded-road, solar panel",
        "x" * 400,  # longer than the context: cut, last token end-of-text
    ]
    ours = BpeTokenizer()(texts)
    ref = open_clip.get_tokenizer("ViT-B-16")(texts).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert ours.dtype == np.int64 and ours.shape == (5, 77)


def test_synonym_rule_prompts_the_first_part() -> None:
    vocab = Vocabulary(("low vegetation, grass", "building", "a,b"))
    assert vocab.prompts() == [
        "A photo of a low vegetation in the scene",
        "A photo of a building in the scene",
        "A photo of a a,b in the scene",  # only ", " separates synonyms (official rule)
    ]
    assert vocab.display_names == ("low vegetation", "building", "a,b")


def test_parse_classes_splits_on_commas() -> None:
    assert parse_classes(" building, road ,tree").names == ("building", "road", "tree")


@pytest.mark.parametrize(
    ("text", "match"),
    [("", "empty"), ("   ", "empty"), ("road,,tree", "blank"), ("road, Road", "same prompt")],
)
def test_parse_classes_errors(text: str, match: str) -> None:
    with pytest.raises(VocabularyError, match=match):
        parse_classes(text)


def test_classes_file_lines_and_json(tmp_path: Path) -> None:
    lines = tmp_path / "classes.txt"
    lines.write_text("# Potsdam\nimpervious surface\nlow vegetation, grass\n\ntree\n", encoding="utf-8")
    assert read_classes_file(lines).names == ("impervious surface", "low vegetation, grass", "tree")
    js = tmp_path / "classes.json"
    js.write_text(json.dumps(["building", "tree"]), encoding="utf-8")
    assert read_classes_file(js).names == ("building", "tree")


@pytest.mark.parametrize(
    ("content", "match"),
    [("", "empty"), ("[1, 2]", "list of strings"), ("[oops", "does not parse"), ('["a", "a"]', "same prompt")],
)
def test_classes_file_errors(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(VocabularyError, match=match):
        read_classes_file(path)


def test_missing_classes_file(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match="cannot read"):
        read_classes_file(tmp_path / "nope.txt")


def test_text_cache_computes_once(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def compute(prompts: list[str]) -> np.ndarray:
        calls.append(prompts)
        return np.arange(len(prompts) * 4, dtype=np.float32).reshape(len(prompts), 4)

    cache = TextEmbeddingCache(tmp_path)
    vocab = Vocabulary(("road", "tree"))
    first = cache.get_or_compute(vocab, "a {}", "digest-a", compute)
    second = TextEmbeddingCache(tmp_path).get_or_compute(vocab, "a {}", "digest-a", compute)
    np.testing.assert_array_equal(first, second)
    assert len(calls) == 1
    TextEmbeddingCache(tmp_path).get_or_compute(vocab, "a {}", "digest-b", compute)  # other weights: recomputed
    assert len(calls) == 2
    assert not list(tmp_path.glob("*.tmp"))
