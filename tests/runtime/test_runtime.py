"""The ONNX Runtime serving path: preprocessing, Pipeline, the `runtime` CLI, bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from export.contract.errors import InputError
from export.contract.landmarks import sample_landmarks
from export.contract.parity import relative_error
from runtime.cli import main as runtime_cli
from runtime.pipeline import Pipeline
from export.contract.preprocess import preprocess


def torchvision_style(img: Image.Image) -> torch.Tensor:
    """torchvision's Resize((256,128)) -> ToTensor -> Normalize on a PIL image, written out in torch."""
    img = img.resize((128, 256), Image.BILINEAR)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float().div(255)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return t.sub(mean).div(std)


def random_crop(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("hw", [(256, 128), (97, 41), (400, 180)])
def test_preprocess_is_the_originals_test_transform(hw):
    crop = random_crop(np.random.default_rng(0), *hw)
    ours = preprocess(crop)
    assert ours.dtype == np.float32 and ours.shape == (3, 256, 128)
    np.testing.assert_allclose(ours, torchvision_style(Image.fromarray(crop)).numpy(), rtol=0, atol=1e-6)


@pytest.fixture()
def crops_dir(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "crops"
    folder.mkdir()
    for i, hw in enumerate([(120, 60), (256, 128), (300, 100), (64, 64), (200, 90)]):
        Image.fromarray(random_crop(rng, *hw)).save(folder / f"{i:03d}.png")
    return folder


def test_pipeline_embed_and_refine_match_reference(resnet18_export, crops_dir):
    out_dir, model = resnet18_export
    pipe = Pipeline.load(out_dir, batch_size=2)
    files = sorted(crops_dir.iterdir())
    emb = pipe.embed(files)
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    np.testing.assert_array_equal(pipe.embed(arrays), emb)
    with torch.no_grad():
        expected = model.backbone(torch.stack([torchvision_style(Image.open(f).convert("RGB")) for f in files])).numpy()
    assert relative_error(emb, expected) <= 1e-4
    refined = pipe.refine(emb, seed=3)
    xn = torch.nn.functional.normalize(torch.from_numpy(emb), dim=-1)[None]
    lm = torch.from_numpy(sample_landmarks(len(files), 4, 5, seed=3))
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.nformer(xn, lm)[0], dim=-1).numpy()
    assert relative_error(refined, ref) <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(refined, axis=1), 1, atol=1e-5)


