"""The manifest beside the exported files (DESIGN.md section 2): the contract between stages.

Written by ``export.to_onnx``; read by calibration and the runtime (no torch needed here).

``load_manifest`` trusts nothing in the file: the manifest is checked against its schema (the keys
and types the stages read), every path it names must stay inside the model directory, and the
files it lists are checked against their recorded sha256 (an in-process cache keyed by the file's
identity and modification time makes repeated loads of unchanged files free).  Each problem is one
:class:`~export.contract.errors.InputError` saying what was expected, what was found and what to do.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path, PurePosixPath, PureWindowsPath

from export.contract.config import ModelConfig
from export.contract.errors import InputError
from export.contract.files import sha256_file

MANIFEST_NAME = "manifest.json"
#: the model directory's own folders (written by `runtime build`): no output may land in them
CALIBRATION_CACHE_DIR = "calibration_cache"
MODEL_SUBDIRS = (CALIBRATION_CACHE_DIR,)
FORMAT = "nformer-trt/manifest"
FORMAT_VERSION = 1

#: the networks every export writes (``nformer_layers`` is optional: older exports lack it)
REQUIRED_FILES = ("encoder", "nformer")
#: what the runtime reads of ``manifest["model"]``; the other ModelConfig fields are checked when present
REQUIRED_MODEL_KEYS = ("feature_dim", "n_layer", "n_embd", "n_head", "topk", "landmarks", "input_size_hw",
                       "pixel_mean", "pixel_std")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REEXPORT = "re-run the export (python -m export.to_onnx CHECKPOINT --out-dir DIR)"


def io_spec(path: str | Path) -> dict:
    """Names, dtypes and shapes (symbolic dims by name) of an ONNX file's inputs and outputs."""
    import onnx

    proto = onnx.load(path, load_external_data=False)

    def spec(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
    return {"inputs": [spec(v) for v in proto.graph.input], "outputs": [spec(v) for v in proto.graph.output]}


# ---------------------------------------------------------------------------------------------------
# checksums, cached per file identity


_digests: dict[tuple, str] = {}
_digests_lock = threading.Lock()
_DIGESTS_MAX = 512


def _identity(st: os.stat_result, path: Path) -> tuple:
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_sha256(path: str | Path) -> str:
    """sha256 of ``path``; repeated calls on an unchanged file (same inode, size, mtime and ctime)
    return the digest computed before without reading the file again."""
    path = Path(path).resolve()
    before = os.stat(path)
    key = _identity(before, path)
    with _digests_lock:
        digest = _digests.get(key)
    if digest is not None:
        return digest
    digest = sha256_file(path)
    if _identity(os.stat(path), path) == key:   # not changed while it was read
        with _digests_lock:
            if len(_digests) >= _DIGESTS_MAX:
                _digests.clear()
            _digests[key] = digest
    return digest


def clear_checksum_cache() -> None:
    with _digests_lock:
        _digests.clear()


# ---------------------------------------------------------------------------------------------------
# the schema


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _fail(where: Path, key: str, expected: str, found) -> InputError:
    shown = repr(found)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return InputError(f"{where}: {key} must be {expected}, found {_type_name(found)} {shown}; the manifest is "
                      f"damaged or was edited: {_REEXPORT}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_sha(value, where: Path, key: str) -> None:
    if not (isinstance(value, str) and _SHA256.fullmatch(value)):
        raise _fail(where, key, "a sha256 digest (64 lowercase hex digits)", value)


def _check_model(model, where: Path) -> None:
    if not isinstance(model, dict):
        raise _fail(where, "model", "an object (the model configuration)", model)
    missing = [k for k in REQUIRED_MODEL_KEYS if k not in model]
    if missing:
        raise InputError(f"{where}: model lacks {', '.join(missing)}; expected every key of the model "
                         f"configuration: {_REEXPORT}")
    for key, value in model.items():
        k = f"model.{key}"
        if key == "arch":
            if not isinstance(value, str) or not value:
                raise _fail(where, k, "a non-empty string", value)
        elif key in ("widths", "input_size_hw"):
            n = 4 if key == "widths" else 2
            if not (isinstance(value, list) and len(value) == n and all(_is_int(v) and v >= 1 for v in value)):
                raise _fail(where, k, f"a list of {n} positive integers", value)
        elif key in ("pixel_mean", "pixel_std"):
            if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)
                    and (key == "pixel_mean" or all(v > 0 for v in value))):
                raise _fail(where, k, "a list of 3 finite numbers" + (" > 0" if key == "pixel_std" else ""), value)
        elif key in ModelConfig.__dataclass_fields__:
            least = 0 if key == "num_classes" else 1
            if not (_is_int(value) and value >= least):
                raise _fail(where, k, f"an integer >= {least}", value)
    _check_normalization(model["pixel_mean"], model["pixel_std"], where)
    try:
        ModelConfig.from_json(model)
    except (TypeError, ValueError) as err:
        raise InputError(f"{where}: model is not a valid model configuration ({err}): {_REEXPORT}") from None


