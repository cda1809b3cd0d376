"""The reciprocal-neighbour step: reference properties, the original's mask, the ONNX function body."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from export.reference.nformer import original_topk_mask
from export.onnx_functions import OPSET, OUTPUTS, reciprocal_neighbors_function
from export.reference.reciprocal_neighbors import (
    OP_DOMAIN,
    OP_TYPE,
    ROW_BLOCK,
    dense_reciprocal_mask,
    reciprocal_neighbors,
    row_block,
)
from export.reference.testing import clustered_features


def random_unit(n, d=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(1, n, d, generator=g), dim=-1)


@pytest.mark.parametrize("n", [1, 5, 21, 500])
def test_dense_mask_equals_the_originals(n):
    """Without near-ties, the O(N k) lists give exactly the original's mask * mask^T."""
    x = random_unit(n, seed=n)
    idx, valid = reciprocal_neighbors(x, 20)
    assert torch.equal(dense_reciprocal_mask(idx, valid, n), original_topk_mask(x, 20))


@pytest.mark.parametrize("n,k", [(1, 20), (5, 20), (20, 20), (21, 20), (300, 64)])
def test_shapes_self_first_and_validity(n, k):
    x = torch.from_numpy(clustered_features(n, seed=n))[None]
    idx, valid = reciprocal_neighbors(x, k)
    k_eff = min(n, k)
    assert idx.shape == valid.shape == (1, n, k_eff)
    assert torch.equal(idx[0, :, 0], torch.arange(n))
    assert valid[..., 0].all()
    for i in range(n):  # each row's list holds distinct rows
        assert len(set(idx[0, i].tolist())) == k_eff
    # brute-force the reciprocal definition
    lists = [set(r) for r in idx[0].tolist()]
    expected = torch.tensor([[i in lists[j] for j in row] for i, row in enumerate(idx[0].tolist())])
    assert torch.equal(valid[0], expected)
    if n <= k:  # every row lists every row: all reciprocal
        assert valid.all()


def test_ties_break_to_the_lower_index_and_duplicates_keep_themselves():
    base = random_unit(40, seed=3)
    x = base.clone()
    x[0, 10:35] = x[0, 2]  # a group of 26 identical rows, larger than k
    idx, valid = reciprocal_neighbors(x, 20)
    group = {2, *range(10, 35)}
    for i in sorted(group):
        row = idx[0, i].tolist()
        assert row[0] == i
        # the other 19 slots: the lowest-index members of the group other than i
        assert row[1:] == sorted(group - {i})[:19]
        assert valid[0, i, 0]


def test_zero_rows_and_duplicates_give_no_empty_rows():
    x = random_unit(50, seed=4)
    x[0, 5] = 0
    x[0, 6] = 0
    idx, valid = reciprocal_neighbors(x, 20)
    assert valid[..., 0].all() and idx[0, 5, 0] == 5 and idx[0, 6, 0] == 6


def test_fp16_input_ranks_like_its_fp32_values():
    x = torch.from_numpy(clustered_features(200, seed=5))[None].half()
    a = reciprocal_neighbors(x, 20)
    b = reciprocal_neighbors(x.float(), 20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def function_session(k=20, block_elements=None):
    node = helper.make_node(OP_TYPE, ["features"], OUTPUTS, domain=OP_DOMAIN, k=k, plugin_version="1",
                            plugin_namespace="")
    graph = helper.make_graph(
        [node], "reciprocal_neighbors", [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, "N", 256])],
        [helper.make_tensor_value_info(o, TensorProto.INT32, [1, "N", None]) for o in OUTPUTS])
    function = reciprocal_neighbors_function(*([block_elements] if block_elements else []))
    model = helper.make_model(graph, functions=[function], ir_version=10,
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(OP_DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("n", [1, 5, 21, ROW_BLOCK - 1, ROW_BLOCK, ROW_BLOCK + 1, 3000])
@pytest.mark.parametrize("duplicates", [0, 40])
def test_onnx_function_body_equals_reference(n, duplicates):
    session = function_session()
    x = clustered_features(n, seed=n + duplicates, duplicates=duplicates)[None]
    idx, valid = session.run(None, {"features": x})
    ref_idx, ref_valid = reciprocal_neighbors(torch.from_numpy(x), 20)
    assert idx.dtype == np.int32 and valid.dtype == np.int32
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_array_equal(valid.astype(bool), ref_valid.numpy())


def test_onnx_function_body_k64():
    session = function_session(k=64)
    x = clustered_features(700, seed=7, duplicates=80)[None]
    idx, valid = session.run(None, {"features": x})
    ref_idx, ref_valid = reciprocal_neighbors(torch.from_numpy(x), 64)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_array_equal(valid.astype(bool), ref_valid.numpy())


@pytest.mark.parametrize("n,block_elements", [(3000, 3000 * 7), (500, 1), (33, 33 * 4)])
def test_onnx_function_body_with_small_row_blocks(n, block_elements):
    """Large N uses fewer rows per block (memory O(N)); emulate it with a small element budget."""
    session = function_session(block_elements=block_elements)
    x = clustered_features(n, seed=n, duplicates=n // 10)[None]
    idx, valid = session.run(None, {"features": x})
    assert row_block(n, block_elements) < min(n, ROW_BLOCK)
    ref_idx, ref_valid = reciprocal_neighbors(torch.from_numpy(x), 20, block_elements)
    default_idx, _ = reciprocal_neighbors(torch.from_numpy(x), 20)
    assert torch.equal(ref_idx, default_idx)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_array_equal(valid.astype(bool), ref_valid.numpy())
