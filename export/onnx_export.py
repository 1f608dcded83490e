"""Export a trained purifier (and, fused, purifier + target classifier) to ONNX with the dynamo exporter.

Two artifacts, both with a dynamic batch axis and the K classes batched inside the graph (B*K):
  ``purifier.onnx``  x -> purified, chosen_class, scores (N x K), recon_error
  ``pipeline.onnx``  x -> purified, chosen_class, scores, logits, recon_error

``scores`` is the selection rule's per-class score (lower = better fit, ``chosen_class`` its argmin);
``recon_error`` is a deprecated alias of it (an ``Identity`` node, ``export.outputs``), removed in the next release.

Each carries ``metadata_props`` that the torch-free runtime reads (dataset, class names, input shape, value
range, selection rule, rejection threshold, versions, sha256 of the weights), so serving needs no Python
config. Every export is checked against torch on the same inputs; a parity failure raises and writes nothing.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from purifier import __version__
from purifier import checkpoint
from purifier.classifier_io import ClassifierSource, check_classifier, describe, source_of
from purifier.fitting import rejection_threshold
from purifier.data import load_dataset, train_val_split
from purifier.models.cvae import CVAE
from purifier.designs import load_purifier, prior_path
from purifier.pipeline import Purifier

from .outputs import ALIAS, PIPELINE_OUTPUTS, PURIFIER_OUTPUTS, SCORES, alias_scores
PARITY_ATOL = 1e-4  # per output: max |onnx - torch| / max(1, |torch|)
PARITY_BATCHES = (1, 64)


class ParityError(RuntimeError):
    """onnxruntime and torch disagree on an exported model beyond tolerance."""


class ExportError(ValueError):
    """The purifier cannot be written as one inference graph."""


def not_exportable(purifier: Purifier) -> str | None:
    """Why ``purifier`` cannot be exported, or None."""
    if getattr(purifier, "spec", {}).get("kind") == "abs":
        return ("analysis by synthesis optimises each class's latent by gradient descent at inference; ONNX "
                "inference graphs have no autodiff operator, so the decoder's backward pass would have to be "
                "written out by hand for every step")
    if getattr(purifier.cvae, "random", False):
        return "the model samples at inference (temperature > 0); export it with temperature 0"
    return None


class _Graph(nn.Module):
    """The exported function: a tuple of named outputs instead of a dict."""

    def __init__(self, purifier: Purifier, classifier: nn.Module | None = None):
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier

    def forward(self, x: torch.Tensor):
        out = self.purifier(x)
        outputs = (out["purified"], out["chosen_class"], out["scores"])
        if self.classifier is not None:
            outputs += (self.classifier(out["purified"]),)
        return outputs


@dataclass
class ExportResult:
    path: Path
    metadata: dict
    parity: dict  # batch size -> max abs difference per output


def calibrate_threshold(cvae: CVAE | Purifier, selection: str = "mse", percentile: float = 99.0) -> dict:
    """Rejection threshold: the ``percentile`` of the chosen class's score on the CVAE's own validation split.

    ``cvae``: a model (wrapped with ``selection``'s rule) or a whole purifier (its own rule). A model that
    ``purifier.fit`` wrote carries its calibration (at the percentile it was trained with); otherwise the split is
    rebuilt from the dataset, validation size and seed recorded in the model's checkpoint, so it is the held-out
    data the model never trained on (never the test set).
    """
    purifier = cvae if isinstance(cvae, Purifier) else Purifier(cvae, selection)
    cvae = purifier.cvae
    meta = getattr(cvae, "meta", {})
    recorded = meta.get("rejection_calibration")
    if recorded and recorded["percentile"] == percentile and purifier.spec == meta.get("purifier", purifier.spec):
        return recorded
    if not {"dataset", "n_val", "train"} <= set(meta) or meta["dataset"] == "arrays":
        raise ValueError("the CVAE checkpoint records no dataset/validation split to calibrate the rejection "
                         "threshold on; pass threshold= explicitly (or --percentile as the model was fitted with)")
    ds = load_dataset(meta["dataset"], "train")
    seed = int(meta["train"]["seed"])
    _, val = train_val_split(len(ds.y), int(meta["n_val"]), seed)
    return rejection_threshold(purifier, torch.from_numpy(ds.x[val]), percentile,
                               f"{meta['dataset']} validation split (seed {seed})")


def _check_parity(path: Path, graph: _Graph, names, image_shape, seed: int = 0) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    report = {}
    for b in PARITY_BATCHES:
        x = torch.rand(b, *image_shape, generator=gen)
        with torch.no_grad():
            expected = graph(x)
        got = session.run([*names, ALIAS], {"x": x.numpy()})
        if not np.array_equal(got[-1], got[names.index(SCORES)], equal_nan=True):
            raise ParityError(f"{path.name}: output {ALIAS!r} is not equal to {SCORES!r} at batch {b}")
        diffs = {}
        for name, e, g in zip(names, expected, got):
            if name == "chosen_class":
                if not np.array_equal(e.numpy(), g):
                    raise ParityError(f"{path.name}: chosen classes differ from torch at batch {b}")
                diffs[name] = 0.0
                continue
            # absolute below 1, relative above: likelihood scores are sums over pixels, hundreds of nats
            # equal entries count as no difference, so +inf scores (classes a candidate purifier never
            # reconstructs) must be +inf in both; inf against a finite value is an infinite difference
            e = e.numpy()
            with np.errstate(invalid="ignore"):
                d = np.where(e == g, 0.0, np.abs(e - g) / np.maximum(1.0, np.abs(e)))
            diffs[name] = float(np.nan_to_num(d, nan=np.inf).max())
            if diffs[name] > PARITY_ATOL:
                raise ParityError(f"{path.name}: output {name!r} differs from torch by {diffs[name]:.3g} "
                                  f"(> {PARITY_ATOL}) at batch {b}")
        report[b] = diffs
    return report


def export_onnx(path: str | os.PathLike, cvae: CVAE | Purifier, classifier: nn.Module | None = None,
                selection: str = "mse", metadata: dict | None = None,
                rewrite_convtranspose: bool = False) -> ExportResult:
    """Export purifier (+ classifier) to ``path``, check parity against torch, then move it into place.

    ``cvae``: a model (wrapped with ``selection``'s rule) or a whole purifier of any design that runs as one
    graph (not analysis by synthesis: ``ExportError``). ``rewrite_convtranspose``: each stride-2 ConvTranspose of
    at least ``export.optimize.MIN_OUT_CHANNELS`` output channels becomes four Convs and a DepthToSpace
    (``convtranspose_as_conv``; faster on onnxruntime's CPU provider, untimed on CUDA), recorded in the metadata as
    ``graph_rewrites``; parity is checked on the rewritten graph."""
    purifier = cvae if isinstance(cvae, Purifier) else Purifier(cvae, selection)
    if not_exportable(purifier):
        raise ExportError(not_exportable(purifier))
    if classifier is not None:
        classifier = classifier.eval()
    graph = _Graph(purifier.eval(), classifier).eval()
    names = PIPELINE_OUTPUTS if classifier is not None else PURIFIER_OUTPUTS
    image_shape = tuple(purifier.image_shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        program = torch.onnx.export(
            graph, (torch.rand(2, *image_shape),), dynamo=True, input_names=["x"], output_names=list(names),
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1 << 20)}}, verbose=False)
        program.save(str(tmp_path))
        model = onnx.load(str(tmp_path))
        metadata = dict(metadata or {})
        if rewrite_convtranspose:
            from .optimize import convtranspose_as_conv

            metadata["graph_rewrites"] = {"convtranspose_as_conv": convtranspose_as_conv(model)}
        props = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
        onnx.helper.set_model_props(model, props)
        alias_scores(model)  # + recon_error, metadata_props outputs and deprecated_outputs
        props = {p.key: p.value for p in model.metadata_props}
        model.producer_name, model.producer_version = "purifier", __version__
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp_path))
        parity = _check_parity(tmp_path, graph, names, image_shape)
        os.replace(tmp_path, path)
    return ExportResult(path, props, parity)


def export_run(cvae_path, classifier, out_dir, selection: str | None = None, percentile: float = 99.0,
               threshold: float | None = None, rewrite_convtranspose: bool = False) -> dict[str, ExportResult]:
    """Export ``purifier.onnx`` and, given a classifier, ``pipeline.onnx`` into ``out_dir``
    (``rewrite_convtranspose``: see ``export_onnx``).

    ``classifier``: a checkpoint path (a project classifier or a model directory's ``classifier.json``), a
    ``ClassifierSource``, or None (purifier.onnx alone). A classifier given as ONNX is composed after the purifier's
    graph as it is (``export.compose``); any other is exported with the purifier from torch. The purifier is the
    one the model's checkpoint records (its design), or PuVAE's with ``selection``'s rule.
    """
    recorded = checkpoint.read_record(cvae_path)["meta"].get("purifier") or {}
    # another rule keeps the model's robust prior: the exported graph is the purifier the model directory describes
    spec = None if selection is None else {"selection": selection, **{k: v for k, v in recorded.items()
                                                                       if k == "prior_weight"}}
    purifier = load_purifier(cvae_path, spec)
    cvae = purifier.cvae
    if not_exportable(purifier):
        raise ExportError(f"{cvae_path}: {not_exportable(purifier)}")
    source = classifier if classifier is None or isinstance(classifier, ClassifierSource) else source_of(classifier)
    if threshold is None:
        calib = calibrate_threshold(purifier, percentile=percentile)
    else:
        calib = {"threshold": float(threshold), "percentile": None, "n": 0, "source": "given"}
    meta = cvae.meta
    c, h, w = cvae.cfg.image_shape
    common = {
        "dataset": meta.get("dataset", "unknown"),
        "class_names": list(meta.get("class_names") or [str(k) for k in range(cvae.cfg.num_classes)]),
        "num_classes": cvae.cfg.num_classes,
        "input_name": "x", "input_shape": ["N", c, h, w], "input_dtype": "float32", "value_range": [0.0, 1.0],
        "selection": purifier.selection, "purifier": purifier.spec, "design": meta.get("design", "puvae"),
        "model_kind": checkpoint.read_record(cvae_path)["kind"],
        "rejection_threshold": calib["threshold"], "rejection_calibration": calib,
        "purifier_version": __version__, "torch_version": torch.__version__,
        "cvae_sha256": checkpoint.read_record(cvae_path)["weights_sha256"],
    }
    if purifier.prior_weight:
        common["prior_sha256"] = checkpoint.read_record(prior_path(cvae_path))["weights_sha256"]
    out_dir = Path(out_dir)
    results = {"purifier": export_onnx(out_dir / "purifier.onnx", purifier, None,
                                       metadata={**common, "kind": "purifier"},
                                       rewrite_convtranspose=rewrite_convtranspose)}
    if source is None:
        return results
    module = source.load(_check_images(meta, (c, h, w)))
    check_classifier(module, (c, h, w), cvae.cfg.num_classes, f"classifier {_source_name(source)}")
    pipe_meta = {**common, "kind": "pipeline", "classifier_sha256": source.sha256(),
                 "classifier_arch": describe(module), "classifier_source": source.kind,
                 "classifier_layout": source.layout, "classifier_mean": source.mean, "classifier_std": source.std}
    if source.kind == "onnx":
        from .compose import compose_pipeline

        if "graph_rewrites" in results["purifier"].metadata:  # composed from the rewritten purifier.onnx
            pipe_meta["graph_rewrites"] = json.loads(results["purifier"].metadata["graph_rewrites"])
        r = compose_pipeline(out_dir / "purifier.onnx", source.path, out_dir / "pipeline.onnx", layout=source.layout,
                             mean=source.mean, std=source.std, metadata=pipe_meta)
        results["pipeline"] = ExportResult(Path(r["path"]), r["metadata"], {"composed": r["parity"]})
        return results
    results["pipeline"] = export_onnx(out_dir / "pipeline.onnx", purifier, module, metadata=pipe_meta,
                                      rewrite_convtranspose=rewrite_convtranspose)
    return results


def _source_name(source: ClassifierSource) -> str:
    return source.path if source.kind != "factory" else source.factory


def _check_images(meta: dict, image_shape) -> np.ndarray | None:
    """Real images to check an ONNX classifier's conversion on: the model's own training data where it can be
    loaded, else None (random images)."""
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        x = load_dataset(meta["dataset"], "train").x[:64]
        if tuple(x.shape[1:]) == tuple(image_shape):
            return x
    return None


__all__ = ["export_onnx", "export_run", "calibrate_threshold", "not_exportable", "ParityError", "ExportError",
           "ExportResult"]
