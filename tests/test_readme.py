"""The README states only what a committed result backs: every cited result exists and records its date and command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CITED = re.compile(r"benchmarks/results/[A-Za-z0-9_.\-]+\.(?:md|json)")
DATE = re.compile(r"20\d\d-\d\d-\d\d")


def cited_results(text: str) -> list[str]:
    """Result files the text cites, in order of first mention."""
    return list(dict.fromkeys(CITED.findall(text)))


def records_date_and_command(path: Path) -> bool:
    """Whether a result file says when it was measured and with which command."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        return isinstance(data, dict) and bool(DATE.search(str(data.get("date", "")))) and bool(data.get("command"))
    return bool(DATE.search(text)) and re.search(r"command", text, re.IGNORECASE) is not None


@pytest.mark.parametrize("doc", ["README.md", "docs/serving.md"])
def test_every_cited_result_is_committed_with_date_and_command(doc: str) -> None:
    """Catches: a README figure whose result file was deleted, renamed, or never recorded how it was measured."""
    cited = cited_results((REPO / doc).read_text(encoding="utf-8"))
    assert cited, f"{doc} cites no results"
    missing = [c for c in cited if not (REPO / c).is_file()]
    assert not missing, f"{doc} cites results that are not committed: {missing}"
    undated = [c for c in cited if not records_date_and_command(REPO / c)]
    assert not undated, f"{doc} cites results without a date and a command: {undated}"


def test_the_check_fails_on_an_undated_result(tmp_path: Path) -> None:
    """The check itself can fail: a result without a command or a date is refused."""
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"median_ms": 12.0}), encoding="utf-8")
    assert not records_date_and_command(bare)
    dated = tmp_path / "dated.md"
    dated.write_text("- Date: 2026-11-29. Command: `gsnet bench latency`\n", encoding="utf-8")
    assert records_date_and_command(dated)
