"""The output names of the exported graphs, and ``recon_error``, the deprecated alias of ``scores``.

``purifier.onnx`` gives ``purified``, ``chosen_class``, ``scores`` (N x K: per class, lower = better fit;
``chosen_class`` is the argmin; MSE reconstruction errors under the ``mse`` rule, negative ELBO or IWAE bounds
under the others); ``pipeline.onnx`` adds ``logits``. Both end with ``recon_error``, an ``Identity`` of ``scores``
kept for clients written against the old name; it is removed in the next release.

``alias_scores(model)`` puts a graph in that form in place, and is what the exporter and ``compose`` apply to the
graphs they write. A graph from an earlier release (``recon_error`` computed, no ``scores``) has that tensor
renamed to ``scores`` in every node, output and value_info; no node, weight or attribute changes otherwise, so
onnxruntime gives the same numbers. ``upgrade_files(paths)`` applies it to ONNX files on disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import onnx
from onnx import helper

from serve.runtime import ALIASES, SCORES

ALIAS = next(a for a, of in ALIASES.items() if of == SCORES)  # "recon_error"
PURIFIER_OUTPUTS = ("purified", "chosen_class", SCORES)
PIPELINE_OUTPUTS = (*PURIFIER_OUTPUTS, "logits")
# metadata_props "deprecated_outputs": output -> what it is and when it goes
DEPRECATED_OUTPUTS = {ALIAS: {"alias_of": SCORES, "removed_in": "the next release"}}
ALIAS_NODE = f"{ALIAS}_alias"


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the tensor ``old`` to ``new`` in ``graph`` and in the subgraphs that read it from there."""
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                _rename(sub, old, new)
    for values in (graph.input, graph.output, graph.value_info):
        for v in values:
            if v.name == old:
                v.name = new


def _names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for values in (graph.input, graph.output, graph.value_info, graph.initializer) for v in values}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _set_output_props(model: onnx.ModelProto) -> None:
    """``outputs`` (every graph output, in order) and ``deprecated_outputs`` right after it; the others keep
    their order."""
    props = {"outputs": json.dumps([o.name for o in model.graph.output]),
             "deprecated_outputs": json.dumps(DEPRECATED_OUTPUTS)}
    entries = []
    for p in model.metadata_props:
        if p.key == "outputs":
            entries += props.items()
        elif p.key not in props:
            entries.append((p.key, p.value))
    if "outputs" not in {p.key for p in model.metadata_props}:
        entries += props.items()
    helper.set_model_props(model, dict(entries))


def alias_scores(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (a purifier or pipeline graph) with the output ``scores`` and, last, ``recon_error`` =
    ``Identity(scores)``; ``outputs`` and ``deprecated_outputs`` in its metadata_props. In place; returns it.
    Applying it again changes nothing."""
    graph = model.graph
    outputs = [o.name for o in graph.output]
    if SCORES not in outputs:
        if ALIAS not in outputs:
            raise ValueError(f"the graph's outputs {outputs} hold neither {SCORES!r} nor {ALIAS!r}")
        if SCORES in _names(graph):
            raise ValueError(f"the graph computes {ALIAS!r} and already has another tensor named {SCORES!r}")
        _rename(graph, ALIAS, SCORES)
    kept = [n for n in graph.node if not (n.op_type == "Identity" and list(n.input) == [SCORES]
                                          and list(n.output) == [ALIAS])]
    if any(ALIAS in n.output for n in kept):
        raise ValueError(f"the graph computes {ALIAS!r} besides {SCORES!r}; it cannot be the alias")
    del graph.node[:]
    graph.node.extend(kept)
    for values in (graph.output, graph.value_info):
        keep = [v for v in values if v.name != ALIAS]
        del values[:]
        values.extend(keep)
    graph.node.append(helper.make_node("Identity", [SCORES], [ALIAS], name=ALIAS_NODE))
    alias = onnx.ValueInfoProto()
    alias.CopyFrom(next(o for o in graph.output if o.name == SCORES))
    alias.name = ALIAS
    graph.output.append(alias)
    _set_output_props(model)
    return model


def upgrade_files(paths) -> dict[Path, tuple[str, str]]:
    """``alias_scores`` on each ONNX file in ``paths``, rewritten atomically where it changes; an int8 file's
    ``fp32_sha256`` naming a file rewritten here is set to that file's new sha256 (fp32 files go first).

    Returns ``{path: (sha256 before, sha256 after)}`` for every file."""
    def load(path):
        model = onnx.load(str(path))
        return model, {p.key: p.value for p in model.metadata_props}

    loaded = {Path(p): load(p) for p in paths}
    order = sorted(loaded, key=lambda p: loaded[p][1].get("precision", "fp32") != "fp32")
    renamed, report = {}, {}
    for path in order:
        model, props = loaded[path]
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        alias_scores(model)
        if props.get("fp32_sha256") in renamed:
            helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                           "fp32_sha256": renamed[props["fp32_sha256"]]})
        onnx.checker.check_model(model)
        data = model.SerializeToString()
        after = hashlib.sha256(data).hexdigest()
        if after != before:
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
                tmp.write(data)
            os.chmod(tmp.name, path.stat().st_mode)
            os.replace(tmp.name, path)
        renamed[before] = after
        report[path] = (before, after)
    return report


__all__ = ["alias_scores", "upgrade_files", "SCORES", "ALIAS", "PURIFIER_OUTPUTS", "PIPELINE_OUTPUTS",
           "DEPRECATED_OUTPUTS"]


if __name__ == "__main__":  # python -m export.outputs FILE.onnx ...
    import sys

    for file, (old, new) in upgrade_files(sys.argv[1:]).items():
        print(f"{file}: {'unchanged' if old == new else 'rewritten'} (sha256 {old[:16]}… -> {new[:16]}…)")
