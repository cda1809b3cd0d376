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

File format (``format`` ``nformer-trt/calibration-cache``, version 2)::

    {"format": ..., "format_version": 2, "key": {...}, "key_sha256": "...",
     "images": ["bounding_box_train/0002_c1s1_000451_03.jpg", ...], "skipped": [{"path", "reason"}],
     "check": {"crops", "cosine_mean", "cosine_min", "held_out"},  # the accuracy check the ranges passed
     "check_images": ["bounding_box_train/...", ...],      # its held-out crops (none: calibration crops)
     "created": "...", "ranges": {...ONNX Runtime TensorsData JSON...},
     "content_sha256": "..."}                               # sha256 of every other field

The file is untrusted: :func:`load` validates it (JSON types, every field, the checksum, the ranges:
finite numbers, ``lowest <= highest``, the calibration method of the key, tensor names of the model)
and treats an entry that does not validate as damaged: ignored with a one-line note, and the ranges
are recomputed from the crops (then saved over it).  Version 1 entries (no checksum, no check) are
recomputed the same way; version 2 entries from before the held-out check (no ``check_images``, no
``held_out``) are read.  ``check_images`` is a record only: a cache hit's check runs on held-out crops
that ``calibration.quantize`` chooses itself (and uses an entry only when its ``images`` are the
seeded selection of the folder's crops).

Imports no torch.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Callable

from export.contract.errors import InputError
from export.contract.files import write_json_atomic
from export.contract.manifest import CALIBRATION_CACHE_DIR

CACHE_DIR = CALIBRATION_CACHE_DIR
FORMAT = "nformer-trt/calibration-cache"
FORMAT_VERSION = 2
#: most held-out crops an entry may list (the accuracy check reads 8; room to grow)
MAX_CHECK_IMAGES = 64


def cache_key(model_sha256: str, method: str, options: dict, images_digest: str, count: int, seed: int) -> dict:
    return {"model_sha256": model_sha256, "method": method, "options": dict(sorted(options.items())),
            "images_digest": images_digest, "count": int(count), "seed": int(seed)}


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_path(model_dir: str | Path, network: str, key: dict) -> Path:
    return Path(model_dir) / CACHE_DIR / f"{network}.{key['method']}.{key_digest(key)[:16]}.json"


class DamagedCache(ValueError):
    """A cache entry that does not validate (the message says what is wrong with it)."""


#: fields of one tensor's entry in ONNX Runtime's TensorsData JSON (``TensorData._allowed`` + its class tag)
_TENSOR_FIELDS = frozenset(["lowest", "highest", "avg", "std", "hist", "hist_edges", "bins", "CLS"])
_ARRAY_DTYPES = frozenset(["float16", "float32", "float64", "int32", "int64", "uint32", "uint64"])
_FLOAT32_MAX = 3.4028234663852886e38
#: the ``CalibrationMethod`` member that ``quantize_static`` records for each of our method names
_ORT_METHODS = {"entropy": "Entropy", "percentile": "Percentile", "minmax": "MinMax"}


def content_digest(entry: dict) -> str:
    """sha256 of a cache entry's every field but ``content_sha256`` (floats serialise exactly)."""
    content = {k: v for k, v in entry.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DamagedCache(f"{what} is {type(value).__name__} {str(value)[:40]!r}, not a number")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf
    if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
        raise DamagedCache(f"{what} is {str(value)[:40]}, not a finite float32")
    return number


def _numbers(value, what: str) -> list[float]:
    """The numbers of a TensorData field: a plain number or ONNX Runtime's ``numpy.array`` object."""
    if not isinstance(value, dict):
        return [_number(value, what)]
    if value.get("CLS") != "numpy.array" or set(value) != {"CLS", "data", "dtype"}:
        raise DamagedCache(f"{what} is neither a number nor a numpy.array object")
    if not isinstance(value["dtype"], str) or value["dtype"] not in _ARRAY_DTYPES:
        raise DamagedCache(f"{what} has dtype {str(value['dtype'])[:40]!r}, not a numeric one")
    flat, stack = [], [value["data"]]
    while stack:  # nested lists without recursion
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            flat.append(_number(item, what))
    return flat


def _scalar(value, what: str) -> float:
    numbers = _numbers(value, what)
    if len(numbers) != 1:
        raise DamagedCache(f"{what} holds {len(numbers)} numbers, not one")
    return numbers[0]


def validate_ranges(ranges, method: str, tensors=None) -> None:
    """Raise :class:`DamagedCache` unless ``ranges`` is ONNX Runtime TensorsData JSON for ``method``
    whose every tensor has a finite ``lowest <= highest`` (and, given ``tensors``, is one of them)."""
    if not isinstance(ranges, dict):
        raise DamagedCache(f'"ranges" is {type(ranges).__name__}, not an object')
    if ranges.get("CLS", "TensorsData") != "TensorsData":
        raise DamagedCache(f'"ranges" is a {str(ranges.get("CLS"))[:40]!r}, not TensorsData')
    if ranges.get("smooth_quant", False) is not False:
        raise DamagedCache('"ranges" were made with SmoothQuant (this build does not use it)')
    expected = {"CLS": "CalibrationMethod", "value": f"CalibrationMethod.{_ORT_METHODS[method]}"}
    if ranges.get("calibration_method") != expected:
        raise DamagedCache(f'"ranges" has the calibration method {str(ranges.get("calibration_method"))[:60]}, '
                           f"expected {expected['value']} (the key's {method})")
    data = ranges.get("data")
    if not isinstance(data, dict) or not data:
        raise DamagedCache('"ranges" has no "data" object of tensors')
    for name, td in data.items():
        what = f"tensor {name[:80]!r}"
        if tensors is not None and name not in tensors:
            raise DamagedCache(f"{what} is not a tensor of the model")
        if not isinstance(td, dict):
            raise DamagedCache(f"{what} is {type(td).__name__}, not an object")
        unknown = set(td) - _TENSOR_FIELDS
        if unknown or td.get("CLS", "TensorData") != "TensorData":
            raise DamagedCache(f"{what} has unexpected fields {sorted(unknown)[:3] or td.get('CLS')}")
        if "lowest" not in td or "highest" not in td:
            raise DamagedCache(f"{what} has no lowest/highest")
        lowest, highest = _scalar(td["lowest"], f"{what} lowest"), _scalar(td["highest"], f"{what} highest")
        if not lowest <= highest:
            raise DamagedCache(f"{what} has lowest {lowest:g} > highest {highest:g}")
        if highest - lowest > _FLOAT32_MAX:
            raise DamagedCache(f"{what} has a range {lowest:g}..{highest:g} wider than float32")
        for field in ("avg", "std", "hist", "hist_edges", "bins"):
            if field in td:
                _numbers(td[field], f"{what} {field}")
    try:  # the quantiser's own reader takes it (it is what reads the file next)
        from onnxruntime.quantization.calibrate import TensorsData

        TensorsData.from_dict(ranges)
    except Exception as err:  # noqa: BLE001  (any failure of the reader: the entry is damaged)
        raise DamagedCache(f"ONNX Runtime cannot read the ranges ({type(err).__name__}: {str(err)[:80]})") from None


def _validate(entry, key: dict, tensors) -> None:
    if not isinstance(entry, dict):
        raise DamagedCache(f"the file holds a JSON {type(entry).__name__}, not an object")
    if entry.get("format") != FORMAT:
        raise DamagedCache(f"format {str(entry.get('format'))[:60]!r}, expected {FORMAT!r}")
    if entry.get("format_version") != FORMAT_VERSION:
        raise DamagedCache(f"format version {str(entry.get('format_version'))[:20]}, this build reads {FORMAT_VERSION}")
    if entry.get("content_sha256") != content_digest(entry):
        raise DamagedCache("its content does not match its checksum (content_sha256)")
    if entry.get("key") != key:
        raise DamagedCache("it was made for another key (model, method, options or images) than its name says")
    images, skipped, check = entry.get("images"), entry.get("skipped"), entry.get("check")
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images) \
            or len(images) > key["count"]:
        raise DamagedCache(f'"images" is not a list of 1 to {key["count"]} image paths')
    if not isinstance(skipped, list) or not all(isinstance(s, dict) and isinstance(s.get("path"), str)
                                                and isinstance(s.get("reason"), str) for s in skipped):
        raise DamagedCache('"skipped" is not a list of {"path", "reason"} objects')
    if not isinstance(check, dict) or set(check) - {"held_out"} != {"crops", "cosine_mean", "cosine_min"} \
            or isinstance(check["crops"], bool) or not isinstance(check["crops"], int) \
            or not isinstance(check.get("held_out", False), bool):
        raise DamagedCache('"check" is not an accuracy check record')
    _number(check["cosine_mean"], "check cosine_mean"), _number(check["cosine_min"], "check cosine_min")
    held = entry.get("check_images", [])
    if not isinstance(held, list) or not all(isinstance(i, str) for i in held) or len(held) > MAX_CHECK_IMAGES \
            or set(held) & set(images) or bool(held) != check.get("held_out", False):
        raise DamagedCache('"check_images" is not a list of held-out image paths matching the check record')
    validate_ranges(entry.get("ranges"), key["method"], tensors)


def load(path: Path, key: dict, *, tensors=None, log: Callable[[str], None] | None = None) -> dict | None:
    """The cache entry at ``path`` if it exists, validates and was made for ``key``; None otherwise.

    ``tensors``: the names of the model's tensors (ranges of any other tensor are refused).  A file
    that does not validate is damaged: ``log`` gets a one-line note and None is returned, so the
    ranges are recomputed (never an error).
    """
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        _validate(entry, key, tensors)
    except (OSError, ValueError, RecursionError) as err:  # DamagedCache and JSON errors are ValueErrors
        reason = err.strerror if isinstance(err, OSError) and err.strerror else \
            ("JSON nested too deeply" if isinstance(err, RecursionError) else str(err))
        if log is not None:
            log(f"calibration: note: the calibration cache {path} is not usable ({reason}); recomputing the "
                "ranges from the crops")
        return None
    return entry


def save(path: Path, key: dict, ranges: dict, images: list[str], skipped: list[dict], check: dict,
         check_images: list[str] = ()) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the calibration cache directory {path.parent}: {err.strerror or err}") from None
    entry = {"format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "key_sha256": key_digest(key),
             "images": images, "skipped": skipped, "check": check, "check_images": list(check_images),
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "ranges": ranges}
    write_json_atomic(path, {**entry, "content_sha256": content_digest(entry)})


def ranges_file(entry: dict, directory: Path) -> Path:
    """Write an entry's ranges where ``quantize_static(calibration_cache_path=...)`` reads them."""
    fd, name = tempfile.mkstemp(dir=directory, prefix="ranges-", suffix=".json")
    with open(fd, "w") as f:
        json.dump(entry["ranges"], f)
    return Path(name)
