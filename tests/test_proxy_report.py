"""The proxy benchmark's numbers in README.md and docs/proxy_benchmark.md are the ones its sweeps
printed: every generated block equals what `python -m radio_proxy.report` makes of the archived
sweep outputs in docs/proxy_results/ (rewrite them with the command in the docs, never by hand)."""
from pathlib import Path

import pytest

from radio_proxy import report

REPO = Path(__file__).resolve().parents[1]
ARCHIVES = sorted(p for p in (REPO / "docs" / "proxy_results").glob("*") if (p / "summary.json").is_file())


def test_generated_blocks_match_the_archived_sweeps():
    assert ARCHIVES, "docs/proxy_results holds no archived sweep"
    values = {}
    for archive in ARCHIVES:
        values.update(report.blocks(archive))
    curves = REPO / "docs" / "proxy_results" / "teacher_curves.md"
    if curves.is_file():
        values["teacher-curves"] = curves.read_text().strip()
    seen = set()
    for doc in ("README.md", "docs/proxy_benchmark.md"):
        text = (REPO / doc).read_text()
        filled, done = report.fill(text, values)
        assert filled == text, f"{doc}: generated blocks differ from docs/proxy_results ({', '.join(done)})"
        seen.update(done)
    names = {m.group("name") for doc in ("README.md", "docs/proxy_benchmark.md")
             for m in report.BLOCK.finditer((REPO / doc).read_text())}
    assert names <= seen, f"blocks with no archived source: {sorted(names - seen)}"


def test_fill_rewrites_only_named_blocks():
    text = "a\n<!-- BEGIN generated: x-findings -->\nold\n<!-- END generated: x-findings -->\nb\n"
    new, done = report.fill(text, {"x-findings": "| new |", "y-arms": "unused"})
    assert done == ["x-findings"] and "| new |" in new and "old" not in new and new.endswith("b\n")
    assert report.fill(new, {"x-findings": "| new |"})[0] == new  # idempotent
    md = "## Runs\n\nr\n\n## Findings\n\nf1\nf2\n\n## Retention of x\n\nz\n"
    assert report.results_section(md, "## Findings") == "f1\nf2"
    assert report.results_section(md, "## Retention") == "z"
    with pytest.raises(SystemExit):
        report.main(["--help"])
