"""The README stays short and every relative link in README.md and docs/*.md works.

Links are checked as GitHub renders them: a relative target must be an existing file or folder, and a
`#anchor` (in the same page or `page.md#anchor`) must match a heading of the target under GitHub's
slug rules (lowercase, punctuation except '-' and '_' dropped, spaces to '-', repeats get -1, -2, ...).
Links inside fenced code blocks and inline code are not links.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

MAX_README_LINES = 250
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (markdown formatting reduced to the rendered text)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images -> their text
    text = INLINE_CODE.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(path: Path) -> list[str]:
    """Link and image targets of a markdown file that are not absolute URLs."""
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("", line)
        for match in LINK.finditer(line):
            target = match.group(1)
            if not SCHEME.match(target) and not target.startswith("//"):
                targets.append(target)
    return targets


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}: ({target})"
        if not resolved.exists():
            problems.append(f"{where}: no such file {resolved}")
            continue
        if anchor:
            if resolved.is_dir() or resolved.suffix.lower() != ".md":
                problems.append(f"{where}: an anchor into something that is not a markdown file")
            elif anchor not in anchors(resolved):
                problems.append(f"{where}: no heading with anchor #{anchor} in {resolved.name} "
                                f"(has: {', '.join(sorted(anchors(resolved)))})")
    return problems


def test_github_slug_rules():
    assert github_slug("ECI vs EI: why the curriculum does not pay here") == "eci-vs-ei-why-the-curriculum-does-not-pay-here"
    assert github_slug("Omniglot benchmark (real data, CPU)") == "omniglot-benchmark-real-data-cpu"
    assert github_slug("The separate push (`purer_sep`)") == "the-separate-push-purer_sep"
    assert github_slug("1. Edit the profile once") == "1-edit-the-profile-once"
    assert github_slug("Results (CPU, 2 torch threads; run of 17:19, load 0.6 -> 1.7)") == \
        "results-cpu-2-torch-threads-run-of-1719-load-06---17"


def test_link_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#a-section) [ok](#page) [bad](missing.md) [bad](other.md#nope)\n"
                    "`[not a link](missing.md)`\n```\n[not a link](missing.md)\n```\n")
    assert relative_links(page) == ["other.md#a-section", "#page", "missing.md", "other.md#nope"]
    problems = broken_links(page)
    assert len(problems) == 2
    assert "missing.md" in problems[0] and "#nope" in problems[1]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move details to docs/"


def test_readme_has_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "make run" in text
    assert "make test" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_the_docs_index_lists_every_page():
    index = REPO_ROOT / "docs" / "README.md"
    assert index.is_file()
    listed = {(index.parent / target.partition("#")[0]).resolve() for target in relative_links(index)}
    missing = [path.name for path in DOCS if path != index and path.resolve() not in listed]
    assert missing == [], f"docs/README.md does not list {missing}"


def test_the_readme_overview_is_the_recorded_benchmark_results(capsys):
    # docs/benchmark_results/<scenario>.json: each benchmark run's results/metrics.json, as its DVC experiment saved it.
    import sys

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import benchmark_table

    import yaml

    order = list(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["scenarios"])  # the README's column order
    recorded = sorted((REPO_ROOT / "docs" / "benchmark_results").glob("*.json"), key=lambda path: order.index(path.stem))
    benchmark_table.main(["--overview", "--metrics", *map(str, recorded)])
    table = capsys.readouterr().out.strip()
    assert table.count("\n") >= 3 and table in README.read_text(encoding="utf-8")


def test_the_published_numbers_name_scenarios_and_methods_the_benchmark_has():
    import sys

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import benchmark_table

    import yaml

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    benchmark = yaml.safe_load((REPO_ROOT / "configs" / "benchmark.yaml").read_text())
    names = set(params["methods"]) | set(benchmark["metatest"]["baselines"])
    path = REPO_ROOT / "docs" / "benchmark_results" / "published.yaml"
    for scenario in yaml.safe_load(path.read_text()):
        assert scenario in params["scenarios"], f"{scenario} is not a scenario of params.yaml"
        rows = benchmark_table.published_numbers(path, scenario)  # also checks every [mean, ci95]
        assert set(rows) <= names, f"{scenario}: {set(rows) - names} are not methods or baselines of the benchmark"


def test_the_differences_table_has_rows_for_every_registered_algorithm():
    """docs/library.md lists each algorithm's deliberate differences from its official code, one table row each."""
    from dfml.methods.base import ALGORITHMS

    text = (REPO_ROOT / "docs" / "library.md").read_text()
    section = text.split("## Differences from the official code", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in prose_lines(section) if line.startswith("| ")]
    assert rows and [cell.strip() for cell in rows[0]] == ["algorithm", "difference from the official code",
                                                           "option (default)", "reason"]
    algorithms = [cells[0].strip() for cells in rows[1:]]
    assert all(len(cells) == 4 and all(cell.strip() for cell in cells) for cells in rows[1:])
    assert set(algorithms) <= {"all", *ALGORITHMS}, sorted(set(algorithms) - {"all", *ALGORITHMS})
    assert not [name for name in ALGORITHMS if name not in algorithms]


def test_the_spread_docs_quote_is_what_the_two_recorded_seed_sets_give():
    # docs/benchmark.md quotes tools/replicate.py on the spread run (glyph SS, training seeds 3-5) against the
    # record (seeds 0-2); both are in git, so the quote is checked against them, outside cells named.
    from dfml.replication import compare, markdown

    results = REPO_ROOT / "docs" / "benchmark_results"
    checks = compare(json.loads((results / "spread" / "ss_seeds3-5.json").read_text()),
                     json.loads((results / "ss.json").read_text()))
    benchmark = (REPO_ROOT / "docs" / "benchmark.md").read_text(encoding="utf-8")
    summary = markdown(checks)[:3]  # the count line and one distance line per calibration
    assert len(summary) == 3 and all(line in benchmark for line in summary), summary
    unnamed = [c.cell for c in checks if c.verdict in ("outside", "missing") and c.cell not in benchmark]
    assert unnamed == [], unnamed