def _check_normalization(mean: list, std: list, where: Path) -> None:
    """The preprocessing computes ``(pixel / 255 - mean) / std`` in float32: each mean must be a
    float32 number, each std a positive one, and the result finite for pixels 0..1 (a mean of 1e300
    or a std of 1e-300 passes as a finite JSON number and made every embedding NaN)."""
    import numpy as np

    largest = float(np.finfo(np.float32).max)
    with np.errstate(over="ignore", under="ignore"):
        mean32 = [float(np.float32(v)) for v in mean]
        std32 = [float(np.float32(v)) for v in std]
    if not all(math.isfinite(m) for m in mean32):
        raise _fail(where, "model.pixel_mean", f"a list of 3 numbers within float32's range (+-{largest:.3g})", mean)
    if not all(s > 0 for s in std32) or any(max(abs(m), abs(1.0 - m)) / s > largest for m, s in zip(mean32, std32)):
        raise _fail(where, "model.pixel_std", "a list of 3 numbers > 0 in float32, large enough that (pixel - "
                    "pixel_mean) / pixel_std stays within float32's range", std)


def _check_io(entry: dict, where: Path, key: str) -> None:
    for side in ("inputs", "outputs"):
        specs = entry.get(side)
        ok = isinstance(specs, list) and all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("dtype"), str)
            and isinstance(s.get("shape"), list) and all(isinstance(d, str) or _is_int(d) for d in s["shape"])
            for s in specs)
        if not ok:
            raise _fail(where, f"{key}.{side}", "a list of {name, dtype, shape} objects", specs)


def _check_entry(entry, where: Path, key: str, need_sha: bool) -> None:
    if not isinstance(entry, dict):
        raise _fail(where, key, "an object with a path and a sha256", entry)
    if not isinstance(entry.get("path"), str) or not entry["path"]:
        raise _fail(where, f"{key}.path", "a non-empty relative path (a string)", entry.get("path"))
    if need_sha or "sha256" in entry:
        _check_sha(entry.get("sha256"), where, f"{key}.sha256")
    for name in ("network", "precision", "record", "onnx"):
        if name in entry and not isinstance(entry[name], str):
            raise _fail(where, f"{key}.{name}", "a string", entry[name])


