"""Training that survives interruption: the full state of a training loop in one file, saved at a fixed interval
and restored exactly.

A state file holds every model's and optimiser's ``state_dict``, the learning-rate schedules, every random generator
the loop draws from (its own ``torch.Generator``s, torch's and numpy's global ones) and the loop's own position
(step, the epoch's shuffle, running sums, validation history). It is one safetensors file: the tensors, plus the
rest as JSON in the header, written to a temporary file and renamed over the old one, so a kill at any moment leaves
either the previous state or the new one. A run resumed from it takes the same steps an uninterrupted run would have
taken and ends with the same weights.

The ``fingerprint`` (settings and a digest of the data) is stored with the state; resuming under different settings
fails with the differing keys named instead of continuing a different run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMAT = "purifier-training-state/1"


class StateError(ValueError):
    """A saved training state that cannot be resumed here (another run's settings, a damaged file)."""


def data_digest(*tensors: torch.Tensor) -> str:
    """sha256 over the shapes, dtypes and bytes of the tensors: which data a run trains on."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _flatten(obj, key: str, tensors: dict):
    """JSON-able form of ``obj`` with each tensor moved into ``tensors`` (dict keys that are not strings, such as an
    optimiser's parameter indices, survive as an item list)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
        return {"__array__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, f"{key}.{i}", tensors)] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at {key} in a training state")


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__array__" in obj:
            return tensors[obj["__array__"]].numpy().astype(obj["dtype"])
        if "__items__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: str | Path, state: dict) -> None:
    """Write ``state`` (nested dicts and lists of tensors, arrays and JSON values) to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    tree = _flatten(state, "s", tensors)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "state": json.dumps(tree)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: str | Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise StateError(f"{path} is not a readable training state ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise StateError(f"{path} is not a training state of this version (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return _unflatten(json.loads(meta["state"]), tensors)


def _differences(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


@dataclass
class Snapshots:
    """Where and how often a training loop saves its state, and whether it starts from the saved one.

    path: the state file. every: optimiser steps between saves (the loop also saves when it ends).
    resume: continue from ``path`` if it exists (a missing file starts afresh). fingerprint: settings and data
    digest the state must match. After the loop: ``resumed_at`` (the step it continued from, or None) and
    ``seconds`` (training time over every sitting).
    """

    path: Path
    every: int = 200
    resume: bool = False
    fingerprint: dict = field(default_factory=dict)
    resumed_at: int | None = None
    seconds: float = 0.0

    def __post_init__(self):
        self.path = Path(self.path)
        if self.every < 1:
            raise ValueError(f"save interval must be at least 1 step, got {self.every}")
        self.fingerprint = json.loads(json.dumps(self.fingerprint))  # what it reads back as


class Checkpointer:
    """Saves and restores one loop's full state through ``Snapshots`` (``None``: does nothing)."""

    def __init__(self, snaps: Snapshots | None, modules: dict[str, nn.Module], optimisers: dict,
                 schedulers: dict, generators: dict[str, torch.Generator]):
        self.snaps, self.modules, self.optimisers = snaps, modules, optimisers
        self.schedulers, self.generators = schedulers, generators

    def restore(self) -> dict | None:
        """The saved loop position (and every module, optimiser, schedule and generator restored), or None."""
        s = self.snaps
        if s is None or not s.resume or not s.path.is_file():
            return None
        state = load_state(s.path)
        diff = _differences(state["fingerprint"], s.fingerprint)
        if diff:
            raise StateError(f"{s.path} was saved by a run with other settings or data; differing: "
                             + "; ".join(diff))
        for kind, parts in (("modules", self.modules), ("optimisers", self.optimisers),
                            ("schedulers", self.schedulers)):
            missing = sorted(set(parts) - set(state[kind]))
            if missing:
                raise StateError(f"{s.path} holds no {kind} state for {missing}")
            for name, part in parts.items():
                if part is not None:
                    part.load_state_dict(state[kind][name])
        for name, gen in self.generators.items():
            gen.set_state(state["generators"][name])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(tuple(state["numpy_rng"]))
        s.resumed_at = state["loop"]["step"]
        return state["loop"]

    def due(self, step: int) -> bool:
        return self.snaps is not None and step % self.snaps.every == 0

    def save(self, loop: dict) -> None:
        """Save now; ``loop`` is the loop's own position and must hold ``step`` (optimiser steps taken)."""
        if self.snaps is None:
            return
        save_state(self.snaps.path, {
            "fingerprint": self.snaps.fingerprint, "loop": loop,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimisers": {k: o.state_dict() for k, o in self.optimisers.items()},
            "schedulers": {k: (sc.state_dict() if sc is not None else None) for k, sc in self.schedulers.items()},
            "generators": {k: g.get_state() for k, g in self.generators.items()},
            "torch_rng": torch.get_rng_state(), "numpy_rng": list(np.random.get_state())})
