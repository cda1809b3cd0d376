"""Precision variants of a model directory, and the manifest section that lists them.

Place in the flow: ``export`` wrote ``encoder.onnx``, ``nformer.onnx`` and ``manifest.json``; this
module writes the precision-specific ONNX files **beside** them (the fp32 files stay) and records
each in the manifest under ``"variants"``; ``runtime.tensorrt.build`` builds TensorRT engines from
them and records those under ``"engines"`` (its docstring gives that format).  Both sections are
updated with :func:`update_manifest_section` (read, merge, atomic write): the export's own keys are
never touched, and a re-export (which rewrites the manifest) drops both sections with the files
they describe going stale.

Files per precision (``variant_file``):

=========  ==========================  =================================================
precision  encoder                     refinement (``nformer``)
=========  ==========================  =================================================
fp32       ``encoder.onnx``            ``nformer.onnx`` (the export's files; not re-listed)
fp16       ``encoder.fp16.onnx``       ``nformer.fp16.onnx`` (neighbour ranking reads fp32)
int8       ``encoder.int8.onnx``       none: the refinement runs fp32 or fp16 (DESIGN.md 3)
int8-cpu   ``encoder.int8-cpu.onnx``   none: fp32 by default (ONNX Runtime on a CPU)
=========  ==========================  =================================================

``int8`` is TensorRT's file (symmetric int8 activations), ``int8-cpu`` ONNX Runtime's x86 file
(uint8 activations, 7-bit weights; never built into an engine): ``calibration.quantize`` says why
there are two.  Both calibrate on the same crops and keep their ranges in the same cache.

``manifest["variants"]`` format (one entry per file, keyed ``"<network>.<precision>"``)::

    "variants": {
      "encoder.int8": {
        "network": "encoder", "precision": "int8", "path": "encoder.int8.onnx", "sha256": "...",
        "source": {"path": "encoder.onnx", "sha256": "..."},        # the fp32 file it came from
        "inputs": [{"name", "dtype", "shape"}], "outputs": [...],   # float32 I/O in every variant
        "quantization": "qdq-int8",                 # or "qdq-u8s8-cpu" (int8-cpu), "fp16-tensors"
        "calibration": {"method", "options", "images", "seed", "source", "layout", "skipped",
                        "cache", "cache_hit",                       # int8 and int8-cpu only
                        "check": {"crops", "cosine_mean", "cosine_min", "held_out"}},  # vs fp32 on held-out crops
        "serving": "onnxruntime-cpu",                               # int8-cpu only: no TensorRT engine
        "neighbor_ranking": "float32",                              # nformer.* only
        "tools": {"onnx": "...", "onnxruntime": "..."}, "created": "..."
      }, ...
    }

Imports no torch.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Callable

import onnx

from export.contract.errors import InputError
from export.contract.manifest import MANIFEST_NAME, io_spec, load_manifest
from export.contract.variants import (  # noqa: F401  (names of the variants' contract)
    CALIBRATED_PRECISIONS, NETWORKS, PRECISIONS, REFINE_PRECISIONS, VARIANTS_KEY, refinement_precision,
    variant_file, variant_name)
from export.contract.files import dir_lock, remove_stale_temp_files, staged_file, sha256_file, write_json_atomic

from calibration.quantize import DEFAULT_IMAGES, DEFAULT_METHOD, DEFAULT_PERCENTILE, quantize_encoder

def update_manifest_section(model_dir: str | Path, key: str, entries: dict) -> dict:
    """Merge ``entries`` into ``manifest[key]`` and write the manifest atomically; returns it.
    Read, merge and write hold the model directory's lock: two builds into one directory (an fp16
    and an int8-cpu build side by side) each keep the other's entries."""
    path = Path(model_dir) / MANIFEST_NAME
    with dir_lock(model_dir):
        manifest = load_manifest(model_dir)
        manifest.setdefault(key, {}).update(entries)
        write_json_atomic(path, manifest)
    return manifest


def read_variants(model_dir: str | Path) -> dict:
    """``manifest["variants"]`` with every listed file present (missing ones are dropped)."""
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    return {name: v for name, v in manifest.get(VARIANTS_KEY, {}).items() if (model_dir / v["path"]).is_file()}


