"""Training that survives interruption: a real training process is killed with SIGKILL once it has saved its state,
resumed with --resume, and must end with exactly the weights of a run that was never interrupted."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import write_bands
from purifier.resume import load_state

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "purifier.cli"]


def kill_once_saved(cmd, state: Path, timeout: float = 300) -> int:
    """Start ``cmd``, SIGKILL it as soon as ``state`` exists; the step that state was saved at."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not state.exists():
            assert proc.poll() is None, f"the run ended before it saved a state: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no training state within the timeout"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return load_state(state)["loop"]["step"]


def run(cmd):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if not (wa[k] == wb[k]).all()]
    assert not differing, f"weights differ after resuming: {differing}"


def without_times(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def bands(tmp_path_factory):
    """The tiny_npz dataset (600 images of 5 classes, 1 x 32 x 32), made once for the module."""
    return write_bands(tmp_path_factory.mktemp("data") / "bands.npz")


def classifier_cmd(data, out, *extra):
    return [*CLI, "train-classifier", "--data", f"npz:{data}", "--arch", "b", "--epochs", "2", "--batch-size", "32",
            "--adversarial", "trades", "--adv-steps", "2", "--val-robust-n", "30", "--save-every", "3", "--quiet",
            "--out", str(out), *extra]


def test_train_classifier_killed_and_resumed_ends_with_the_uninterrupted_weights(bands, tmp_path):
    whole = tmp_path / "whole" / "clf"
    run(classifier_cmd(bands, whole))
    assert not Path(f"{whole}.training-state.safetensors").exists(), "a finished run leaves no state behind"

    cut = tmp_path / "cut" / "clf"
    state = Path(f"{cut}.training-state.safetensors")
    step = kill_once_saved(classifier_cmd(bands, cut), state)
    assert 0 < step < 2 * 17, step  # 540 training images in batches of 32: 17 steps per epoch
    assert not Path(f"{cut}.safetensors").exists()

    refused = subprocess.run(classifier_cmd(bands, cut), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    other = subprocess.run(classifier_cmd(bands, cut, "--lr", "0.002", "--resume"), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert other.returncode == 2 and "'lr': 0.002" in other.stderr, other.stderr[-2000:]

    run(classifier_cmd(bands, cut, "--resume"))
    same_weights(Path(f"{whole}.safetensors"), Path(f"{cut}.safetensors"))
    a, b = (json.loads(Path(f"{p}.json").read_text())["meta"] for p in (whole, cut))
    assert without_times(a["history"]) == without_times(b["history"])
    assert b["resumed_at_step"] == step and a["resumed_at_step"] is None
    assert a["best_epoch"] == b["best_epoch"] and a["val_robust"] == b["val_robust"]
    assert not state.exists()


FIT = textwrap.dedent('''
    import sys
    import purifier
    from purifier.adversarial import PipelineAdversarial
    from purifier.models.classifiers import Classifier, ClassifierConfig
    import torch

    torch.manual_seed(0)
    clf = Classifier(ClassifierConfig("b", (1, 32, 32), 5)).eval()
    config = purifier.FitConfig(epochs=1, batch_size=32, model={"latent_dim": 4, "channels": (8, 8), "hidden": 16},
                                adversarial=PipelineAdversarial(mode="cvae", steps=1, val_n=20, val_steps=2,
                                                                val_every=0.5),
                                adversarial_epochs=1.0)
    purifier.fit(clf, "npz:" + sys.argv[1], sys.argv[2], config, resume=True, save_every=2)
''')


def test_fit_killed_in_the_adversarial_stage_and_resumed_ends_with_the_uninterrupted_weights(bands, tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(FIT)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run([sys.executable, str(script), str(bands), str(whole)])
    assert not (whole / ".training-state").exists()

    state = cut / ".training-state" / "adversarial.safetensors"
    step = kill_once_saved([sys.executable, str(script), str(bands), str(cut)], state)
    assert 0 < step < 17
    assert (cut / ".training-state" / "puvae.safetensors").exists() and not (cut / "cvae.json").exists()

    run([sys.executable, str(script), str(bands), str(cut)])
    same_weights(whole / "cvae.safetensors", cut / "cvae.safetensors")
    a, b = (json.loads((d / "cvae.json").read_text())["meta"] for d in (whole, cut))
    assert without_times(a["history"]) == without_times(b["history"])
    assert without_times(a["pretrain"]["history"]) == without_times(b["pretrain"]["history"])
    assert b["resumed_at_step"] == step
    assert a["rejection_calibration"] == b["rejection_calibration"]
