"""The Triton Python-backend model: ``OnnxPurifier`` answering Triton's batched requests.

Loaded by Triton's python backend stub (``model.py`` of a repository from ``serve.triton.write_python_repo``
imports it), where ``triton_python_backend_utils`` exists. Model parameters from config.pbtxt: ``onnx_file`` (in
the version folder), ``device`` (auto, cpu, cuda) and ``threads`` (onnxruntime intra-op threads; 0: all cores).

Each call gets the requests Triton's dynamic batcher gathered; the valid ones run as one onnxruntime batch and
each answers with the outputs it asked for. A request whose input ``OnnxPurifier.validate`` refuses (a value
outside [0, 1], NaN) gets INVALID_ARG with the runtime's message; the others in the batch are unaffected.
Tensors cross the stub by DLPack: the stub's ``as_numpy()`` and ``Tensor(name, ndarray)`` read numpy's array
descriptor with the numpy 1 layout and, under numpy 2, return zeros or refuse the output's size.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .runtime import OnnxPurifier


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        folder = Path(args["model_repository"]) / str(args["model_version"])
        threads = int(params.get("threads") or 0) or None
        self.runtime = OnnxPurifier(folder / (params.get("onnx_file") or "model.onnx"),
                                    device=params.get("device") or "auto", threads=threads)
        self.outputs = [o["name"] for o in config["output"]]
        probe = self.runtime(np.zeros((1, *self.runtime.image_shape), np.float32))
        missing = [n for n in self.outputs if n not in probe]
        if missing:
            raise ValueError(f"config.pbtxt declares outputs {missing} that {self.runtime.path} does not give "
                             f"(it gives {sorted(probe)})")

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses: list = [None] * len(requests)
        valid = []
        for i, request in enumerate(requests):
            try:
                x = self.runtime.validate(np.from_dlpack(pb.get_input_tensor_by_name(request, "x")))
            except ValueError as exc:
                responses[i] = pb.InferenceResponse(error=pb.TritonError(f"input 'x': {exc}",
                                                                         pb.TritonError.INVALID_ARG))
                continue
            valid.append((i, x, set(request.requested_output_names())))
        if valid:
            out = self.runtime(np.concatenate([x for _, x, _ in valid]))
            start = 0
            for i, x, wanted in valid:
                names = [n for n in self.outputs if not wanted or n in wanted]
                part = slice(start, start + len(x))
                start += len(x)
                responses[i] = pb.InferenceResponse(
                    output_tensors=[pb.Tensor.from_dlpack(n, np.ascontiguousarray(out[n][part])) for n in names])
        return responses