def _tools() -> dict:
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _entry(model_dir: Path, network: str, precision: str, source: str, **extra) -> dict:
    path = variant_file(network, precision)
    return {"network": network, "precision": precision, "path": path, "sha256": sha256_file(model_dir / path),
            "source": {"path": source, "sha256": sha256_file(model_dir / source)}, **io_spec(model_dir / path),
            **extra, "tools": _tools(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _up_to_date(model_dir: Path, manifest: dict, network: str, precision: str) -> dict | None:
    """The manifest's entry of a variant that a rewrite would reproduce (same source file, same
    tools, file unchanged since), or None.  The fp16 refinement is a pure conversion: the fp16 and
    int8 builds both need it, and a rerun need not write it again."""
    entry = manifest.get(VARIANTS_KEY, {}).get(variant_name(network, precision))
    if not isinstance(entry, dict) or entry.get("path") != variant_file(network, precision):
        return None
    if entry.get("source", {}).get("sha256") != manifest["files"][network]["sha256"] or entry.get("tools") != _tools():
        return None
    try:
        return entry if sha256_file(model_dir / entry["path"]) == entry.get("sha256") else None
    except OSError:
        return None


def _write_variant(dst: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the file by name (onnx.save, the quantizer); published atomically."""
    with staged_file(dst) as tmp:
        write(tmp)


def write_variants(model_dir: str | Path, precision: str, *, refine_precision: str | None = None,
                   calib_data: str | Path | None = None, calib_method: str = DEFAULT_METHOD,
                   calib_images: int = DEFAULT_IMAGES, calib_seed: int = 0,
                   percentile: float = DEFAULT_PERCENTILE, log: Callable[[str], None] = print) -> dict:
    """Write the ONNX files a build at ``precision`` needs; return ``{"encoder": entry, "nformer": entry}``.

    The entries are manifest-style dicts (fp32 entries describe the export's own files).  INT8 (both
    ``int8`` and ``int8-cpu``) needs ``calib_data``; ``refine_precision`` defaults to
    :func:`refinement_precision`.
    """
    from calibration.fp16 import convert_encoder, convert_nformer

    model_dir = Path(model_dir)
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    refine_precision = refine_precision or refinement_precision(precision)
    if refine_precision not in REFINE_PRECISIONS:
        raise InputError(f"the refinement runs in {' or '.join(REFINE_PRECISIONS)} (its neighbour ranking is "
                         f"fp32 in every variant), got {refine_precision!r}")
    if precision in CALIBRATED_PRECISIONS and calib_data is None:
        raise InputError(f"--precision {precision} needs --calib-data DIR: a folder of person crops or a "
                         "Market-1501-layout directory (its training split is used) to calibrate the activation "
                         "ranges on")
    manifest = load_manifest(model_dir)
    config = manifest["model"]
    files = manifest["files"]
    remove_stale_temp_files(model_dir)     # what builds killed while writing a file left (SIGKILL, power loss)
    written = {}
    if precision == "fp32":
        written["encoder"] = _fp32_entry(model_dir, manifest, "encoder")
    elif precision == "fp16":
        log(f"writing {variant_file('encoder', 'fp16')} (fp16 tensors, float32 input/output) ...")
        _write_variant(model_dir / variant_file("encoder", "fp16"),
                       lambda tmp: convert_encoder(model_dir / files["encoder"]["path"], tmp))
        written["encoder"] = _entry(model_dir, "encoder", "fp16", files["encoder"]["path"], quantization="fp16-tensors")
    else:
        if precision == "int8":
            log(f"writing {variant_file('encoder', 'int8')} (Q/DQ: int8 symmetric, per-channel weights) ...")
            extra = {"quantization": "qdq-int8"}
        else:
            log(f"writing {variant_file('encoder', precision)} (Q/DQ for ONNX Runtime on x86 CPUs: uint8 asymmetric "
                "activations, 7-bit per-channel int8 weights; TensorRT builds --precision int8 instead) ...")
            extra = {"quantization": "qdq-u8s8-cpu", "serving": "onnxruntime-cpu"}
        calibration = {}

        def quantize(tmp: Path) -> None:
            calibration.update(quantize_encoder(
                model_dir / files["encoder"]["path"], tmp, calib_data, size_hw=tuple(config["input_size_hw"]),
                mean=tuple(config["pixel_mean"]), std=tuple(config["pixel_std"]), method=calib_method,
                count=calib_images, seed=calib_seed, percentile=percentile, cache_dir=model_dir,
                precision=precision, log=log))
        _write_variant(model_dir / variant_file("encoder", precision), quantize)
        calibration["cache"] = os.path.relpath(calibration["cache"], model_dir)
        written["encoder"] = _entry(model_dir, "encoder", precision, files["encoder"]["path"], **extra,
                                    calibration=calibration)
    if refine_precision == "fp32":
        written["nformer"] = _fp32_entry(model_dir, manifest, "nformer")
    elif (current := _up_to_date(model_dir, manifest, "nformer", "fp16")) is not None:
        log(f"{variant_file('nformer', 'fp16')} is up to date (same nformer.onnx, same tools): kept")
        written["nformer"] = current
    else:
        log(f"writing {variant_file('nformer', 'fp16')} (fp16 layers; neighbour ranking on the float32 input) ...")
        _write_variant(model_dir / variant_file("nformer", "fp16"),
                       lambda tmp: convert_nformer(model_dir / files["nformer"]["path"], tmp))
        written["nformer"] = _entry(model_dir, "nformer", "fp16", files["nformer"]["path"],
                                    quantization="fp16-tensors", neighbor_ranking="float32")
    new = {variant_name(e["network"], e["precision"]): e for e in written.values() if e["precision"] != "fp32"}
    if new:
        update_manifest_section(model_dir, VARIANTS_KEY, new)
    return written


def _fp32_entry(model_dir: Path, manifest: dict, network: str) -> dict:
    f = manifest["files"][network]
    return {"network": network, "precision": "fp32", "path": f["path"], "sha256": f["sha256"],
            "source": {"path": f["path"], "sha256": f["sha256"]}, "inputs": f["inputs"], "outputs": f["outputs"],
            **({"neighbor_ranking": "float32"} if network == "nformer" else {})}
