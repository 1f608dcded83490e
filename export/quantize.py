"""Static int8 quantisation of an exported ``pipeline.onnx`` / ``purifier.onnx`` with onnxruntime.

``quantize_model("models/middleware/cvae-alone-smooth200-tau3-prior1-mu2/pipeline.onnx")`` writes
``pipeline.int8.onnx`` beside it: QDQ format, int8 weights per output channel, int8 activations calibrated (min/max)
on a seeded sample of the dataset's *training* images (never the test set). Only the Conv, ConvTranspose, Gemm and
MatMul nodes are quantised: the reconstruction errors, the argmin over the K classes and the gather stay in fp32, so
the selection rule compares the reconstructions at full precision.

The int8 file carries the fp32 model's ``metadata_props`` plus ``precision`` = ``int8``, ``quantization`` (the
settings and calibration sample) and ``fp32_sha256`` (the model it was made from), so the torch-free runtime
(``serve.runtime.OnnxPurifier(..., precision="int8")``) needs nothing else.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_static)

from purifier.data import load_dataset

QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CALIBRATION_IMAGES = 256
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 32


def int8_path(fp32_path: str | os.PathLike) -> Path:
    """``.../pipeline.onnx`` -> ``.../pipeline.int8.onnx`` (the name the runtime looks for)."""
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


class ImageReader(CalibrationDataReader):
    """Feeds ``images`` (N x C x H x W float32 in [0, 1]) to the calibrator as ``{"x": batch}``."""

    def __init__(self, images: np.ndarray, batch: int = CALIBRATION_BATCH):
        self.batches = [images[i:i + batch] for i in range(0, len(images), batch)]
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter({"x": b} for b in self.batches)


def calibration_images(dataset: str, n: int = CALIBRATION_IMAGES,
                       seed: int = CALIBRATION_SEED) -> tuple[np.ndarray, dict]:
    """A seeded sample of ``n`` images of ``dataset``'s training split, sorted by index, and its description."""
    train = load_dataset(dataset, "train")
    if not 1 <= n <= len(train.y):
        raise ValueError(f"calibration images must be between 1 and {len(train.y)} ({dataset} train), got {n}")
    index = np.sort(np.random.default_rng(seed).choice(len(train.y), n, replace=False))
    return train.x[index], {"dataset": dataset, "split": "train", "images": n, "seed": seed,
                            "sample": "numpy default_rng(seed).choice(len(train), n, replace=False), sorted"}


def quantize_model(fp32_path: str | os.PathLike, out: str | os.PathLike | None = None, n: int = CALIBRATION_IMAGES,
                   seed: int = CALIBRATION_SEED, images: np.ndarray | None = None,
                   calibration_source: dict | None = None) -> Path:
    """Write the int8 twin of the fp32 model at ``fp32_path`` (default: ``int8_path(fp32_path)``); returns its path.

    Calibration images: ``images`` (N x C x H x W float32 in [0, 1], described by ``calibration_source``) or, by
    default, ``n`` training images of the dataset the model's metadata names, drawn with ``seed``.
    """
    fp32_path = Path(fp32_path)
    model = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("precision", "fp32") != "fp32":
        raise ValueError(f"{fp32_path} is already {props['precision']}; quantise the fp32 model")
    if images is None:
        if props.get("dataset") in (None, "unknown", "arrays"):
            raise ValueError(f"{fp32_path}: its metadata names no dataset to draw training images from; pass images=")
        images, source = calibration_images(props["dataset"], n, seed)
    else:
        images = np.ascontiguousarray(images, dtype=np.float32)
        source = dict(calibration_source or {"dataset": "given", "images": len(images)})
    settings = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True,
                "weight_type": "int8", "activation_type": "int8", "calibrate_method": "MinMax",
                "op_types": list(QUANTIZED_OPS), "calibration": {**source, "batch": CALIBRATION_BATCH}}
    out = Path(out) if out is not None else int8_path(fp32_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / out.name
        quant_pre_process(str(fp32_path), str(pre))  # shape inference + graph cleanup, as the tool recommends
        quantize_static(str(pre), str(q), ImageReader(images), quant_format=QuantFormat.QDQ, per_channel=True,
                        op_types_to_quantize=list(QUANTIZED_OPS), activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        quantized = onnx.load(str(q))
        props.update({"precision": "int8", "quantization": json.dumps(settings),
                      "fp32_sha256": hashlib.sha256(fp32_path.read_bytes()).hexdigest()})
        onnx.helper.set_model_props(quantized, props)
        quantized.producer_name, quantized.producer_version = model.producer_name, model.producer_version
        onnx.checker.check_model(quantized)
        onnx.save(quantized, str(q))
        os.replace(q, out)
    return out


__all__ = ["quantize_model", "int8_path", "calibration_images", "ImageReader", "QUANTIZED_OPS"]
