"""Serving exports (Triton repository, DeepStream config), backend selection, and the TensorRT
backend (marker ``tensorrt``: skipped where TensorRT / pycuda / a GPU are missing)."""
from __future__ import annotations

import configparser
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from export.contract.errors import InputError
from export.contract.manifest import load_manifest
from runtime.backends import OnnxRuntimeBackend
from runtime.cli import main as runtime_cli
from runtime.pipeline import Pipeline
from runtime.serving.exports import normalization_constants, write_deepstream_config, write_triton_repository


def parse_triton_config(path: Path):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed: Triton's model_config "
                        "protobuf is needed to parse config.pbtxt")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_triton_repository_parses_and_points_at_files(resnet18_export, tmp_path):
    model_dir = resnet18_export[0]
    out = tmp_path / "repo"
    r = CliRunner().invoke(runtime_cli, ["triton-repo", str(model_dir), str(out), "--max-batch", "16",
                                         "--instance-kind", "gpu"])
    assert r.exit_code == 0, r.output
    from tritonclient.grpc import model_config_pb2 as pb  # noqa: F401  (skipped above when missing)

    enc = parse_triton_config(out / "nformer_encoder" / "config.pbtxt")
    assert enc.name == "nformer_encoder" and enc.platform == "onnxruntime_onnx" and enc.max_batch_size == 16
    assert list(enc.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert enc.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(i.name, list(i.dims)) for i in enc.input] == [("images", [3, 256, 128])]
    assert [(o.name, list(o.dims)) for o in enc.output] == [("embeddings", [256])]
    assert enc.input[0].data_type == pb.TYPE_FP32 and enc.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    ref = parse_triton_config(out / "nformer_refine" / "config.pbtxt")
    assert ref.max_batch_size == 0 and not ref.HasField("dynamic_batching")
    assert {i.name: (list(i.dims), i.data_type) for i in ref.input} == {
        "features": ([1, -1, 256], pb.TYPE_FP32), "landmarks": ([4, -1], pb.TYPE_INT64)}
    assert [(o.name, list(o.dims)) for o in ref.output] == [("refined", [1, -1, 256])]
    manifest = load_manifest(model_dir)
    for name, network in (("nformer_encoder", "encoder"), ("nformer_refine", "nformer")):
        model_file = out / name / "1" / "model.onnx"
        assert model_file.read_bytes() == (model_dir / manifest["files"][network]["path"]).read_bytes()
    record = json.loads((out / "nformer_repository.json").read_text())
    assert all((out / m["file"]).is_file() and (out / m["config"]).is_file() for m in record["models"].values())
    # the model file as Triton's ONNX Runtime backend would load it: the inputs the config names
    sess = OnnxRuntimeBackend(out / "nformer_refine" / "1" / "model.onnx", dynamic_shapes=True)
    assert set(sess.input_names) == {"features", "landmarks"} and sess.output_names == ["refined"]
    # a non-empty directory is refused unless it is a repository written here and --overwrite is given
    r = CliRunner().invoke(runtime_cli, ["triton-repo", str(model_dir), str(out)])
    assert r.exit_code == 2 and "not empty" in r.output
    # a TensorRT version without engines would be ignored: refused, nothing touched
    r = CliRunner().invoke(runtime_cli, ["triton-repo", str(model_dir), str(tmp_path / "x"), "--tensorrt-version", "10.13.0"])
    assert r.exit_code == 2 and "--engines only" in r.output and not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="--engines only"):          # the API refuses it too (one home)
        write_triton_repository(model_dir, tmp_path / "x", tensorrt_version="10.13.0")
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(runtime_cli, ["triton-repo", str(model_dir), str(out), "--overwrite", "--max-batch", "8"])
    assert r.exit_code == 0, r.output
    assert parse_triton_config(out / "nformer_encoder" / "config.pbtxt").max_batch_size == 8
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_triton_repository(model_dir, tmp_path / "other", overwrite=True)
    with pytest.raises(InputError, match="lists no TensorRT engines"):
        write_triton_repository(model_dir, tmp_path / "plans", engines=True)
    assert not (tmp_path / "plans").exists() and not list(tmp_path.glob(".plans*"))


