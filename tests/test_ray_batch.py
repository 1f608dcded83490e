"""`purifier purify --engine ray` on a real local Ray cluster (2 CPUs), against the local engine on the same files."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from purifier.cli import main

ray = pytest.importorskip("ray")

from test_purify_cli import interrupt_and_resume  # noqa: E402
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(MODELS["fashion-mnist"].path)


def lines(path):
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x]


@pytest.fixture(scope="module")
def cluster():
    """A local cluster; other processes join it at ``ray.get_runtime_context().gcs_address``. ray.init takes
    SIGTERM's handler; the test process gets its own back afterwards."""
    handler = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, fmnist_test):
    """Real test images as PNGs in two folders and an .npz shard, plus inputs that must fail one by one."""
    d = tmp_path_factory.mktemp("ray-in")
    (d / "sub").mkdir()
    imgs = (fmnist_test.x[:160, 0] * 255).round().astype(np.uint8)
    for i in range(60):
        Image.fromarray(imgs[i]).save(d / ("sub" if i % 3 == 0 else ".") / f"{i:03d}.png")
    np.savez(d / "shard.npz", x=imgs[60:150])
    nan = fmnist_test.x[150:160].copy()
    nan[4, 0, 3, 5] = np.nan
    np.save(d / "floats.npy", nan)  # item 4 holds a NaN: that item fails, the other nine go on
    (d / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(d / "wrong-size.png")
    np.savez(d / "wrong-key.npz", pictures=imgs[:2])
    return d


EXPECTED_FAILURES = {("text.png", None), ("wrong-size.png", None), ("floats.npy", 4), ("wrong-key.npz", None)}
N_GOOD = 60 + 90 + 9


def run(args):
    return CliRunner().invoke(main, ["purify", *args, "--model", MODEL, "--batch-size", "16"])


def keyed(records):
    return {(r["source"], r["index"]): r for r in records}


def test_the_ray_engine_writes_the_local_engines_manifest_images_and_failures(cluster, inputs, tmp_path):
    local, distributed = tmp_path / "local", tmp_path / "ray"
    r = run([str(inputs), "--out", str(local)])
    assert r.exit_code == 1, r.output
    r = run([str(inputs), "--out", str(distributed), "--engine", "ray", "--actors", "2"])
    assert r.exit_code == 1, r.output  # the failures are recorded, not dropped, and the exit code says so

    manifest, errors = lines(distributed / "manifest.jsonl"), lines(distributed / "errors.jsonl")
    keys = [(r["source"], r["index"]) for r in manifest + errors]
    assert len(keys) == len(set(keys)) == N_GOOD + len(EXPECTED_FAILURES)  # every input exactly once
    assert {(Path(e["source"]).name, e["index"]) for e in errors} == EXPECTED_FAILURES
    assert keyed(errors) == keyed(lines(local / "errors.jsonl"))  # the same reasons, word for word
    assert any("non-finite" in e["error"] for e in errors) and any("32 x 32" in e["error"] for e in errors)

    want = keyed(lines(local / "manifest.jsonl"))
    assert keyed(manifest) == want  # every field: predictions, chosen class, errors, margins, output names
    for m in manifest:
        assert np.array_equal(np.asarray(Image.open(distributed / m["output"])),
                              np.asarray(Image.open(local / m["output"])))
    summary = json.loads((distributed / "summary.json").read_text())
    assert summary["engine"] == "ray" and summary["done"] == N_GOOD and summary["failed"] == len(EXPECTED_FAILURES)
    assert summary["providers"] == ["CPUExecutionProvider"] and summary["ray"]["actors"] == 2
    assert sum(a["items"] for a in summary["actors"]) == N_GOOD + 3  # the load failures went through the actors
    assert not list(distributed.rglob("*.tmp"))


def test_npz_shards_hold_the_local_engines_rows(cluster, inputs, tmp_path):
    local, distributed = tmp_path / "local", tmp_path / "ray"
    src = [str(inputs / "shard.npz"), str(inputs / "floats.npy")]
    assert run([*src, "--out", str(local), "--format", "npz"]).exit_code == 1
    r = run([*src, "--out", str(distributed), "--format", "npz", "--engine", "ray"])
    assert r.exit_code == 1, r.output
    with np.load(local / "purified.npz") as f:
        want = {(s, int(i)): x for s, i, x in zip(f["source"], f["index"], f["x"])}
    manifest = lines(distributed / "manifest.jsonl")
    assert len(manifest) == len(want) == 99 and not (distributed / "purified.npz").exists()
    for m in manifest:
        part, k = m["output"].rsplit(":", 1)
        with np.load(distributed / part) as f:
            assert np.array_equal(f["x"][int(k)], want[(m["source"], m["index"])])


def test_a_stopped_job_records_what_came_back_and_a_rerun_adds_each_remaining_input_once(cluster, inputs, tmp_path):
    from serve.ray_batch import purify_files_ray

    out = tmp_path / "out"
    asked = []

    def stop_after_the_first_batch():
        asked.append(1)
        return True

    stats = purify_files_ray([str(inputs)], MODEL, out, batch_size=16, should_stop=stop_after_the_first_batch)
    assert asked and stats.interrupted and 0 < stats.done < N_GOOD, stats
    summary = json.loads((out / "summary.json").read_text())
    recorded = len(lines(out / "manifest.jsonl")) + len(lines(out / "errors.jsonl"))
    assert summary["interrupted"] is True and recorded + summary["remaining"] == N_GOOD + len(EXPECTED_FAILURES)
    stats = purify_files_ray([str(inputs)], MODEL, out, batch_size=16)  # resumes: out holds a manifest
    assert not stats.interrupted and stats.remaining == 0
    keys = [(r["source"], r["index"]) for r in lines(out / "manifest.jsonl") + lines(out / "errors.jsonl")]
    assert len(keys) == len(set(keys)) == N_GOOD + len(EXPECTED_FAILURES)


@pytest.mark.parametrize("extra, message", [
    (["--actors", "2"], "--actors 2 applies to --engine ray only"),
    (["--ray-address", "auto"], "--ray-address auto applies to --engine ray only"),
    (["--engine", "ray", "--actors", "5"], "5 actors x 1 CPU each need 5 CPUs; the Ray cluster has 2"),
    (["--engine", "ray", "--device", "cuda"], "device 'cuda' asked for, but the Ray cluster has no GPUs"),
    (["--engine", "ray", "--actors", "0"], "0 is not in the range x>=1"),
], ids=["actors-without-ray", "address-without-ray", "more-actors-than-cpus", "cuda-without-gpus", "zero-actors"])
def test_bad_ray_options_are_usage_errors_naming_the_value(cluster, inputs, tmp_path, extra, message):
    r = run([str(inputs / "shard.npz"), "--out", str(tmp_path / "o"), *extra])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())
    assert not (tmp_path / "o" / "manifest.jsonl").exists()  # nothing was done