def validate_manifest(manifest, where: str | Path = MANIFEST_NAME) -> dict:
    """Check ``manifest`` against the schema (keys and types the stages read); returns it."""
    where = Path(where)
    if not isinstance(manifest, dict):
        raise _fail(where, "the manifest", "a JSON object", manifest)
    fmt, version = manifest.get("format"), manifest.get("format_version")
    if fmt != FORMAT or not _is_int(version) or version != FORMAT_VERSION:
        raise InputError(f"{where} has format {fmt!r} version {version!r}, expected {FORMAT!r} version "
                         f"{FORMAT_VERSION}; re-run the export with this version of nformer-trt")
    if "model" not in manifest:
        raise InputError(f"{where} has no model section: {_REEXPORT}")
    _check_model(manifest["model"], where)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _fail(where, "files", "an object mapping network names to {path, sha256}", files)
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise InputError(f"{where} lists no {' or '.join(missing)} file (files has {sorted(files)}): {_REEXPORT}")
    for name, entry in files.items():
        _check_entry(entry, where, f"files.{name}", need_sha=True)
        _check_io(entry, where, f"files.{name}")
    if "source" in manifest:
        source = manifest["source"]
        if not isinstance(source, dict):
            raise _fail(where, "source", "an object {checkpoint, sha256}", source)
        if "sha256" in source:
            _check_sha(source["sha256"], where, "source.sha256")
    if "variants" in manifest:
        variants = manifest["variants"]
        if not isinstance(variants, dict):
            raise _fail(where, "variants", "an object mapping names to {network, precision, path, sha256}", variants)
        for name, entry in variants.items():
            _check_entry(entry, where, f"variants.{name}", need_sha=True)
            for key in ("network", "precision"):
                if not isinstance(entry.get(key), str):
                    raise _fail(where, f"variants.{name}.{key}", "a string", entry.get(key))
    if "engines" in manifest:
        for key, entry in _engine_entries(manifest["engines"], where):
            _check_entry(entry, where, key, need_sha=False)
    _check_interfaces(manifest, where)
    return manifest


def network_interface(model: dict, network: str) -> dict[str, dict[str, tuple[str, list]]] | None:
    """What ``network``'s file must take and give for the model configuration ``model``:
    ``{"inputs"|"outputs": {name: (dtype, shape)}}``, a dimension None where it is dynamic; None for
    a network this contract does not describe."""
    h, w = model["input_size_hw"]
    c, n_layer = model["n_embd"], model["n_layer"]
    refine_in = {"features": ("float32", [1, None, c]), "landmarks": ("int64", [n_layer, None])}
    refine_out = {"refined": ("float32", [1, None, c])}
    return {
        "encoder": {"inputs": {"images": ("float32", [None, 3, h, w])},
                    "outputs": {"embeddings": ("float32", [None, model["feature_dim"]])}},
        "nformer": {"inputs": refine_in, "outputs": refine_out},
        "nformer_layers": {"inputs": {**refine_in, "neighbor_index": ("int32", [1, None, None]),
                                      "neighbor_valid": ("int32", [1, None, None])}, "outputs": refine_out},
    }.get(network)


def interface_mismatch(want: dict, found: dict) -> str | None:
    """How ``found`` (``{"inputs"|"outputs": {name: (dtype, shape)}}``, dims int or a symbol) differs
    from :func:`network_interface`'s ``want``, or None."""
    for side in ("inputs", "outputs"):
        if set(found[side]) != set(want[side]):
            return f"{side} {sorted(found[side])}, expected {sorted(want[side])}"
        for name, (dtype, shape) in want[side].items():
            got_dtype, got_shape = found[side][name]
            if got_dtype != dtype or len(got_shape) != len(shape) or any(
                    d is not None and g != d for g, d in zip(got_shape, shape)):
                return (f"{side[:-1]} {name} is {got_dtype} [{', '.join(map(str, got_shape))}], expected {dtype} "
                        f"[{', '.join('*' if d is None else str(d) for d in shape)}]")
    return None


