"""The Triton model repositories, parsed with Triton's own model-config protobuf and checked against the ONNX model
(ONNX Runtime backend) and against the embedded server's outputs (Python backend). tests/test_tritonserver.py loads
them into a real tritonserver."""
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from export.triton import write_triton_repo, write_triton_repos
from serve.models import MODELS

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = MODELS["fashion-mnist"].path / "pipeline.onnx"
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

    r = CliRunner().invoke(main, ["export", str(MODELS["fashion-mnist"].path), "--out", str(tmp_path / "m"),
                                  "--triton", str(tmp_path / "repo"), "--triton-name", "fmnist"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "repo" / "fmnist" / "config.pbtxt").is_file()  # --triton-backend both, the default
    assert (tmp_path / "repo" / "fmnist-python" / "1" / "model.py").is_file()
    with pytest.raises(ValueError, match="directory name"):
        write_triton_repo(PIPELINE, tmp_path, "a/b")


def test_python_backend_config_declares_what_the_embedded_server_answers(tmp_path):
    from serve.protocol import _outputs_meta
    from serve.runtime import OnnxPurifier

    (model_dir,) = write_triton_repos(PIPELINE, tmp_path, "fashion-mnist", "python", max_batch_size=32,
                                      max_queue_delay_us=500)
    assert model_dir.name == "fashion-mnist-python" and not (tmp_path / "fashion-mnist").exists()
    assert (model_dir / "1" / "model.onnx").read_bytes() == PIPELINE.read_bytes()
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "fashion-mnist-python" and cfg.backend == "python" and not cfg.platform
    assert cfg.max_batch_size == 32 and cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("x", model_config_pb2.TYPE_FP32, [1, 28, 28])]
    served = _outputs_meta(OnnxPurifier(PIPELINE, device="cpu"))
    assert [o.name for o in cfg.output] == [o["name"] for o in served]
    assert {"margin", "rejected", "predicted_class"} <= {o.name for o in cfg.output}
    for o, want in zip(cfg.output, served):
        assert model_config_pb2.DataType.Name(o.data_type) == "TYPE_" + want["datatype"]
        assert list(o.dims) == (want["shape"][1:] or [1])
    assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert cfg.parameters["onnx_file"].string_value == "model.onnx"


def test_python_backend_model_imports_without_torch(tmp_path):
    (model_dir,) = write_triton_repos(PIPELINE, tmp_path, "m", "python")
    code = ("import runpy, sys; sys.modules['torch'] = None; "  # any import of torch would now fail
            f"ns = runpy.run_path({str(model_dir / '1' / 'model.py')!r}); print(ns['TritonPythonModel'].__module__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "serve.triton_model", r.stderr


def test_backend_choice_and_instances_are_checked(tmp_path):
    from serve.triton import write_python_repo

    assert [d.name for d in write_triton_repos(PIPELINE, tmp_path, "m", "onnx")] == ["m"]
    with pytest.raises(ValueError, match="backend must be one of .*'tensorrt'"):
        write_triton_repos(PIPELINE, tmp_path, "m", "tensorrt")
    two = write_python_repo(PIPELINE, tmp_path, "two", instances=2)
    cfg = text_format.Parse((two / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [g.count for g in cfg.instance_group] == [2]
    with pytest.raises(ValueError, match="instances must be at least 1, got 0"):
        write_python_repo(PIPELINE, tmp_path, "none", instances=0)
