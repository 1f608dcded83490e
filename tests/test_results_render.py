"""Every committed results markdown is what its benchmark script's renderer makes of the JSON beside it, so a table
cannot drift from the numbers it was rendered from (``python -m benchmarks.rerender`` puts one back)."""
import json
from pathlib import Path

import pytest

from benchmarks.rerender import RENDERERS, rendered

ROOT = Path(__file__).resolve().parents[1]
STEMS = [s for s in RENDERERS if (ROOT / "results" / f"{s}.json").is_file()]


@pytest.mark.parametrize("stem", STEMS)
def test_results_markdown_is_what_its_json_renders(stem):
    md, now, new = rendered(stem)
    assert now == new, f"{md} differs from what its JSON renders: python -m benchmarks.rerender"


def test_a_changed_figure_in_the_json_changes_the_rendered_table(tmp_path, monkeypatch):
    """The comparison can fail: one row's adaptive figure changed in a copy of the JSON renders another table."""
    import benchmarks.rerender as rr

    results = tmp_path / "results"
    results.mkdir()
    for name in ("adversarial-full.json", "adversarial-full.md"):
        (results / name).write_bytes((ROOT / "results" / name).read_bytes())
    report = json.loads((results / "adversarial-full.json").read_text())
    row = next(iter(report["rows"].values()))
    row["adaptive"] = round(row["adaptive"] - 0.01, 6)
    (results / "adversarial-full.json").write_text(json.dumps(report))
    monkeypatch.setattr(rr, "ROOT", tmp_path)
    md, now, new = rr.rendered("adversarial-full")
    assert now != new and f"**{row['adaptive']:.3f}**" in new