def test_deepstream_config_matches_the_preprocessing(resnet18_export, tmp_path):
    model_dir = resnet18_export[0]
    lib = tmp_path / "libnformer_plugins_autoreg.so"
    lib.write_bytes(b"\x7fELF stand-in")
    r = CliRunner().invoke(runtime_cli, ["deepstream-config", str(model_dir), str(tmp_path / "sgie.txt"),
                                         "--batch-size", "8", "--plugin-lib", str(lib)])
    assert r.exit_code == 0, r.output
    parser = configparser.ConfigParser(inline_comment_prefixes=None)
    parser.read(tmp_path / "sgie.txt")
    p = parser["property"]
    assert p["infer-dims"] == "3;256;128" and p["batch-size"] == "8" and p["model-color-format"] == "0"
    assert p["network-type"] == "100" and p["output-tensor-meta"] == "1" and p["process-mode"] == "2"
    assert p["output-blob-names"] == "embeddings" and p["maintain-aspect-ratio"] == "0"
    assert Path(p["onnx-file"]).is_file() and Path(p["custom-lib-path"]) == lib.resolve()
    assert "model-engine-file" not in p
    # nvinfer's y = scale * (x - offset[c]) fed to the folded ONNX == the original transform fed to encoder.onnx
    scale, offsets = float(p["net-scale-factor"]), np.array([float(v) for v in p["offsets"].split(";")])
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 3, 256, 128)).astype(np.float32)
    nvinfer_input = (scale * (pixels - offsets[None, :, None, None])).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    original_input = ((pixels / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    folded = OnnxRuntimeBackend(p["onnx-file"]).run({"images": nvinfer_input})["embeddings"]
    plain = OnnxRuntimeBackend(model_dir / "encoder.onnx").run({"images": original_input})["embeddings"]
    assert np.linalg.norm(folded - plain) / np.linalg.norm(plain) < 1e-4
    # without a plugin library, no custom-lib-path; a missing one is refused
    write_deepstream_config(model_dir, tmp_path / "plain.txt", plugin_library=None)
    assert "custom-lib-path" not in (tmp_path / "plain.txt").read_text()
    with pytest.raises(InputError, match="does not exist"):
        write_deepstream_config(model_dir, tmp_path / "x.txt", plugin_library=tmp_path / "missing.so")
    # the loadLibrary-only library registers nothing when nvinfer dlopens it: refused, naming the one to use
    (tmp_path / "libnformer_plugins.so").write_bytes(b"\x7fELF stand-in")
    with pytest.raises(InputError, match=r"loadLibrary.*libnformer_plugins_autoreg\.so"):
        write_deepstream_config(model_dir, tmp_path / "x.txt", plugin_library=tmp_path / "libnformer_plugins.so")
    with pytest.raises(InputError, match="does not exist"):
        write_deepstream_config(model_dir, tmp_path / "no_dir" / "x.txt")


def test_normalization_constants_reproduce_mean_and_std():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    c = normalization_constants(mean, std)
    x = np.arange(0, 256, 15.0)
    for ch in range(3):
        np.testing.assert_allclose(c["channel_ratio"][ch] * c["net_scale_factor"] * (x - c["offsets"][ch]),
                                   (x / 255 - mean[ch]) / std[ch], rtol=1e-12, atol=1e-12)


@pytest.fixture()
def model_dir_with_engines(resnet18_export, tmp_path):
    """A copy of the export (files linked) whose manifest lists engines that cannot run here."""
    src = resnet18_export[0]
    dst = tmp_path / "build"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".onnx":
            os.symlink(f, dst / f.name)
    manifest = json.loads((src / "manifest.json").read_text())
    (dst / "encoder.fp16.engine").write_bytes(b"not a real engine")
    manifest["engines"] = {"encoder.fp16": {"network": "encoder", "precision": "fp16", "path": "encoder.fp16.engine"},
                           "nformer.fp16": {"network": "nformer", "precision": "fp16", "path": "nformer.fp16.engine"}}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_engine_lookup_is_a_no_op_without_engines(resnet18_export):
    pipe = Pipeline.load(resnet18_export[0])
    assert pipe.notes == [] and pipe.backend_names == {"encoder": "onnxruntime", "nformer": "onnxruntime"}
    from runtime.evaluation.evaluate import available_backends

    assert available_backends(resnet18_export[0]) == ["onnxruntime"]


def test_unusable_engines_fall_back_to_onnx_runtime_with_reasons(model_dir_with_engines):
    pipe = Pipeline.load(model_dir_with_engines)
    assert pipe.backend_names["encoder"] == "onnxruntime" and len(pipe.notes) == 2
    assert "missing" in pipe.notes[1]
    with pytest.raises(InputError, match="no usable TensorRT engine for encoder"):
        Pipeline.load(model_dir_with_engines, backend="tensorrt")
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "bench", str(model_dir_with_engines), "--backend",
                          "tensorrt"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: no usable TensorRT engine")
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("engines,expect", [
    ([{"network": "encoder", "precision": "fp16", "path": "encoder.fp16.engine"}], "section is a list"),
    ({"encoder": [{"precision": "fp16", "path": "encoder.fp16.engine"}]}, "entry 'encoder' is a list"),
    ({"encoder.fp16": {"precision": "fp16", "path": "encoder.fp16.engine"}}, "has no string network"),
    ({"encoder.fp16": {"network": "encoder", "precision": "fp16"}}, "has no string path"),
    ({"encoder": {"network": "encoder", "precision": "fp16", "path": "encoder.fp16.engine"}},
     'expected it keyed "encoder.fp16"'),
    ("encoder.fp16.engine", "section is a str")])
def test_engines_in_another_format_are_one_clear_error(engines, expect):
    from runtime.tensorrt.backend import find_engine, listed_engines

    with pytest.raises(InputError) as err:
        listed_engines({"engines": engines})
    message = str(err.value)
    assert expect in message and "as `runtime build` writes it" in message and "\n" not in message
    with pytest.raises(InputError, match="as `runtime build` writes it"):
        find_engine({"engines": engines}, Path("."), "encoder")
    assert listed_engines({}) == [] and listed_engines({"engines": {}}) == []


def test_a_listed_engines_section_in_another_format_stops_the_load(model_dir_with_engines):
    manifest = json.loads((model_dir_with_engines / "manifest.json").read_text())
    manifest["engines"] = list(manifest["engines"].values())
    (model_dir_with_engines / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError):
        Pipeline.load(model_dir_with_engines)
    with pytest.raises(InputError):
        write_triton_repository(model_dir_with_engines, model_dir_with_engines.parent / "repo", engines=True)


def test_serving_files_follow_the_umask_and_leave_no_temporary_files(resnet18_export, tmp_path, monkeypatch):
    model_dir = resnet18_export[0]
    lib_dir = tmp_path / "libs"
    lib_dir.mkdir()
    monkeypatch.setenv("NFORMER_PLUGIN_DIR", str(lib_dir))
    import plugins

    monkeypatch.setattr(plugins, "DEFAULT_BUILD_DIR", tmp_path / "no_build")
    out = tmp_path / "out"
    out.mkdir()
    old = os.umask(0o022)
    try:
        write_triton_repository(model_dir, out / "repo")
        auto = write_deepstream_config(model_dir, out / "sgie.txt")  # plugin library "auto": not built, none added
        (lib_dir / plugins.PLUGIN_LIBRARY).write_bytes(b"\x7fELF stand-in")
        # "auto" is the self-registering library: the loadLibrary one alone adds nothing either
        assert write_deepstream_config(model_dir, out / "sgie.txt")["custom_lib_path"] is None
        (lib_dir / plugins.AUTOREG_LIBRARY).write_bytes(b"\x7fELF stand-in")
        built = write_deepstream_config(model_dir, out / "sgie2.txt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "repo").stat().st_mode) == 0o755  # a published folder, not mkdtemp's 0700
    for name in ("sgie.txt", "sgie.encoder.onnx", "sgie2.txt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert sorted(p.name for p in out.iterdir()) == ["repo", "sgie.encoder.onnx", "sgie.txt", "sgie2.encoder.onnx",
                                                     "sgie2.txt"]
    assert auto["custom_lib_path"] is None and "custom-lib-path" not in (out / "sgie.txt").read_text()
    assert built["custom_lib_path"] == str((lib_dir / plugins.AUTOREG_LIBRARY).resolve())
    assert f"custom-lib-path={(lib_dir / plugins.AUTOREG_LIBRARY).resolve()}" in (out / "sgie2.txt").read_text()


def test_cuda_helper_without_pycuda_says_what_to_install():
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        from runtime.tensorrt.cuda_memory import CudaUnavailable, Device

        with pytest.raises(CudaUnavailable, match="pycuda is not installed"):
            Device(0)
    else:
        pytest.skip("pycuda is installed here: the missing-pycuda message is not exercised")


@pytest.mark.gpu
def test_onnx_runtime_uses_cuda_when_available(resnet18_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed: the ONNX Runtime CUDA path is "
                    "not verified here")
    pipe = Pipeline.load(resnet18_export[0])
    assert pipe.encoder.backend.providers[0] == "CUDAExecutionProvider"


def _require_tensorrt():
    from runtime.tensorrt.cuda_memory import cuda_driver
    from runtime.tensorrt.lib import EngineUnusable, import_tensorrt

    try:
        trt = import_tensorrt()
    except EngineUnusable as err:
        pytest.skip(f"{err}: the TensorRT backend is not verified here")
    try:
        if cuda_driver().Device.count() == 0:
            raise RuntimeError("no CUDA device")
    except Exception as err:
        pytest.skip(f"pycuda / a CUDA GPU is not available ({err}): the TensorRT backend is not verified here")
    return trt


def _build_engine(trt, onnx_path: Path, engine_path: Path, profiles: dict) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)     # compare fp32 with fp32
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    engine_path.write_bytes(bytes(plan))


@pytest.mark.tensorrt
def test_tensorrt_backend_matches_onnx_runtime(resnet18_export, tmp_path):
    trt = _require_tensorrt()
    from runtime.tensorrt.backend import TensorRTBackend

    model_dir = resnet18_export[0]
    engine = tmp_path / "encoder.engine"
    _build_engine(trt, model_dir / "encoder.onnx", engine,
                  {"images": ((1, 3, 256, 128), (4, 3, 256, 128), (8, 3, 256, 128))})
    backend = TensorRTBackend(engine, load_plugins=False)
    assert backend.input_names == ["images"] and backend.output_names == ["embeddings"]
    ort_backend = OnnxRuntimeBackend(model_dir / "encoder.onnx")
    for b in (1, 3, 8, 2):                   # shapes change between calls; buffers are reused
        x = np.random.default_rng(b).standard_normal((b, 3, 256, 128)).astype(np.float32)
        got = backend.run({"images": x})["embeddings"]
        want = ort_backend.run({"images": x})["embeddings"]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3
    with pytest.raises(InputError, match="the engine accepts"):
        backend.run({"images": np.zeros((9, 3, 256, 128), np.float32)})
    from runtime.batching import DynamicBatcher

    with DynamicBatcher(lambda x: backend.run({"images": x})["embeddings"], max_batch=8) as batcher:
        x = np.random.default_rng(0).standard_normal((5, 3, 256, 128)).astype(np.float32)
        np.testing.assert_allclose(batcher(x), backend.run({"images": x})["embeddings"], rtol=1e-5, atol=1e-5)
    backend.close()


@pytest.mark.tensorrt
def test_tensorrt_layers_refinement_matches_onnx_runtime(resnet18_export, tmp_path):
    """nformer_layers.onnx (no custom op) as an engine, fed by runtime.neighbors, vs ONNX Runtime."""
    trt = _require_tensorrt()
    from export.contract.landmarks import sample_landmarks
    from runtime.neighbors import reciprocal_neighbors
    from runtime.tensorrt.backend import TensorRTBackend

    model_dir = resnet18_export[0]
    engine = tmp_path / "layers.engine"
    _build_engine(trt, model_dir / "nformer_layers.onnx", engine, {
        "features": ((1, 1, 256), (1, 500, 256), (1, 2000, 256)),
        "landmarks": ((4, 1), (4, 5), (4, 5)),
        "neighbor_index": ((1, 1, 1), (1, 500, 20), (1, 2000, 20)),
        "neighbor_valid": ((1, 1, 1), (1, 500, 20), (1, 2000, 20))})
    backend = TensorRTBackend(engine, load_plugins=False)
    ort_backend = OnnxRuntimeBackend(model_dir / "nformer_layers.onnx", dynamic_shapes=True)
    for n in (1, 7, 500):
        x = np.random.default_rng(n).standard_normal((n, 256)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        idx, valid = reciprocal_neighbors(x, 20)
        feeds = {"features": x[None], "landmarks": sample_landmarks(n, 4, 5, seed=0),
                 "neighbor_index": idx[None], "neighbor_valid": valid[None]}
        got, want = backend.run(feeds)["refined"], ort_backend.run(feeds)["refined"]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3
    backend.close()


def test_serving_modules_need_no_tritonclient_or_torch():
    code = ("import sys, runtime.serving.exports, runtime.gallery, runtime.batching, runtime.neighbors, runtime.evaluation.bench, "
            "runtime.evaluation.evaluate, runtime.tensorrt.backend, runtime.tensorrt.cuda_memory; "
            "print(any(m in sys.modules for m in ('torch', 'tritonclient', 'tensorrt', 'pycuda')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_help_of_new_commands():
    for cmd in ("evaluate", "bench", "triton-repo", "deepstream-config"):
        r = CliRunner().invoke(runtime_cli, [cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, cmd


def test_triton_repository_sweeps_a_killed_runs_folder_but_not_a_running_ones(resnet18_export, tmp_path):
    """A SIGKILLed triton-repo leaves its work folder; the next run removes it (nobody holds its
    lock), while a folder another running triton-repo holds stays."""
    import os
    import time

    from export.contract.files import STALE_GRACE_S, WORK_MARKER, work_dir

    model_dir = resnet18_export[0]
    killed = tmp_path / ".repo.tmp-killed"
    (killed / "repository" / "nformer_encoder" / "1").mkdir(parents=True)
    (killed / WORK_MARKER).touch()
    (killed / "repository" / "nformer_encoder" / "1" / "model.onnx").write_bytes(b"half")
    old = time.time() - 10 * STALE_GRACE_S
    os.utime(killed, (old, old))
    with work_dir(tmp_path, ".repo.tmp-") as running:
        os.utime(running, (old, old))
        write_triton_repository(model_dir, tmp_path / "repo")
        assert running.is_dir() and not killed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == [
        "README.md", "nformer_encoder", "nformer_refine", "nformer_repository.json"]


def test_triton_repository_publishing_is_serialised_and_whole(resnet18_export, tmp_path, monkeypatch):
    """Two runs into one OUT_DIR: the second finds it taken (no --overwrite) instead of replacing it;
    --overwrite swaps the whole folder (the old one moves aside first), a symlinked OUT_DIR is refused."""
    import threading

    import runtime.serving.exports as exports

    model_dir = resnet18_export[0]
    out = tmp_path / "repo"
    started, release = threading.Event(), threading.Event()
    real_readme = exports._triton_readme

    def slow_readme(*a, **k):          # the first run stops before publishing until the second has built
        started.set()
        release.wait(60)
        return real_readme(*a, **k)

    monkeypatch.setattr(exports, "_triton_readme", slow_readme)
    first_error = []

    def first_run():
        try:
            write_triton_repository(model_dir, out, max_batch=4)
        except InputError as err:
            first_error.append(str(err))

    first = threading.Thread(target=first_run)
    first.start()
    assert started.wait(60)
    monkeypatch.setattr(exports, "_triton_readme", real_readme)
    write_triton_repository(model_dir, out, max_batch=8)       # the second run publishes first
    release.set()
    first.join(60)
    assert not first.is_alive()
    # the first run, publishing second, was refused: the second run's repository is intact
    assert len(first_error) == 1 and "is not empty" in first_error[0], first_error
    assert parse_triton_config(out / "nformer_encoder" / "config.pbtxt").max_batch_size == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    # --overwrite replaces it whole
    write_triton_repository(model_dir, out, max_batch=16, overwrite=True)
    assert parse_triton_config(out / "nformer_encoder" / "config.pbtxt").max_batch_size == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    # the new folder cannot be renamed into place: the old repository is put back, unchanged
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_rename = Path.rename

    def failing_rename(self, target):
        if Path(target) == out and self.name == "repository":
            raise OSError(5, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(InputError, match="cannot publish the repository .* the previous one, if any, is unchanged"):
        write_triton_repository(model_dir, out, max_batch=2, overwrite=True)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(InputError, match="symbolic link"):
        write_triton_repository(model_dir, link, overwrite=True)
    assert link.is_symlink() and (out / "nformer_repository.json").is_file()
