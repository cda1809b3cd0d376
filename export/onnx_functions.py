"""The standard-op body of the ``nformer::ReciprocalNeighbors`` node (an ONNX FunctionProto).

ONNX Runtime runs the node through this body with no registration; TensorRT maps the node to the
``ReciprocalNeighbors`` plugin when it is loaded (the node carries ``plugin_namespace``) and
imports this body otherwise (DESIGN.md section 2).

The lists are those of the contract's canonical key (:mod:`export.contract.neighbor_key`, the
definition): ``key[i, j] = dot(x_i, x_j) / norm(x_j)`` with the exact float64 products summed by a
fixed double-double tree, so they depend on neither the BLAS nor where a row sits in a call.  Row
``i`` lists itself first, then the other rows by key descending, equal keys to the lower index;
``k_eff = min(k, N)``; ``valid[i, t] = i in idx[idx[i, t]]``.  Outputs are int32 (what the
TensorRT plugin produces).  No N x N tensor is ever materialised.

How:

* once: the inputs in float64 (exact), zero-padded to ``Dp`` columns (the next power of two >= D);
  the canonical norms and row lengths by the tree; ``delta_i`` = :func:`key_error_bound` of each
  row (0 for an all-zero row).  The tree is a ``Loop`` over its ``log2(Dp)`` levels whose carried
  ``(hi, lo)`` halve in width (ONNX Runtime allows loop-carried values to change shape).
* stage 1, a ``Loop`` over blocks of ``R1 = clip(block_elements // N, 1, ROW_BLOCK)`` rows: the
  fast key ``F = MatMul(rows, x^T) / norm`` in float64, ``TopK(F, c)`` with
  ``c = min(N, k_eff + EXTRA)``, ``F_c`` the c-th value (every column left out has ``F <= F_c``).
  The row itself is put in the c-th place if ``TopK`` left it out, so the candidates are always
  the row and the c - 1 best others (as with self at +inf, without a pass over the R1 x N block);
  then they are put in index order.
* stage 2, a ``Loop`` over chunks of ``R2`` rows, ``R2 * c * Dp <= min(block_elements,
  CANDIDATE_ELEMENTS)`` (small, so the tree's intermediates stay in cache): the canonical key of
  every candidate (gathered rows, exact products, the tree, the canonical norm; self at +inf),
  ``TopK(key, k_eff)`` -- the ONNX rule puts the lower position, hence the lower index, first
  among equal keys -- gives the list and ``K_last``, its k_eff-th key.
* certificate: a list is final when ``c == N``, ``k_eff == 1``, the row is all zero (its fast
  keys are then exact: all 0, and ``TopK`` kept the lowest indices), or ``K_last > F_c + delta_i``
  (a column left out has a key ``<= F_c + delta_i < K_last``).
* the other rows (duplicate groups larger than c at the boundary, ties there within the bound)
  are redone one at a time in a third ``Loop``: the row's fast keys against its whole set, the
  canonical key of every column with ``F >= K_last - delta_i`` (they include the whole true list,
  whose keys are ``>= K_last``; every column if that threshold is NaN), self at +inf,
  ``TopK(k_eff)``, written over the row's list.

Memory: a stage-1 block holds ``R1 x N <= block_elements`` (2^25) fast keys, a stage-2 chunk
``R2 x c x Dp`` products, a redone row its N fast keys and the products of the columns it
rescores; the rest is O(N * (Dp + k)).  The lists do not depend on ``block_elements``.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from export.contract.ops import BLOCK_ELEMENTS, EXTRA_CANDIDATES, NORM_EPS, OP_DOMAIN, OP_TYPE, ROW_BLOCK

INPUTS = ["features"]
OUTPUTS = ["neighbor_index", "neighbor_valid"]
ATTRIBUTES = ["k", "plugin_version", "plugin_namespace"]
OPSET = 20
EXTRA = EXTRA_CANDIDATES
#: candidate products (c x Dp per row) held by one block: small enough to stay in cache
CANDIDATE_ELEMENTS = 1 << 17
#: largest power of two the tree width can take (D <= 2^40)
_MAX_LEVELS = 40
_U = 2.0 ** -53            # key_error_bound: (D + 8) * _U * _SLACK * length + _TINY
_SLACK = 1.0001
_TINY = 2.0 ** -1000
_BIG = 1 << 62             # an open end for Slice


def _const(name: str, value, dtype=TensorProto.INT64, dims=None):
    values = value if isinstance(value, list) else [value]
    dims = dims if dims is not None else ([] if not isinstance(value, list) else [len(values)])
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, values))


def _tree_level_body() -> onnx.GraphProto:
    """One level of the double-double tree: (hi, lo) of width 2w -> width w (slot j with j + w).

    It reads nothing from outer scopes, so one copy serves every Loop that sums a tree."""
    n = helper.make_node
    nodes = [
        n("Split", ["tree_h_in"], ["tree_h1", "tree_h2"], axis=-1, num_outputs=2),
        n("Split", ["tree_l_in"], ["tree_l1", "tree_l2"], axis=-1, num_outputs=2),
        # TwoSum: s + e == h1 + h2 exactly
        n("Add", ["tree_h1", "tree_h2"], ["tree_s"]),
        n("Sub", ["tree_s", "tree_h1"], ["tree_v"]),
        n("Sub", ["tree_s", "tree_v"], ["tree_sv"]),
        n("Sub", ["tree_h1", "tree_sv"], ["tree_e1"]),
        n("Sub", ["tree_h2", "tree_v"], ["tree_e2"]),
        n("Add", ["tree_e1", "tree_e2"], ["tree_e0"]),
        # add the low parts, renormalise (FastTwoSum)
        n("Add", ["tree_l1", "tree_l2"], ["tree_ll"]),
        n("Add", ["tree_e0", "tree_ll"], ["tree_e"]),
        n("Add", ["tree_s", "tree_e"], ["tree_h_out"]),
        n("Sub", ["tree_h_out", "tree_s"], ["tree_hs"]),
        n("Sub", ["tree_e", "tree_hs"], ["tree_l_out"]),
        n("Identity", ["tree_cond_in"], ["tree_cond_out"]),
    ]
    return helper.make_graph(
        nodes, "dd_tree_level",
        [helper.make_tensor_value_info("tree_iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("tree_cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("tree_h_in", TensorProto.DOUBLE, None),
         helper.make_tensor_value_info("tree_l_in", TensorProto.DOUBLE, None)],
        [helper.make_tensor_value_info("tree_cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("tree_h_out", TensorProto.DOUBLE, None),
         helper.make_tensor_value_info("tree_l_out", TensorProto.DOUBLE, None)],
    )


def _tree_sum(p: str, out: str) -> list[onnx.NodeProto]:
    """``out = dd_tree_sum(p)`` over the last axis (width Dp, a power of two; removed).

    Uses the function-scope values ``levels`` (log2 Dp; 0 levels for Dp = 1), ``true`` and
    ``last_axis``."""
    n = helper.make_node
    return [
        n("Shape", [p], [f"{out}_shape"]),
        n("ConstantOfShape", [f"{out}_shape"], [f"{out}_lo0"],
          value=helper.make_tensor(f"{out}_zero", TensorProto.DOUBLE, [1], [0.0])),
        n("Loop", ["levels", "true", p, f"{out}_lo0"], [f"{out}_h", f"{out}_l"], body=_tree_level_body()),
        n("Add", [f"{out}_h", f"{out}_l"], [f"{out}_hl"]),
        n("Squeeze", [f"{out}_hl", "last_axis"], [out]),
    ]


def _fast_block_body() -> onnx.GraphProto:
    """Stage 1, one Loop iteration: the c candidates of R1 padded rows by the fast key."""
    n = helper.make_node
    nodes = [
        n("Mul", ["iter", "block"], ["start"]),
        n("Add", ["start", "block"], ["stop"]),
        n("Unsqueeze", ["start", "zero_axis"], ["start1"]),
        n("Unsqueeze", ["stop", "zero_axis"], ["stop1"]),
        n("Slice", ["x_rows", "start1", "stop1", "one_axis"], ["rows"]),            # [B, R1, D]
        n("MatMul", ["rows", "x_t"], ["dots"]),                                     # [B, R1, N]
        n("Div", ["dots", "norms_t"], ["fast"]),
        # the c best columns by the fast key, F_c the c-th fast key (every column left out has F <= F_c)
        n("TopK", ["fast", "c1"], ["fast_top", "cand_raw"], axis=-1, largest=1, sorted=1),
        n("Slice", ["fast_top", "minus_one", "open_end", "last_axis"], ["block_fast_c"]),  # [B, R1, 1]
        # the row itself is a candidate: if TopK left it out it takes the c-th place (so the set is
        # always the row and the c - 1 best others, as with self at +inf; no R1 x N pass for it).
        # Padding rows (ids >= N) use column N - 1; they are dropped.
        n("Range", ["start", "stop", "one"], ["row_ids"]),
        n("Min", ["row_ids", "n_minus_one"], ["self_cols"]),
        n("Reshape", ["self_cols", "bcast_row"], ["self_cols3"]),                   # [1, R1, 1]
        n("Equal", ["cand_raw", "self_cols3"], ["cand_is_self"]),
        n("Cast", ["cand_is_self"], ["cand_is_self32"], to=TensorProto.INT32),
        n("ReduceMax", ["cand_is_self32", "last_axis"], ["has_self32"], keepdims=1),
        n("Cast", ["has_self32"], ["has_self"], to=TensorProto.BOOL),               # [B, R1, 1]
        n("Range", ["zero_s", "c", "one"], ["cand_slots"]),
        n("Sub", ["c", "one"], ["c_minus_one"]),
        n("Equal", ["cand_slots", "c_minus_one"], ["last_slot"]),                   # [c]
        n("Not", ["has_self"], ["no_self"]),
        n("And", ["no_self", "last_slot"], ["put_self"]),                           # [B, R1, c]
        n("Where", ["put_self", "self_cols3", "cand_raw"], ["cand"]),
        n("TopK", ["cand", "c1"], ["block_cands", "cand_pos"], axis=-1, largest=0, sorted=1),  # index order
        n("Identity", ["cond_in"], ["cond_out"]),
    ]
    return helper.make_graph(
        nodes, "fast_candidates",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("block_cands", TensorProto.INT64, None),
         helper.make_tensor_value_info("block_fast_c", TensorProto.DOUBLE, None)],
    )


def _rescore_body() -> onnx.GraphProto:
    """Stage 2, one Loop iteration: canonical keys of the candidates of R2 padded rows, their
    lists, the last listed key and the certificate."""
    n = helper.make_node
    nodes = [
        n("Mul", ["rs_iter", "chunk"], ["rs_start"]),
        n("Add", ["rs_start", "chunk"], ["rs_stop"]),
        n("Unsqueeze", ["rs_start", "zero_axis"], ["rs_start1"]),
        n("Unsqueeze", ["rs_stop", "zero_axis"], ["rs_stop1"]),
        n("Slice", ["x_rows2", "rs_start1", "rs_stop1", "one_axis"], ["rs_rows"]),   # [B, R2, Dp]
        n("Slice", ["cands2", "rs_start1", "rs_stop1", "one_axis"], ["rs_cands"]),   # [B, R2, c]
        n("Slice", ["fast_c2", "rs_start1", "rs_stop1", "one_axis"], ["rs_fast_c"]),  # [B, R2, 1]
        n("Slice", ["delta2", "rs_start1", "rs_stop1", "one_axis"], ["rs_delta"]),    # [B, R2, 1]
        n("Add", ["rs_cands", "batch_offset"], ["rs_flat"]),                        # [B, R2, c]
        n("Gather", ["x_flat", "rs_flat"], ["rs_cand_rows"], axis=0),               # [B, R2, c, Dp]
        n("Unsqueeze", ["rs_rows", "two_axis"], ["rs_rows4"]),                      # [B, R2, 1, Dp]
        n("Mul", ["rs_rows4", "rs_cand_rows"], ["rs_prod"]),
        *_tree_sum("rs_prod", "rs_dot"),                                            # [B, R2, c]
        n("Gather", ["norms_flat", "rs_flat"], ["rs_norm"], axis=0),
        n("Div", ["rs_dot", "rs_norm"], ["rs_key_raw"]),
        n("Range", ["rs_start", "rs_stop", "one"], ["rs_row_ids"]),
        n("Reshape", ["rs_row_ids", "bcast_row"], ["rs_row_ids3"]),                 # [1, R2, 1]
        n("Equal", ["rs_cands", "rs_row_ids3"], ["rs_self"]),
        n("Where", ["rs_self", "pos_inf", "rs_key_raw"], ["rs_key"]),
        # key desc, equal keys in position (= index) order
        n("TopK", ["rs_key", "k_eff1"], ["rs_top", "rs_pos"], axis=-1, largest=1, sorted=1),
        n("GatherElements", ["rs_cands", "rs_pos"], ["chunk_list"], axis=-1),       # [B, R2, k_eff]
        n("Slice", ["rs_top", "minus_one", "open_end", "last_axis"], ["chunk_last"]),  # [B, R2, 1]
        # certificate: every column left out has a key <= F_c + delta < K_last
        n("Add", ["rs_fast_c", "rs_delta"], ["rs_fast_c_up"]),
        n("Greater", ["chunk_last", "rs_fast_c_up"], ["rs_separated"]),
        n("Equal", ["rs_delta", "zero_d"], ["rs_zero_row"]),
        n("Or", ["rs_separated", "rs_zero_row"], ["rs_ok_row"]),
        n("Or", ["rs_ok_row", "trivial"], ["chunk_ok"]),                             # [B, R2, 1]
        n("Identity", ["rs_cond_in"], ["rs_cond_out"]),
    ]
    return helper.make_graph(
        nodes, "canonical_rescore",
        [helper.make_tensor_value_info("rs_iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("rs_cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("rs_cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("chunk_list", TensorProto.INT64, None),
         helper.make_tensor_value_info("chunk_last", TensorProto.DOUBLE, None),
         helper.make_tensor_value_info("chunk_ok", TensorProto.BOOL, None)],
    )


def _fallback_body() -> onnx.GraphProto:
    """One Loop iteration: redo one uncertified row (b, i) in place.

    Its true list has keys >= its k_eff-th candidate key K_last, so fast keys >= K_last - delta_i:
    the columns with ``F >= K_last - delta_i`` (all of them if that is NaN) are scored canonically.
    """
    n = helper.make_node
    nodes = [
        n("Gather", ["fail_pairs", "fb_iter"], ["fb_pair"], axis=0),                # [2] = (b, i)
        n("Slice", ["fb_pair", "zero_axis", "one_axis"], ["fb_b"]),                 # [1]
        n("Slice", ["fb_pair", "one_axis", "two_axis"], ["fb_i"]),                  # [1]
        n("Mul", ["fb_b", "n"], ["fb_offset"]),
        n("Add", ["fb_offset", "fb_i"], ["fb_flat_row"]),                           # [1]: b * N + i
        # fast keys of the row against its set
        n("Gather", ["x_flat", "fb_flat_row"], ["fb_row_p"], axis=0),               # [1, Dp]
        n("Slice", ["fb_row_p", "zero_axis", "d1", "last_axis"], ["fb_row"]),       # [1, D]
        n("MatMul", ["fb_row", "x_t"], ["fb_dots_all"]),                            # [B, 1, N]
        n("Gather", ["fb_dots_all", "fb_b"], ["fb_dots"], axis=0),                  # [1, 1, N]
        n("Gather", ["norms", "fb_b"], ["fb_norms"], axis=0),                       # [1, N]
        n("Reshape", ["fb_dots", "minus_one"], ["fb_dots1"]),
        n("Reshape", ["fb_norms", "minus_one"], ["fb_norms1"]),
        n("Div", ["fb_dots1", "fb_norms1"], ["fb_fast_raw"]),                       # [N]
        n("Equal", ["col_ids", "fb_i"], ["fb_self"]),
        n("Where", ["fb_self", "pos_inf", "fb_fast_raw"], ["fb_fast"]),
        n("Gather", ["keys_last", "fb_flat_row"], ["fb_last"], axis=0),             # [1]
        n("Gather", ["delta_flat", "fb_flat_row"], ["fb_delta"], axis=0),
        n("Sub", ["fb_last", "fb_delta"], ["fb_floor"]),
        n("Less", ["fb_fast", "fb_floor"], ["fb_out"]),
        n("Not", ["fb_out"], ["fb_in"]),
        n("NonZero", ["fb_in"], ["fb_cols2"]),                                      # [1, m], ascending
        n("Squeeze", ["fb_cols2", "zero_axis"], ["fb_cols"]),                       # [m]
        # canonical keys of those columns
        n("Add", ["fb_cols", "fb_offset"], ["fb_flat"]),
        n("Gather", ["x_flat", "fb_flat"], ["fb_cand_rows"], axis=0),               # [m, Dp]
        n("Mul", ["fb_row_p", "fb_cand_rows"], ["fb_prod"]),
        *_tree_sum("fb_prod", "fb_dot"),                                            # [m]
        n("Gather", ["norms_flat", "fb_flat"], ["fb_norm"], axis=0),
        n("Div", ["fb_dot", "fb_norm"], ["fb_key_raw"]),
        n("Equal", ["fb_cols", "fb_i"], ["fb_cand_self"]),
        n("Where", ["fb_cand_self", "pos_inf", "fb_key_raw"], ["fb_key"]),
        n("TopK", ["fb_key", "k_eff1"], ["fb_top", "fb_pos"], axis=-1, largest=1, sorted=1),
        n("Gather", ["fb_cols", "fb_pos"], ["fb_list"], axis=0),                    # [k_eff]
        n("Unsqueeze", ["fb_list", "zero_axis"], ["fb_update"]),                    # [1, k_eff]
        n("Unsqueeze", ["fb_pair", "zero_axis"], ["fb_where"]),                     # [1, 2]
        n("ScatterND", ["fb_idx_in", "fb_where", "fb_update"], ["fb_idx_out"]),
        n("Identity", ["fb_cond_in"], ["fb_cond_out"]),
    ]
    return helper.make_graph(
        nodes, "redo_row",
        [helper.make_tensor_value_info("fb_iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("fb_cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("fb_idx_in", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("fb_cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("fb_idx_out", TensorProto.INT64, None)],
    )


def _row_padding(rows: str, count: str, pads: str) -> list[onnx.NodeProto]:
    """``count = ceil(N / rows)`` blocks and the Pad ``pads`` that bring axis 1 to ``count * rows``."""
    n = helper.make_node
    return [
        n("Sub", [rows, "one"], [f"{count}_rm1"]),
        n("Add", ["n", f"{count}_rm1"], [f"{count}_up"]),
        n("Div", [f"{count}_up", rows], [count]),
        n("Mul", [count, rows], [f"{count}_rows"]),
        n("Sub", [f"{count}_rows", "n"], [f"{count}_pad"]),
        n("Unsqueeze", [f"{count}_pad", "zero_axis"], [f"{count}_pad1"]),
        n("Concat", ["zeros4", f"{count}_pad1", "zero_axis"], [pads], axis=0),     # ends: [0, pad, 0]
    ]


def _unblock(scan: str, width1: str, out: str) -> list[onnx.NodeProto]:
    """Loop scan output [M, B, R, W] -> [B, N, W] (the padding rows dropped)."""
    n = helper.make_node
    return [
        n("Transpose", [scan], [f"{out}_t"], perm=[1, 0, 2, 3]),                   # [B, M, R, W]
        n("Concat", ["b1", "minus_one", width1], [f"{out}_shape"], axis=0),
        n("Reshape", [f"{out}_t", f"{out}_shape"], [f"{out}_pad"]),
        n("Slice", [f"{out}_pad", "zero_axis", "n1", "one_axis"], [out]),
    ]


def reciprocal_neighbors_function(block_elements: int = BLOCK_ELEMENTS) -> onnx.FunctionProto:
    """The FunctionProto; ``block_elements`` bounds a stage-1 block's fast keys and a stage-2
    chunk's candidate products (the lists do not depend on it)."""
    n = helper.make_node
    k_attr = helper.make_node("Constant", [], ["k_scalar"])
    k_attr.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name="k"))
    nodes = [
        k_attr,
        _const("zero_axis", [0]), _const("one_axis", [1]), _const("two_axis", [2]), _const("last_axis", [-1]),
        _const("zero_s", 0), _const("one", 1), _const("extra", EXTRA), _const("eight", 8),
        _const("max_block", ROW_BLOCK), _const("block_elements", block_elements),
        _const("candidate_elements", CANDIDATE_ELEMENTS),
        _const("zeros4", [0, 0, 0, 0]), _const("zeros5", [0, 0, 0, 0, 0]), _const("minus_one", [-1]),
        _const("open_end", [_BIG]), _const("bcast3", [-1, 1, 1]), _const("bcast4", [1, -1, 1, 1]),
        _const("bcast_row", [1, -1, 1]),
        _const("powers", [1 << e for e in range(_MAX_LEVELS + 1)]),
        _const("eps", NORM_EPS, TensorProto.DOUBLE),
        _const("pos_inf", float("inf"), TensorProto.DOUBLE),
        _const("zero_d", 0.0, TensorProto.DOUBLE),
        _const("unit", _U, TensorProto.DOUBLE), _const("slack", _SLACK, TensorProto.DOUBLE),
        _const("tiny", _TINY, TensorProto.DOUBLE),
        _const("true", True, TensorProto.BOOL),
        n("Cast", ["features"], ["x"], to=TensorProto.DOUBLE),                     # [B, N, D], exact
        n("Shape", ["x"], ["shape"]),
        n("Gather", ["shape", "zero_axis"], ["b1"]),
        n("Gather", ["shape", "one_axis"], ["n1"]),
        n("Gather", ["shape", "last_axis"], ["d1"]),
        n("Squeeze", ["b1"], ["b"]),
        n("Squeeze", ["n1"], ["n"]),
        n("Squeeze", ["d1"], ["d"]),
        # tree width Dp = 2^levels, levels = #{powers of two < D}
        n("Less", ["powers", "d"], ["below_d"]),
        n("Cast", ["below_d"], ["below_d64"], to=TensorProto.INT64),
        n("ReduceSum", ["below_d64"], ["levels"], keepdims=0),
        n("Gather", ["powers", "levels"], ["dp"]),
        n("Unsqueeze", ["dp", "zero_axis"], ["dp1"]),
        n("Sub", ["dp", "d"], ["pad_cols"]),
        n("Unsqueeze", ["pad_cols", "zero_axis"], ["pad_cols1"]),
        n("Concat", ["zeros5", "pad_cols1"], ["col_pads"], axis=0),                # ends: [0, 0, Dp - D]
        n("Pad", ["x", "col_pads"], ["x_pad"]),                                     # [B, N, Dp]
        # canonical norms and the rows' error bounds
        n("Mul", ["x_pad", "x_pad"], ["sq_prod"]),
        *_tree_sum("sq_prod", "sq"),                                                # [B, N]
        n("Sqrt", ["sq"], ["lengths"]),
        n("Max", ["lengths", "eps"], ["norms"]),
        n("Add", ["d", "eight"], ["d8"]),
        n("Cast", ["d8"], ["d8f"], to=TensorProto.DOUBLE),
        n("Mul", ["d8f", "unit"], ["coef0"]),
        n("Mul", ["coef0", "slack"], ["coef"]),
        n("Mul", ["coef", "lengths"], ["delta0"]),
        n("Add", ["delta0", "tiny"], ["delta1"]),
        n("Greater", ["lengths", "zero_d"], ["nonzero_row"]),
        n("Where", ["nonzero_row", "delta1", "zero_d"], ["delta"]),                # [B, N]
        n("Unsqueeze", ["delta", "last_axis"], ["delta3"]),                         # [B, N, 1]
        n("Unsqueeze", ["norms", "one_axis"], ["norms_t"]),                         # [B, 1, N]
        n("Reshape", ["norms", "minus_one"], ["norms_flat"]),                       # [B*N]
        n("Concat", ["minus_one", "dp1"], ["flat_rows_shape"], axis=0),
        n("Reshape", ["x_pad", "flat_rows_shape"], ["x_flat"]),                     # [B*N, Dp]
        n("Transpose", ["x"], ["x_t"], perm=[0, 2, 1]),                              # [B, D, N]
        n("Min", ["k_scalar", "n"], ["k_eff"]),
        n("Unsqueeze", ["k_eff", "zero_axis"], ["k_eff1"]),
        n("Add", ["k_eff", "extra"], ["k_extra"]),
        n("Min", ["k_extra", "n"], ["c"]),
        n("Unsqueeze", ["c", "zero_axis"], ["c1"]),
        n("Equal", ["c", "n"], ["all_candidates"]),
        n("Equal", ["k_eff", "one"], ["self_only"]),
        n("Or", ["all_candidates", "self_only"], ["trivial"]),
        n("Range", ["zero_s", "n", "one"], ["col_ids"]),
        n("Sub", ["n", "one"], ["n_minus_one"]),
        n("Range", ["zero_s", "b", "one"], ["batch_ids"]),
        n("Mul", ["batch_ids", "n"], ["batch_offset0"]),
        n("Reshape", ["batch_offset0", "bcast3"], ["batch_offset"]),               # [B, 1, 1]
        # stage 1: R1 = clip(block_elements // N, 1, ROW_BLOCK) rows per block
        n("Div", ["block_elements", "n"], ["fit_keys"]),
        n("Min", ["fit_keys", "max_block"], ["fit_keys_capped"]),
        n("Max", ["fit_keys_capped", "one"], ["block"]),
        *_row_padding("block", "blocks", "row_pads"),
        n("Pad", ["x", "row_pads"], ["x_rows"]),                                    # [B, N_pad1, D]
        n("Loop", ["blocks", "true"], ["block_cands_all", "block_fast_c_all"], body=_fast_block_body()),
        *_unblock("block_cands_all", "c1", "cands"),                                # [B, N, c]
        *_unblock("block_fast_c_all", "one_axis", "fast_c"),                        # [B, N, 1]
        # stage 2: R2 = clip(min(block_elements, CANDIDATE_ELEMENTS) // (c * Dp), 1, ROW_BLOCK) rows
        n("Min", ["block_elements", "candidate_elements"], ["cand_budget"]),
        n("Mul", ["c", "dp"], ["cand_width"]),
        n("Div", ["cand_budget", "cand_width"], ["fit_cands"]),
        n("Min", ["fit_cands", "max_block"], ["fit_cands_capped"]),
        n("Max", ["fit_cands_capped", "one"], ["chunk"]),
        *_row_padding("chunk", "chunks", "row_pads2"),
        n("Pad", ["x_pad", "row_pads2"], ["x_rows2"]),                              # [B, N_pad2, Dp]
        n("Pad", ["cands", "row_pads2"], ["cands2"]),
        n("Pad", ["fast_c", "row_pads2"], ["fast_c2"]),
        n("Pad", ["delta3", "row_pads2"], ["delta2"]),                              # zero: certified
        n("Loop", ["chunks", "true"], ["chunk_lists", "chunk_lasts", "chunk_oks"], body=_rescore_body()),
        *_unblock("chunk_lists", "k_eff1", "lists"),                                # [B, N, k_eff]
        *_unblock("chunk_lasts", "one_axis", "lasts"),                              # [B, N, 1]
        *_unblock("chunk_oks", "one_axis", "oks"),                                  # [B, N, 1]
        n("Reshape", ["lasts", "minus_one"], ["keys_last"]),                        # [B*N]
        n("Reshape", ["delta", "minus_one"], ["delta_flat"]),                       # [B*N]
        # redo the uncertified rows, one at a time
        n("Squeeze", ["oks", "last_axis"], ["oks2"]),                               # [B, N]
        n("Not", ["oks2"], ["fails"]),
        n("NonZero", ["fails"], ["fail_pairs_t"]),                                  # [2, F]
        n("Transpose", ["fail_pairs_t"], ["fail_pairs"], perm=[1, 0]),             # [F, 2]
        n("Shape", ["fail_pairs"], ["fail_shape"]),
        n("Gather", ["fail_shape", "zero_axis"], ["fail_count1"]),
        n("Squeeze", ["fail_count1"], ["fail_count"]),
        n("Loop", ["fail_count", "true", "lists"], ["idx"], body=_fallback_body()),  # [B, N, k_eff]
        # reciprocal check: back[b, i, t, :] = idx[b, idx[b, i, t], :]
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
    return helper.make_function(
        OP_DOMAIN, OP_TYPE, INPUTS, OUTPUTS, nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
        attributes=ATTRIBUTES,
    )
