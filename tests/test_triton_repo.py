"""The Triton model repository, parsed with Triton's own model-config protobuf and checked against the ONNX model."""
from pathlib import Path

import onnx
import pytest

from export.triton import write_triton_repo

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "models" / "fashion-mnist" / "pipeline.onnx"
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32, onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64}


def test_config_matches_the_onnx_model(tmp_path):
    model_dir = write_triton_repo(PIPELINE, tmp_path, "fashion-mnist", max_batch_size=128)
    assert (model_dir / "1" / "model.onnx").read_bytes() == PIPELINE.read_bytes()
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "fashion-mnist" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 128
    assert cfg.HasField("dynamic_batching")
    graph = onnx.load(str(PIPELINE)).graph
    for declared, actual in ((cfg.input, graph.input), (cfg.output, graph.output)):
        assert [d.name for d in declared] == [a.name for a in actual]
        for d, a in zip(declared, actual):
            t = a.type.tensor_type
            assert d.data_type == ONNX_TO_TRITON[t.elem_type]
            dims = [x.dim_value if x.HasField("dim_value") else -1 for x in t.shape.dim][1:]
            if dims:
                assert list(d.dims) == dims
            else:  # [N] outputs: dims [1] reshaped to a scalar per image
                assert list(d.dims) == [1] and list(d.reshape.shape) == []


def test_cli_writes_the_repository_and_refuses_bad_names(tmp_path):
    from click.testing import CliRunner

    from purifier.cli import main

    r = CliRunner().invoke(main, ["export", str(ROOT / "models" / "fashion-mnist"), "--out", str(tmp_path / "m"),
                                  "--triton", str(tmp_path / "repo"), "--triton-name", "fmnist"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "repo" / "fmnist" / "config.pbtxt").is_file()
    with pytest.raises(ValueError, match="directory name"):
        write_triton_repo(PIPELINE, tmp_path, "a/b")