def test_sigterm_to_a_job_joined_by_address_exits_130_and_a_rerun_gives_each_input_once(cluster, fmnist_test,
                                                                                      tmp_path):
    stderr = interrupt_and_resume(tmp_path, fmnist_test, signal.SIGTERM, 2000, "--batch-size", "32", "--engine",
                                  "ray", "--ray-address", cluster.get_runtime_context().gcs_address)
    assert "ray: 2 actors on 1 node, CPUExecutionProvider" in stderr


def test_the_benchmark_runs_both_engines_and_finds_them_agreeing(cluster, tmp_path):
    out = tmp_path / "ray-batch.json"
    subprocess.run([sys.executable, "-m", "benchmarks.ray_batch", "--n", "64", "--reps", "1",
                    "--batch-size", "16", "--ray-address", cluster.get_runtime_context().gcs_address,
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    report = json.loads(out.read_text())
    assert report["parity"] == {"same_inputs": True, "inputs": 64, "same_predicted_class": 64,
                                "same_chosen_class": 64, "max_abs_score_diff": 0.0}
    assert report["engines"]["ray"]["providers"] == report["engines"]["local"]["providers"] == ["CPUExecutionProvider"]
    assert "| ray | CPUExecutionProvider |" in out.with_suffix(".md").read_text()

