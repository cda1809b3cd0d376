"""Checkpoint loading: the original's layout, its wrappers, and every way a checkpoint can be wrong."""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from export.reference.checkpoint import load_checkpoint
from export.contract.config import ModelConfig
from export.contract.errors import CheckpointError, InputError
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


# ---- hostile and careless input (the hardening issue) ----


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_are_not_a_checkpoint_rather_than_refused_code(tmp_path, seed):
    """Random bytes (also behind a pickle's first byte) are "not a PyTorch checkpoint", not "pickled code"."""
    rng = np.random.default_rng(seed)
    path = tmp_path / "random.pth"
    path.write_bytes((b"\x80" if seed % 2 else b"") + rng.bytes(4096))
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as info:
        load_checkpoint(path)
    assert "pickled objects or code" not in str(info.value)


def test_short_random_streams_behind_a_pickle_byte_are_one_clear_error(tmp_path, recwarn):
    """Short random streams after 0x80: torch raises struct.error, UnicodeDecodeError, ... on some
    (was a traceback), and some parse as a pickle with an impossible protocol or a frame past the
    end of the file (were called "pickled code").  Each is one "not a PyTorch checkpoint" error,
    without torch's protocol warnings."""
    rng = np.random.default_rng(20261202)
    path = tmp_path / "short.pth"
    regressions = [bytes.fromhex("80e172e1b4b7"),                      # struct.error in torch.load
                   bytes.fromhex("80a84affff0000950526a3cb0000002e")]   # PROTO 168, FRAME past the end, STOP
    streams = regressions + [b"\x80" + rng.bytes(int(rng.integers(1, 200))) for _ in range(3000)]
    for data in streams:
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as info:
            load_checkpoint(path)
        assert "pickled objects or code" not in str(info.value), data.hex()
    assert not [w for w in recwarn if "protocol" in str(w.message)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_bad_input_naming_the_tensor(tmp_path, small_model, bad):
    state = original_state_dict(small_model)
    state["nformer.h.1.attn.c_attn.w"][3, 5] = bad
    torch.save(state, tmp_path / "diverged.pth")
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 1 tensor\(s\): nformer\.h\.1\.attn\.c_attn\.w"):
        load_checkpoint(tmp_path / "diverged.pth")


@pytest.mark.parametrize("rtol", ["nan", "inf", "-1e-4", "0"])
def test_export_refuses_an_rtol_that_is_not_a_positive_finite_number(tmp_path, rtol):
    from click.testing import CliRunner

    from export.to_onnx import export_checkpoint, main as export_main

    result = CliRunner().invoke(export_main, ["missing.pth", "--rtol", rtol, "--out-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--rtol" in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="rtol must be a finite number > 0"):
        export_checkpoint("missing.pth", tmp_path / "o", rtol=float(rtol))
    assert not (tmp_path / "o").exists()


def _small_checkpoint(path):
    from export.reference.testing import save_random_checkpoint

    save_random_checkpoint(path, ModelConfig(arch="resnet18", widths=(16, 32, 64, 128), stem_width=16,
                                             feature_dim=128, n_embd=128, input_size_hw=(128, 64)), seed=5)
    return path


def test_an_interrupted_export_leaves_no_temporary_folder_and_a_killed_ones_is_removed(tmp_path, monkeypatch):
    import fcntl
    import time

    import export.to_onnx as to_onnx
    from export.contract.files import STALE_GRACE_S, WORK_MARKER

    ckpt = _small_checkpoint(tmp_path / "small.pth")
    out = tmp_path / "build"
    out.mkdir()
    killed = out / ".export-killed1"        # what a SIGKILLed export leaves
    killed.mkdir()
    (killed / "encoder.onnx").write_bytes(b"half")
    (killed / WORK_MARKER).touch()
    running = out / ".export-running"       # another export, still running (holds its folder's lock)
    running.mkdir()
    (running / WORK_MARKER).touch()
    for d in (killed, running):
        os.utime(d, (time.time() - STALE_GRACE_S - 60,) * 2)
    fd = os.open(running, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        def interrupted(model, path):
            path.write_bytes(b"half an encoder")
            raise KeyboardInterrupt
        monkeypatch.setattr(to_onnx, "export_encoder", interrupted)
        with pytest.raises(KeyboardInterrupt):
            to_onnx.export_checkpoint(ckpt, out, log=lambda *a: None)
        assert sorted(p.name for p in out.iterdir()) == [".export-running"]
    finally:
        os.close(fd)


def test_sigterm_during_an_export_removes_its_temporary_folder(tmp_path):
    import signal

    from process_support import sigterm_once

    ckpt = _small_checkpoint(tmp_path / "small.pth")
    out = tmp_path / "build"
    status, _ = sigterm_once(["export.to_onnx", str(ckpt), "--out-dir", str(out), "--input-size", "128x64",
                              "--check-batches", "2", "--check-sizes", "9"],
                             lambda: bool(list(out.glob(".export-*"))), "the export's temporary folder",
                             start_timeout=240, exit_timeout=120)
    assert status == 128 + signal.SIGTERM
    assert list(out.iterdir()) == []


# ---- shapes, ranks and dtypes of a hostile checkpoint (checked before any model is allocated) ----

NARROW = ModelConfig(arch="resnet18", widths=(16, 32, 64, 128), stem_width=16, feature_dim=128, n_embd=128,
                     n_layer=2, num_classes=13)


@pytest.fixture(scope="module")
def narrow_state():
    return original_state_dict(random_model(NARROW, seed=7))


@pytest.fixture
def no_real_model(monkeypatch):
    """Fail the test if a model with storage is built: an invalid checkpoint must be refused first
    (a model on the "meta" device, which allocates nothing, is allowed)."""
    import export.reference.checkpoint as checkpoint

    real = checkpoint.NFormerModel

    def guarded(config):
        if torch.empty(0).device.type != "meta":
            raise AssertionError(f"a model was allocated from an invalid checkpoint: {config}")
        return real(config)
    monkeypatch.setattr(checkpoint, "NFormerModel", guarded)


def _refused(tmp_path, state, match):
    path = tmp_path / "hostile.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def _layer0_copies(state, n):
    """``n`` refinement layers, copies of layer 0."""
    layer0 = {k[len("nformer.h.0."):]: v for k, v in state.items() if k.startswith("nformer.h.0.")}
    out = {k: v for k, v in state.items() if not k.startswith("nformer.h.")}
    out.update({f"nformer.h.{i}.{name}": v.clone() for i in range(n) for name, v in layer0.items()})
    return out


def test_shapes_beyond_any_real_model_are_refused_before_a_model_is_allocated(tmp_path, narrow_state, no_real_model):
    """Was: the model was built from the shapes read, before the layout check (~120 GB for
    (100000, 0) weights, 10^8 layers for a stray nformer.h.99999999 key, 36 TB for a
    (10**6, 0, 3, 3) layer4 conv)."""
    from export.reference.checkpoint import MAX_CLASSES, MAX_N_LAYER, MAX_WIDTH

    cases = [
        ({"backbone.projection.weight": torch.zeros(100000, 0), "nformer.h.0.attn.c_attn.w": torch.zeros(100000, 0)},
         r"backbone\.projection\.weight has shape \(100000, 0\) with a zero-sized dimension.*"
         r"nformer\.h\.0\.attn\.c_attn\.w has shape \(100000, 0\)"),
        ({"nformer.h.99999999.attn.c_attn.w": torch.zeros(128, 384)},
         r"unexpected \(1\): nformer\.h\.99999999\.attn\.c_attn\.w; the nformer\.h\.\* layers must be numbered 0\.\.n-1"),
        ({"backbone.base.layer4.0.conv1.weight": torch.zeros(10**6, 0, 3, 3)},
         r"backbone\.base\.layer4\.0\.conv1\.weight has shape \(1000000, 0, 3, 3\) with a zero-sized dimension"),
        ({"backbone.base.layer4.0.conv1.weight": torch.zeros(1, 1, 1, 1).expand(10**5, 10**5, 3, 3)},
         r"backbone\.base\.layer4\.0\.conv1\.weight has shape \(100000, 100000, 3, 3\) but only 4 bytes of data"),
        ({"backbone.base.layer4.0.conv1.weight": torch.zeros(MAX_WIDTH + 1, 64, 1, 1)},
         rf"layer4 width {MAX_WIDTH + 1} \(from backbone\.base\.layer4\.0\.conv1\.weight; at most {MAX_WIDTH}\)"),
        ({"backbone.classifier.weight": torch.zeros(MAX_CLASSES + 1, 1)},
         rf"num_classes {MAX_CLASSES + 1} \(from backbone\.classifier\.weight; at most {MAX_CLASSES}\)"),
    ]
    for change, match in cases:
        _refused(tmp_path, {**narrow_state, **change}, match)
    tiny = original_state_dict(NFormerModel(ModelConfig(arch="resnet18", widths=(16, 32, 64, 128), stem_width=16,
                                                        feature_dim=8, n_embd=8, n_layer=1)))
    _refused(tmp_path, _layer0_copies(tiny, MAX_N_LAYER + 1),
             rf"n_layer {MAX_N_LAYER + 1} \(from nformer\.h\.\*; at most {MAX_N_LAYER}\)")


def test_tensors_that_view_one_block_of_data_are_refused(tmp_path, narrow_state, no_real_model):
    """Overlapping views let a small file claim far more weights than it holds; every layer of a
    trained model has its own data."""
    state = dict(narrow_state)
    keys = sorted(k for k in state if k.startswith("nformer.h.") and k.endswith(".w"))
    block = torch.randn(128 * 512)
    for key in keys:
        state[key] = block[:state[key].numel()].view(state[key].shape)
    claimed = sum(state[k].numel() * 4 for k in keys)
    _refused(tmp_path, state, rf"{re.escape(', '.join(keys[:4]))} \(\+4 more\) share one block of {block.numel() * 4} "
                              rf"bytes but claim {claimed} bytes \(overlapping views\)")


def test_views_of_one_flat_buffer_that_do_not_overlap_load(tmp_path, narrow_state):
    """Some training setups keep the weights as views of one flat buffer: that is no overlap."""
    state = dict(narrow_state)
    keys = [k for k in state if k.startswith("nformer.h.") and k.endswith(".w")]
    flat = torch.cat([state[k].reshape(-1) for k in keys])
    offset = 0
    for key in keys:
        n = state[key].numel()
        state[key] = flat[offset:offset + n].view(state[key].shape)
        offset += n
    torch.save(state, tmp_path / "flat.pth")
    model = load_checkpoint(tmp_path / "flat.pth")
    assert torch.equal(model.nformer.h[1].mlp.c_fc.w, narrow_state["nformer.h.1.mlp.c_fc.w"])


def test_a_missing_layer_is_named_with_the_numbering_expected(tmp_path, narrow_state, no_real_model):
    state = _layer0_copies(narrow_state, 4)
    state = {k: v for k, v in state.items() if not k.startswith("nformer.h.2.")}
    _refused(tmp_path, state, r"unexpected \(12\): nformer\.h\.3\..*layers must be numbered 0\.\.n-1, found 0, 1, 3 "
                              r"\(read as 2 layer\(s\)\)")


RANK_CASES = [("backbone.base.layer1.0.conv1.weight", 4), ("nformer.h.0.attn.c_attn.w", 2),
              ("backbone.classifier.weight", 2), ("nformer.h.1.ln_2.g", 1)]


@pytest.mark.parametrize("key,rank", RANK_CASES)
def test_a_tensor_of_another_rank_is_named_with_the_rank_expected(tmp_path, narrow_state, no_real_model, key, rank):
    """Was: IndexError (tuple index out of range) for a 0-dim tensor where infer_config reads a size."""
    _refused(tmp_path, {**narrow_state, key: torch.tensor(1.0)},
             rf"{re.escape(key)} has 0 dimension\(s\) \(\), expected {rank} \(")


def test_export_cli_reports_a_wrong_rank_on_one_line(tmp_path, narrow_state):
    from click.testing import CliRunner

    from export.to_onnx import main as export_main

    torch.save({**narrow_state, "nformer.h.0.attn.c_attn.w": torch.tensor(1.0)}, tmp_path / "scalar.pth")
    result = CliRunner().invoke(export_main, [str(tmp_path / "scalar.pth"), "--out-dir", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    assert "nformer.h.0.attn.c_attn.w has 0 dimension(s) (), expected 2" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key,dtype", [("nformer.h.0.attn.c_attn.w", torch.complex64),
                                       ("backbone.base.layer2.0.bn1.weight", torch.int64),
                                       ("nformer.bottleneck.running_var", torch.bool),
                                       ("backbone.classifier.weight", torch.complex128),
                                       ("backbone.bottleneck.num_batches_tracked", torch.bool),
                                       ("nformer.h.1.mlp.c_fc.b", torch.float8_e4m3fn)])
def test_weights_that_are_not_real_floating_point_are_refused(tmp_path, narrow_state, no_real_model, key, dtype):
    """Was: complex64 and int64 weights loaded silently (and the NaN check skipped complex tensors)."""
    _refused(tmp_path, {**narrow_state, key: narrow_state[key].to(dtype)},
             rf"{re.escape(key)} is {re.escape(str(dtype))}, expected")


def test_half_precision_weights_and_integer_step_counters_load(tmp_path, narrow_state):
    """What real checkpoints hold stays accepted: float16/bfloat16/float64 weights and the int64
    (or int32) BatchNorm step counters."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in narrow_state.items()}
    state["backbone.bottleneck.weight"] = state["backbone.bottleneck.weight"].to(torch.bfloat16)
    state["nformer.bottleneck.bias"] = state["nformer.bottleneck.bias"].double()
    state["backbone.bottleneck.num_batches_tracked"] = torch.tensor(5, dtype=torch.int32)
    assert narrow_state["nformer.bottleneck.num_batches_tracked"].dtype == torch.int64
    torch.save(state, tmp_path / "half.pth")
    model = load_checkpoint(tmp_path / "half.pth")
    assert model.config.n_layer == 2 and model.config.num_classes == 13


def test_export_refuses_an_input_size_beyond_its_range_and_writes_nothing(tmp_path):
    """Was: --input-size 99999999x99999999 ended in an allocation traceback after --out-dir was made."""
    from click.testing import CliRunner

    from export.contract.config import MAX_INPUT_SIDE, MIN_INPUT_SIDE
    from export.shipped import SHIPPED
    from export.to_onnx import export_checkpoint, main as export_main

    for size in ("99999999x99999999", f"{MAX_INPUT_SIDE + 1}x128", f"256x{MIN_INPUT_SIDE - 1}"):
        result = CliRunner().invoke(export_main, [str(SHIPPED), "--input-size", size, "--out-dir", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and "--input-size" in result.output
        assert f"{MIN_INPUT_SIDE}..{MAX_INPUT_SIDE}" in result.output, result.output
        assert not (tmp_path / "o").exists()
    with pytest.raises(CheckpointError, match=rf"each {MIN_INPUT_SIDE}\.\.{MAX_INPUT_SIDE}"):
        export_checkpoint(SHIPPED, tmp_path / "o", input_size_hw=(99999999, 99999999))
    assert not (tmp_path / "o").exists()


def test_a_compressed_zip_that_inflates_far_beyond_its_size_is_refused(tmp_path):
    """torch.load inflates compressed zip entries in memory: a ~200 KB file held a 200 MB tensor."""
    import zipfile

    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(1 << 20)}, plain)                 # 4 MB of zeros, stored uncompressed
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < plain.stat().st_size // 16
    with pytest.raises(CheckpointError, match="decompression bomb"):
        load_checkpoint(bomb)
    with pytest.raises(CheckpointError, match="not a supported ResNet"):   # the plain one loads (then is no NFormer)
        load_checkpoint(plain)


def test_export_check_options_beyond_their_range_are_refused(tmp_path):
    from click.testing import CliRunner

    from export.to_onnx import main as export_main

    for args in (["--check-sizes", "1,99999999"], ["--check-batches", "100000"], ["--landmarks", "0"],
                 ["--landmarks", "100000"], ["--n-head", "0"]):
        result = CliRunner().invoke(export_main, ["missing.pth", *args, "--out-dir", str(tmp_path / "o")])
        assert result.exit_code == 2 and "Invalid value" in result.output and "Traceback" not in result.output, args
    assert not (tmp_path / "o").exists()


def test_a_zip_python_cannot_read_is_not_inflated_by_torch(tmp_path):
    """An extra field that declares more bytes than it holds: Python's zipfile refuses the archive,
    torch's reader ignores the field and inflated the (compressed) entries anyway."""
    path = tmp_path / "odd.pth"
    torch.save({"w": torch.zeros(16)}, path)
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")                       # the first central directory entry
    data[at + 30:at + 32] = (200).to_bytes(2, "little")  # declares a 200-byte extra field that is not there
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="zip archive is malformed"):
        load_checkpoint(path)


def test_export_of_a_carded_checkpoint_at_default_options_names_the_options_its_card_records(tmp_path):
    """Was: the shipped model exported without --input-size 128x64 passed every check at 256x128 and
    then scored mAP 0.08 instead of 0.80 (its card beside it records the size)."""
    import json
    import shutil

    from click.testing import CliRunner

    from export.shipped import SHIPPED, SHIPPED_CARD
    from export.to_onnx import card_mismatches, main as export_main

    result = CliRunner().invoke(export_main, [str(SHIPPED), "--out-dir", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "pass --input-size 128x64" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    defaults = {"input_size_hw": (256, 128), "n_head": 2, "topk": 20, "landmarks": 5, "last_stride": 1}
    everything = {"--input-size", "--n-head", "--topk", "--landmarks", "--last-stride"}
    # an option given explicitly is the user's choice
    assert card_mismatches(SHIPPED, defaults, everything - {"--input-size"}) == []
    assert card_mismatches(SHIPPED, {**defaults, "input_size_hw": (128, 64)}, everything) == []
    # a card that belongs to another file, or none, is no hint
    ckpt = tmp_path / "m.pth"
    shutil.copyfile(SHIPPED, ckpt)
    assert card_mismatches(ckpt, defaults, everything) == []
    card = json.loads(SHIPPED_CARD.read_text())
    (tmp_path / "m.json").write_text(json.dumps({**card, "sha256": "0" * 64}))
    assert card_mismatches(ckpt, defaults, everything) == []
    (tmp_path / "m.json").write_text(json.dumps({**card, "export_options": {**card["export_options"], "topk": 10}}))
    assert card_mismatches(ckpt, defaults, everything) == ["--input-size 128x64", "--topk 10"]
    (tmp_path / "m.json").write_text("not json")
    assert card_mismatches(ckpt, defaults, everything) == []
    (tmp_path / "m.json").write_text("[" * 100_000)        # nested past Python's recursion limit
    assert card_mismatches(ckpt, defaults, everything) == []


def test_export_without_torch_is_one_line_naming_the_extra(tmp_path):
    """Was: `pip install -e .` (serving only) then `python -m export.to_onnx` ended in a
    ModuleNotFoundError traceback."""
    import subprocess
    import sys

    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['to_onnx', 'x.pth']; "
            "runpy.run_module('export.to_onnx', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "needs torch" in result.stderr and '.[export]' in result.stderr


def test_export_to_an_out_dir_that_is_a_file_says_so(tmp_path):
    """Was: "cannot write to output directory x: File exists"."""
    from click.testing import CliRunner

    from export.shipped import SHIPPED
    from export.to_onnx import main as export_main

    (tmp_path / "x").write_text("a file")
    result = CliRunner().invoke(export_main, [str(SHIPPED), "--input-size", "128x64", "--out-dir", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "is a file; give a directory" in result.output, result.output
    assert (tmp_path / "x").read_text() == "a file"
