"""export.contract.manifest: the manifest is validated against its schema, its paths are confined
to the model directory and the files it lists are checked against their sha256 on every load
(cached per file identity); every problem is one InputError, never a traceback."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import export.contract.manifest as manifest_module
from export.contract.config import ModelConfig
from export.contract.errors import InputError
from export.contract.files import sha256_file, write_bytes_atomic, write_json_atomic
from export.contract.manifest import MANIFEST_NAME, load_manifest

def io_records(model: dict, network: str) -> dict:
    """The inputs/outputs the export records for ``network`` under the configuration ``model``."""
    want = manifest_module.network_interface(model, network)
    return {side: [{"name": name, "dtype": dtype, "shape": ["N" if d is None else d for d in shape]}
                   for name, (dtype, shape) in want[side].items()] for side in ("inputs", "outputs")}


def make_model_dir(folder: Path) -> Path:
    """A model directory with small stand-in files and a manifest as the export writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    model = json.loads(json.dumps(ModelConfig(arch="resnet18").to_json()))
    for name in ("encoder", "nformer", "nformer_layers"):
        write_bytes_atomic(folder / f"{name}.onnx", f"{name} {folder.name}".encode() * 50)
        files[name] = {"path": f"{name}.onnx", "sha256": sha256_file(folder / f"{name}.onnx"),
                       **io_records(model, name)}
    write_bytes_atomic(folder / "encoder.fp16.onnx", b"fp16 encoder" * 30)
    manifest = {
        "format": "nformer-trt/manifest", "format_version": 1,
        "model": model, "opset": 20, "files": files,
        "source": {"checkpoint": "x.pth", "sha256": "c" * 64},
        "variants": {"encoder.fp16": {"network": "encoder", "precision": "fp16", "path": "encoder.fp16.onnx",
                                      "sha256": sha256_file(folder / "encoder.fp16.onnx"),
                                      "source": {"path": "encoder.onnx", "sha256": files["encoder"]["sha256"]},
                                      **io_records(model, "encoder")}},
        "engines": {"encoder.fp16": {"network": "encoder", "precision": "fp16", "path": "encoder.fp16.engine",
                                     "record": "encoder.fp16.engine.json", "sha256": "d" * 64}},
    }
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return folder


