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


def test_a_row_measured_before_is_reused_only_with_the_same_weights_attacks_and_suite(tmp_path):
    """measure_rows takes a row from another benchmark's published results file when the weights, the attack
    settings and the suite match, and measures it when one differs or the file is its own; a row not asked for
    enters from the file last published while its weights are unchanged, and is left out once they differ."""
    import dataclasses

    from benchmarks.protocol import PROFILES, Bench, Row, checkpoints_of, measure_rows

    results = tmp_path / "results"
    work = results / ".mine-work"
    work.mkdir(parents=True)
    tiny = PROFILES["tiny"]
    plain = Row("plain classifier", "models/fashion-mnist-plain/classifier")
    other = Row("another name", "models/fashion-mnist-plain/classifier")
    planted = {"name": "measured elsewhere", "checkpoints": checkpoints_of(plain), "adaptive": 0.123, "steps": []}
    profile = json.loads(json.dumps(dataclasses.asdict(tiny)))
    # another benchmark's file, timed with other speed settings: the same computation
    (results / "theirs.json").write_text(json.dumps(
        {"profile": {**profile, "speed_reps": 7}, "rows": {"measured elsewhere": planted}}))
    bench = Bench(tiny, work, lambda line: None)
    got = measure_rows(bench, [plain])
    assert got["plain classifier"]["adaptive"] == 0.123
    assert got["plain classifier"]["measured_as"] == {"name": "measured elsewhere", "cache": "theirs.json"}

    # another attack setting, other weights, another suite, or this benchmark's own file (mine.json for
    # .mine-work): not taken, measured here (6 images: a multiple of 1/6)
    targeted_step = {"attack": "targeted selection r1", "restart": 0, "accuracy": 0.5, "seconds": 1.0}
    for name, report in {
            "theirs.json": {"profile": {**profile, "steps": tiny.steps + 1}, "rows": {"r": planted}},
            "theirs.json ": {"profile": profile, "rows": {"r": {**planted, "checkpoints": {"classifier": "0" * 64}}}},
            "theirs.json  ": {"profile": profile, "rows": {"r": {**planted, "steps": [targeted_step]}}},
            "mine.json": {"profile": profile, "rows": {"r": planted}}}.items():
        for stale in results.glob("*.json"):
            stale.unlink()
        (results / name.strip()).write_text(json.dumps(report))
        (work / "row-plain-classifier.json").unlink()
        got = measure_rows(bench, [plain])
        assert got["plain classifier"]["adaptive"] != 0.123 and "measured_as" not in got["plain classifier"], name

    # a row not asked for comes from the file last published while its weights are unchanged
    mine = results / "mine.json"
    mine.write_text(json.dumps({"profile": profile, "rows": {"another name": {**planted, "name": "another name"}}}))
    got = measure_rows(bench, [plain], [plain, other], mine)
    assert list(got) == ["plain classifier", "another name"] and got["another name"]["adaptive"] == 0.123
    changed = {**planted, "name": "another name", "checkpoints": {"classifier": "0" * 64}}
    mine.write_text(json.dumps({"profile": profile, "rows": {"another name": changed}}))
    assert list(measure_rows(bench, [plain], [plain, other], mine)) == ["plain classifier"]
