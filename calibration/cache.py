"""The calibration cache: activation ranges kept so that a second build does not re-read the images.

Place in the flow: written and read by ``calibration.quantize`` inside the model directory
(``MODEL_DIR/calibration_cache/``).  One JSON file per key; the key is everything the ranges depend
on: the source ONNX file's sha256, the calibration method and its options, the image list (digest
of relative path, size and modification time of every candidate: nothing is decoded to compute
it), the number of images and the selection seed.  The file name carries the key's digest, and the
file repeats the key in full, so a changed model, method or image folder never reuses stale ranges.

The ranges themselves are ONNX Runtime's own serialisation (``onnxruntime.quantization.calibrate``
``save_tensors_data`` / ``load_tensors_data``: per tensor lowest/highest and, for the histogram
methods, the histogram), embedded under ``"ranges"`` and handed back to ``quantize_static`` through
its ``calibration_cache_path``.

File format (``format`` ``nformer-trt/calibration-cache``, version 1)::

    {"format": ..., "format_version": 1, "key": {...}, "key_sha256": "...",
     "images": ["bounding_box_train/0002_c1s1_000451_03.jpg", ...], "skipped": [{"path", "reason"}],
     "created": "...", "ranges": {...ONNX Runtime TensorsData JSON...}}

Imports no torch.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import tempfile
from pathlib import Path

from export.contract.errors import InputError
from export.contract.files import write_json_atomic

CACHE_DIR = "calibration_cache"
FORMAT = "nformer-trt/calibration-cache"
FORMAT_VERSION = 1


def cache_key(model_sha256: str, method: str, options: dict, images_digest: str, count: int, seed: int) -> dict:
    return {"model_sha256": model_sha256, "method": method, "options": dict(sorted(options.items())),
            "images_digest": images_digest, "count": int(count), "seed": int(seed)}


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_path(model_dir: str | Path, network: str, key: dict) -> Path:
    return Path(model_dir) / CACHE_DIR / f"{network}.{key['method']}.{key_digest(key)[:16]}.json"


def load(path: Path, key: dict) -> dict | None:
    """The cache entry at ``path`` if it exists and was made for ``key``; None otherwise."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged cache is recomputed, not an error
    if entry.get("format") != FORMAT or entry.get("format_version") != FORMAT_VERSION or entry.get("key") != key:
        return None
    return entry


def save(path: Path, key: dict, ranges: dict, images: list[str], skipped: list[dict]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the calibration cache directory {path.parent}: {err.strerror or err}") from None
    write_json_atomic(path, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "key_sha256": key_digest(key),
        "images": images, "skipped": skipped,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ranges": ranges})


def ranges_file(entry: dict, directory: Path) -> Path:
    """Write an entry's ranges where ``quantize_static(calibration_cache_path=...)`` reads them."""
    fd, name = tempfile.mkstemp(dir=directory, prefix="ranges-", suffix=".json")
    with open(fd, "w") as f:
        json.dump(entry["ranges"], f)
    return Path(name)
