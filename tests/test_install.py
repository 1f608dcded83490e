"""The package states the versions it works with; exact pins live in constraints.txt. Installing the train extra
beside an installed compatible torch keeps that torch (pip installs nothing but purifier itself)."""
import configparser
import json
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def extra(name: str) -> dict:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = [Requirement(line) for line in cfg["options.extras_require"][name].strip().splitlines()]
    return {r.name: r for r in reqs}


def test_the_train_extra_takes_a_range_of_torch_and_the_constraints_pin_one():
    torch = extra("train")["torch"].specifier
    assert all(torch.contains(v) for v in ("2.4.0", "2.10.0", "2.14.1")) and not torch.contains("2.15.0"), torch
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert torch.contains(pins["torch"]), (pins["torch"], torch)


def test_installing_the_train_extra_keeps_the_installed_torch(tmp_path):
    import torch

    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--no-index",
                        "--report", str(report), "-e", f"{ROOT}[train]"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    would = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert set(would) == {"purifier"}, f"pip would replace installed packages: {would} (torch {torch.__version__})"
