"""README quotes results tables: every table under a ``<!-- rows from results/NAME.md -->`` mark must be, line for
line, in that results file (a subset of its rows is fine), so a rerun benchmark cannot leave stale figures behind."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- rows from (results/[\w./-]+\.md) -->")


def quoted_tables(text: str) -> list[tuple[str, list[str]]]:
    """(results file, the table lines below its mark) for every mark; the table must follow the mark's line."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = MARK.search(line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        table = []
        while j < len(lines) and lines[j].startswith("|"):
            table.append(lines[j])
            j += 1
        out.append((m.group(1), table))
    return out


def stale_rows(text: str) -> list[tuple[str, str]]:
    """(results file, README line) for every quoted table line its results file does not hold."""
    stale = []
    for path, table in quoted_tables(text):
        assert len(table) >= 3, f"the mark for {path} is not followed by a table"
        source = set((ROOT / path).read_text().splitlines())
        stale += [(path, row) for row in table if row not in source]
    return stale


def test_readme_tables_are_rows_of_the_results_files_they_name():
    text = (ROOT / "README.md").read_text()
    assert len(quoted_tables(text)) >= 6, "README lost the marks on its results tables"
    assert stale_rows(text) == [], "README rows not in the results file they name: rerun or recopy"


def test_a_changed_figure_is_caught():
    rows = [r for r in (ROOT / "results/speed.md").read_text().splitlines() if r.startswith("|")][:4]
    changed = rows[3].replace("|", "| 9", 2)  # its first two cells gain a leading 9
    text = "\n".join(["<!-- rows from results/speed.md -->", "", *rows[:3], changed, "", "prose"])
    assert stale_rows(text) == [("results/speed.md", changed)]
