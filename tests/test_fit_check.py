"""benchmarks/fit_check.py: the three image sets it attacks, and a run on a handful of images."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks import fit_check
from purifier import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_the_sets_are_the_runs_own_training_images_held_out_images_and_test_images():
    meta = checkpoint.read_record(ROOT / "models/middleware/cvae-alone-smooth200/cvae")["meta"]
    s = fit_check.sets(meta, 50)
    rows = {k: {x.numpy().tobytes() for x in v[0]} for k, v in s.items()}
    assert all(len(v[0]) == len(v[1]) == 50 for v in s.values())
    assert not rows["train"] & rows["validation"] and not rows["validation"] & rows["test"]
    # the validation images are the held-out split past the ones the run's own check attacked
    from purifier.data import load_dataset
    from purifier.fitting import split
    _, _, xv, _ = split(load_dataset("fashion-mnist", "train"), meta["n_val"], meta["train"]["seed"])
    assert np.array_equal(s["validation"][0].numpy(), xv[fit_check.VAL_SKIP:fit_check.VAL_SKIP + 50].numpy())


def test_a_tiny_run_writes_every_row(tmp_path):
    out = tmp_path / "fit.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.fit_check", "--n", "4", "--steps", "1", "--out", str(out),
                        "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert [name for name, *_ in fit_check.ROWS] == list(rep["rows"])
    for row in rep["rows"].values():
        assert all(0 <= row[k] <= 1 for k in ("train", "validation", "test"))
    assert "| train - test |" in out.with_suffix(".md").read_text()
