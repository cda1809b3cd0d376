"""Checkpoint loading: the original's layout, its wrappers, and every way a checkpoint can be wrong."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from export.reference.checkpoint import load_checkpoint
from export.contract.config import ModelConfig
from export.contract.errors import CheckpointError
from export.reference.model import NFormerModel
from export.reference.testing import original_state_dict, random_model

LAYOUT = json.loads((Path(__file__).resolve().parents[1] / "data" / "official_checkpoint_layout.json").read_text())


def test_reference_model_has_the_official_key_layout():
    model = NFormerModel(ModelConfig())
    ours = {k: list(v.shape) for k, v in original_state_dict(model).items()}
    assert ours == LAYOUT["state_dict"]


@pytest.fixture(scope="module")
def small_model():
    return random_model(ModelConfig(arch="resnet18", n_layer=2, num_classes=13), seed=3)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_wrappers_and_prefixes_load(tmp_path, small_model, wrap):
    state = original_state_dict(small_model)
    if wrap == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap != "plain":
        state = {wrap: state, "epoch": 7}
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    loaded = load_checkpoint(path)
    assert _same_weights(loaded, small_model)
    c = loaded.config
    assert (c.arch, c.n_layer, c.n_embd, c.num_classes, c.n_head, c.topk, c.landmarks, c.last_stride) == \
        ("resnet18", 2, 256, 13, 2, 20, 5, 1)


@pytest.mark.parametrize("arch", ["resnet34", "resnet101"])
def test_backbone_depth_comes_from_the_shapes(tmp_path, arch):
    model = NFormerModel(ModelConfig(arch=arch, n_layer=1))
    torch.save(original_state_dict(model), tmp_path / "c.pth")
    loaded = load_checkpoint(tmp_path / "c.pth", n_head=4, topk=10, landmarks=3, last_stride=2)
    assert (loaded.config.arch, loaded.config.n_layer) == (arch, 1)
    assert (loaded.config.n_head, loaded.config.topk, loaded.config.landmarks, loaded.config.last_stride) == (4, 10, 3, 2)
    assert loaded.backbone.base.layer4[0].downsample[0].stride == (2, 2)


def test_widths_and_embedding_size_come_from_the_shapes(tmp_path):
    config = ModelConfig(arch="resnet18", widths=(16, 32, 64, 128), stem_width=16, feature_dim=128, n_embd=128,
                         n_layer=2, num_classes=40)
    model = random_model(config, seed=5)
    torch.save(original_state_dict(model), tmp_path / "narrow.pth")
    loaded = load_checkpoint(tmp_path / "narrow.pth", input_size_hw=(128, 64))
    assert loaded.config == ModelConfig(**{**config.__dict__, "input_size_hw": (128, 64)})
    assert _same_weights(loaded, model)


def test_halves_that_do_not_belong_together(tmp_path):
    model = NFormerModel(ModelConfig(arch="resnet18", feature_dim=128, n_layer=1))
    torch.save(original_state_dict(model), tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="do not belong together"):
        load_checkpoint(tmp_path / "mixed.pth")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.pth"
    path.write_bytes(b"x")
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads everything: make the read itself fail as permissions would
        def deny(*a, **k):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(torch, "load", deny)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"hello, this is text\n", b"", b"PK\x03\x04truncated zip"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path, small_model):
    path = tmp_path / "cut.pth"
    torch.save(original_state_dict(small_model), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Exploit(marker)}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_pickle_in_torch_zip_is_refused(tmp_path):
    marker = tmp_path / "pwned2"
    path = tmp_path / "evil2.pth"
    torch.save({"w": torch.zeros(1), "x": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        load_checkpoint(tmp_path / "meta.pth")


def test_checkpoint_of_another_architecture(tmp_path):
    # a plain classification ResNet: no backbone./nformer. prefixes
    state = {f"layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(1000, 512)}
    torch.save(state, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a supported ResNet|not an NFormer"):
        load_checkpoint(tmp_path / "resnet.pth")


def test_backbone_only_checkpoint(tmp_path, small_model):
    state = {k: v for k, v in original_state_dict(small_model).items() if k.startswith("backbone.")}
    torch.save(state, tmp_path / "baseline.pth")
    with pytest.raises(CheckpointError, match="not an NFormer"):
        load_checkpoint(tmp_path / "baseline.pth")


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path, small_model):
    state = original_state_dict(small_model)
    del state["nformer.h.1.ln_2.g"]
    state["nformer.h.1.extra"] = torch.zeros(3)
    state["nformer.h.0.mlp.c_fc.b"] = torch.zeros(999)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "odd.pth")
    text = str(err.value)
    assert "missing (1): nformer.h.1.ln_2.g" in text
    assert "unexpected (1): nformer.h.1.extra" in text
    assert "mis-shaped (1): nformer.h.0.mlp.c_fc.b (999,) != (1024,)" in text
    assert "\n" not in text


def test_bad_options(tmp_path, small_model):
    torch.save(original_state_dict(small_model), tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="not divisible"):
        load_checkpoint(tmp_path / "c.pth", n_head=3)
    with pytest.raises(CheckpointError, match="invalid options"):
        load_checkpoint(tmp_path / "c.pth", topk=0)


def test_export_refuses_a_k_beyond_the_plugins_limit(tmp_path):
    from click.testing import CliRunner

    from export.contract.ops import MAX_K
    from export.to_onnx import main as export_main

    result = CliRunner().invoke(export_main, ["missing.pth", "--topk", str(MAX_K + 1), "--out-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"1<=x<={MAX_K}" in result.output
    assert not (tmp_path / "o").exists()
