"""Facts recorded beside every result: the machine, the software, the commit (no torch import here)."""
from __future__ import annotations

import contextlib
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return platform.processor() or platform.machine()


def git_commit(repo: str | Path = ".") -> str:
    """The checked-out commit, with ``+dirty`` when the tree has uncommitted changes; '' outside git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout.strip()

    with contextlib.suppress(OSError):
        commit = git("rev-parse", "HEAD")
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"
        return commit
    return ""
