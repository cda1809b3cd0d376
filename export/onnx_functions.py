"""The standard-op body of the ``nformer::ReciprocalNeighbors`` node (an ONNX FunctionProto).

ONNX Runtime runs the node through this body with no registration; TensorRT maps the node to the
``ReciprocalNeighbors`` plugin when it is loaded (the node carries ``plugin_namespace``) and
imports this body otherwise (DESIGN.md section 2).  The body computes exactly
:func:`export.reciprocal_neighbors.reciprocal_neighbors`:

* fp64 ranking key ``(x_i . x_j) / max(||x_j||, eps)``, self at +inf, ``TopK`` (lower index wins
  ties, as the ONNX spec says), ``k_eff = min(k, N)``;
* the similarity is computed ``R = clip(2^25 // N, 1, 1024)`` rows at a time in a ``Loop``
  (:func:`export.reciprocal_neighbors.row_block`), so no N x N tensor is ever materialised --
  a block is at most 2^25 doubles (256 MB) at any N;
* ``valid[i, t] = i in idx[idx[i, t]]``.

Outputs are int32 (what the TensorRT plugin produces).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .reciprocal_neighbors import BLOCK_ELEMENTS, NORM_EPS, OP_DOMAIN, OP_TYPE, ROW_BLOCK

INPUTS = ["features"]
OUTPUTS = ["neighbor_index", "neighbor_valid"]
ATTRIBUTES = ["k", "plugin_version", "plugin_namespace"]
OPSET = 20


def _const(name: str, value, dtype=TensorProto.INT64, dims=None):
    values = value if isinstance(value, list) else [value]
    dims = dims if dims is not None else ([] if not isinstance(value, list) else [len(values)])
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, values))


def _row_block_body() -> onnx.GraphProto:
    """One Loop iteration: the top-k of ROW_BLOCK padded rows against all N rows."""
    n = helper.make_node
    nodes = [
        n("Mul", ["iter", "block"], ["start"]),
        n("Add", ["start", "block"], ["stop"]),
        n("Unsqueeze", ["start", "zero_axis"], ["start1"]),
        n("Unsqueeze", ["stop", "zero_axis"], ["stop1"]),
        n("Slice", ["x_rows", "start1", "stop1", "one_axis"], ["rows"]),            # [B, R, D]
        n("MatMul", ["rows", "x_t"], ["dots"]),                                     # [B, R, N]
        n("Div", ["dots", "norms_t"], ["key_raw"]),
        n("Range", ["start", "stop", "one"], ["row_ids"]),
        n("Unsqueeze", ["row_ids", "one_axis"], ["row_ids_col"]),                   # [R, 1]
        n("Equal", ["row_ids_col", "col_ids"], ["is_self"]),                        # [R, N]
        n("Where", ["is_self", "pos_inf", "key_raw"], ["key"]),
        n("TopK", ["key", "k_eff1"], ["top_vals", "top_idx"], axis=-1, largest=1, sorted=1),
        n("Identity", ["cond_in"], ["cond_out"]),
    ]
    return helper.make_graph(
        nodes, "row_block",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("top_idx", TensorProto.INT64, None)],
    )


def reciprocal_neighbors_function(block_elements: int = BLOCK_ELEMENTS) -> onnx.FunctionProto:
    n = helper.make_node
    k_attr = helper.make_node("Constant", [], ["k_scalar"])
    k_attr.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name="k"))
    nodes = [
        k_attr,
        _const("zero_axis", [0]), _const("one_axis", [1]), _const("last_axis", [-1]),
        _const("one", 1), _const("max_block", ROW_BLOCK), _const("block_elements", block_elements),
        _const("eps", NORM_EPS, TensorProto.DOUBLE),
        _const("pos_inf", float("inf"), TensorProto.DOUBLE),
        _const("true", True, TensorProto.BOOL),
        n("Cast", ["features"], ["x"], to=TensorProto.DOUBLE),                     # [B, N, D]
        n("Shape", ["x"], ["shape"]),
        n("Gather", ["shape", "zero_axis"], ["b1"]),
        n("Gather", ["shape", "one_axis"], ["n1"]),
        n("Gather", ["shape", "last_axis"], ["d1"]),
        n("Squeeze", ["n1"], ["n"]),
        n("Squeeze", ["b1"], ["b"]),
        # norms of the columns, [B, 1, N]
        n("Mul", ["x", "x"], ["sq"]),
        n("ReduceSum", ["sq", "last_axis"], ["sq_sum"], keepdims=1),
        n("Sqrt", ["sq_sum"], ["norms_raw"]),
        n("Max", ["norms_raw", "eps"], ["norms"]),
        n("Transpose", ["norms"], ["norms_t"], perm=[0, 2, 1]),
        n("Transpose", ["x"], ["x_t"], perm=[0, 2, 1]),                              # [B, D, N]
        n("Min", ["k_scalar", "n"], ["k_eff"]),
        n("Unsqueeze", ["k_eff", "zero_axis"], ["k_eff1"]),
        n("Range", ["zero_s", "n", "one"], ["col_ids"]),
        # rows per block R = clip(block_elements // N, 1, ROW_BLOCK), as row_block() in the reference
        n("Div", ["block_elements", "n"], ["fit"]),
        n("Min", ["fit", "max_block"], ["fit_capped"]),
        n("Max", ["fit_capped", "one"], ["block"]),
        # pad the rows to a whole number of blocks: blocks = ceil(N / R)
        n("Sub", ["block", "one"], ["block_minus_one"]),
        n("Add", ["n", "block_minus_one"], ["n_up"]),
        n("Div", ["n_up", "block"], ["blocks"]),
        n("Mul", ["blocks", "block"], ["n_pad"]),
        n("Sub", ["n_pad", "n"], ["pad_rows"]),
        n("Unsqueeze", ["pad_rows", "zero_axis"], ["pad_rows1"]),
        n("Concat", ["zeros4", "pad_rows1", "zero_axis"], ["pads"], axis=0),  # ends: [0, pad, 0]
        n("Pad", ["x", "pads"], ["x_rows"]),                                         # [B, N_pad, D]
        n("Loop", ["blocks", "true"], ["block_idx"], body=_row_block_body()),       # [M, B, R, K]
        n("Transpose", ["block_idx"], ["block_idx_t"], perm=[1, 0, 2, 3]),
        n("Concat", ["b1", "minus_one", "k_eff1"], ["flat_shape"], axis=0),
        n("Reshape", ["block_idx_t", "flat_shape"], ["idx_pad"]),
        n("Slice", ["idx_pad", "zero_axis", "n1", "one_axis"], ["idx"]),           # [B, N, K]
        # reciprocal check: back[b, i, t, :] = idx[b, idx[b, i, t], :]
        n("Range", ["zero_s", "b", "one"], ["batch_ids"]),
        n("Mul", ["batch_ids", "n"], ["batch_offset0"]),
        n("Reshape", ["batch_offset0", "bcast3"], ["batch_offset"]),
        n("Add", ["idx", "batch_offset"], ["flat_idx"]),
        n("Concat", ["minus_one", "k_eff1"], ["table_shape"], axis=0),
        n("Reshape", ["idx", "table_shape"], ["table"]),                            # [B*N, K]
        n("Gather", ["table", "flat_idx"], ["back"], axis=0),                       # [B, N, K, K]
        n("Reshape", ["col_ids", "bcast4"], ["me"]),
        n("Equal", ["back", "me"], ["hit"]),
        n("Cast", ["hit"], ["hit32"], to=TensorProto.INT32),
        n("ReduceMax", ["hit32", "last_axis"], ["neighbor_valid"], keepdims=0),
        n("Cast", ["idx"], ["neighbor_index"], to=TensorProto.INT32),
    ]
    extra = [
        _const("zero_s", 0),
        _const("zeros4", [0, 0, 0, 0]), _const("minus_one", [-1]),
        _const("bcast3", [-1, 1, 1]), _const("bcast4", [1, -1, 1, 1]),
    ]
    return helper.make_function(
        OP_DOMAIN, OP_TYPE, INPUTS, OUTPUTS, extra + nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
        attributes=ATTRIBUTES,
    )
