"""The manifest beside the exported files (DESIGN.md section 2): the contract between stages.

Written by ``export.to_onnx``; read by calibration and the runtime (no torch needed here).
"""
from __future__ import annotations

import json
from pathlib import Path

from export.contract.config import ModelConfig
from export.contract.errors import InputError
from export.contract.files import sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT = "nformer-trt/manifest"
FORMAT_VERSION = 1


def io_spec(path: str | Path) -> dict:
    """Names, dtypes and shapes (symbolic dims by name) of an ONNX file's inputs and outputs."""
    import onnx

    proto = onnx.load(path, load_external_data=False)

    def spec(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
    return {"inputs": [spec(v) for v in proto.graph.input], "outputs": [spec(v) for v in proto.graph.output]}


def load_manifest(model_dir: str | Path, verify_checksums: bool = False) -> dict:
    """Read and validate ``model_dir/manifest.json``; the files it names must exist."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"no {MANIFEST_NAME} in {model_dir}: expected a directory written by "
                         "`python -m export.to_onnx CHECKPOINT --out-dir DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path}: {err}; re-run the export") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path} has format {manifest.get('format')!r} version "
                         f"{manifest.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}; "
                         "re-run the export with this version of nformer-trt")
    for name, entry in manifest["files"].items():
        file = model_dir / entry["path"]
        if not file.is_file():
            raise InputError(f"{name} file {file} named in {path} is missing; re-run the export")
        if verify_checksums and sha256_file(file) != entry["sha256"]:
            raise InputError(f"{file} does not match the checksum in {path}: it was changed after export; "
                             "re-run the export")
    return manifest


def model_config(manifest: dict) -> ModelConfig:
    return ModelConfig.from_json(manifest["model"])
