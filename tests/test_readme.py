"""README and docs/ quote results tables: every table under a ``<!-- rows from results/NAME.md -->`` mark must be, line
for line, in that results file (a subset of its rows is fine), so a rerun benchmark cannot leave stale figures
behind. README's Python examples run as written."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def docs_tables():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "benchmarks" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_and_docs_tables_are_what_their_results_files_render():
    texts = {p.relative_to(ROOT).as_posix(): p.read_text() for p in DOCUMENTS}
    marks = docs_tables().MARK
    assert marks.search(texts["README.md"]), "README lost the mark on its results table"
    assert sum(len(marks.findall(t)) for t in texts.values()) >= 8, "the documents lost marks on their tables"
    r = subprocess.run([sys.executable, "-m", "benchmarks.docs_tables", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"tables differ from their results files; run python -m benchmarks.docs_tables: " \
                              f"{r.stderr}"


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


def test_a_changed_figure_is_put_back_and_a_vanished_row_is_an_error():
    rows = [r for r in (ROOT / "results/speed.md").read_text().splitlines() if r.startswith("|")][:4]
    figure = rows[3].rsplit("|", 2)[0] + "| 0.01x |"  # the same row, its last figure changed
    renamed = rows[3].replace("|", "| 9", 2)  # its first cells gain a leading 9: a row the file does not have
    tool = docs_tables()
    text = "\n".join(["<!-- rows from results/speed.md -->", "", *rows[:3], figure, "", "prose"])
    assert figure != rows[3]
    assert tool.refresh(text) == "\n".join(["<!-- rows from results/speed.md -->", "", *rows, "", "prose"])
    with pytest.raises(Exception, match="holds the rows"):
        tool.refresh(text.replace(figure, renamed))


def test_readme_lists_every_shipped_model_by_name_and_folder():
    from serve.models import MODELS

    text = (ROOT / "README.md").read_text()
    for m in MODELS.values():
        assert f"| `{m.name}` | `models/{m.folder}` |" in text, f"README's model table lacks {m.name}"