def test_cli_embed_then_refine(resnet18_export, crops_dir, tmp_path):
    out_dir, _ = resnet18_export
    runner = CliRunner()
    r = runner.invoke(runtime_cli, ["embed", str(out_dir), str(crops_dir), "--out", str(tmp_path / "e.npy"),
                                    "--names-out", str(tmp_path / "names.txt"), "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (5, 256)
    assert (tmp_path / "names.txt").read_text().split() == [f"{i:03d}.png" for i in range(5)]
    r = runner.invoke(runtime_cli, ["refine", str(out_dir), str(tmp_path / "e.npy"), "--out", str(tmp_path / "r.npy")])
    assert r.exit_code == 0, r.output
    refined = np.load(tmp_path / "r.npy")
    assert refined.shape == (5, 256) and np.isfinite(refined).all()
    lm = sample_landmarks(5, 4, 2, seed=9)
    np.save(tmp_path / "lm.npy", lm)
    r = runner.invoke(runtime_cli, ["refine", str(out_dir), str(tmp_path / "e.npy"), "--out", str(tmp_path / "r2.npy"),
                                    "--landmarks", str(tmp_path / "lm.npy"), "--raw"])
    assert r.exit_code == 0, r.output
    assert not np.allclose(np.load(tmp_path / "r2.npy"), refined)


def test_cli_help():
    runner = CliRunner()
    for cmd in ([], ["embed"], ["refine"]):
        r = runner.invoke(runtime_cli, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output


# ---- bad input: one clear error, nothing written ----

@pytest.fixture(scope="module")
def refiner_pipe(resnet18_export):
    return Pipeline.load(resnet18_export[0])


@pytest.mark.parametrize("features,match", [
    (np.zeros((4, 128), np.float32), "256 wide"),
    (np.zeros((2, 3, 256), np.float32), "2-D array"),
    (np.zeros((256,), np.float32), "2-D array"),
    (np.zeros((0, 256), np.float32), "empty"),
    (np.full((3, 256), np.nan, np.float32), "NaN or infinite"),
    (np.concatenate([np.ones((2, 256)), np.full((1, 256), np.inf)]).astype(np.float32), "NaN or infinite"),
    (np.ones((3, 256), np.int64), "floating point"),
])
def test_bad_features(refiner_pipe, features, match):
    with pytest.raises(InputError, match=match):
        refiner_pipe.refine(features)


@pytest.mark.parametrize("landmarks,match", [
    (np.array([[0, 1, 99]] * 4), "index rows"),
    (np.array([[0, -1, 2]] * 4), "index rows"),
    (np.array([[0, 1, 2]] * 3), r"must be \[n_layer=4"),
    (np.array([0, 1, 2]), r"must be \[n_layer=4"),
    (np.array([[0.0, 1.0]] * 4), "integer"),
    (np.arange(4 * 11).reshape(4, 11) % 10, "only N=10"),
])
def test_bad_landmarks(refiner_pipe, landmarks, match):
    x = np.random.default_rng(0).standard_normal((10, 256)).astype(np.float32)
    with pytest.raises(InputError, match=match):
        refiner_pipe.refine(x, landmarks=landmarks)


def test_refine_single_row_and_fewer_than_k(refiner_pipe):
    for n in (1, 3, 19):
        x = np.random.default_rng(n).standard_normal((n, 256)).astype(np.float32)
        out = refiner_pipe.refine(x)
        assert out.shape == (n, 256) and np.isfinite(out).all()


def test_bad_crops(refiner_pipe, tmp_path):
    with pytest.raises(InputError, match="uint8"):
        refiner_pipe.embed([np.zeros((10, 10, 3), np.float32)])
    with pytest.raises(InputError, match="HxWx3"):
        refiner_pipe.embed([np.zeros((10, 10, 4), np.uint8)])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(InputError, match="not an image in a format PIL reads"):
        refiner_pipe.embed([bad])


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _one_line_error(result):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr


def test_cli_undecodable_crop_writes_nothing(resnet18_export, crops_dir, tmp_path):
    (crops_dir / "zzz.jpg").write_bytes(b"\xff\xd8 broken")
    result = _run_cli("embed", resnet18_export[0], crops_dir, "--out", tmp_path / "e.npy")
    _one_line_error(result)
    assert "zzz.jpg" in result.stderr
    assert list(tmp_path.glob("*.npy")) == [] and list(tmp_path.glob(".*tmp")) == []


@pytest.mark.parametrize("case", ["width", "nan", "empty", "not_npy", "unwritable", "no_model"])
def test_cli_refine_bad_input(resnet18_export, tmp_path, case):
    model_dir = resnet18_export[0]
    src = tmp_path / "e.npy"
    out = tmp_path / "r.npy"
    data = {"width": np.zeros((4, 100), np.float32), "nan": np.full((4, 256), np.nan, np.float32),
            "empty": np.zeros((0, 256), np.float32)}.get(case, np.ones((4, 256), np.float32))
    np.save(src, data)
    if case == "not_npy":
        src.write_text("1,2,3")
    if case == "unwritable":
        out = tmp_path / "missing_dir" / "r.npy"
    if case == "no_model":
        model_dir = tmp_path
    result = _run_cli("refine", model_dir, src, "--out", out)
    _one_line_error(result)
    assert not out.exists()


def test_serving_path_imports_no_torch():
    code = ("import sys, runtime, runtime.cli, runtime.pipeline, runtime.backends, export.contract.preprocess, "
            "runtime.refiner, runtime.encoder, calibration, export.contract.manifest, export.contract.landmarks, "
            "calibration.images, calibration.cache, calibration.quantize, calibration.fp16, calibration.variants, "
            "runtime.tensorrt.build, runtime.evaluation.parity, "
            "runtime.neighbors, runtime.gallery, runtime.batching, runtime.evaluation.evaluate, "
            "runtime.evaluation.bench, runtime.serving.exports, runtime.tensorrt.backend, runtime.tensorrt.cuda_memory; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---- the refinement path: Pipeline picks runtime.neighbors + nformer_layers.onnx on a CPU ----

def test_pipeline_refines_through_lists_and_layers_on_a_cpu(resnet50_export, caplog):
    import logging

    from export.onnx_functions import OUTPUTS as NEIGHBOR_OUTPUTS
    from export.reference.testing import clustered_features
    from export.to_onnx import _session
    from runtime.neighbors import reciprocal_neighbors
    from runtime.refiner import l2_normalize

    out_dir, _ = resnet50_export
    with caplog.at_level(logging.INFO, logger="runtime.pipeline"):
        pipe = Pipeline.load(out_dir, providers=["CPUExecutionProvider"])
    assert pipe.refine_path == "lists+layers"
    assert pipe.backend_choice["refine"]["path"] == "lists+layers"
    assert any(r.getMessage().startswith("refine: lists+layers") for r in caplog.records)
    n = 2500                                     # the tiled neighbour pass (N >= SPARSE_SCAN_MIN_ROWS)
    x = clustered_features(n, seed=4, duplicates=n // 10)
    lm = sample_landmarks(n, 4, 5, seed=2)
    for landmarks, normalize in ((None, True), (lm, False)):
        fast = pipe.refine(x, landmarks=landmarks, seed=2, normalize_output=normalize)
        one_shot = pipe.refiner.refine(x, landmarks=landmarks, seed=2, normalize_output=normalize)
        assert relative_error(fast, one_shot) <= 1e-5
    # the lists are the ones inside nformer.onnx, index for index
    xn = l2_normalize(x)
    _, idx, valid = _session(out_dir / "nformer.onnx", NEIGHBOR_OUTPUTS).run(
        ["refined", *NEIGHBOR_OUTPUTS], {"features": xn[None], "landmarks": lm})
    lists = reciprocal_neighbors(xn, 20)
    np.testing.assert_array_equal(lists[0], idx[0])
    np.testing.assert_array_equal(lists[1], valid[0])
    # asked for explicitly
    assert pipe.set_refine_path("one-shot") == "one-shot" and pipe.backend_choice["refine"]["path"] == "one-shot"
    np.testing.assert_array_equal(pipe.refine(x, seed=2), pipe.refiner.refine(x, seed=2))
    with pytest.raises(InputError, match="refine path must be one of"):
        pipe.set_refine_path("fastest")
    assert pipe.refine_path == "one-shot"
    pipe.close()


def test_refine_path_choice():
    from types import SimpleNamespace

    from runtime.refiner import choose_refine_path

    files = {"files": {"nformer": {}, "nformer_layers": {}}}
    cpu = SimpleNamespace(name="onnxruntime", providers=["CPUExecutionProvider"])
    assert choose_refine_path(cpu, files)[0] == "lists+layers"
    cuda = SimpleNamespace(name="onnxruntime", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose_refine_path(cuda, files) == ("one-shot", "nformer.onnx runs on ONNX Runtime's CUDAExecutionProvider")
    assert choose_refine_path(SimpleNamespace(name="tensorrt"), files)[0] == "one-shot"
    path, reason = choose_refine_path(cpu, {"files": {"nformer": {}}})
    assert path == "one-shot" and "no nformer_layers.onnx" in reason


def test_a_precision_without_an_engine_runs_fp32_and_says_so(resnet18_export, caplog):
    """precision="int8"/"fp16" needs a TensorRT engine; without one the fp32 file runs, with a warning
    and the reason kept in backend_choice (not silently)."""
    import logging

    out_dir = resnet18_export[0]
    for precision in ("int8", "fp16"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="runtime.pipeline"), \
                Pipeline.load(out_dir, providers=["CPUExecutionProvider"], precision=precision) as pipe:
            choice = pipe.backend_choice["encoder"]
            assert choice["backend"] == "onnxruntime" and pipe.encoder.backend.path.name == "encoder.onnx"
            assert f"precision {precision!r} needs a TensorRT engine" in choice["reason"]
            assert ("int8-cpu" in choice["reason"]) == (precision == "int8")
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith("encoder:")]
        assert len(warned) == 1 and precision in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="runtime.pipeline"), \
            Pipeline.load(out_dir, providers=["CPUExecutionProvider"]):
        pass
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # backend="onnxruntime" asked for too: the same warning, the reason says both
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="runtime.pipeline"), \
            Pipeline.load(out_dir, backend="onnxruntime", precision="fp16") as pipe:
        reason = pipe.backend_choice["encoder"]["reason"]
        assert "backend='onnxruntime' was asked for" in reason and "'fp16' needs a TensorRT engine" in reason
    assert [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith("encoder:")]
    for bad in ("bogus", 8, "FP16"):
        with pytest.raises(InputError, match="precision must be one of fp32, fp16, int8, int8-cpu"):
            Pipeline.load(out_dir, precision=bad)