def _check_interfaces(manifest: dict, where: Path) -> None:
    """The files' recorded inputs and outputs, and the custom op's k, must be those the model
    configuration implies (an edited ``model`` section otherwise feeds the files shapes they were
    not made for, or -- topk -- silently computes other lists on one path than on the other)."""
    model = manifest["model"]
    for name, entry in manifest["files"].items():
        want = network_interface(model, name)
        if want is None:
            continue
        found = {side: {s["name"]: (s["dtype"], s["shape"]) for s in entry[side]} for side in ("inputs", "outputs")}
        problem = interface_mismatch(want, found)
        if problem:
            raise InputError(f"{where}: files.{name} records {problem} for the model section's configuration "
                             f"(input_size_hw {model['input_size_hw']}, feature_dim {model['feature_dim']}, n_embd "
                             f"{model['n_embd']}, n_layer {model['n_layer']}): the manifest was edited; {_REEXPORT}")
    for op in manifest.get("custom_ops") or []:
        k = op.get("attributes", {}).get("k") if isinstance(op, dict) and isinstance(op.get("attributes"), dict) else None
        if k is not None and k != model["topk"]:
            raise InputError(f"{where}: the custom op {op.get('op_type')} was exported with k = {k!r} but the model "
                             f"section says topk = {model['topk']}: the manifest was edited; {_REEXPORT}")


def _engine_entries(engines, where: Path) -> list[tuple[str, dict]]:
    """(key, entry) pairs of the engines section: an object keyed ``"<network>.<precision>"`` whose
    entries are objects, as ``runtime build`` writes it (runtime.tensorrt.backend checks the rest)."""
    if engines is None:
        return []
    if not isinstance(engines, dict):
        raise _fail(where, "engines", 'an object keyed "<network>.<precision>" (as `runtime build` writes it)',
                    engines)
    return [(f"engines.{name}", entry) for name, entry in engines.items()]


# ---------------------------------------------------------------------------------------------------
# paths


def resolve_in_model_dir(model_dir: str | Path, relative, where: str | Path = MANIFEST_NAME, key: str = "path",
                         verified: bool = False) -> Path:
    """``model_dir / relative`` for a path read from the manifest, refused unless it stays inside
    ``model_dir``: no absolute path, no ``..``, and no symlink leading out of it, except (``verified``)
    a symlinked file whose contents the caller checks against a recorded sha256."""
    model_dir = Path(model_dir)
    text = str(relative)
    posix, windows = PurePosixPath(text), PureWindowsPath(text)
    if not text or "\x00" in text or posix.is_absolute() or windows.is_absolute() or windows.drive \
            or ".." in posix.parts or ".." in windows.parts or text in (".", "./"):
        raise InputError(f"{where}: {key} is {text!r}, expected a path relative to the model directory {model_dir} "
                         f"with no '..' (the manifest must not name files elsewhere); {_REEXPORT}")
    path = model_dir / posix
    root = model_dir.resolve()
    # the folders on the way must not lead out of the model directory, whatever the final file is
    if not _inside(path.parent.resolve(), root):
        raise InputError(f"{where}: {key} {text!r} leads out of the model directory {model_dir} (through a "
                         f"symbolic link, to {path.parent.resolve()}); {_REEXPORT} or remove the link")
    if not verified and path.is_symlink() and not _inside(path.resolve(), root):
        raise InputError(f"{where}: {key} {text!r} is a symbolic link out of the model directory {model_dir} "
                         f"(to {path.resolve()}); copy the file into the model directory or {_REEXPORT}")
    return path


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _listed_paths(manifest: dict | None) -> list[str]:
    if not isinstance(manifest, dict):
        return []
    paths = []
    for section in ("files", "variants"):
        entries = manifest.get(section)
        paths += [e["path"] for e in (entries.values() if isinstance(entries, dict) else ())
                  if isinstance(e, dict) and isinstance(e.get("path"), str)]
    engines = manifest.get("engines")
    for entry in engines.values() if isinstance(engines, dict) else ():
        if isinstance(entry, dict):
            paths += [entry[k] for k in ("path", "record") if isinstance(entry.get(k), str)]
    return paths


