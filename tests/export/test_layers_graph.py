"""``nformer_layers.onnx`` as ``export.layers_graph`` writes it, against the PyTorch reference.

The file is written node by node (landmark algebra, a Loop over row blocks); these tests run it in
ONNX Runtime with small row blocks so that sets of a few rows already cross block boundaries, and
compare with ``NFormer.forward(..., neighbors=...)`` of the reference.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.contract.config import ModelConfig
from export.contract.landmarks import sample_landmarks
from export.contract.parity import relative_error
from export.layers_graph import BLOCK_ROWS, layers_model
from export.reference.testing import clustered_features, random_model

RTOL = 1e-4


def _model(config: ModelConfig, block_rows: int):
    nformer = random_model(config, seed=5).nformer
    proto = layers_model(nformer.state_dict(), config.n_layer, config.n_embd, config.n_head,
                         ln_eps=nformer.h[0].ln_1.e, bn_eps=nformer.bottleneck.eps, block_rows=block_rows)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return nformer, proto, session


@pytest.fixture(scope="module")
def small_blocks():
    return _model(ModelConfig(arch="resnet18"), block_rows=8)


@pytest.mark.parametrize("n,duplicates,landmarks", [(1, 0, 5), (2, 0, 5), (7, 0, 5), (8, 0, 5), (9, 0, 3),
                                                    (21, 5, 5), (64, 0, 1), (203, 40, 5)])
def test_layers_file_equals_the_reference(small_blocks, n, duplicates, landmarks):
    """N below, at and across block boundaries (8 rows per block here), N < k, one landmark,
    exact duplicates (invalid slots in the softmax)."""
    nformer, _, session = small_blocks
    x = clustered_features(n, seed=n, duplicates=duplicates)[None]
    lm = sample_landmarks(n, 4, landmarks, seed=n)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        idx, valid = nformer.neighbors(xt)
        expected = nformer(xt, torch.from_numpy(lm), neighbors=(idx, valid)).numpy()
    (got,) = session.run(["refined"], {"features": x, "landmarks": lm,
                                       "neighbor_index": idx.numpy().astype(np.int32),
                                       "neighbor_valid": valid.numpy().astype(np.int32)})
    assert got.shape == (1, n, 256)
    assert relative_error(got, expected) <= RTOL


def test_a_narrow_two_layer_model():
    config = ModelConfig(arch="resnet18", widths=(16, 32, 64, 128), stem_width=16, feature_dim=128, n_embd=128,
                         n_layer=2, n_head=4)
    nformer, _, session = _model(config, block_rows=16)
    x = clustered_features(50, dim=128, seed=1, duplicates=6)[None]
    lm = sample_landmarks(50, 2, 5, seed=1)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        idx, valid = nformer.neighbors(xt)
        expected = nformer(xt, torch.from_numpy(lm), neighbors=(idx, valid)).numpy()
    (got,) = session.run(["refined"], {"features": x, "landmarks": lm, "neighbor_index": idx.numpy().astype(np.int32),
                                       "neighbor_valid": valid.numpy().astype(np.int32)})
    assert relative_error(got, expected) <= RTOL


def test_the_graph_loops_over_row_blocks_and_keeps_the_files_contract():
    """One Loop per layer; at the neighbour lists the main graph gathers only ``k_hat`` (H l values a
    row, the last output of each layer's Split; the [rows, k, C] gathers of ``v`` live in the Loop
    bodies); the inputs and output of the exported module."""
    _, proto, _ = _model(ModelConfig(arch="resnet18"), block_rows=BLOCK_ROWS)
    ops = Counter(node.op_type for node in proto.graph.node)
    assert ops["Loop"] == 4
    from_lists = {"neighbor_index"}                  # tensors computed from the lists in the main graph
    for node in proto.graph.node:
        if set(node.input) & from_lists and node.op_type != "Loop":
            from_lists.update(node.output)
    k_hats = {node.output[2] for node in proto.graph.node if node.op_type == "Split" and len(node.output) == 3}
    at_lists = [node for node in proto.graph.node if node.op_type == "Gather" and node.input[1] in from_lists]
    assert len(k_hats) == 4 and sorted(node.input[0] for node in at_lists) == sorted(k_hats)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert [(i.name, dims(i)) for i in proto.graph.input] == [
        ("features", [1, "N", 256]), ("landmarks", [4, "l"]), ("neighbor_index", [1, "N", "k"]),
        ("neighbor_valid", [1, "N", "k"])]
    assert [(o.name, dims(o)) for o in proto.graph.output] == [("refined", [1, "N", 256])]
