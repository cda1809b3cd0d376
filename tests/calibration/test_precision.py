"""FP16 and INT8 variants in ONNX Runtime (CPU): graph checks, accuracy on the synthetic evaluation
split with the shipped checkpoint, and the `runtime build` / `runtime parity` commands."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from calibration import fp16 as calib_fp16
from calibration.quantize import check_qdq_encoder
from calibration.variants import read_variants, write_variants
from export.contract.files import sha256_file
from export.contract.manifest import load_manifest
from export.contract.landmarks import sample_landmarks
from export.contract.parity import cosine_rows, neighbor_set_agreement
from export.reference.testing import clustered_features
from runtime.backends import OnnxRuntimeBackend
from runtime.cli import main as runtime_cli
from export.contract.market1501 import read_market1501
from export.shipped import SHIPPED
from runtime.evaluation.metrics import euclidean_distances, evaluate_rank
from export.contract.preprocess import preprocess_batch
from runtime.refiner import l2_normalize

from precision_support import fresh_copy, shipped_export, synthetic_data

CALIB_IMAGES = 200


@pytest.fixture(scope="module")
def variants_dir(tmp_path_factory):
    """The shipped model with its FP16 files and INT8 encoder (calibrated on 200 training crops)."""
    model_dir = fresh_copy(shipped_export(tmp_path_factory), tmp_path_factory.mktemp("variants") / "build")
    data = synthetic_data(tmp_path_factory)
    write_variants(model_dir, "fp16", log=lambda m: None)
    write_variants(model_dir, "int8", calib_data=data, calib_images=CALIB_IMAGES, log=lambda m: None)
    return model_dir


@pytest.fixture(scope="module")
def evaluation(variants_dir, tmp_path_factory):
    """Raw and refined embeddings of the synthetic query+gallery split for fp32, fp16 and int8 files."""
    data = read_market1501(synthetic_data(tmp_path_factory), splits=("query", "gallery"))
    items = data.query + data.gallery
    images = preprocess_batch([i.path for i in items], (128, 64))
    landmarks = sample_landmarks(len(items), 4, 5, seed=0)
    out = {"pids": np.array([i.pid for i in items]), "cams": np.array([i.camid for i in items]), "nq": len(data.query)}
    pairs = {"fp32": ("encoder.onnx", "nformer.onnx"), "fp16": ("encoder.fp16.onnx", "nformer.fp16.onnx"),
             "int8": ("encoder.int8.onnx", "nformer.fp16.onnx")}
    for precision, (enc, ref) in pairs.items():
        encoder = OnnxRuntimeBackend(variants_dir / enc, ["CPUExecutionProvider"])
        raw = np.concatenate([encoder.run({"images": images[s:s + 64]})["embeddings"] for s in range(0, len(images), 64)])
        refiner = OnnxRuntimeBackend(variants_dir / ref, ["CPUExecutionProvider"], dynamic_shapes=True)
        refined = refiner.run({"features": l2_normalize(raw)[None], "landmarks": landmarks})["refined"][0]
        out[precision] = {"raw": raw, "refined": l2_normalize(refined)}
    return out


def _map(ev, emb):
    nq = ev["nq"]
    _, mAP = evaluate_rank(euclidean_distances(emb[:nq], emb[nq:]), ev["pids"][:nq], ev["pids"][nq:],
                           ev["cams"][:nq], ev["cams"][nq:])
    return 100 * mAP


def test_int8_encoder_is_qdq_as_tensorrt_needs_and_runs_in_onnxruntime(variants_dir):
    model = onnx.load(variants_dir / "encoder.int8.onnx")
    check_qdq_encoder(model)  # Conv/Gemm read DQ(int8), zero points 0, float32 I/O
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dq = producers[conv.input[1]]
        weights = inits[dq.input[0]]
        assert weights.data_type == onnx.TensorProto.INT8
        assert list(inits[dq.input[1]].dims) == [weights.dims[0]]  # one scale per output channel
        if len(conv.input) > 2:  # biases stay float: TensorRT's parser rejects an int32 DequantizeLinear
            assert inits[conv.input[2]].data_type == onnx.TensorProto.FLOAT
    session = OnnxRuntimeBackend(variants_dir / "encoder.int8.onnx", ["CPUExecutionProvider"])
    out = session.run({"images": np.zeros((3, 3, 128, 64), np.float32)})["embeddings"]
    assert out.shape == (3, 128) and out.dtype == np.float32
    entry = read_variants(variants_dir)["encoder.int8"]
    assert entry["calibration"]["images"] == CALIB_IMAGES and entry["calibration"]["layout"] == "market1501-train"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped checkpoint is not in export/data")
def test_int8_embeddings_and_refined_map_stay_close_to_fp32(evaluation):
    ev = evaluation
    cos = cosine_rows(ev["int8"]["raw"], ev["fp32"]["raw"])
    assert cos.mean() >= 0.99 and cos.min() >= 0.95, (cos.mean(), cos.min())
    fp32_map, int8_map = _map(ev, ev["fp32"]["refined"]), _map(ev, ev["int8"]["refined"])
    assert abs(int8_map - fp32_map) <= 1.0, (fp32_map, int8_map)
    assert fp32_map > 50  # the shipped model is a trained one: the comparison means something


def test_fp16_files_are_valid_and_keep_the_neighbour_ranking_in_fp32(variants_dir):
    fp32 = onnx.load(variants_dir / "nformer.onnx")
    for name in ("encoder.fp16.onnx", "nformer.fp16.onnx"):
        model = onnx.load(variants_dir / name)
        onnx.checker.check_model(model, full_check=True)
        assert all(v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
                   for v in (*model.graph.input, *model.graph.output))
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)  # it is fp16 inside
    model = onnx.load(variants_dir / "nformer.fp16.onnx")
    calib_fp16.check_fp32_ranking(model)
    (node,) = [n for n in model.graph.node if n.op_type == "ReciprocalNeighbors"]
    inputs = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    assert node.input[0] == "features" and inputs["features"] == onnx.TensorProto.FLOAT
    assert [f.SerializeToString() for f in model.functions] == [f.SerializeToString() for f in fp32.functions]
    # without the rewiring, the converter would feed the node fp16-rounded features: the check sees it
    raw = calib_fp16._convert(onnx.load(variants_dir / "nformer.onnx"), node_block_list=[node.name])
    with pytest.raises(RuntimeError, match="not a float32 graph input"):
        calib_fp16.check_fp32_ranking(raw)


def test_an_up_to_date_fp16_refinement_is_kept_and_a_changed_one_rewritten(variants_dir, tmp_path):
    """The fp16 and int8 builds both need nformer.fp16.onnx: the second (and a rerun) kept writing the
    same conversion again ("writing nformer.fp16.onnx" twice in the demo)."""
    model_dir = fresh_copy(variants_dir, tmp_path / "build")
    target = model_dir / "nformer.fp16.onnx"
    before = target.stat()
    logs = []
    entry = write_variants(model_dir, "fp16", log=logs.append)["nformer"]
    assert any("nformer.fp16.onnx is up to date" in m for m in logs), logs
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert entry["sha256"] == sha256_file(target)
    target.write_bytes(target.read_bytes() + b"\0")          # changed since: written again
    logs.clear()
    entry = write_variants(model_dir, "fp16", log=logs.append)["nformer"]
    assert any(m.startswith("writing nformer.fp16.onnx") for m in logs), logs
    assert entry["sha256"] == sha256_file(target) and load_manifest(model_dir)["variants"]["nformer.fp16"] == entry


def test_fp16_refinement_takes_the_same_neighbours_as_fp32(variants_dir):
    """Near-ties (exact duplicates, tight clusters) included: the index lists are identical."""
    import onnxruntime as ort

    def session(name):
        proto = onnx.load(variants_dir / name)
        for out in ("neighbor_index", "neighbor_valid"):
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
        return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    for n in (1, 7, 600):
        x = clustered_features(n, 128, seed=n, spread=0.05, duplicates=n // 10)[None]
        lm = sample_landmarks(n, 4, 5, seed=1)
        a = session("nformer.onnx").run(None, {"features": x, "landmarks": lm})
        b = session("nformer.fp16.onnx").run(None, {"features": x, "landmarks": lm})
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])
        assert neighbor_set_agreement(a[1], b[1]) == 1.0


def test_fp16_outputs_stay_within_cosine_0999_of_fp32(evaluation):
    ev = evaluation
    assert cosine_rows(ev["fp16"]["raw"], ev["fp32"]["raw"]).mean() >= 0.999
    assert cosine_rows(ev["fp16"]["refined"], ev["fp32"]["refined"]).mean() >= 0.999


def _cli(*args):
    return CliRunner().invoke(runtime_cli, [str(a) for a in args])


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for w in words:
        assert w in lines[0], lines[0]


def test_build_cli_writes_the_onnx_files_and_says_how_to_build_engines(variants_dir, tmp_path, tmp_path_factory):
    model_dir = fresh_copy(variants_dir, tmp_path / "build")
    result = _cli("build", model_dir, "--precision", "int8", "--calib-data", synthetic_data(tmp_path_factory),
                  "--calib-images", CALIB_IMAGES, "--engine-tool", "none")
    assert result.exit_code == 0, result.output
    assert "ranges from cache" in result.output  # the copied calibration cache: no image read
    assert "runtime build" in result.output and "engines: not built" in result.output
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert {"encoder.int8", "nformer.fp16"} <= set(manifest["variants"])
    assert manifest["files"] == json.loads((variants_dir / "manifest.json").read_text())["files"]


@pytest.mark.parametrize("case", ["no_calib_data", "empty_calib_data", "too_few", "no_trtexec", "bad_profile",
                                  "no_model", "missing_calib_data"])
def test_build_cli_bad_input_is_one_error_line(case, variants_dir, tmp_path):
    model_dir = fresh_copy(variants_dir, tmp_path / "build")
    (tmp_path / "empty").mkdir()
    args = ["build", model_dir, "--precision", "int8", "--calib-data", tmp_path / "empty"]
    words = []
    if case == "no_calib_data":
        args, words = ["build", model_dir, "--precision", "int8"], ["--calib-data"]
    elif case == "empty_calib_data":
        words = ["no images", "empty"]
    elif case == "too_few":   # fewer crops than --calib-images are all used; none readable is the error
        (tmp_path / "few").mkdir()
        (tmp_path / "few" / "a.png").write_bytes(b"not a png")
        args, words = ["build", model_dir, "--precision", "int8", "--calib-data", tmp_path / "few"], ["no readable"]
    elif case == "no_trtexec":
        args, words = ["build", model_dir, "--precision", "fp16", "--engine-tool", "trtexec",
                       "--trtexec", tmp_path / "missing-trtexec"], ["trtexec"]
    elif case == "bad_profile":
        args, words = ["build", model_dir, "--precision", "fp16", "--min-batch", "64", "--opt-batch", "32"], ["min <= opt"]
    elif case == "no_model":
        args, words = ["build", tmp_path / "empty", "--precision", "fp16"], ["manifest.json"]
    elif case == "missing_calib_data":   # was: "writing encoder.int8.onnx ..." printed before the error
        args, words = ["build", model_dir, "--precision", "int8", "--calib-data", tmp_path / "nowhere"], ["not found"]
        result = _cli(*args)
        assert "writing" not in result.output, result.output
    _one_line_error(_cli(*args), *words)


def test_parity_cli_prints_a_table_and_writes_json(variants_dir, tmp_path, tmp_path_factory):
    data = synthetic_data(tmp_path_factory, identities=40)
    report = tmp_path / "parity.json"
    result = _cli("parity", variants_dir, "--data", data, "--report", report, "--checkpoint", SHIPPED)
    assert result.exit_code == 0, result.output
    rows = json.loads(report.read_text())["rows"]
    assert [(r["backend"], r["precision"]) for r in rows] == [
        ("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "int8")]
    ref, ort32 = rows[0], rows[1]
    assert ref["cosine_mean"] == 1.0 and ref["neighbor_overlap"] == 1.0 and ref["mAP_diff"] == 0.0
    assert ort32["cosine_min"] > 0.9999 and ort32["neighbor_overlap"] == 1.0
    for r in rows:
        assert {"cosine_min", "cosine_mean", "neighbor_overlap", "mAP_diff", "rank1_diff", "ok"} <= set(r)
    assert "neighbor_overlap" in result.output and "tolerances" in result.output
    assert "is not the file" not in result.output


def test_parity_cli_notes_a_checkpoint_that_is_not_the_exported_one(variants_dir, tmp_path, tmp_path_factory):
    """Was: --checkpoint of another model ran in silence and ended in a table of failed rows, as if the
    export were broken.  A note names the mismatch; the same weights re-saved still pass."""
    import torch

    data = synthetic_data(tmp_path_factory, identities=40)
    resaved = tmp_path / "resaved.pth"
    torch.save(torch.load(SHIPPED, weights_only=True), resaved)         # same weights, other bytes
    result = _cli("parity", variants_dir, "--data", data, "--checkpoint", resaved)
    assert result.exit_code == 0, result.output
    note = [line for line in result.output.splitlines() if line.startswith("note: --checkpoint")]
    assert len(note) == 1 and "is not the file" in note[0] and "nformer_synthetic.pth" in note[0], result.output


def test_parity_note_never_turns_an_unreadable_checkpoint_into_a_traceback(variants_dir, tmp_path,
                                                                           tmp_path_factory, monkeypatch):
    """The mismatch note hashed --checkpoint first: a file the user cannot read (PermissionError, which
    load_checkpoint turns into one CheckpointError) escaped as a raw OSError before any reader ran."""
    import runtime.evaluation.parity as parity

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(parity, "sha256_file", unreadable)
    data = synthetic_data(tmp_path_factory, identities=40)
    result = _cli("parity", variants_dir, "--data", data, "--checkpoint", SHIPPED)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "is not the file" not in result.output


def test_parity_cli_bad_input_is_one_error_line(variants_dir, tmp_path, tmp_path_factory):
    _one_line_error(_cli("parity", variants_dir, "--data", tmp_path / "nowhere"), "Market-1501")
    data = synthetic_data(tmp_path_factory, identities=40)
    _one_line_error(_cli("parity", variants_dir, "--data", data, "--checkpoint", tmp_path / "x.pth"), "checkpoint")
    _one_line_error(_cli("parity", tmp_path, "--data", data), "manifest.json")
