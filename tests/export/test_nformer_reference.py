"""The O(N k) refinement against the dense masked form of DESIGN.md section 1 (the original's path)."""
from __future__ import annotations

import pytest
import torch

from export.contract.config import ModelConfig
from export.contract.landmarks import sample_landmarks
from export.reference.reciprocal_neighbors import reciprocal_neighbors
from export.reference.testing import clustered_features, random_model


@pytest.fixture(scope="module")
def nformer():
    return random_model(ModelConfig(arch="resnet18"), seed=11).nformer


def run(model, x, **kw):
    n = x.shape[1]
    lm = torch.from_numpy(sample_landmarks(n, len(model.h), 5, seed=n))
    with torch.no_grad():
        return model(x, lm, **kw)


@pytest.mark.parametrize("n", [1, 5, 19, 21, 500, 2000])
def test_sparse_equals_dense_masked_form(nformer, n):
    x = torch.from_numpy(clustered_features(n, seed=n))[None]
    neighbors = reciprocal_neighbors(x, nformer.k)
    sparse = run(nformer, x)
    dense = run(nformer, x, dense=True, neighbors=neighbors)
    assert (sparse - dense).abs().max().item() <= 1e-5


def test_sparse_equals_the_originals_dense_path_without_ties(nformer):
    """The original computes its own fp32 top-k mask; without near-ties it is the same function."""
    x = torch.nn.functional.normalize(torch.randn(1, 400, 256, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert (run(nformer, x) - run(nformer, x, dense=True)).abs().max().item() <= 1e-5


def test_duplicates_and_zero_rows_give_finite_output(nformer):
    x = torch.from_numpy(clustered_features(300, seed=3, duplicates=60))[None]
    x[0, 7] = 0
    out = run(nformer, x)
    assert torch.isfinite(out).all()
    neighbors = reciprocal_neighbors(x, nformer.k)
    assert (out - run(nformer, x, dense=True, neighbors=neighbors)).abs().max().item() <= 1e-5


def test_row_blocks_do_not_change_the_result(nformer):
    x = torch.from_numpy(clustered_features(777, seed=5))[None]
    assert (run(nformer, x) - run(nformer, x, row_block=100)).abs().max().item() <= 1e-5


def test_precomputed_neighbors_are_used(nformer):
    x = torch.from_numpy(clustered_features(50, seed=6))[None]
    idx, valid = reciprocal_neighbors(x, nformer.k)
    assert torch.equal(run(nformer, x), run(nformer, x, neighbors=(idx, valid)))
    only_self = torch.zeros_like(valid)
    only_self[..., 0] = True
    assert not torch.allclose(run(nformer, x), run(nformer, x, neighbors=(idx, only_self)))