def refuse_model_file(path: str | Path, model_dir: str | Path, manifest: dict | None = None,
                      what: str = "the output") -> None:
    """InputError when writing ``path`` would replace a file of the model directory: its manifest, a
    file the manifest lists, any other file directly in it (build records), or anything in its own
    folders (``MODEL_SUBDIRS``: the calibration cache).
    Writes rename a new file over the name, so a name is compared by its folder's real location:
    a symbolic link to the model directory is caught, a link that merely points at a model file is
    replaced itself and leaves the model alone."""
    path, model_dir = Path(path), Path(model_dir)
    protected = [model_dir / MANIFEST_NAME, *(model_dir / p for p in _listed_paths(manifest))]
    try:
        protected += [p for p in model_dir.iterdir() if p.is_file()]
    except OSError:
        pass

    def where(p: Path) -> Path:
        return p.parent.resolve() / p.name
    target = where(path)
    for sub in MODEL_SUBDIRS:
        folder = (model_dir / sub).resolve()
        if target.parent == folder or folder in target.parent.parents:
            raise InputError(f"{what} {path} would be written into {sub}/ of the model directory {model_dir}, "
                             "which `runtime build` keeps; write it somewhere else")
    for file in protected:
        if where(file) == target:
            raise InputError(f"{what} {path} would replace {file.name}, a file of the model directory {model_dir}; "
                             "write it somewhere else (the model directory's files are the export's)")


# ---------------------------------------------------------------------------------------------------
# loading


def load_manifest(model_dir: str | Path, verify_checksums: bool = True) -> dict:
    """Read ``model_dir/manifest.json``, validate it (:func:`validate_manifest`), confine its paths
    to ``model_dir`` and check the files it lists: they must exist and (``verify_checksums``, the
    default) match their sha256.  Precision variants whose file is missing or no longer matches its
    checksum (a calibration interrupted between writing the file and the manifest) are left out of
    the returned manifest: ``runtime build`` writes them again."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"no {MANIFEST_NAME} in {model_dir}: expected a directory written by "
                         "`python -m export.to_onnx CHECKPOINT --out-dir DIR`")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:     # RecursionError: arrays nested 100,000 deep
        raise InputError(f"cannot read {path}: {err}; {_REEXPORT}") from None
    validate_manifest(manifest, path)
    for name, entry in manifest["files"].items():
        file = resolve_in_model_dir(model_dir, entry["path"], path, f"files.{name}.path", verified=verify_checksums)
        if not file.is_file():
            raise InputError(f"{name} file {file} named in {path} is missing; {_REEXPORT}")
        if verify_checksums:
            _verify(file, entry["sha256"], path, f"the {name} file")
    stale = []
    for name, entry in manifest.get("variants", {}).items():
        file = resolve_in_model_dir(model_dir, entry["path"], path, f"variants.{name}.path",
                                    verified=verify_checksums)
        if not file.is_file() or (verify_checksums and _digest(file, path) != entry["sha256"]):
            stale.append(name)
    for name in stale:
        del manifest["variants"][name]
    for key, entry in _engine_entries(manifest.get("engines"), path):
        # engine files are checked against their build record when used (runtime.tensorrt.build.check_engine)
        resolve_in_model_dir(model_dir, entry["path"], path, f"{key}.path")
        if isinstance(entry.get("record"), str):
            resolve_in_model_dir(model_dir, entry["record"], path, f"{key}.record")
    return manifest


def _digest(file: Path, where: Path) -> str:
    try:
        return file_sha256(file)
    except OSError as err:
        raise InputError(f"cannot read {file} named in {where}: {err.strerror or err}; check its permissions "
                         f"or {_REEXPORT}") from None


def _verify(file: Path, expected: str, where: Path, what: str) -> None:
    found = _digest(file, where)
    if found != expected:
        raise InputError(f"{what} {file} does not match the checksum in {where} (sha256 {found[:12]}..., the "
                         f"manifest records {expected[:12]}...): it was replaced, truncated or changed after the "
                         f"export, or an export was interrupted; {_REEXPORT}")


def model_config(manifest: dict) -> ModelConfig:
    return ModelConfig.from_json(manifest["model"])
