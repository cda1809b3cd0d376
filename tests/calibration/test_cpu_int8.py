"""The CPU INT8 encoder (precision ``int8-cpu``): ONNX Runtime's x86 format (uint8 activations, 7-bit
per-channel int8 weights), written by `runtime build` from the same calibration crops as TensorRT's INT8
file, served only when asked for, and its accuracy gate on the shipped model (CPU only)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from calibration.quantize import check_cpu_encoder, check_qdq_encoder
from calibration.variants import read_variants, write_variants
from export.contract.errors import InputError
from export.contract.files import sha256_file
from export.contract.market1501 import read_market1501
from export.contract.parity import cosine_rows
from export.contract.preprocess import preprocess_batch
from export.contract.variants import PRECISIONS, refinement_precision, variant_file
from export.shipped import SHIPPED
from runtime.cli import main as runtime_cli
from runtime.pipeline import Pipeline

from precision_support import fresh_copy, shipped_export, synthetic_data

CALIB_IMAGES = 200
CPU = "int8-cpu"


@pytest.fixture(scope="module")
def cpu_dir(tmp_path_factory):
    """The shipped model with its CPU INT8 encoder (entropy ranges from 200 training crops)."""
    model_dir = fresh_copy(shipped_export(tmp_path_factory), tmp_path_factory.mktemp("cpu_int8") / "build")
    write_variants(model_dir, CPU, calib_data=synthetic_data(tmp_path_factory), calib_images=CALIB_IMAGES,
                   log=lambda m: None)
    return model_dir


def _cli(*args):
    return CliRunner().invoke(runtime_cli, [str(a) for a in args])


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for w in words:
        assert w in lines[0], lines[0]


def test_the_contract_names_the_variant_and_pairs_it_with_the_fp32_refinement():
    assert CPU in PRECISIONS and variant_file("encoder", CPU) == "encoder.int8-cpu.onnx"
    # ONNX Runtime's CPU provider runs FP16 files through casts: the CPU variant keeps the fp32 refinement
    assert refinement_precision(CPU, ("fp32", "fp16")) == "fp32"


def test_variant_is_listed_in_the_manifest_with_its_checksum(cpu_dir):
    variants = read_variants(cpu_dir)
    entry = variants["encoder.int8-cpu"]
    assert entry["path"] == "encoder.int8-cpu.onnx" and entry["precision"] == CPU
    assert entry["sha256"] == sha256_file(cpu_dir / entry["path"])
    assert entry["source"] == {"path": "encoder.onnx", "sha256": sha256_file(cpu_dir / "encoder.onnx")}
    assert entry["quantization"] == "qdq-u8s8-cpu" and entry["serving"] == "onnxruntime-cpu"
    calib = entry["calibration"]
    assert calib["images"] == CALIB_IMAGES and calib["layout"] == "market1501-train"
    assert calib["options"]["activations"] == "uint8-asymmetric-per-tensor"
    assert calib["options"]["weights"] == "int8-symmetric-per-channel-7bit"
    assert "nformer.fp16" not in variants  # the refinement stays the export's fp32 file
    assert [e["dtype"] for e in entry["inputs"] + entry["outputs"]] == ["float32", "float32"]


def test_file_is_the_x86_format_and_onnxruntime_fuses_every_convolution(cpu_dir, tmp_path):
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(cpu_dir / "encoder.int8-cpu.onnx")
    check_cpu_encoder(model)  # uint8 activations, per-channel 7-bit int8 weights, float embeddings
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(zp.dtype == np.uint8 for zp in zero_points)
    assert any(int(zp) != 0 for zp in zero_points)  # asymmetric: signed tensors sit around a non-zero point
    assert not [n for n in model.graph.node if n.op_type == "Relu"]  # folded into the ranges before them
    with pytest.raises(RuntimeError, match="zero point is not 0"):
        check_qdq_encoder(model)  # what TensorRT needs: this file is not for it
    # ONNX Runtime's graph optimiser turns every Q/DQ Conv into one integer QLinearConv (the speed-up)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(cpu_dir / "encoder.int8-cpu.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    convs = sum(n.op_type == "Conv" for n in onnx.load(cpu_dir / "encoder.onnx").graph.node)
    assert ops.count("QLinearConv") == convs and "Conv" not in ops, sorted(set(ops))


def test_pipeline_serves_it_only_when_asked_for(cpu_dir, tmp_path_factory):
    data = read_market1501(synthetic_data(tmp_path_factory), splits=("query",))
    crops = [i.path for i in data.query[:16]]
    with Pipeline.load(cpu_dir) as default:  # a CPU box without engines: fp32 unless INT8 is asked for
        assert default.encoder.backend.path.name == "encoder.onnx" and default.encoder.backend.precision == "fp32"
        fp32 = default.embed(crops)
    with Pipeline.load(cpu_dir, precision=CPU) as pipe:
        assert pipe.encoder.backend.name == "onnxruntime"
        assert pipe.encoder.backend.path.name == "encoder.int8-cpu.onnx" and pipe.encoder.backend.precision == CPU
        assert pipe.refiner.backend.path.name == "nformer.onnx"
        assert pipe.backend_choice["encoder"]["backend"] == "onnxruntime"
        assert CPU in pipe.backend_choice["encoder"]["reason"]
        int8 = pipe.embed(crops)
        refined = pipe.refine(int8)
    assert cosine_rows(int8, fp32).min() > 0.95 and np.isfinite(refined).all()
    with pytest.raises(InputError, match="TensorRT cannot"):
        Pipeline.load(cpu_dir, precision=CPU, backend="tensorrt")


def test_pipeline_without_the_variant_says_how_to_build_it(cpu_dir, tmp_path):
    stale = fresh_copy(cpu_dir, tmp_path / "build")
    with open(stale / "encoder.int8-cpu.onnx", "ab") as f:  # no longer matches its checksum: dropped
        f.write(b"\0")
    with pytest.raises(InputError, match="runtime build .* --precision int8-cpu --calib-data"):
        Pipeline.load(stale, precision=CPU)


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped checkpoint is not in export/data")
def test_accuracy_gate_through_runtime_parity(cpu_dir, tmp_path, tmp_path_factory):
    """DESIGN.md 3's INT8 gate on the demo's split (600 identities: 600 queries, 2,044 gallery crops):
    embedding cosine to fp32 mean >= 0.99 (min >= 0.95), refined mAP within 1 point."""
    report = tmp_path / "parity.json"
    result = _cli("parity", cpu_dir, "--data", synthetic_data(tmp_path_factory), "--report", report,
                  "--checkpoint", SHIPPED)
    assert result.exit_code == 0, result.output
    rows = {(r["backend"], r["precision"]): r for r in json.loads(report.read_text())["rows"]}
    assert set(rows) == {("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", CPU)}
    cpu, ort32 = rows[("onnxruntime", CPU)], rows[("onnxruntime", "fp32")]
    assert cpu["refinement"] == "fp32" and cpu["encoder_file"] == "encoder.int8-cpu.onnx"
    assert cpu["ok"], cpu
    assert cpu["cosine_mean"] >= 0.99 and cpu["cosine_min"] >= 0.95, cpu
    assert abs(cpu["mAP"] - ort32["mAP"]) * 100 <= 1.0, (cpu["mAP"], ort32["mAP"])
    assert ort32["mAP"] > 0.5  # a trained model: the comparison means something
    # the same gate against ONNX Runtime's fp32 file directly
    data = read_market1501(synthetic_data(tmp_path_factory), splits=("query", "gallery"))
    images = preprocess_batch([i.path for i in (data.query + data.gallery)[:256]], (128, 64))
    with Pipeline.load(cpu_dir) as fp32, Pipeline.load(cpu_dir, precision=CPU) as int8:
        cos = cosine_rows(int8.encoder.embed_images(images), fp32.encoder.embed_images(images))
    assert cos.mean() >= 0.99, cos.mean()


def test_build_cli_writes_it_from_the_same_crops_and_cache_as_tensorrts_int8(cpu_dir, tmp_path, tmp_path_factory):
    model_dir = fresh_copy(cpu_dir, tmp_path / "build")
    data = synthetic_data(tmp_path_factory)
    result = _cli("build", model_dir, "--precision", CPU, "--calib-data", data, "--calib-images", CALIB_IMAGES)
    assert result.exit_code == 0, result.output
    assert "ranges from cache" in result.output  # the copied calibration cache: no image read
    assert "engines: none" in result.output and "TensorRT builds --precision int8" in result.output
    result = _cli("build", model_dir, "--precision", "int8", "--calib-data", data, "--calib-images", CALIB_IMAGES,
                  "--engine-tool", "none")
    assert result.exit_code == 0, result.output
    variants = read_variants(model_dir)
    assert {"encoder.int8", "encoder.int8-cpu"} <= set(variants)
    trt, cpu = variants["encoder.int8"]["calibration"], variants["encoder.int8-cpu"]["calibration"]
    assert trt["cache"] != cpu["cache"] and trt["cache"].startswith("calibration_cache/encoder.entropy.")
    images = [json.loads((model_dir / c["cache"]).read_text())["images"] for c in (trt, cpu)]
    assert images[0] == images[1] and len(images[0]) == CALIB_IMAGES  # one selection of crops for both


@pytest.mark.parametrize("case", ["no_calib_data", "empty_calib_data", "engine_tool", "tensorrt_pipeline"])
def test_bad_input_is_one_error_line(case, cpu_dir, tmp_path):
    model_dir = fresh_copy(cpu_dir, tmp_path / "build")
    (tmp_path / "empty").mkdir()
    if case == "no_calib_data":
        _one_line_error(_cli("build", model_dir, "--precision", CPU), "--precision int8-cpu needs --calib-data")
        with pytest.raises(InputError, match="--calib-data"):
            write_variants(model_dir, CPU, log=lambda m: None)
    elif case == "empty_calib_data":
        _one_line_error(_cli("build", model_dir, "--precision", CPU, "--calib-data", tmp_path / "empty"),
                        "no images", "empty")
    elif case == "engine_tool":
        _one_line_error(_cli("build", model_dir, "--precision", CPU, "--calib-data", tmp_path / "empty",
                             "--engine-tool", "trtexec"), "TensorRT cannot build", "--precision int8")
    else:
        with pytest.raises(InputError, match="precision='int8' for TensorRT"):
            Pipeline.load(model_dir, precision=CPU, backend="tensorrt")
    assert read_variants(model_dir).keys() == read_variants(cpu_dir).keys()  # nothing written or dropped


def test_demo_evaluates_the_variant(tmp_path, tmp_path_factory):
    from runtime.evaluation.demo import demo_runners

    build = fresh_copy(shipped_export(tmp_path_factory), tmp_path / "build")
    runners = demo_runners(build, synthetic_data(tmp_path_factory), log=lambda m: None)
    rows = [(r.backend, r.precision, r.refinement) for r in runners]
    assert ("onnxruntime", CPU, "fp32") in rows and ("onnxruntime", "int8", "fp16") in rows


def test_triton_repository_serves_it_on_cpu_instances(cpu_dir, tmp_path):
    """`triton-repo --encoder-precision int8-cpu`: the variant's bytes as the encoder model (CPU
    instances), recorded as such; refused with engines, GPU instances, or without the file."""
    import json

    out = tmp_path / "repo"
    r = _cli("triton-repo", cpu_dir, out, "--encoder-precision", CPU, "--instance-kind", "cpu")
    assert r.exit_code == 0, r.output
    assert (out / "nformer_encoder" / "1" / "model.onnx").read_bytes() == (cpu_dir / "encoder.int8-cpu.onnx").read_bytes()
    assert (out / "nformer_refine" / "1" / "model.onnx").read_bytes() == (cpu_dir / "nformer.onnx").read_bytes()
    record = json.loads((out / "nformer_repository.json").read_text())
    assert record["models"]["nformer_encoder"]["precision"] == CPU
    assert record["models"]["nformer_encoder"]["from"] == "encoder.int8-cpu.onnx"
    assert "KIND_CPU" in (out / "nformer_encoder" / "config.pbtxt").read_text()
    assert "uint8 activations" in (out / "README.md").read_text()
    _one_line_error(_cli("triton-repo", cpu_dir, tmp_path / "g", "--encoder-precision", CPU, "--instance-kind", "gpu"),
                    "--instance-kind cpu")
    _one_line_error(_cli("triton-repo", cpu_dir, tmp_path / "e", "--encoder-precision", CPU, "--engines"),
                    "choose one")
    stale = fresh_copy(cpu_dir, tmp_path / "stale")
    (stale / "encoder.int8-cpu.onnx").unlink()
    _one_line_error(_cli("triton-repo", stale, tmp_path / "s", "--encoder-precision", CPU, "--instance-kind", "cpu"),
                    "--precision int8-cpu")
    # the default instance kind (auto) would let a server with a GPU place it there
    _one_line_error(_cli("triton-repo", cpu_dir, tmp_path / "a", "--encoder-precision", CPU), "--instance-kind auto")
    refused = ("g", "e", "s", "a")
    assert not any(p.name in refused or p.name.startswith(tuple("." + r for r in refused)) for p in tmp_path.iterdir())


def test_cli_embed_runs_it_when_asked_for(cpu_dir, tmp_path, tmp_path_factory):
    import shutil

    data = read_market1501(synthetic_data(tmp_path_factory), splits=("query",))
    crops = tmp_path / "crops"
    crops.mkdir()
    for item in data.query[:6]:
        shutil.copy(item.path, crops / item.path.name)
    r = _cli("embed", cpu_dir, crops, "--out", tmp_path / "int8.npy", "--precision", CPU)
    assert r.exit_code == 0, r.output
    with Pipeline.load(cpu_dir, precision=CPU) as pipe:
        want = pipe.embed(sorted(crops.iterdir()))
    np.testing.assert_array_equal(np.load(tmp_path / "int8.npy"), want)
    r = _cli("embed", cpu_dir, crops, "--out", tmp_path / "fp32.npy")
    assert r.exit_code == 0, r.output
    assert not np.array_equal(np.load(tmp_path / "fp32.npy"), want)
    stale = fresh_copy(cpu_dir, tmp_path / "stale")
    (stale / "encoder.int8-cpu.onnx").unlink()
    _one_line_error(_cli("embed", stale, crops, "--out", tmp_path / "x.npy", "--precision", CPU), "--precision int8-cpu")
    assert not (tmp_path / "x.npy").exists()


def _small_split(src, dst, identities: int = 12):
    """The first ``identities`` identities of a Market-layout set (query + gallery): a quick threshold fit."""
    import shutil

    for folder in ("query", "bounding_box_test", "bounding_box_train"):
        (dst / folder).mkdir(parents=True)
        files = sorted((src / folder).glob("*.jpg"))
        pids = sorted({f.name.split("_")[0] for f in files if not f.name.startswith("-")})[:identities]
        for f in files:
            if f.name.split("_")[0] in pids:
                shutil.copy(f, dst / folder / f.name)
    return dst


def test_threshold_and_serve_at_the_int8_cpu_precision(cpu_dir, tmp_path, tmp_path_factory, caplog):
    """`runtime threshold --precision int8-cpu` fits on the variant's embeddings and records it;
    `runtime serve --precision int8-cpu` serves them and uses that threshold silently, while a
    service at another precision says the threshold was fitted elsewhere (and still uses it)."""
    import logging

    from runtime.evaluation.threshold import fit_thresholds
    from runtime.serving.open_set import OPEN_SET_FILE
    from runtime.serving.triton_server import open_service

    model = fresh_copy(cpu_dir, tmp_path / "model")
    data = _small_split(synthetic_data(tmp_path_factory), tmp_path / "market")
    r = _cli("threshold", data, "--model-dir", model, "--far", "0.1", "--backend", "onnxruntime", "--max-queries", "8",
             "--precision", CPU)
    assert r.exit_code == 0, r.output
    assert f"encoder precision: {CPU}" in r.output
    stored = json.loads((model / OPEN_SET_FILE).read_text())
    assert stored["encoder_precision"] == CPU
    fp32 = fit_thresholds(data, model, far=0.1, backend="onnxruntime", max_queries=8, store=False)
    assert fp32["encoder_precision"] == "fp32" and fp32["thresholds"] != stored["thresholds"]
    for precision, warned in ((CPU, False), (None, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="runtime.serving.open_set"):
            service = open_service(model, tmp_path / f"g{precision}", backend="onnxruntime", precision=precision)
        try:
            assert service.pipe.encoder_precision == (precision or "fp32")
            assert service.thresholds == stored["thresholds"]
            said = [rec.getMessage() for rec in caplog.records if rec.name == "runtime.serving.open_set"]
            assert bool(said) == warned, said
            if warned:
                assert f"fitted with the {CPU} encoder" in said[0] and "--precision fp32" in said[0]
        finally:
            service.close()
    assert "--precision" in _cli("serve", "--help").output
    stale = fresh_copy(cpu_dir, tmp_path / "stale")
    (stale / "encoder.int8-cpu.onnx").unlink()
    _one_line_error(_cli("threshold", data, "--model-dir", stale, "--precision", CPU), "--precision int8-cpu")
    assert not (stale / OPEN_SET_FILE).exists()


def test_evaluate_runs_it_when_asked_for(cpu_dir, tmp_path, tmp_path_factory):
    """`runtime evaluate --precision int8-cpu` scores the INT8 encoder (each row says the precision that
    ran); without the option, fp32; without the file, one error that says how to build it."""
    from runtime.evaluation.evaluate import evaluate, rank_scores

    small = _small_split(synthetic_data(tmp_path_factory), tmp_path / "small", identities=6)
    report = tmp_path / "eval.json"
    r = _cli("evaluate", small, "--model-dir", cpu_dir, "--precision", CPU, "--report", report)
    assert r.exit_code == 0, r.output
    rows = {(row["precision"], row["mode"]): row for row in json.loads(report.read_text())["results"]}
    assert set(rows) == {(CPU, "encoder"), (CPU, "refined")}
    assert CPU in r.output
    # the rows are the INT8 encoder's: the same scores as its embeddings ranked directly
    data = read_market1501(small, splits=("query", "gallery"))
    items = data.query + data.gallery
    with Pipeline.load(cpu_dir, precision=CPU) as pipe:
        emb = pipe.embed([i.path for i in items])
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q = len(data.query)
    want = rank_scores(x[:q], x[q:], [i.pid for i in data.query], [i.pid for i in data.gallery],
                       [i.camid for i in data.query], [i.camid for i in data.gallery])
    assert rows[(CPU, "encoder")]["mAP"] == pytest.approx(want["mAP"], abs=1e-6)
    fp32 = evaluate(small, cpu_dir, backends=["onnxruntime"])
    assert {row["precision"] for row in fp32["results"]} == {"fp32"}
    stale = fresh_copy(cpu_dir, tmp_path / "stale")
    (stale / "encoder.int8-cpu.onnx").unlink()
    _one_line_error(_cli("evaluate", small, "--model-dir", stale, "--precision", CPU), "--precision int8-cpu")
