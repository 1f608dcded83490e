"""Refresh the results tables quoted in README.md and docs/ from the results files they name.

    python -m benchmarks.docs_tables            # rewrite every quoted table from its results file
    python -m benchmarks.docs_tables --check    # exit 1, naming the tables, if any is not what its file holds

A quoted table sits under a ``<!-- rows from results/NAME.md -->`` mark. It keeps its rows (by their first cell, in
its own order) and takes the header and every cell from the results table that holds those rows, so after a
benchmark is rerun one command brings every document up to date; a row the results file no longer has is an error.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from benchmarks.results import sync_texts

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- rows from (results/[\w./-]+\.md) -->")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def tables(lines: list[str]) -> list[list[str]]:
    """Every markdown table (runs of lines starting with '|') in ``lines``."""
    out, current = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append(current)
            current = []
    return out


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def key_width(rows: list[str]) -> int:
    """How many leading cells name a row uniquely in ``rows`` (the row name, or name and batch size, ...)."""
    for k in range(1, 1 + max(len(cells(r)) for r in rows)):
        if len({tuple(cells(r)[:k]) for r in rows}) == len(rows):
            return k
    raise click.ClickException(f"a table has duplicate rows: {rows}")


def render_quote(quoted: list[str], source: Path) -> list[str]:
    """``quoted`` (header, rule, rows) redone from the table in ``source`` that holds all of its rows."""
    for table in tables(source.read_text().splitlines()):
        if cells(table[0])[0] != cells(quoted[0])[0] or len(table) < 3:
            continue
        k = key_width(table[2:])
        by_key = {tuple(cells(r)[:k]): r for r in table[2:]}
        keys = [tuple(cells(r)[:k]) for r in quoted[2:]]
        if all(key in by_key for key in keys):
            return [table[0], table[1], *(by_key[key] for key in keys)]
    raise click.ClickException(f"no table in {source.relative_to(ROOT)} holds the rows "
                               f"{[cells(r)[0] for r in quoted[2:]]}")


def refresh(text: str) -> str:
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = MARK.search(lines[i])
        i += 1
        if not m:
            continue
        while i < len(lines) and not lines[i].strip():
            i += 1
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        if j - i < 3:
            raise click.ClickException(f"the mark for {m.group(1)} is not followed by a table")
        lines[i:j] = render_quote(lines[i:j], ROOT / m.group(1))
        i += 3
    return "\n".join(lines)


@click.command()
@click.option("--check", is_flag=True, help="Change nothing; exit 1 if a quoted table differs from its file.")
def main(check):
    texts = {doc: doc.read_text() for doc in documents()}
    stale = sync_texts(((doc, text, refresh(text)) for doc, text in texts.items()), check, ROOT)
    if stale:
        click.echo(("stale: " if check else "refreshed: ") + ", ".join(stale), err=True)
    sys.exit(1 if check and stale else 0)


if __name__ == "__main__":
    main()