def read(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def write(folder: Path, manifest) -> None:
    write_json_atomic(folder / MANIFEST_NAME, manifest)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture()
def model_dir(tmp_path):
    return make_model_dir(tmp_path / "model")


def test_a_valid_manifest_loads(model_dir):
    manifest = load_manifest(model_dir)
    assert set(manifest["files"]) == {"encoder", "nformer", "nformer_layers"}
    assert "encoder.fp16" in manifest["variants"]
    assert manifest_module.model_config(manifest).arch == "resnet18"


def _mutations():
    def model(**kw):
        return lambda m: m["model"].update(kw)

    def drop(*keys):
        def f(m):
            d = m
            for k in keys[:-1]:
                d = d[k]
            del d[keys[-1]]
        return f

    def put(value, *keys):
        def f(m):
            d = m
            for k in keys[:-1]:
                d = d[k]
            d[keys[-1]] = value
        return f
    return {
        "not_an_object": (lambda m: [m], "must be a JSON object"),
        "no_format": (drop("format"), "format None"),
        "version_as_string": (put("1", "format_version"), "version '1'"),
        "no_model": (drop("model"), "no model section"),
        "model_not_object": (put("resnet18", "model"), "model must be an object"),
        "model_lacks_input_size": (drop("model", "input_size_hw"), "model lacks input_size_hw"),
        "topk_string": (model(topk="20"), r"model.topk must be an integer >= 1"),
        "input_size_one_int": (model(input_size_hw=[256]), r"model.input_size_hw must be a list of 2 positive"),
        "pixel_std_zero": (model(pixel_std=[0.2, 0, 0.2]), r"model.pixel_std must be a list of 3 finite numbers > 0"),
        "pixel_mean_nan": (model(pixel_mean=[0.4, float("nan"), 0.4]), r"model.pixel_mean must be"),
        # finite in JSON but not in the float32 the preprocessing computes in: embed returned NaN rows
        "pixel_std_below_float32": (model(pixel_std=[0.2, 1e-300, 0.2]), r"model.pixel_std must be"),
        "pixel_mean_beyond_float32": (model(pixel_mean=[0.4, 1e300, 0.4]), r"model.pixel_mean must be"),
        "pixel_range_overflows": (model(pixel_mean=[0.4, 3e38, 0.4], pixel_std=[0.2, 1e-3, 0.2]),
                                  r"model.pixel_(mean|std) must be"),
        "no_files": (drop("files"), "files must be an object"),
        "files_list": (put([], "files"), "files must be an object"),
        "no_encoder": (drop("files", "encoder"), "lists no encoder file"),
        "entry_string": (put("encoder.onnx", "files", "encoder"), "files.encoder must be an object"),
        "path_int": (put(5, "files", "encoder", "path"), "files.encoder.path must be a non-empty relative path"),
        "no_path": (drop("files", "nformer", "path"), "files.nformer.path must be"),
        "no_sha": (drop("files", "encoder", "sha256"), "files.encoder.sha256 must be a sha256"),
        "sha_short": (put("abc", "files", "encoder", "sha256"), "files.encoder.sha256 must be a sha256"),
        "no_inputs": (drop("files", "encoder", "inputs"), "files.encoder.inputs must be a list"),
        "source_string": (put("x.pth", "source"), "source must be an object"),
        "variants_list": (put([], "variants"), "variants must be an object"),
        "variant_no_network": (drop("variants", "encoder.fp16", "network"), "variants.encoder.fp16.network must be"),
        "variant_no_sha": (drop("variants", "encoder.fp16", "sha256"), "variants.encoder.fp16.sha256 must be"),
        "engines_string": (put("encoder.fp16.engine", "engines"), "engines must be an object"),
        "engines_list": (put([{"network": "encoder", "precision": "fp16", "path": "e.engine"}], "engines"),
                         "engines must be an object"),
        "engine_path_int": (put(7, "engines", "encoder.fp16", "path"), r"engines.encoder.fp16.path must be"),
        "engine_entry_string": (put("x", "engines", "encoder.fp16"), r"engines.encoder.fp16 must be an object"),
    }


MUTATIONS = _mutations()


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_schema_violations_are_one_clear_error(model_dir, case):
    mutate, message = MUTATIONS[case]
    manifest = read(model_dir)
    result = mutate(manifest)
    write(model_dir, result if result is not None else manifest)
    before = listing(model_dir)
    with pytest.raises(InputError, match=message) as info:
        load_manifest(model_dir)
    assert "manifest.json" in str(info.value) and "\n" not in str(info.value)
    assert listing(model_dir) == before


@pytest.mark.parametrize("text", ["", "{", "\xff\xfe", "null", "[1, 2]",
                                  "[" * 100000 + "]" * 100000])      # nested past Python's recursion limit
def test_unreadable_or_truncated_manifest(model_dir, text):
    (model_dir / MANIFEST_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match="manifest.json"):
        load_manifest(model_dir)


@pytest.mark.parametrize("path", ["../../../../etc/passwd", "/etc/passwd", "../other/encoder.onnx",
                                  "sub/../../other/encoder.onnx", "..\\other\\encoder.onnx", "C:/x/encoder.onnx",
                                  "", "."])
def test_paths_outside_the_model_directory_are_refused(tmp_path, path):
    model_dir = make_model_dir(tmp_path / "model")
    other = make_model_dir(tmp_path / "other")
    manifest = read(model_dir)
    manifest["files"]["encoder"]["path"] = path
    manifest["files"]["encoder"]["sha256"] = read(other)["files"]["encoder"]["sha256"]
    write(model_dir, manifest)
    with pytest.raises(InputError, match="files.encoder.path") as info:
        load_manifest(model_dir)
    assert "relative to the model directory" in str(info.value) or "must be a non-empty" in str(info.value)


@pytest.mark.parametrize("section", ["variants", "engines", "record"])
def test_paths_of_variants_and_engines_are_confined_too(model_dir, section):
    manifest = read(model_dir)
    if section == "variants":
        manifest["variants"]["encoder.fp16"]["path"] = "../../../../etc/passwd"
    elif section == "engines":
        manifest["engines"]["encoder.fp16"]["path"] = "/etc/passwd"
    else:
        manifest["engines"]["encoder.fp16"]["record"] = "../x.json"
    write(model_dir, manifest)
    with pytest.raises(InputError, match="relative to the model directory"):
        load_manifest(model_dir)


def test_symlinks_out_of_the_model_directory(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    other = make_model_dir(tmp_path / "other")
    # a folder inside that is a link to another place: refused whatever the file
    os.symlink(other, model_dir / "sub")
    manifest = read(model_dir)
    manifest["files"]["encoder"] = {**read(other)["files"]["encoder"], "path": "sub/encoder.onnx"}
    write(model_dir, manifest)
    with pytest.raises(InputError, match="leads out of the model directory"):
        load_manifest(model_dir)
    # a file that is a link to another model's encoder: its contents fail the checksum
    manifest = read(model_dir)
    manifest["files"]["encoder"]["path"] = "linked.onnx"
    manifest["files"]["encoder"]["sha256"] = sha256_file(model_dir / "encoder.onnx")
    write(model_dir, manifest)
    os.symlink(other / "encoder.onnx", model_dir / "linked.onnx")
    with pytest.raises(InputError, match="does not match the checksum"):
        load_manifest(model_dir)
    # ... and without checksums a link out of the directory is refused outright
    with pytest.raises(InputError, match="symbolic link out of the model directory"):
        load_manifest(model_dir, verify_checksums=False)
    # an engine (not checksummed here) may not be a link out either
    manifest = read(model_dir)
    manifest["files"]["encoder"]["path"] = "encoder.onnx"
    manifest["engines"]["encoder.fp16"]["path"] = "engine.link"
    write(model_dir, manifest)
    os.symlink("/etc/passwd", model_dir / "engine.link")
    with pytest.raises(InputError, match="symbolic link out of the model directory"):
        load_manifest(model_dir)


@pytest.mark.parametrize("damage", ["replaced", "truncated", "missing"])
def test_files_are_checked_against_their_checksums_by_default(model_dir, damage):
    encoder = model_dir / "encoder.onnx"
    load_manifest(model_dir)                      # the digest is cached now ...
    if damage == "replaced":                     # ... a new export's file without the new manifest
        write_bytes_atomic(encoder, b"another encoder" * 50)
    elif damage == "truncated":
        data = encoder.read_bytes()
        with open(encoder, "r+b") as f:
            f.truncate(len(data) // 2)
    else:
        encoder.unlink()
    message = "missing" if damage == "missing" else "does not match the checksum in .*manifest.json"
    with pytest.raises(InputError, match=message):
        load_manifest(model_dir)


def test_repeated_loads_reuse_verified_checksums(model_dir, monkeypatch):
    calls = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    load_manifest(model_dir)
    assert sorted(calls) == ["encoder.fp16.onnx", "encoder.onnx", "nformer.onnx", "nformer_layers.onnx"]
    calls.clear()
    load_manifest(model_dir)
    assert calls == []                           # unchanged files: no reading
    os.utime(model_dir / "nformer.onnx", ns=(1, 1))  # a changed file is read again
    load_manifest(model_dir)
    assert calls == ["nformer.onnx"]


def test_a_stale_variant_is_left_out_not_used(model_dir):
    """A calibration interrupted between writing a variant and the manifest: the variant is not
    offered (``runtime build`` writes it again), the export's own files still load."""
    write_bytes_atomic(model_dir / "encoder.fp16.onnx", b"newer fp16 encoder")
    manifest = load_manifest(model_dir)
    assert "encoder.fp16" not in manifest["variants"]
    assert "encoder.fp16" in read(model_dir)["variants"]     # the file on disk is untouched
    (model_dir / "encoder.fp16.onnx").unlink()
    assert "encoder.fp16" not in load_manifest(model_dir)["variants"]


def test_validate_manifest_without_files():
    from export.contract.manifest import validate_manifest

    with pytest.raises(InputError, match="format"):
        validate_manifest({"format": "something else"})


# ---- the real export and the stages that rewrite its manifest ----


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy of an export: ONNX files hard-linked (never written in place here), manifest copied."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".onnx":
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    shutil.copy2(src / MANIFEST_NAME, dst / MANIFEST_NAME)
    return dst


def test_real_export_build_and_pipeline(resnet18_export, tmp_path):
    """A fresh export + ``runtime build --precision fp16 --engine-tool none`` + Pipeline.load work
    with checksums verified; a replaced or truncated encoder.onnx is then refused clearly."""
    from runtime.pipeline import Pipeline
    from runtime.tensorrt.build import BuildOptions, build

    model_dir = _linked_copy(resnet18_export[0], tmp_path / "build")
    result = build(model_dir, BuildOptions(precision="fp16", engine_tool="none"), log=lambda *a: None)
    assert result["tool"] == "none"
    manifest = load_manifest(model_dir)
    assert {"encoder.fp16", "nformer.fp16"} <= set(manifest["variants"])
    for entry in manifest["variants"].values():
        assert sha256_file(model_dir / entry["path"]) == entry["sha256"]
    pipe = Pipeline.load(model_dir)
    assert pipe.backend_names == {"encoder": "onnxruntime", "nformer": "onnxruntime"}
    pipe.close()
    encoder = model_dir / "encoder.onnx"
    data = encoder.read_bytes()
    encoder.unlink()                                 # (a hard link: never truncate the shared file)
    write_bytes_atomic(encoder, data[: len(data) // 3])
    with pytest.raises(InputError, match="encoder file .*encoder.onnx does not match the checksum"):
        Pipeline.load(model_dir)
