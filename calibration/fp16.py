"""FP16 variants of the encoder and the refinement, with the neighbour ranking kept in fp32.

Place in the flow: ``encoder.onnx`` / ``nformer.onnx`` (fp32, from ``export``) -> ``encoder.fp16.onnx``
/ ``nformer.fp16.onnx`` beside them.  TensorRT builds an FP16 engine from these files in strongly
typed mode (no ``--fp16`` flag, which TensorRT 11 removed); ONNX Runtime runs them as they are.

The conversion is ONNX Runtime's ``onnxruntime.transformers.float16.convert_float_to_float16``
with the graph inputs and outputs kept float32 (``keep_io_types``: the runtime's contract does not
change with precision; the casts are inside the file).  One thing is done on top of it, for the
refinement: **which rows are neighbours is decided in fp32** (DESIGN.md section 1: an fp16 similarity
flips near-tied neighbours).  The converter would feed the ``nformer::ReciprocalNeighbors`` node the
fp16-rounded features cast back to float32; this module blocks the node (and leaves its
FunctionProto body alone) and rewires its input to the untouched float32 graph input ``features``,
then removes the cast that fed it.  :func:`check_fp32_ranking` is the graph check that proves it.

Imports no torch.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from export.contract.ops import OP_DOMAIN, OP_TYPE

FEATURES = "features"


def _convert(model: onnx.ModelProto, node_block_list=()) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, OP_TYPE],
                                     node_block_list=list(node_block_list), disable_shape_infer=False)
    _sort_topologically(model.graph)
    return model


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """The converter appends its Cast nodes at the end; ONNX (and TensorRT's parser) want every node
    after the producers of its inputs.  Stable: the original order is kept where it is valid."""
    known = {v.name for v in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in _consumed(n))]
        if not ready:
            raise RuntimeError("the converted graph has a cycle or an input that nothing produces")
        ready_ids = {id(n) for n in ready}
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def _consumed(node: onnx.NodeProto) -> set[str]:
    """Inputs of ``node`` and the outer-scope names its subgraphs read."""
    names = set(node.input)
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            inner = {v.name for v in g.input} | {i.name for i in g.initializer}
            for n in g.node:
                inner.update(n.output)
            for n in g.node:
                names.update(i for i in _consumed(n) if i not in inner)
    return names


def convert_encoder(src: str | Path, dst: str | Path) -> None:
    model = _convert(onnx.load(src))
    _check_io_float32(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, dst)


def convert_nformer(src: str | Path, dst: str | Path) -> None:
    source = onnx.load(src)
    nodes = _neighbor_nodes(source)
    if len(nodes) != 1 or list(nodes[0].input) != [FEATURES]:
        raise RuntimeError(f"{src}: expected one {OP_DOMAIN}::{OP_TYPE} node reading {FEATURES!r}")
    functions = [f.SerializeToString() for f in source.functions]
    model = _convert(source, node_block_list=[nodes[0].name])
    (node,) = _neighbor_nodes(model)
    fed_by = node.input[0]
    node.input[0] = FEATURES  # the ranking reads the float32 input itself, not fp16 cast back to fp32
    _remove_unused_casts(model, fed_by)
    # the converter must not have touched the function body (it does not walk functions today)
    if [f.SerializeToString() for f in model.functions] != functions:
        raise RuntimeError("the fp16 conversion changed the ReciprocalNeighbors function body")
    _check_io_float32(model)
    check_fp32_ranking(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, dst)


def _neighbor_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == OP_DOMAIN]


def _remove_unused_casts(model: onnx.ModelProto, name: str) -> None:
    """Drop the chain of Cast nodes that produced ``name`` once nothing reads it any more."""
    graph = model.graph
    while name and name not in {o.name for o in graph.output}:
        if any(name in n.input for n in graph.node):
            return
        producer = next((n for n in graph.node if name in n.output), None)
        if producer is None or producer.op_type != "Cast":
            return
        graph.node.remove(producer)
        for vi in [v for v in graph.value_info if v.name == name]:
            graph.value_info.remove(vi)
        name = producer.input[0]


def _check_io_float32(model: onnx.ModelProto) -> None:
    for value in (*model.graph.input, *model.graph.output):
        t = value.type.tensor_type.elem_type
        if t not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            raise RuntimeError(f"graph input/output {value.name} became {onnx.TensorProto.DataType.Name(t)}; "
                               "the runtime's contract is float32")


def check_fp32_ranking(model: onnx.ModelProto) -> None:
    """Raise unless every ReciprocalNeighbors node reads a float32 graph input directly and its
    function body computes in float32 (no Cast to a 16-bit type inside)."""
    inputs = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    nodes = _neighbor_nodes(model)
    if not nodes:
        raise RuntimeError(f"no {OP_DOMAIN}::{OP_TYPE} node in the graph")
    for node in nodes:
        src = node.input[0]
        if inputs.get(src) != onnx.TensorProto.FLOAT:
            raise RuntimeError(f"{node.name} reads {src!r}, not a float32 graph input: the neighbour ranking "
                               "would not be decided in fp32")
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    for fn in model.functions:
        if fn.name == OP_TYPE and fn.domain == OP_DOMAIN:
            for n in _walk(fn.node):
                if n.op_type == "Cast" and any(a.name == "to" and a.i in half for a in n.attribute):
                    raise RuntimeError(f"the {OP_TYPE} function body casts to 16 bits ({n.name})")


def _walk(nodes):
    for n in nodes:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _walk(a.g.node)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _walk(g.node)
