"""Results files: ``NAME.json`` (every setting and number) beside ``NAME.md`` (the table), both atomic."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from purifier.checkpoint import read_record, write_json
from serve.files import atomic_write_bytes


def write_results(out: str | Path, report: dict, heading: str, table: str) -> None:
    """``report`` must hold ``command`` and ``commit``; the markdown repeats them under ``heading``."""
    write_json(out, report)
    text = f"{heading}\n\n`{report['command']}` at commit {report['commit'][:10]}\n\n{table}\n"
    atomic_write_bytes(Path(out).with_suffix(".md"), text.encode())


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def model_weights(model_dir: str | Path) -> dict:
    """sha256 of a model directory's CVAE and classifier weights, from their JSON records."""
    return {part: read_record(Path(model_dir) / part)["weights_sha256"] for part in ("cvae", "classifier")}


def weights_work(work: str | Path, weights: dict) -> Path:
    """The cache folder under ``work`` for the measured ``weights`` (name -> sha256): one folder per set of weights,
    so sections measured on other weights (a re-chosen default, a retrained model) are never taken for these."""
    key = hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()[:16]
    return Path(work) / f"weights-{key}"


def cached(work: Path, name: str, fn, say) -> dict:
    """``fn()`` (a dict) cached as ``work/NAME.json``, with the seconds it took; ``say`` reports progress."""
    path = Path(work) / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    say(f"{name} ...")
    t0 = time.perf_counter()
    value = fn()
    value["seconds"] = time.perf_counter() - t0
    write_json(path, value)
    say(f"{name}: {value['seconds']:.0f} s")
    return value


def sync_texts(items, check: bool, root: Path) -> list[str]:
    """For each ``(path, text now, text it should hold)``: the paths (relative to ``root``) that differ, each
    rewritten atomically unless ``check``."""
    stale = []
    for path, now, new in items:
        if now != new:
            stale.append(Path(path).relative_to(root).as_posix())
            if not check:
                atomic_write_bytes(path, new.encode())
    return stale
