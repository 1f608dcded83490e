"""ONNX export of trained purifiers (imports purifier and onnx). Filled in by the export issue."""
