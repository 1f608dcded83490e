"""What ``purifier purify`` needs around the batch job: stopping on SIGINT/SIGTERM and the summary line on stderr."""
from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def stop_on_signals(notice):
    """SIGINT and SIGTERM ask the job to stop (yields the ``should_stop`` callable); a second one stops at once
    (KeyboardInterrupt). The old handlers come back afterwards. Outside the main thread, signals are left alone."""
    import signal
    import threading

    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def on_signal(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        notice(signum)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested.is_set
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def summary_line(stats, out_dir: Path) -> str:
    """The one-line summary on stderr."""
    rate = stats.done / stats.seconds["total"] if stats.seconds["total"] else 0.0
    failed = f"failed {stats.failed}"
    if stats.failed_earlier:
        failed += f" ({stats.failed_earlier} recorded by an earlier run; --no-resume retries them)"
    parts = [f"done {stats.done}", failed, f"rejected {stats.rejected}", f"resumed {stats.skipped}"]
    if stats.skipped_files:
        names = ", ".join(Path(f["path"]).name for f in stats.skipped_files[:3])
        more = f" and {len(stats.skipped_files) - 3} more" if len(stats.skipped_files) > 3 else ""
        parts.append(f"skipped {len(stats.skipped_files)} non-image file{'s' * (len(stats.skipped_files) != 1)} "
                     f"({names}{more}; listed in summary.json)")
    line = ", ".join(parts) + f"; {rate:.0f} images/s; manifest: {out_dir / 'manifest.jsonl'}"
    if stats.failed:
        line += f", errors: {out_dir / 'errors.jsonl'}"
    if stats.interrupted:
        line = (f"interrupted with {stats.remaining} input{'s' * (stats.remaining != 1)} left (rerun the same "
                f"command to resume): {line}")
    return line


def ray_line(out_dir: Path) -> str:
    """The Ray engine's part of the summary line, from summary.json."""
    import json

    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    r = summary["ray"]
    return (f"; ray: {r['actors']} actor{'s' * (r['actors'] != 1)} on {r['nodes']} node{'s' * (r['nodes'] != 1)}, "
            f"{providers_text(summary['providers'])}, {r['start_seconds']:.1f} s to start")


def providers_text(providers: list) -> str:
    """onnxruntime providers as words; the Ray engine's list of distinct lists (actors that disagree) as A / B."""
    if providers and isinstance(providers[0], list):
        return " / ".join(providers_text(p) for p in providers)
    return ", ".join(providers)
