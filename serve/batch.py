"""Batch purification of files that loses nothing: every input ends in the manifest or in the error log.

Torch-free (onnxruntime + numpy + Pillow). Inputs are image files, directories (recursive, sorted, symlink
loops guarded; files of other kinds are listed as skipped, never dropped silently) and ``.npy``/``.npz`` arrays.
Each batch's outputs are written under temporary names and renamed; only then are its manifest lines appended
and flushed, so a job killed at any point and rerun with resume ends with every input exactly once and no
half-written file. A job asked to stop (``should_stop``) finishes the part of the batch it has loaded, records
it, and writes ``summary.json`` with ``interrupted: true``.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .files import atomic_savez, atomic_write_bytes
from .png import encode_png
from .runtime import OnnxPurifier

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
ARRAY_EXTS = {".npy", ".npz"}
MANIFEST, ERRORS, SUMMARY = "manifest.jsonl", "errors.jsonl", "summary.json"


@dataclass(frozen=True)
class Item:
    """One input image: a file, or one entry (``index``) of an array file. ``output``: relative output path."""

    source: str
    index: int | None
    output: str

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.source, self.index)


@dataclass
class Stats:
    """What a job did. ``failed`` counts every input of this job whose failure stands in errors.jsonl: the new
    ones and ``failed_earlier``, those an earlier run in the same folder recorded (resume does not retry them).
    ``skipped``: inputs already in the manifest (resumed). ``skipped_files``: files found in input folders that
    are neither images nor arrays, ``{"path", "reason"}``. ``remaining``: inputs not reached (interrupted)."""

    done: int = 0
    failed: int = 0
    failed_earlier: int = 0
    rejected: int = 0
    skipped: int = 0
    remaining: int = 0
    interrupted: bool = False
    skipped_files: list = field(default_factory=list)
    seconds: dict = field(default_factory=lambda: {"load": 0.0, "onnxruntime": 0.0, "write": 0.0, "total": 0.0})


def discover(inputs: Iterable[str | os.PathLike]) -> tuple[list[tuple[Path, str]], list[dict], list[dict]]:
    """Expand inputs into (file, relative path) pairs, in sorted order; inputs that do not exist become errors.

    Returns (files, errors, skipped): ``skipped`` lists the files a folder walk passed over, ``{"path",
    "reason"}`` (not images or arrays by their extension). A file named on the command line is always an input,
    whatever its extension.
    """
    files, errors, skipped = [], [], []
    for raw in inputs:
        root = Path(raw)
        if root.is_dir():
            seen = set()
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                real = os.path.realpath(dirpath)
                if real in seen:  # a symlink loop, or a directory reached twice: its files are already in
                    dirnames[:] = []
                    continue
                seen.add(real)
                dirnames.sort()
                for name in sorted(filenames):
                    path = Path(dirpath) / name
                    if path.suffix.lower() in IMAGE_EXTS | ARRAY_EXTS:
                        files.append((path, str(path.relative_to(root))))
                    else:
                        kind = f"extension {path.suffix!r}" if path.suffix else "no extension"
                        skipped.append({"path": str(path), "reason": f"not an image or array file ({kind})"})
        elif root.is_file():
            files.append((root, root.name))
        else:
            errors.append({"source": str(root), "index": None, "error": f"input {str(root)!r} does not exist"})
    return files, errors, skipped


def _array_items(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    with np.load(path, allow_pickle=False) as f:
        for key in ("x", "x_test", "images"):
            if key in f.files:
                return f[key]
        raise ValueError(f"{path}: no image array under 'x', 'x_test' or 'images'; the file holds {sorted(f.files)}")


def plan(files: list[tuple[Path, str]]) -> tuple[list[Item], list[dict]]:
    """Items with unique, deterministic output names (two inputs never share one)."""
    items, errors, taken = [], [], set()

    def claim(rel: str) -> str:
        base = Path(rel)
        out = str(base.with_suffix(".png"))
        n = 0
        while out in taken:  # a.png and a.jpg, or the same name under two inputs
            n += 1
            out = str(base.with_name(f"{base.stem}~{base.suffix.lstrip('.') or 'x'}{'' if n == 1 else n}.png"))
        taken.add(out)
        return out

    for path, rel in files:
        if path.suffix.lower() in ARRAY_EXTS:
            try:
                arr = _array_items(path)
                if arr.ndim not in (3, 4):
                    raise ValueError(f"{path}: array must be N x H x W or N x C x H x W, got shape {arr.shape}")
            except Exception as exc:  # corrupt files raise many types
                errors.append({"source": str(path), "index": None, "error": _reason(exc)})
                continue
            stem = str(Path(rel).with_suffix(""))
            items += [Item(str(path), i, claim(f"{stem}/{i:06d}.png")) for i in range(len(arr))]
        else:
            items.append(Item(str(path), None, claim(rel)))
    return items, errors


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Loader:
    """Reads items as float32 C x H x W in [0, 1] for the model's shape; caches the array file in use."""

    def __init__(self, runtime: OnnxPurifier, resize: bool = False):
        self.c, self.h, self.w = runtime.image_shape
        self.validate = runtime.validate  # the runtime's own checks, one item at a time
        self.resize = resize
        self._array = (None, None)

    def __call__(self, item: Item) -> np.ndarray:
        if item.index is None:
            return self._image(Path(item.source))
        if self._array[0] != item.source:
            self._array = (item.source, _array_items(Path(item.source)))
        return self.validate(np.asarray(self._array[1][item.index])[None])[0]

    def _image(self, path: Path) -> np.ndarray:
        if path.stat().st_size == 0:
            raise ValueError("empty file (0 bytes)")
        return decode_image(path, (self.c, self.h, self.w), self.resize)


