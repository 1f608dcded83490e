"""`purifier purify`: real files of every kind, real failures, a real SIGKILL, on the torch-free runtime."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from purifier.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "models" / "fashion-mnist")


def lines(path):
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x]


@pytest.fixture
def messy(tmp_path, fmnist_test):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "other").mkdir()
    imgs = (fmnist_test.x[:8, 0] * 255).astype(np.uint8)
    Image.fromarray(imgs[0]).save(d / "a.png")
    Image.fromarray(imgs[1]).save(d / "b.jpg", quality=95)
    Image.fromarray(imgs[2]).save(d / "sub" / "a.png")  # same name, another folder
    Image.fromarray(imgs[3]).save(d / "other" / "ünïcode 名前.png")
    Image.fromarray(np.stack([imgs[4]] * 3, -1)).save(d / "rgb.png")  # RGB for a grayscale model: converted
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(d / "wrong-size.png")
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    data = (d / "a.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    np.savez(d / "arrays.npz", x=imgs[5:8])
    np.savez(d / "wrong-key.npz", pictures=imgs[:2])
    (d / "loop").symlink_to(d, target_is_directory=True)  # a symlink loop
    return d


def test_messy_folder_good_items_purified_bad_ones_logged(messy, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["purify", str(messy), "--model", MODEL, "--out", str(out), "--batch-size", "4"])
    assert r.exit_code == 1, r.output
    manifest, errors = lines(out / "manifest.jsonl"), lines(out / "errors.jsonl")
    sources = {Path(m["source"]).name for m in manifest}
    assert sources == {"a.png", "b.jpg", "ünïcode 名前.png", "rgb.png", "arrays.npz"}
    assert len(manifest) == 8  # a.png twice (two folders), b, unicode, rgb, and 3 array items
    assert len({m["output"] for m in manifest}) == 8  # no two inputs share an output
    reasons = {Path(e["source"]).name: e["error"] for e in errors}
    assert set(reasons) == {"wrong-size.png", "empty.png", "text.png", "truncated.png", "wrong-key.npz"}
    assert "32 x 32" in reasons["wrong-size.png"] and "--resize" in reasons["wrong-size.png"]
    assert "0 bytes" in reasons["empty.png"]
    assert "truncated" in reasons["truncated.png"]
    assert "cannot identify" in reasons["text.png"]
    assert "pictures" in reasons["wrong-key.npz"]
    for m in manifest:
        img = Image.open(out / m["output"])
        img.load()
        assert img.size == (28, 28) and img.mode == "L"
        assert m["predicted_name"] and isinstance(m["rejected"], bool) and m["margin"] >= 0
    assert (out / "other" / "ünïcode 名前.png").exists()
    assert sorted(m["index"] for m in manifest if m["index"] is not None) == [0, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 8 and summary["failed"] == 5


def test_resize_rescues_the_wrong_size_image_and_all_good_exits_zero(tmp_path, fmnist_test):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(np.zeros((40, 36), np.uint8)).save(d / "big.png")
    Image.fromarray((fmnist_test.x[0, 0] * 255).astype(np.uint8)).save(d / "ok.png")
    r = CliRunner().invoke(main, ["purify", str(d), "--model", MODEL, "--out", str(tmp_path / "o"), "--resize"])
    assert r.exit_code == 0, r.output
    assert len(lines(tmp_path / "o" / "manifest.jsonl")) == 2


def test_npz_format_writes_one_array_in_manifest_order(tmp_path, fmnist_test):
    src = tmp_path / "batch.npy"
    np.save(src, fmnist_test.x[:10])
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["purify", str(src), "--model", MODEL, "--out", str(out), "--format", "npz",
                                  "--batch-size", "3"])
    assert r.exit_code == 0, r.output
    with np.load(out / "purified.npz") as f:
        assert f["x"].shape == (10, 1, 28, 28) and f["x"].dtype == np.uint8
        assert f["index"].tolist() == list(range(10))


def test_usage_errors_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["purify", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--model" in r.output
    r = CliRunner().invoke(main, ["purify", str(tmp_path), "--model", MODEL, "--out", str(tmp_path / "o"),
                                  "--batch-size", "0"])
    assert r.exit_code == 2


def test_sigkill_midway_then_resume_gives_each_input_exactly_once(tmp_path, fmnist_test):
    d = tmp_path / "in"
    d.mkdir()
    n = 3000
    imgs = (fmnist_test.x[:n, 0] * 255).astype(np.uint8)
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(d / f"{i:05d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "purifier.cli", "purify", str(d), "--model", MODEL, "--out", str(out),
           "--batch-size", "16", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        m = out / "manifest.jsonl"
        if m.exists() and m.stat().st_size > 0:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(lines(out / "manifest.jsonl"))
    assert 0 < killed_at < n, "the job was not killed midway"
    subprocess.run(cmd, cwd=ROOT, check=True)  # resume is on: OUT holds a manifest
    manifest = lines(out / "manifest.jsonl")
    assert sorted(Path(m["source"]).name for m in manifest) == [f"{i:05d}.png" for i in range(n)]
    assert json.loads((out / "summary.json").read_text())["skipped"] >= killed_at
    for m in manifest:
        Image.open(out / m["output"]).load()  # every output is a complete image
    assert not list(out.rglob("*.tmp"))


def test_purify_runs_without_torch(tmp_path, fmnist_test):
    np.save(tmp_path / "x.npy", fmnist_test.x[:4])
    code = ("import sys; from click.testing import CliRunner; import purifier.cli as c; "
            f"r = CliRunner().invoke(c.main, ['purify', {str(tmp_path / 'x.npy')!r}, '--model', {MODEL!r}, "
            f"'--out', {str(tmp_path / 'o')!r}]); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
