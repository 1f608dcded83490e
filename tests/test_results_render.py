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


def test_the_speed_section_is_timed_again_at_another_thread_count(tmp_path):
    """A cached images/s section timed with other torch threads is not labelled with this run's count: re-timed."""
    import torch

    from benchmarks.protocol import PROFILES, Bench, Row, speed_threads, speed_together

    bench = Bench(PROFILES["tiny"], tmp_path, lambda line: None)
    rows = [Row("classifier", "models/fashion-mnist-plain/classifier")]
    first = speed_together(bench, rows)
    assert first["threads"] == torch.get_num_threads()
    assert speed_threads({"speed": first, "machine": {"torch_threads": 99}}) == first["threads"]
    stale = {**first, "threads": first["threads"] + 1, "classifier": {"batch 256": {"images_per_s": -1.0}}}
    (tmp_path / "speed.json").write_text(json.dumps(stale))
    again = speed_together(bench, rows)
    assert again["threads"] == torch.get_num_threads()
    assert again["classifier"]["batch 256"]["images_per_s"] > 0
    # a file from before the section recorded its threads reads the run's
    assert speed_threads({"speed": {"seconds": 1.0}, "machine": {"torch_threads": 3}}) == 3
