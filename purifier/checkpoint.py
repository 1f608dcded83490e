"""Self-describing checkpoints: ``NAME.safetensors`` (weights) beside ``NAME.json`` (config and facts).

The JSON alone rebuilds the module (no pickle, no code in the file): ``{"kind", "config", "meta",
"weights_sha256", "version"}``. Both files are written to temporary names and renamed, so a crash never
leaves a half-written checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from serve.files import atomic_write

from . import __version__
from .models.classifiers import Classifier, ClassifierConfig
from .models.cvae import CVAE, CVAEConfig
from .models.defensegan import VAE, VAEConfig
from .models.hcvae import HCVAE, HCVAEConfig

# kind -> (module class, config class); the only constructors a checkpoint can name
REGISTRY = {"cvae": (CVAE, CVAEConfig), "hcvae": (HCVAE, HCVAEConfig), "classifier": (Classifier, ClassifierConfig),
            "vae": (VAE, VAEConfig)}
# classifiers the project did not make, recorded in a model directory's classifier.json (``classifier_io``)
EXTERNAL = ("factory", "onnx")
# what ``load(..., expect=...)`` accepts: every class-conditional model a Purifier can wrap counts as a "cvae",
# every classifier (the project's or a user's) as a "classifier"
FAMILIES = {"cvae": ("cvae", "hcvae"), "classifier": ("classifier", *EXTERNAL)}


def write_json(path: str | os.PathLike, obj, **kwargs) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, **kwargs) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stem_of(path: str | os.PathLike) -> Path:
    """A checkpoint's stem from the stem itself or either of its files (``cvae-v1.2.json`` -> ``cvae-v1.2``)."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def file_of(stem: str | os.PathLike, suffix: str) -> Path:
    """The checkpoint file ``stem`` + ``suffix``. Appended, not ``with_suffix``, which would take a dotted stem's
    last part (``v1.2``) for an extension and replace it."""
    stem = Path(stem)
    return stem.with_name(stem.name + suffix)


def kind_of(module: nn.Module) -> str:
    for kind, (cls, _) in REGISTRY.items():
        if isinstance(module, cls):
            return kind
    raise TypeError(f"cannot checkpoint a {type(module).__name__}; known kinds: {sorted(REGISTRY)}")


def save(module: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``module`` (a CVAE or Classifier) to ``path`` (stem, .safetensors or .json); returns the stem."""
    stem = stem_of(path)
    weights = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    weights_path = file_of(stem, ".safetensors")
    atomic_write(weights_path, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    record = {
        "kind": kind_of(module), "config": module.cfg.to_dict(), "meta": meta or {},
        "weights_sha256": sha256_file(weights_path), "version": __version__,
    }

    write_json(file_of(stem, ".json"), record, sort_keys=True)
    return stem


def read_record(path: str | os.PathLike) -> dict:
    stem = stem_of(path)
    json_path = file_of(stem, ".json")
    if not json_path.is_file():
        raise FileNotFoundError(f"checkpoint config {json_path} does not exist")
    with open(json_path) as f:
        record = json.load(f)
    if record.get("kind") not in (*REGISTRY, *EXTERNAL):
        raise ValueError(f"{json_path}: unknown kind {record.get('kind')!r}; known kinds: "
                         f"{sorted((*REGISTRY, *EXTERNAL))}")
    return record


def load(path: str | os.PathLike, expect: str | None = None) -> nn.Module:
    """Rebuild a module from its JSON config and load its safetensors weights; returned in eval mode.

    The weights' sha256 must match the one recorded in the JSON. A user's classifier (kind ``factory`` or
    ``onnx``) is rebuilt by ``classifier_io`` from the files its record names, frozen.
    """
    stem = stem_of(path)
    record = read_record(stem)
    if expect is not None and record["kind"] not in FAMILIES.get(expect, (expect,)):
        raise ValueError(f"{stem}.json holds a {record['kind']!r}, expected a {expect!r}")
    if record["kind"] in EXTERNAL:
        from .classifier_io import load_recorded

        weights_path = stem.parent / record["source"]["path" if record["kind"] == "onnx" else "weights"]
        if sha256_file(weights_path) != record["weights_sha256"]:
            raise ValueError(f"{weights_path}: sha256 does not match {record['weights_sha256']} in {stem}.json")
        return load_recorded(stem, record)
    cls, cfg_cls = REGISTRY[record["kind"]]
    weights_path = file_of(stem, ".safetensors")
    digest = sha256_file(weights_path)
    if record.get("weights_sha256") not in (None, digest):
        raise ValueError(f"{weights_path}: sha256 {digest} does not match {record['weights_sha256']} in its JSON")
    module = cls(cfg_cls.from_dict(record["config"]))
    module.load_state_dict(load_file(str(weights_path)))
    module.meta = record.get("meta", {})
    return module.eval()