def decode_image(source: Path | bytes, image_shape: tuple[int, int, int], resize: bool = False) -> np.ndarray:
    """An image file (path or bytes) -> float32 C x H x W in [0, 1]; ``ValueError`` naming what is wrong."""
    import io

    from PIL import Image, UnidentifiedImageError

    c, h, w = image_shape
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ValueError("empty file (0 bytes)")
        source = io.BytesIO(source)
    try:
        with Image.open(source) as img:
            img.load()  # decode now: a truncated file fails here, not later
            img = img.convert("L" if c == 1 else "RGB")
    except UnidentifiedImageError as exc:
        raise ValueError(f"not an image Pillow can read ({exc})") from exc
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable image ({exc})") from exc
    if img.size != (w, h):
        if not resize:
            raise ValueError(f"image is {img.size[0]} x {img.size[1]} (W x H), the model expects "
                             f"{w} x {h}; pass --resize to resize")
        img = img.resize((w, h), Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)


def _read_keys(path: Path) -> set:
    """Keys already recorded in a JSONL log; a half-written last line (a killed job) is cut off first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    keys = set()
    for line in data[:end].splitlines():
        if line.strip():
            rec = json.loads(line)
            keys.add((rec["source"], rec["index"]))
    return keys


class _Log:
    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        if records:
            self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


class Job:
    """A run into ``out_dir``, set up the same way for every engine: inputs discovered and planned, resume
    decided, temporaries of a killed run removed, the failures found while planning recorded, the logs open.

    ``todo``: the items still to purify, in input order. ``record(records, failed)`` appends one batch's manifest
    lines and failures (flushed, fsynced) and counts them; ``finish`` closes the logs and writes summary.json.
    """

    def __init__(self, inputs: list[str], out_dir: str | os.PathLike, resume: bool | None = None,
                 start: float | None = None):
        self.start = time.perf_counter() if start is None else start
        self.out_dir = out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files, errors, skipped_files = discover(inputs)
        items, plan_errors = plan(files)
        errors += plan_errors
        if resume is None:
            resume = (out_dir / MANIFEST).exists()
        if not resume:
            for name in (MANIFEST, ERRORS):
                (out_dir / name).unlink(missing_ok=True)
        for stale in out_dir.rglob(".*.tmp"):  # temporaries of a killed run (atomic_write's naming); never outputs
            stale.unlink(missing_ok=True)
        in_manifest, in_errors = _read_keys(out_dir / MANIFEST), _read_keys(out_dir / ERRORS)
        done = in_manifest | in_errors
        keys = {item.key for item in items} | {(e["source"], e["index"]) for e in errors}
        # failures an earlier run recorded still stand: resume skips them, and the job must not look clean
        earlier = len(keys & (in_errors - in_manifest))
        self.stats = Stats(skipped=sum(item.key in in_manifest for item in items), failed=earlier,
                           failed_earlier=earlier, skipped_files=skipped_files)
        self.todo = [item for item in items if item.key not in done]
        self.run = uuid.uuid4().hex[:12]  # npz parts of a resumed job must not overwrite the parts its manifest names
        self.manifest, self.errors = _Log(out_dir / MANIFEST), _Log(out_dir / ERRORS)
        self.record([], [e for e in errors if (e["source"], e["index"]) not in done])

    def record(self, records: list[dict], failed: list[dict]) -> None:
        self.manifest.write(records)
        self.stats.done += len(records)
        self.stats.rejected += sum(r["rejected"] for r in records)
        self.errors.write(failed)
        self.stats.failed += len(failed)

    def close(self) -> None:
        self.manifest.close()
        self.errors.close()

    def finish(self, reached: int, model: Path, providers: list, fmt: str | None = None, merge: bool = True,
               **extra) -> Stats:
        """Close the logs, set ``remaining``/``interrupted`` from the ``reached`` items of ``todo``, merge the npz
        parts (``fmt`` npz and ``merge``), write summary.json (``extra``: more fields for it)."""
        self.close()
        stats = self.stats
        stats.remaining = len(self.todo) - reached
        stats.interrupted = stats.remaining > 0
        if fmt == "npz" and merge:
            _merge_npz(self.out_dir)
        write_summary(self.out_dir, stats, self.start, model, providers, **extra)
        return stats


def load_batch(load: "Loader", batch: list[Item], stop: Callable[[], bool] | None = None):
    """Load ``batch``'s items; each one that fails becomes an errors.jsonl record and the rest go on.

    Returns (good items, their arrays, failure records, items reached): once ``stop()`` says yes (asked before
    each item after the first), the items after it are left for a rerun.
    """
    good, arrays, failed = [], [], []
    for k, item in enumerate(batch):
        if k and stop is not None and stop():
            return good, arrays, failed, k
        try:
            arrays.append(load(item))
            good.append(item)
        except Exception as exc:  # each bad file is recorded and the job goes on
            failed.append({"source": item.source, "index": item.index, "error": _reason(exc)})
    return good, arrays, failed, len(batch)


def purify_batch(runtime: OnnxPurifier, load: "Loader", batch: list[Item], out_dir: Path, fmt: str, part: str,
                 stop: Callable[[], bool] | None = None):
    """Load, purify and write one batch (outputs atomically; an npz batch is the part ``part``).

    Returns (manifest records, failure records, items reached, seconds by stage ``load``/``onnxruntime``/``write``).
    """
    t0 = time.perf_counter()
    good, arrays, failed, reached = load_batch(load, batch, stop)
    t1 = time.perf_counter()
    records = []
    if good:
        out = runtime(np.stack(arrays))
        t2 = time.perf_counter()
        records = write_outputs(out_dir, good, out, runtime.class_names, fmt, part)
    else:
        t2 = t1
    t3 = time.perf_counter()
    return records, failed, reached, {"load": t1 - t0, "onnxruntime": t2 - t1, "write": t3 - t2}


def check_options(fmt: str, batch_size: int) -> None:
    if fmt not in ("png", "npz"):
        raise ValueError(f"format must be 'png' or 'npz', got {fmt!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")


def purify_files(inputs: list[str], model: str | os.PathLike, out_dir: str | os.PathLike, batch_size: int = 256,
                 resize: bool = False, fmt: str = "png", resume: bool | None = None, device: str = "auto",
                 on_batch: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Stats:
    """Purify every input into ``out_dir``; returns counts and where the time went.

    ``resume`` None: on when ``out_dir`` already holds a manifest. ``on_batch(done_items, total_items)``.
    ``should_stop()`` is asked before each input is loaded; once it says yes, the inputs loaded so far are
    purified and recorded, ``summary.json`` is written and the stats come back with ``interrupted`` set (a
    rerun resumes). A ``KeyboardInterrupt`` raised inside also writes ``summary.json`` before it propagates.
    """
    check_options(fmt, batch_size)
    stop = should_stop or (lambda: False)
    start = time.perf_counter()
    runtime = OnnxPurifier(model, device=device)
    job = Job(inputs, out_dir, resume, start)
    stats, todo = job.stats, job.todo
    load = Loader(runtime, resize)
    reached = 0
    try:
        while reached < len(todo) and not stop():
            batch = todo[reached:reached + batch_size]
            records, failed, n, seconds = purify_batch(runtime, load, batch, job.out_dir, fmt,
                                                       f"{job.run}-{reached:09d}", stop)
            job.record(records, failed)
            reached += n
            for key, v in seconds.items():
                stats.seconds[key] += v
            if on_batch is not None:
                on_batch(reached, len(todo))
    except KeyboardInterrupt:  # stopped at once (a second Ctrl-C): the logs hold what was recorded
        job.close()
        stats.interrupted, stats.remaining = True, len(todo) - reached
        write_summary(job.out_dir, stats, job.start, runtime.path, runtime.providers)
        raise
    finally:
        job.close()
    return job.finish(reached, runtime.path, runtime.providers, fmt)


def write_summary(out_dir: Path, stats: Stats, start: float, model: Path, providers: list, **extra) -> None:
    stats.seconds["total"] = time.perf_counter() - start
    summary = {"done": stats.done, "failed": stats.failed, "failed_earlier": stats.failed_earlier,
               "rejected": stats.rejected, "skipped": stats.skipped, "skipped_files": stats.skipped_files,
               "interrupted": stats.interrupted, "remaining": stats.remaining, "seconds": stats.seconds,
               "model": str(model), "providers": providers, **extra}
    atomic_write_bytes(out_dir / SUMMARY, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode())


def write_outputs(out_dir: Path, items: list[Item], out: dict, names: list[str], fmt: str, part: str) -> list[dict]:
    purified = np.round(np.clip(out["purified"], 0, 1) * 255).astype(np.uint8)
    if fmt == "npz":
        part = f"npz-parts/part-{part}.npz"

        atomic_savez(out_dir / part, x=purified)
        outputs = [f"{part}:{k}" for k in range(len(items))]
    else:
        outputs = [item.output for item in items]
        for rel, img in zip(outputs, purified):
            atomic_write_bytes(out_dir / rel, encode_png(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)))
    records = []
    best = out["scores"].min(1).tolist()  # the chosen class's score
    for k, item in enumerate(items):
        chosen = int(out["chosen_class"][k])
        pred = int(out["predicted_class"][k]) if "predicted_class" in out else None
        records.append({
            "source": item.source, "index": item.index, "output": outputs[k],
            "predicted_class": pred, "predicted_name": names[pred] if pred is not None else None,
            "chosen_class": chosen, "chosen_name": names[chosen],
            "score": best[k], "margin": float(out["margin"][k]), "rejected": bool(out["rejected"][k]),
            "recon_error": best[k],  # the deprecated alias of score
        })
    return records


def _merge_npz(out_dir: Path) -> None:
    """One ``purified.npz`` (x, source, index) in manifest order, from the per-batch parts."""
    records = [json.loads(line) for line in (out_dir / MANIFEST).read_text(encoding="utf-8").splitlines() if line]
    parts: dict[str, np.ndarray] = {}
    xs = []
    for r in records:
        part, k = r["output"].rsplit(":", 1)
        if part not in parts:
            with np.load(out_dir / part) as f:
                parts[part] = f["x"]
        xs.append(parts[part][int(k)])
    sources = np.array([r["source"] for r in records])
    index = np.array([-1 if r["index"] is None else r["index"] for r in records])

    atomic_savez(out_dir / "purified.npz", x=np.stack(xs) if xs else np.zeros((0,)), source=sources, index=index)
