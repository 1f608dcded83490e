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
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(MODELS["fashion-mnist"].path)


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
        assert m["score"] > 0 and m["recon_error"] == m["score"]  # the chosen class's score; the deprecated alias
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
    wait_for_manifest(proc, out)
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


def test_purify_runs_without_torch(tmp_path, fmnist_test, torch_free):
    np.save(tmp_path / "x.npy", fmnist_test.x[:4])
    torch_free("from click.testing import CliRunner; import purifier.cli as c; "
               f"r = CliRunner().invoke(c.main, ['purify', {str(tmp_path / 'x.npy')!r}, '--model', {MODEL!r}, "
               f"'--out', {str(tmp_path / 'o')!r}]); assert r.exit_code == 0, r.output")


def wait_for_manifest(proc: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    """Return once ``out``'s manifest has its first lines on disk (or the process ended, or ``timeout`` passed)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        m = out / "manifest.jsonl"
        if m.exists() and m.stat().st_size > 0:
            return
        time.sleep(0.005)


def interrupt_midway(cmd, out: Path, signum) -> subprocess.CompletedProcess:
    """Start ``cmd``, send ``signum`` once its first manifest lines are on disk, return the finished process."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_manifest(proc, out)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def interrupt_and_resume(tmp_path, fmnist_test, signum, n: int, *options: str) -> str:
    """`purifier purify` (with ``options``) on ``n`` test images, sent ``signum`` midway, then rerun: both runs
    checked (130 after recording every finished batch; the rerun adds each remaining input once). Returns the
    interrupted run's stderr."""
    src = tmp_path / "x.npy"
    np.save(src, (fmnist_test.x[:n] * 255).round().astype(np.uint8))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "purifier.cli", "purify", str(src), "--model", MODEL, "--out", str(out), *options]
    r = interrupt_midway(cmd, out, signum)
    assert r.returncode == 130, r.stderr
    assert "Aborted!" not in r.stderr and "Traceback" not in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    recorded = len(lines(out / "manifest.jsonl"))
    assert summary["interrupted"] is True and 0 < summary["done"] < n, "the job was not interrupted midway"
    assert summary["done"] == recorded  # the batch in flight was finished and recorded, none lost
    assert summary["done"] + summary["remaining"] == n
    assert f"interrupted with {n - recorded} inputs left" in r.stderr and "rerun the same command" in r.stderr
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert sorted(m["index"] for m in lines(out / "manifest.jsonl")) == list(range(n))  # each exactly once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is False and summary["skipped"] == recorded and summary["done"] == n - recorded
    return r.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_interrupt_midway_exits_130_after_writing_summary_and_a_rerun_finishes_the_rest(tmp_path, fmnist_test,
                                                                                       signum):
    interrupt_and_resume(tmp_path, fmnist_test, signum, 3000, "--batch-size", "64")


def test_a_stop_request_purifies_the_images_loaded_and_a_hard_interrupt_still_writes_the_summary(tmp_path,
                                                                                                fmnist_test):
    from serve.batch import purify_files

    n = 300
    src = tmp_path / "x.npy"
    np.save(src, fmnist_test.x[:n])
    out = tmp_path / "out"
    asked = []

    def stop_at_the_100th_question():
        asked.append(1)
        return len(asked) >= 100

    stats = purify_files([str(src)], MODEL, out, batch_size=256, should_stop=stop_at_the_100th_question)
    assert stats.interrupted and 0 < stats.done < 256  # part of the first batch: the images loaded by then
    assert stats.done == len(lines(out / "manifest.jsonl")) and stats.remaining == n - stats.done
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True

    def ctrl_c_twice():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        purify_files([str(src)], MODEL, out, batch_size=64, should_stop=ctrl_c_twice)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["remaining"] == n - stats.done
    stats = purify_files([str(src)], MODEL, out, batch_size=64)
    assert not stats.interrupted and stats.remaining == 0
    assert sorted(m["index"] for m in lines(out / "manifest.jsonl")) == list(range(n))


