"""Open-set thresholds stored with a model: ``open_set.json`` beside its manifest.

Place in the flow: written by ``runtime threshold`` (``runtime.evaluation.threshold`` fits them on
labelled data), read by ``runtime serve``.  A query whose nearest gallery item lies farther than
the threshold of its ranking mode is "unknown".  The file records the sha256 of the encoder it was
fitted with, so a threshold never silently applies to another model's embedding space, the
precision that encoder ran at (``encoder_precision``: serving at another one is said, not refused,
as for galleries), and a checksum of its own contents.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from export.contract.errors import InputError
from export.contract.files import write_json_atomic
from export.contract.variants import PRECISIONS

MODES = ("refined", "encoder")
OPEN_SET_FILE = "open_set.json"
OPEN_SET_FORMAT = "nformer-trt/open-set"
OPEN_SET_VERSION = 1

log = logging.getLogger(__name__)


def open_set_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / OPEN_SET_FILE


def _digest(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_thresholds(model_dir: str | Path, manifest: dict, record: dict) -> Path:
    """Write ``record`` (``thresholds`` per mode, ``far``, TAR table, data set) as the model's
    open-set file, atomically."""
    data = {"format": OPEN_SET_FORMAT, "format_version": OPEN_SET_VERSION,
            "encoder_sha256": manifest["files"]["encoder"]["sha256"], **record}
    data["content_sha256"] = _digest(data)
    path = open_set_path(model_dir)
    write_json_atomic(path, data)
    return path


def load_thresholds(model_dir: str | Path, manifest: dict, encoder_precision: str | None = None) -> dict | None:
    """``{"refined": distance, "encoder": distance}`` stored for this model, or None when it has
    none.  InputError when the file is damaged, edited, or was fitted with another encoder.
    ``encoder_precision``: the precision the embeddings will come from; a threshold fitted at
    another one is used with a warning (logged): INT8 or FP16
    embeddings sit a little apart from fp32 ones, so the false-accept rate drifts from the fitted one."""
    path = open_set_path(model_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise InputError(f"cannot read {path}: {err}; re-run `runtime threshold` or delete it") from None
    if not isinstance(data, dict) or data.get("format") != OPEN_SET_FORMAT \
            or data.get("format_version") != OPEN_SET_VERSION:
        raise InputError(f"{path} is not an open-set file of this version ({OPEN_SET_FORMAT} "
                         f"{OPEN_SET_VERSION}); re-run `runtime threshold`")
    if data.get("content_sha256") != _digest(data):
        raise InputError(f"{path} does not match its checksum (content_sha256): it was edited or is damaged; "
                         "re-run `runtime threshold`, or pass --unknown-distance")
    expected = manifest["files"]["encoder"].get("sha256")
    if data.get("encoder_sha256") != expected:
        raise InputError(f"{path} was fitted with another encoder (sha256 {str(data.get('encoder_sha256'))[:12]}..., "
                         f"this model's {str(expected)[:12]}...); re-run `runtime threshold` for this model")
    thresholds = data.get("thresholds")
    if not (isinstance(thresholds, dict) and set(thresholds) == set(MODES)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and -1e-12 <= v <= 2
                    for v in thresholds.values())):
        raise InputError(f"{path}: thresholds must map {' and '.join(MODES)} to distances in 0..2 (between unit "
                         "vectors; just below 0 where the fit accepts no pair); re-run `runtime threshold`")
    fitted = data.get("encoder_precision")              # absent in files written before it was recorded
    if fitted is not None and fitted not in PRECISIONS:
        raise InputError(f"{path}: encoder_precision must be one of {', '.join(PRECISIONS)}, found {fitted!r}; "
                         "re-run `runtime threshold`")
    if encoder_precision and fitted and fitted != encoder_precision:
        log.warning("%s was fitted with the %s encoder; the embeddings now come from the %s one, so its "
                    "false-accept rate (%s) may drift: re-run `runtime threshold --precision %s` for an exact fit",
                    path, fitted, encoder_precision, data.get("far"), encoder_precision)
    return {m: float(thresholds[m]) for m in MODES}
