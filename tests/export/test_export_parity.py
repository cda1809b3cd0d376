"""PyTorch reference vs ONNX Runtime, fp32, on random checkpoints in the original's layout."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from export.contract.landmarks import sample_landmarks
from export.onnx_functions import OUTPUTS as NEIGHBOR_OUTPUTS
from export.contract.parity import neighbor_set_agreement, relative_error
from export.reference.reciprocal_neighbors import OP_DOMAIN, OP_TYPE
from export.reference.testing import clustered_features
from export.to_onnx import _session

RTOL = 1e-4


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_encoder_matches_reference(exported, batch):
    out_dir, model = exported
    images = np.random.default_rng(batch).standard_normal((batch, 3, 256, 128)).astype(np.float32)
    with torch.no_grad():
        expected = model.backbone(torch.from_numpy(images)).numpy()
    (actual,) = _session(out_dir / "encoder.onnx").run(["embeddings"], {"images": images})
    assert actual.shape == (batch, 256)
    assert relative_error(actual, expected) <= RTOL


@pytest.fixture(scope="module")
def refine_sessions():
    return {}


@pytest.mark.parametrize("n,duplicates", [(1, 0), (5, 0), (21, 0), (500, 0), (3000, 0), (600, 120)])
def test_refinement_matches_reference(exported, refine_sessions, n, duplicates):
    out_dir, model = exported
    session = refine_sessions.setdefault(out_dir, _session(out_dir / "nformer.onnx", NEIGHBOR_OUTPUTS))
    x = clustered_features(n, seed=n, duplicates=duplicates)[None]
    landmarks = sample_landmarks(n, model.config.n_layer, model.config.landmarks, seed=n)
    assert landmarks.shape == (4, min(5, n))
    with torch.no_grad():
        xt = torch.from_numpy(x)
        idx, valid = model.nformer.neighbors(xt)
        expected = model.nformer(xt, torch.from_numpy(landmarks)).numpy()
    refined, nb_idx, nb_valid = session.run(["refined", *NEIGHBOR_OUTPUTS], {"features": x, "landmarks": landmarks})
    assert refined.shape == (1, n, 256)
    assert relative_error(refined, expected) <= RTOL
    assert neighbor_set_agreement(nb_idx, idx.numpy()) == 1.0
    np.testing.assert_array_equal(nb_idx, idx.numpy())
    np.testing.assert_array_equal(nb_valid.astype(bool), valid.numpy())
    layers = refine_sessions.setdefault((out_dir, "layers"), _session(out_dir / "nformer_layers.onnx"))
    (given,) = layers.run(["refined"], {"features": x, "landmarks": landmarks, "neighbor_index": nb_idx,
                                        "neighbor_valid": nb_valid})
    assert relative_error(given, expected) <= RTOL


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_nformer_graph_has_one_plugin_node_and_no_n_by_n_tensor(resnet50_export):
    out_dir, _ = resnet50_export
    model = onnx.load(out_dir / "nformer.onnx")
    nodes = [nd for nd in model.graph.node if nd.op_type == OP_TYPE]
    assert len(nodes) == 1
    node = nodes[0]
    assert node.domain == OP_DOMAIN
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"k": 20, "plugin_version": b"1", "plugin_namespace": b""}
    assert {a.name: a.type for a in node.attribute}["k"] == onnx.AttributeProto.INT
    assert list(node.output) == NEIGHBOR_OUTPUTS
    functions = [(f.domain, f.name) for f in model.functions]
    assert functions == [(OP_DOMAIN, OP_TYPE)]
    assert [i.name for i in model.graph.input] == ["features", "landmarks"]
    assert [o.name for o in model.graph.output] == ["refined"]
    assert _dims(model.graph.input[0]) == [1, "N", 256]
    # every tensor of the main graph (function bodies excluded), shapes inferred: at most one N-sized axis
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    assert len(values) > 50
    for v in values:
        dims = _dims(v)
        assert sum(1 for d in dims if d == "N") <= 1, f"{v.name} has shape {dims}"
    # and no operator that makes a square matrix of the set outside the function
    ops = Counter(nd.op_type for nd in model.graph.node)
    assert ops[OP_TYPE] == 1 and "TopK" not in ops


def test_encoder_graph_contract(resnet18_export):
    out_dir, _ = resnet18_export
    model = onnx.load(out_dir / "encoder.onnx")
    assert [(i.name, _dims(i)) for i in model.graph.input] == [("images", ["batch", 3, 256, 128])]
    assert [(o.name, _dims(o)) for o in model.graph.output] == [("embeddings", ["batch", 256])]


def test_manifest_describes_the_files(resnet18_export):
    from export.contract.manifest import load_manifest, model_config

    out_dir, model = resnet18_export
    manifest = load_manifest(out_dir, verify_checksums=True)
    assert model_config(manifest) == model.config
    assert manifest["opset"] == 20
    assert manifest["custom_ops"][0]["op_type"] == OP_TYPE
    assert manifest["files"]["nformer"]["inputs"][1] == {"name": "landmarks", "dtype": "int64", "shape": [4, "l"]}
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime"}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "export.to_onnx", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_cli_help_documents_every_option():
    out = _cli("--help").stdout
    for option in ("--out-dir", "--n-head", "--topk", "--landmarks", "--last-stride", "--check-batches",
                   "--check-sizes", "--rtol", "--seed"):
        assert option in out


def test_cli_exports_and_prints_the_table(resnet18_checkpoint, tmp_path):
    path, _ = resnet18_checkpoint
    result = _cli(path, "--out-dir", tmp_path / "b", "--check-batches", "1", "--check-sizes", "1,30")
    assert result.returncode == 0, result.stderr
    assert "relative_error" in result.stdout and "neighbor_sets" in result.stdout
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["encoder.onnx", "manifest.json", "nformer.onnx",
                                                                  "nformer_layers.onnx"]


def test_cli_exports_a_narrow_model_at_a_reduced_input_size(tmp_path):
    from export.contract.config import ModelConfig
    from export.contract.manifest import load_manifest, model_config
    from export.reference.testing import save_random_checkpoint

    config = ModelConfig(arch="resnet18", widths=(16, 32, 64, 128), stem_width=16, feature_dim=128, n_embd=128,
                         n_layer=2)
    save_random_checkpoint(tmp_path / "narrow.pth", config, seed=4)
    result = _cli(tmp_path / "narrow.pth", "--out-dir", tmp_path / "b", "--input-size", "128x64",
                  "--check-batches", "1,7", "--check-sizes", "1,5,300")
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = load_manifest(tmp_path / "b", verify_checksums=True)
    assert model_config(manifest).input_size_hw == (128, 64)
    assert manifest["files"]["encoder"]["inputs"][0]["shape"] == ["batch", 3, 128, 64]
    assert manifest["files"]["nformer"]["inputs"][0]["shape"] == [1, "N", 128]


def test_cli_failed_check_publishes_nothing(resnet18_checkpoint, tmp_path):
    path, _ = resnet18_checkpoint
    result = _cli(path, "--out-dir", tmp_path / "b", "--check-batches", "1", "--check-sizes", "30", "--rtol", "1e-30")
    assert result.returncode == 1
    assert "do not match" in result.stderr
    assert list((tmp_path / "b").iterdir()) == []


@pytest.mark.parametrize("case", ["missing", "text", "unwritable"])
def test_cli_bad_input_is_one_line_and_writes_nothing(resnet18_checkpoint, tmp_path, case):
    path, _ = resnet18_checkpoint
    out_dir = tmp_path / "out"
    if case == "missing":
        path = tmp_path / "missing.pth"
    elif case == "text":
        path = tmp_path / "notes.pth"
        path.write_text("not a checkpoint")
    else:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out_dir = blocker / "sub"
    result = _cli(path, "--out-dir", out_dir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not out_dir.exists() or not any(out_dir.iterdir())