def test_a_rerun_while_an_earlier_failure_stands_exits_1_and_counts_it(tmp_path, fmnist_test):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray((fmnist_test.x[0, 0] * 255).astype(np.uint8)).save(d / "good.png")
    (d / "bad.png").write_text("not an image")
    out = tmp_path / "out"
    args = ["purify", str(d), "--model", MODEL, "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    assert "failed 1," in r.stderr and "errors.jsonl" in r.stderr
    r = CliRunner().invoke(main, args)  # resume: nothing new to do, but bad.png's failure still stands
    assert r.exit_code == 1, r.output
    assert "done 0, failed 1 (1 recorded by an earlier run; --no-resume retries them)" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 1 and summary["failed_earlier"] == 1 and summary["skipped"] == 1
    assert len(lines(out / "errors.jsonl")) == 1  # counted, not recorded twice
    Image.fromarray((fmnist_test.x[1, 0] * 255).astype(np.uint8)).save(d / "bad.png")  # the user fixes it
    r = CliRunner().invoke(main, args + ["--no-resume"])
    assert r.exit_code == 0, r.output
    assert "failed 0," in r.stderr


def test_a_non_image_file_in_a_folder_is_counted_and_listed_as_skipped(tmp_path, fmnist_test):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray((fmnist_test.x[0, 0] * 255).astype(np.uint8)).save(d / "a.png")
    (d / "notes.txt").write_text("shot on Tuesday")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["purify", str(d), "--model", MODEL, "--out", str(out)])
    assert r.exit_code == 0, r.output  # not an input, so not a failure
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 1 and summary["failed"] == 0
    assert summary["skipped_files"] == [{"path": str(d / "notes.txt"),
                                         "reason": "not an image or array file (extension '.txt')"}]
    assert "skipped 1 non-image file (notes.txt; listed in summary.json)" in r.stderr
    assert [Path(m["source"]).name for m in lines(out / "manifest.jsonl")] == ["a.png"]


def test_npz_resume_keeps_the_parts_the_earlier_manifest_names(tmp_path, fmnist_test):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, fmnist_test.x[:6])
    np.save(b, fmnist_test.x[100:106])
    out = tmp_path / "o"
    base = ["purify", "--model", MODEL, "--out", str(out), "--format", "npz", "--batch-size", "4"]
    assert CliRunner().invoke(main, [*base[:1], str(a), *base[1:]]).exit_code == 0
    with np.load(out / "purified.npz") as f:
        first = f["x"].copy()
    r = CliRunner().invoke(main, [*base[:1], str(a), str(b), *base[1:]])  # resumes: only b is new
    assert r.exit_code == 0, r.output
    with np.load(out / "purified.npz") as f:
        assert f["source"].tolist() == [str(a)] * 6 + [str(b)] * 6
        assert np.array_equal(f["x"][:6], first)  # a's rows are still a's purified images
        assert not np.array_equal(f["x"][6:], first)


def test_model_by_shipped_name_and_an_unknown_name_listing_the_known_ones(tmp_path, fmnist_test):
    np.save(tmp_path / "x.npy", fmnist_test.x[:4])
    r = CliRunner().invoke(main, ["purify", str(tmp_path / "x.npy"), "--model", "fashion-mnist",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["model"] == str(Path(MODEL) / "pipeline.onnx")
    r = CliRunner().invoke(main, ["purify", str(tmp_path / "x.npy"), "--model", "fashion",
                                  "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2
    assert "no model 'fashion'" in r.output
    assert "fashion-mnist, fashion-mnist-middleware, fashion-mnist-plain, fashion-mnist-joint" in r.output


def test_help_gives_the_exit_codes():
    r = CliRunner().invoke(main, ["purify", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for line in ("0 every input purified", "1 some inputs failed, in this run or earlier ones",
                 "2 usage error", "130 interrupted (SIGINT, SIGTERM): summary.json written"):
        assert line in text, line
