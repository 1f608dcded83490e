"""Torch-free runtime: onnxruntime + numpy (and the HTTP server). Never imports torch, purifier or export."""
