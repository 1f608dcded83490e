"""README and docs/ quote results tables: every table under a ``<!-- rows from results/NAME.md -->`` mark must be, line
for line, in that results file (a subset of its rows is fine), so a rerun benchmark cannot leave stale figures
behind. README's Python examples run as written."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_and_docs_tables_are_rows_of_the_results_files_they_name():
    texts = {p.relative_to(ROOT).as_posix(): p.read_text() for p in DOCUMENTS}
    assert quoted_tables(texts["README.md"]), "README lost the mark on its results table"
    assert sum(len(quoted_tables(t)) for t in texts.values()) >= 8, "the documents lost marks on their tables"
    stale = {name: stale_rows(t) for name, t in texts.items() if stale_rows(t)}
    assert not stale, f"rows not in the results file they name (rerun or recopy): {stale}"


def test_readme_is_a_users_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 200, f"README has {len(lines)} lines; research and long tables belong in docs/"
    assert lines[2] == "```bash" and lines[3].startswith("make demo ") and lines[4].startswith("make test ") \
        and lines[5] == "```", "README must open with the two set-up commands"
    for link in re.findall(r"\]\((docs/[\w./-]+?)(?:#[\w-]+)?\)", "\n".join(lines)):
        assert (ROOT / link).is_file(), f"README links to a missing {link}"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks((ROOT / "README.md").read_text()))))
def test_readme_python_examples_run_as_written(index, tmp_path):
    code = python_blocks((ROOT / "README.md").read_text())[index]
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"README example {index} fails:\n{code}\n{r.stderr[-2000:]}"


def test_a_changed_figure_is_caught():
    rows = [r for r in (ROOT / "results/speed.md").read_text().splitlines() if r.startswith("|")][:4]
    changed = rows[3].replace("|", "| 9", 2)  # its first two cells gain a leading 9
    text = "\n".join(["<!-- rows from results/speed.md -->", "", *rows[:3], changed, "", "prose"])
    assert stale_rows(text) == [("results/speed.md", changed)]
