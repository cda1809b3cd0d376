"""Serving exports: a Triton model repository and a DeepStream nvinfer config from a model directory.

Place in the flow: the last hop, from the exported files (manifest, ONNX, engines) to the
serving systems a video-analytics deployment runs.  Both read only the manifest and the files it
names; nothing here needs TensorRT, Triton or DeepStream to be installed.

* ``write_triton_repository(build/, OUT/)``: ``nformer_encoder`` (images -> embeddings, dynamic
  batching) and ``nformer_refine`` (the whole set of features -> refined, no batching: a request
  is one set), each with its ``config.pbtxt`` and model file (ONNX for Triton's ONNX Runtime
  backend, or a TensorRT plan where the manifest lists an engine and ``engines=True``).  A plan is
  chosen, per network and in the runtime's precision preference, only when ``check_engine`` accepts
  it for the **Triton server's** TensorRT version (``tensorrt_version``; default: the TensorRT that
  imports here, else a refusal asking for it), this machine's GPU and plugin library, and (encoder)
  when its optimisation profile covers batches 1 to ``max_batch``; otherwise an InputError says why.
* ``write_deepstream_config(build/, OUT.txt)``: a secondary-GIE nvinfer config for the encoder that
  attaches the raw ``embeddings`` tensor to each object (``output-tensor-meta``).  nvinfer's
  preprocessing is ``net-scale-factor * (x - offsets[c])``: one scale for all channels, while the
  model wants ``(x / 255 - mean[c]) / std[c]``.  So the config sits next to ``OUT.encoder.onnx``,
  the encoder with the per-channel ratio ``std[0] / std[c]`` folded in as a first Mul: offsets and
  the single scale then reproduce the original's normalisation exactly (up to DeepStream's own
  resize, which is not PIL's).

Files are written with ``export.contract.files`` (atomic, umask-following; the Triton repository is
assembled in a flocked ``work_dir`` folder, whose leftovers a later run sweeps, and published by one rename); the plugin library is found by
``plugins.plugin_library_path()``.  Triton and DeepStream only dlopen plugin libraries, so what they load
is ``plugins.autoreg_library_path()`` (``libnformer_plugins_autoreg.so``, which registers the plugin's
creator when it is loaded): the repository holds a copy and its README gives the ``tritonserver`` command
lines (``--backend-config=tensorrt,plugins=<it>`` or ``LD_PRELOAD=<it>``); ``custom-lib-path`` names it.

Not verified here: no Triton server or DeepStream runs on this project's machines.  Tests parse
the configs (Triton's model_config protobuf; the key-file syntax) and check the files they name.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
from pathlib import Path

import numpy as np

import plugins
from export.contract.errors import InputError
from export.contract.files import (copy_file_atomic, dir_lock, sha256_file, staged_files, work_dir,
                                   write_text_atomic)
from export.contract.manifest import load_manifest, model_config, refuse_model_file
from export.contract.variants import CPU_PRECISIONS, VARIANTS_KEY, variant_name

ENCODER_MODEL = "nformer_encoder"
REFINE_MODEL = "nformer_refine"
REPOSITORY_RECORD = "nformer_repository.json"
INSTANCE_KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
#: encoder files a repository of ONNX models can serve (TensorRT precisions come as engines)
TRITON_ENCODER_PRECISIONS = ("fp32", *CPU_PRECISIONS)
#: Triton's model_config.proto: max_batch_size, preferred_batch_size and an instance group's count are
#: int32, max_queue_delay_microseconds is uint64; nvinfer reads its integer keys as gint (int32)
INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                 "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}


def _io(manifest: dict, network: str) -> tuple[list[dict], list[dict]]:
    entry = manifest["files"][network]
    return entry["inputs"], entry["outputs"]


def _dims(shape, drop_batch: bool) -> list[int]:
    dims = shape[1:] if drop_batch else shape
    return [d if isinstance(d, int) and d > 0 else -1 for d in dims]


def _tensor_block(kind: str, specs: list[dict], drop_batch: bool, overrides: dict | None = None) -> str:
    lines = [f"{kind} ["]
    for t, spec in enumerate(specs):
        dims = (overrides or {}).get(spec["name"]) or _dims(spec["shape"], drop_batch)
        dtype = _TRITON_TYPES.get(spec["dtype"])
        if dtype is None:
            raise InputError(f"tensor {spec['name']} has dtype {spec['dtype']}, which has no Triton type here")
        lines += ["  {", f'    name: "{spec["name"]}"', f"    data_type: {dtype}",
                  f"    dims: [ {', '.join(map(str, dims))} ]", "  }" + ("," if t < len(specs) - 1 else "")]
    lines.append("]")
    return "\n".join(lines)


def _check_int(name: str, value, low: int, high: int, why: str) -> int:
    """``value`` if it is an integer in [low, high] (what the serving system's parser accepts)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or not low <= value <= high:
        raise InputError(f"{name} must be an integer from {low} to {high} ({why}), found {value!r}")
    return int(value)


def triton_configs(manifest: dict, max_batch: int = 32, max_queue_delay_us: int = 2000, instance_kind: str = "auto",
                   instance_count: int = 1, platforms: dict | None = None) -> dict[str, str]:
    """``{model name: config.pbtxt text}`` for the encoder and the refinement."""
    _check_int("max_batch", max_batch, 1, INT32_MAX, "Triton's max_batch_size is an int32")
    _check_int("instance_count", instance_count, 1, INT32_MAX, "Triton's instance_group count is an int32")
    _check_int("max_queue_delay_us", max_queue_delay_us, 0, UINT64_MAX,
               "Triton's max_queue_delay_microseconds is a uint64")
    if instance_kind not in INSTANCE_KINDS:
        raise InputError(f"instance kind must be one of {', '.join(INSTANCE_KINDS)}, found {instance_kind!r}")
    platforms = platforms or {}
    c = model_config(manifest)
    preferred = sorted({b for b in (max_batch // 4, max_batch // 2, max_batch) if b >= 1})
    head = "# written by `runtime triton-repo` from the manifest of an nformer-trt export\n"
    group = (f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {INSTANCE_KINDS[instance_kind]}\n"
             "  }\n]")
    enc_in, enc_out = _io(manifest, "encoder")
    encoder = "\n".join([
        head + f'name: "{ENCODER_MODEL}"',
        f'platform: "{platforms.get("encoder", "onnxruntime_onnx")}"',
        f"max_batch_size: {max_batch}",
        _tensor_block("input", enc_in, True, {"images": [3, *c.input_size_hw]}),
        _tensor_block("output", enc_out, True, {"embeddings": [c.feature_dim]}),
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        group, ""])
    ref_in, ref_out = _io(manifest, "nformer")
    refine = "\n".join([
        head + "# one request = one whole set (query and gallery together); N is dynamic",
        f'name: "{REFINE_MODEL}"',
        f'platform: "{platforms.get("nformer", "onnxruntime_onnx")}"',
        "max_batch_size: 0",
        _tensor_block("input", ref_in, False, {"features": [1, -1, c.n_embd], "landmarks": [c.n_layer, -1]}),
        _tensor_block("output", ref_out, False, {"refined": [1, -1, c.n_embd]}),
        group, ""])
    return {ENCODER_MODEL: encoder, REFINE_MODEL: refine}


def triton_tensorrt_version(tensorrt_version: str | None) -> str:
    """The Triton server's TensorRT version (``major.minor.patch``): ``tensorrt_version`` when given,
    else the TensorRT that imports here; InputError asking for it otherwise."""
    if tensorrt_version is None:
        from runtime.tensorrt.lib import EngineUnusable, import_tensorrt

        try:
            tensorrt_version = str(import_tensorrt().__version__)
        except EngineUnusable:
            raise InputError("--engines: an engine runs only in the TensorRT version that built it, and TensorRT does "
                             "not import here to tell which version the Triton server runs; pass the server's "
                             "TensorRT version with --tensorrt-version (e.g. 10.13.0; it is in the release notes of "
                             "the Triton container)") from None
    parts = str(tensorrt_version).strip().split(".")
    if len(parts) < 3 or not all(p.isdigit() for p in parts[:3]):
        raise InputError(f"--tensorrt-version must be the full TensorRT version major.minor.patch (e.g. 10.13.0), "
                         f"got {tensorrt_version!r}")
    return ".".join(parts)


def _batch_problem(record: dict, max_batch: int) -> str | None:
    """Why the encoder engine's profile does not serve batches 1..max_batch, or None."""
    profiles = record.get("profiles") or {}
    if not profiles:
        return "its build record names no optimisation profile"
    for name, ranges in profiles.items():
        lo, hi = ranges["min"][0], ranges["max"][0]
        if hi < max_batch or lo > 1:
            return (f"its profile accepts {name} batches {lo} to {hi}, but Triton's dynamic batching sends 1 to "
                    f"--max-batch {max_batch}: pass --max-batch {hi} or lower, or rebuild the engine with "
                    f"`runtime build ... --min-batch 1 --max-batch {max_batch}`")
    return None


def choose_triton_engines(model_dir: Path, manifest: dict, max_batch: int, tensorrt_version: str | None) -> dict:
    """``{network: {"entry", "path", "record"}}`` for each network with a listed engine that the
    Triton server can run (see the module docstring); InputError naming every engine's problem when
    a network has engines but none passes.  InputError when the manifest lists none."""
    from runtime.tensorrt import build as engine_build
    from runtime.tensorrt.backend import PRECISION_PREFERENCE, listed_engines
    from runtime.tensorrt.lib import EngineUnusable

    listed = listed_engines(manifest)
    if not any(e["network"] in ("encoder", "nformer") for e in listed):
        raise InputError(f"--engines: the manifest in {model_dir} lists no TensorRT engines; build them first "
                         "or leave out --engines")
    version = triton_tensorrt_version(tensorrt_version)
    running = {"tensorrt": version, "gpu": engine_build.gpu_facts(),
               "plugin_library": engine_build.plugin_library_facts()}
    rank = {p: i for i, p in enumerate(PRECISION_PREFERENCE)}
    chosen = {}
    for network in ("encoder", "nformer"):
        candidates = sorted((e for e in listed if e["network"] == network),
                            key=lambda e: rank.get(e["precision"], len(rank)))
        problems = []
        for entry in candidates:
            path = model_dir / entry["path"]
            if not path.is_file():
                problems.append(f"{entry['path']}: listed in the manifest but missing")
                continue
            try:
                record = engine_build.check_engine(path, running, model_dir=model_dir)
            except EngineUnusable as err:
                problems.append(f"{entry['path']}: {err}")
                continue
            problem = _batch_problem(record, max_batch) if network == "encoder" else None
            if problem:
                problems.append(f"{entry['path']}: {problem}")
                continue
            chosen[network] = {"entry": entry, "path": path, "record": record, "tensorrt": version,
                               "passed_over": problems}
            break
        if candidates and network not in chosen:
            raise InputError(f"--engines: no {network} engine can be served by a Triton server with TensorRT {version} "
                             f"on this machine's GPU: " + "; ".join(problems))
    return chosen


def _triton_plugin_library(plan: dict, out_dir: Path) -> dict:
    """What the repository records about the plugin library Triton loads for the refinement plan
    (``plugins.autoreg_library_path()``, copied to the repository's top level, which Triton does not
    read as a model): where it came from, its sha256, the TensorRT major version it links (checked
    against the server's), and the exact ``tritonserver`` command lines that load it."""
    lib = plugins.autoreg_library_path(required=True)
    server = plan["tensorrt"]
    major = plugins.linked_tensorrt_major(lib)
    if major is not None and str(major) != server.split(".")[0]:
        raise InputError(f"{lib} links libnvinfer.so.{major} (TensorRT {major}), but the Triton server runs TensorRT "
                         f"{server}: it would not load there. Rebuild the plugins against the server's TensorRT "
                         f"(-DTENSORRT_NVINFER_LIBRARY=/path/to/libnvinfer.so.{server.split('.')[0]})")
    repo = out_dir.resolve()
    inside = repo / plugins.AUTOREG_LIBRARY
    commands = []
    if ";" not in str(inside):  # the backend splits plugins= at ';'
        commands.append(f"tritonserver --model-repository={shlex.quote(str(repo))} "
                        f"--backend-config=tensorrt,plugins={shlex.quote(str(inside))}")
    if not any(ch.isspace() or ch == ":" for ch in str(inside)):  # LD_PRELOAD splits at spaces and colons
        commands.append(f"LD_PRELOAD={shlex.quote(str(inside))} "
                        f"tritonserver --model-repository={shlex.quote(str(repo))}")
    if not commands:
        raise InputError(f"{repo}: a path with ';' and a space or ':' cannot name a plugin library on Triton's command "
                         "line; choose another directory for the model repository")
    return {"file": plugins.AUTOREG_LIBRARY, "from": str(lib), "sha256": sha256_file(lib),
            "links_tensorrt_major": major, "tritonserver": commands,
            "container": (f"docker run --gpus all --rm -v {shlex.quote(str(repo))}:/models "
                          "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models "
                          f"--backend-config=tensorrt,plugins=/models/{plugins.AUTOREG_LIBRARY}")}


def write_triton_repository(model_dir: str | Path, out_dir: str | Path, max_batch: int = 32,
                            max_queue_delay_us: int = 2000, instance_kind: str = "auto", instance_count: int = 1,
                            engines: bool = False, overwrite: bool = False,
                            tensorrt_version: str | None = None, encoder_precision: str = "fp32") -> dict:
    """Write the repository into ``out_dir`` (published only when complete).  Returns its record.

    ``engines``: serve TensorRT plans (:func:`choose_triton_engines`); ``tensorrt_version``: the
    Triton server's TensorRT version (default: the one that imports here; required otherwise);
    ``encoder_precision``: "fp32" (``encoder.onnx``) or "int8-cpu" (``encoder.int8-cpu.onnx`` from
    ``runtime build --precision int8-cpu``, for CPU instances of Triton's ONNX Runtime backend)."""
    # absolute as the kernel resolves it ("a/link/../x" goes through the link), the last component left
    # as given ("." has no parent to work in; a symlinked OUT is refused below)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir = out_dir.resolve() if out_dir.name in ("", ".", "..") else out_dir.parent.resolve() / out_dir.name
    if tensorrt_version is not None and not engines:     # it would be ignored: the repository serves ONNX files
        raise InputError(f"--tensorrt-version {tensorrt_version} applies to --engines only (the TensorRT version the "
                         "engines must match); without --engines the repository serves ONNX files: drop the option "
                         "or add --engines")
    if encoder_precision not in TRITON_ENCODER_PRECISIONS:
        raise InputError(f"encoder precision must be one of {', '.join(TRITON_ENCODER_PRECISIONS)}, found "
                         f"{encoder_precision!r} (TensorRT precisions come from engines: --engines)")
    manifest = load_manifest(model_dir)
    sources = {"encoder": model_dir / manifest["files"]["encoder"]["path"],
               "nformer": model_dir / manifest["files"]["nformer"]["path"]}
    if encoder_precision in CPU_PRECISIONS:
        if engines:
            raise InputError(f"--encoder-precision {encoder_precision} is an ONNX Runtime file for x86 CPUs and "
                             "--engines serves TensorRT plans: choose one")
        if instance_kind != "cpu":   # "auto" lets a server with a GPU place it there
            raise InputError(f"--encoder-precision {encoder_precision} is for CPU instances (ONNX Runtime's x86 "
                             f"integer kernels), found --instance-kind {instance_kind}: pass --instance-kind cpu, or "
                             "serve the fp32 file or an INT8 engine on a GPU")
        entry = manifest.get(VARIANTS_KEY, {}).get(variant_name("encoder", encoder_precision))
        if entry is None:
            raise InputError(f"{model_dir} lists no {variant_name('encoder', encoder_precision)} file (or it no longer "
                             f"matches its checksum); write it with `runtime build {model_dir} --precision "
                             f"{encoder_precision} --calib-data DIR`")
        sources["encoder"] = model_dir / entry["path"]
    platforms = {}
    plans = {}
    if engines:
        plans = choose_triton_engines(model_dir, manifest, max_batch, tensorrt_version)
        for network, plan in plans.items():
            sources[network] = plan["path"]
            platforms[network] = "tensorrt_plan"
    # the refinement plan holds the plugin: Triton must load the library that registers it when dlopen'ed
    autoreg = _triton_plugin_library(plans["nformer"], out_dir) if "nformer" in plans else None
    configs = triton_configs(manifest, max_batch, max_queue_delay_us, instance_kind, instance_count, platforms)
    _check_repository_target(out_dir, overwrite, model_dir)
    with contextlib.ExitStack() as stack:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            # a flocked work folder: a later run sweeps the leftovers of a killed one (SIGKILL), never a running one's
            work = stack.enter_context(work_dir(out_dir.parent, f".{out_dir.name}.tmp-")) / "repository"
            work.mkdir()
        except OSError as err:
            raise InputError(f"cannot write next to {out_dir}: {err.strerror or err}") from None
        record = {"source": str(model_dir.resolve()), "manifest_sha256": sha256_file(model_dir / "manifest.json"),
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "models": {}}
        for network, name in (("encoder", ENCODER_MODEL), ("nformer", REFINE_MODEL)):
            plan = platforms.get(network) == "tensorrt_plan"
            folder = work / name / "1"
            folder.mkdir(parents=True)
            target = folder / ("model.plan" if plan else "model.onnx")
            copy_file_atomic(sources[network], target)
            write_text_atomic(work / name / "config.pbtxt", configs[name])
            record["models"][name] = {"config": f"{name}/config.pbtxt", "file": str(target.relative_to(work)),
                                      "from": sources[network].name}
            if network == "encoder" and not plan:
                record["models"][name]["precision"] = encoder_precision
            if plan:
                chosen = plans[network]
                record["models"][name]["engine"] = {
                    "precision": chosen["entry"]["precision"], "tensorrt": chosen["record"]["tensorrt"]["version"],
                    "server_tensorrt": chosen["tensorrt"], "gpu": chosen["record"].get("gpu"),
                    "profiles": chosen["record"].get("profiles"), "passed_over": chosen["passed_over"]}
        if autoreg is not None:
            copy_file_atomic(autoreg["from"], work / plugins.AUTOREG_LIBRARY)
            record["plugin_library"] = autoreg
        write_text_atomic(work / "README.md", _triton_readme(record, platforms, model_config(manifest)))
        write_text_atomic(work / REPOSITORY_RECORD, json.dumps(record, indent=1) + "\n")
        # publish under a lock on the parent: a concurrent run into the same OUT_DIR waits, then finds it
        # taken (or, with --overwrite, replaces it whole); the old repository moves into the work folder
        # first (one rename), so nothing is half-deleted whatever its permissions
        with dir_lock(out_dir.parent):
            _check_repository_target(out_dir, overwrite, model_dir)
            previous, moved = work.parent / "previous", False
            try:
                if out_dir.exists():
                    out_dir.rename(previous)
                    moved = True
                work.rename(out_dir)
            except OSError as err:
                if moved:                      # put the old one back before the work folder is removed
                    with contextlib.suppress(OSError):
                        previous.rename(out_dir)
                raise InputError(f"cannot publish the repository at {out_dir}: {err.strerror or err}; the previous "
                                 "one, if any, is unchanged") from None
    return {**record, "path": str(out_dir)}


def _check_repository_target(out_dir: Path, overwrite: bool, model_dir: Path | None = None) -> None:
    if model_dir is not None:
        real_out, real_model = out_dir.resolve(), model_dir.resolve()
        if real_model == real_out or real_out in real_model.parents:
            raise InputError(f"the repository {out_dir} is the model directory {model_dir} or holds it: writing (or "
                             "--overwrite replacing) the repository would remove the model's files; choose another "
                             "OUT_DIR")
    here = Path(os.path.abspath(os.getcwd()))
    if out_dir == here or out_dir in here.parents:
        raise InputError(f"{out_dir} is the current directory (or holds it): the repository is published by renaming "
                         "a new folder into place, which would leave this shell in a removed folder; give a new "
                         "directory such as ./triton_models")
    if out_dir.is_symlink():
        raise InputError(f"{out_dir} is a symbolic link; give the directory it points to (the repository is published "
                         "by renaming a folder into place, which would replace the link, not its target)")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; choose a directory for the model repository")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(f"{out_dir} is not empty; choose a new directory or pass --overwrite")
        if not (out_dir / REPOSITORY_RECORD).is_file():
            raise InputError(f"{out_dir} is not empty and was not written by `runtime triton-repo` (no "
                             f"{REPOSITORY_RECORD}); refusing to overwrite it")


def _triton_readme(record: dict, platforms: dict, config) -> str:
    serve = "Serve with `tritonserver --model-repository=<this directory>`.\n"
    plugin = ""
    lib = record.get("plugin_library")
    if lib:
        # Triton's TensorRT backend only dlopens the libraries of its plugins= option (and LD_PRELOAD loads
        # before it): libnformer_plugins.so registers nothing that way, the autoreg library does at load time.
        serve = ""
        major = f"libnvinfer.so.{lib['links_tensorrt_major']}" if lib["links_tensorrt_major"] else "libnvinfer"
        plugin = ("## Loading the plugin\n\n"
                  f"The `{REFINE_MODEL}` plan calls the TensorRT plugin `ReciprocalNeighbors`. Triton only dlopens "
                  f"plugin libraries, so the repository holds `{lib['file']}` (copied from `{lib['from']}`, sha256 "
                  f"`{lib['sha256'][:16]}...`), which registers the plugin with TensorRT when it is loaded. Start "
                  "the server with exactly one of:\n\n"
                  + "".join(f"    {c}\n" for c in lib["tritonserver"])
                  + "\nIn a container, mount this directory and name the library inside it (the image's TensorRT "
                  "must be the version the plans were built with):\n\n"
                  f"    {lib['container']}\n\n"
                  f"The library links {major}, the server's TensorRT, and loads only beside that major version. "
                  "Do not pass `libnformer_plugins.so` instead (it registers its plugin only through TensorRT's "
                  "loadLibrary, which Triton does not call), nor both (the second registration is refused and "
                  "logged). Without the plugin, `nformer_refine` fails to load. Not verified: no Triton server runs "
                  "on this project's machines.\n")
    return (f"# NFormer model repository\n\nWritten by `runtime triton-repo` from `{record['source']}`.\n\n"
            f"- `{ENCODER_MODEL}`: `images` float32 [batch, 3, H, W] (normalised crops) -> `embeddings` float32 "
            f"[batch, {config.feature_dim}]; dynamic batching"
            + (f" (`{record['models'][ENCODER_MODEL]['from']}`: INT8 with uint8 activations, for CPU instances of "
               "ONNX Runtime's backend; embeddings within the INT8 accuracy gate of the fp32 file, not equal to it)"
               if record["models"][ENCODER_MODEL].get("precision", "fp32") != "fp32" else "") + ".\n"
            f"- `{REFINE_MODEL}`: `features` float32 [1, N, {config.n_embd}] (L2-normalised embeddings of the whole "
            f"set) and `landmarks` int64 [n_layer={config.n_layer}, l] -> `refined` float32 [1, N, {config.n_embd}].\n\n"
            + serve + plugin)


# ---- DeepStream ----

def normalization_constants(mean, std, reference_channel: int = 0) -> dict:
    """nvinfer's ``net-scale-factor`` / ``offsets`` and the per-channel ratio left to fold into the
    model so that ``ratio[c] * scale * (x - offset[c]) == (x / 255 - mean[c]) / std[c]``."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    scale = 1.0 / (255.0 * std[reference_channel])
    return {"net_scale_factor": scale, "offsets": (255.0 * mean).tolist(),
            "channel_ratio": (std[reference_channel] / std).tolist()}


def fold_channel_scale(encoder_onnx: Path, out_path: Path, ratio, input_name: str = "images") -> None:
    """``encoder_onnx`` with ``input * ratio[c]`` (a Mul on the input) prepended; same input name."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(encoder_onnx))
    graph = model.graph
    inputs = [i for i in graph.input if i.name == input_name]
    if not inputs:
        raise InputError(f"{encoder_onnx} has no input named {input_name!r}")
    inner = f"{input_name}_scaled_per_channel"
    for node in graph.node:
        node.input[:] = [inner if i == input_name else i for i in node.input]
    const = numpy_helper.from_array(np.asarray(ratio, np.float32).reshape(1, -1, 1, 1), f"{input_name}_channel_ratio")
    graph.initializer.append(const)
    graph.node.insert(0, helper.make_node("Mul", [input_name, const.name], [inner], name="deepstream_channel_ratio"))
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))


def _class_ids(value) -> str:
    """``operate-on-class-ids``: semicolon-separated non-negative integers (a string, an int or ints)."""
    parts = [value] if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else \
        list(value) if isinstance(value, (list, tuple)) else str(value).split(";")
    ids = []
    for part in parts:
        text = str(part).strip()
        if not (text.isascii() and text.isdigit()) or isinstance(part, bool) or int(text) > INT32_MAX:
            raise InputError(f"operate-on-class-ids must be semicolon-separated class ids (integers 0 to {INT32_MAX}, "
                             f"such as 0 or 0;2), found {str(value)!r}; give the detector's class id(s) of person")
        ids.append(str(int(text)))
    return ";".join(ids)


def _check_config_path(key: str, path: Path, comment: bool = False) -> None:
    """A path written into nvinfer's key file: no line break or other control character (it would end
    the line and start keys of its own) and, in a value, no backslash (GKeyFile reads escapes)."""
    text = str(path)
    bad = sorted({ch for ch in text if ord(ch) < 32 or ord(ch) == 127 or (ch == "\\" and not comment)})
    if bad:
        raise InputError(f"{key} {text!r} contains {', '.join(repr(ch) for ch in bad)}, which nvinfer's config "
                         "file cannot hold (a line break would start keys of its own); rename or move it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{key} {text!r} is not valid UTF-8, which nvinfer's config file must be; rename or "
                         "move it") from None


def write_deepstream_config(model_dir: str | Path, out_path: str | Path, batch_size: int = 16, gpu_id: int = 0,
                            gie_unique_id: int = 2, operate_on_gie_id: int = 1, operate_on_class_ids: str = "0",
                            precision: str = "fp16", engine: str | Path | None = None,
                            plugin_library: str | Path | None = "auto") -> dict:
    """Write an nvinfer secondary-GIE config (and the channel-folded encoder ONNX beside it).

    ``engine``: an engine file nvinfer should load instead of building one from the ONNX (it must
    have been built from the folded ONNX for exact preprocessing).  ``plugin_library``: "auto"
    adds ``custom-lib-path`` naming ``libnformer_plugins_autoreg.so`` when it is built (nvinfer only
    dlopens the library, and that one registers the plugin when loaded), a path adds that one
    (``libnformer_plugins.so`` is refused: it registers nothing when dlopen'ed), None leaves it out.
    Returns what was written.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    manifest = load_manifest(model_dir)
    c = model_config(manifest)
    if precision not in ("fp32", "fp16"):
        raise InputError(f"precision must be fp32 or fp16 for nvinfer, found {precision!r}")
    # every value goes into nvinfer's key file: integers in gint's range, no line breaks anywhere
    batch_size = _check_int("batch size", batch_size, 1, INT32_MAX, "nvinfer's batch-size is an int")
    gpu_id = _check_int("gpu id", gpu_id, 0, INT32_MAX, "nvinfer's gpu-id is an int")
    gie_unique_id = _check_int("gie-unique-id", gie_unique_id, 1, INT32_MAX, "nvinfer's gie-unique-id is an int")
    operate_on_gie_id = _check_int("operate-on-gie-id", operate_on_gie_id, 1, INT32_MAX,
                                   "nvinfer's operate-on-gie-id is an int")
    operate_on_class_ids = _class_ids(operate_on_class_ids)
    onnx_out = out_path.with_name(out_path.stem + ".encoder.onnx")
    for target, what in ((out_path, "the config"), (onnx_out, "the folded encoder")):
        if target.is_dir():
            raise InputError(f"cannot write {what} to {target}: it is a directory; give a file name such as "
                             f"{target / 'nformer_sgie.txt'}")
        refuse_model_file(target, model_dir, manifest, what)
    if not out_path.parent.is_dir():
        raise InputError(f"cannot write {out_path}: directory {out_path.parent} does not exist")
    norm = normalization_constants(c.pixel_mean, c.pixel_std)
    lib = None
    if plugin_library == "auto":
        lib = plugins.autoreg_library_path()  # None when not built: nothing to add (the encoder has no custom op)
    elif plugin_library:
        lib = Path(plugin_library)
        if not lib.is_file():
            raise InputError(f"plugin library {lib} does not exist; build it or leave out --plugin-lib")
        if lib.name == plugins.PLUGIN_LIBRARY:
            raise InputError(f"{lib} registers its plugin only through TensorRT's loadLibrary, which nvinfer does not "
                             f"call: give {plugins.AUTOREG_LIBRARY} from the same build (it registers the plugin when "
                             "nvinfer dlopens it), or --plugin-lib auto")
    if engine is not None and not Path(engine).is_file():
        raise InputError(f"engine file {engine} does not exist")
    def where(p: Path) -> Path:
        return p.parent.resolve() / p.name
    for given, option in ((engine, "--engine"), (lib, "--plugin-lib")):
        if given is not None and {where(Path(given)), Path(given).resolve()} & {where(out_path), where(onnx_out)}:
            raise InputError(f"{option} {given} is the file the config or its folded encoder would be written to; "
                             "write the config elsewhere")
    _check_config_path("the model directory", model_dir.resolve(), comment=True)
    _check_config_path("onnx-file", onnx_out.resolve())
    if engine is not None:
        _check_config_path("model-engine-file", Path(engine).resolve())
    if lib is not None:
        _check_config_path("custom-lib-path", lib.resolve())
    h, w = c.input_size_hw
    lines = [
        "# nvinfer (Gst-nvinfer) secondary-GIE config for the NFormer re-identification encoder,",
        f"# written by `runtime deepstream-config` from {model_dir.resolve()}/manifest.json.",
        f"# Each object crop -> {c.feature_dim}-d embedding attached as NvDsInferTensorMeta (output-tensor-meta);",
        "# refine and search them with runtime.gallery.  Not run here: no DeepStream on this machine.",
        "[property]",
        f"gpu-id={gpu_id}",
        "# y = net-scale-factor * (x - offsets[c]) then the model's first Mul by std[0]/std[c]:",
        f"# exactly (x/255 - mean[c]) / std[c] with mean={list(c.pixel_mean)} std={list(c.pixel_std)}",
        f"net-scale-factor={norm['net_scale_factor']:.12g}",
        "offsets=" + ";".join(f"{o:.6g}" for o in norm["offsets"]),
        "# 0 = RGB",
        "model-color-format=0",
        f"onnx-file={onnx_out.resolve()}",
    ]
    if engine is not None:
        lines.append(f"model-engine-file={Path(engine).resolve()}")
    else:
        lines.append("# nvinfer builds the engine from onnx-file on first run; add model-engine-file= to reuse it")
    lines += [
        f"infer-dims=3;{h};{w}",
        f"batch-size={batch_size}",
        "# 0 = FP32, 2 = FP16",
        f"network-mode={0 if precision == 'fp32' else 2}",
        "# 100 = other: no parser, the raw output goes to the tensor meta",
        "network-type=100",
        "output-tensor-meta=1",
        "output-blob-names=embeddings",
        "# 2 = secondary: run on objects of the primary detector",
        "process-mode=2",
        f"gie-unique-id={gie_unique_id}",
        f"operate-on-gie-id={operate_on_gie_id}",
        f"operate-on-class-ids={operate_on_class_ids}",
        "# the original resizes to HxW without keeping the aspect ratio, bilinear",
        "maintain-aspect-ratio=0",
        "scaling-filter=1",
    ]
    if lib is not None:
        lines += ["# the project's TensorRT plugin, registered when nvinfer dlopens this library (the encoder has no",
                  "# custom op); the library links libnvinfer of the TensorRT it was built against",
                  f"custom-lib-path={lib.resolve()}"]
    text = "\n".join(lines) + "\n"
    try:
        with staged_files(onnx_out, out_path) as (onnx_tmp, config_tmp):   # both files or neither
            fold_channel_scale(model_dir / manifest["files"]["encoder"]["path"], onnx_tmp, norm["channel_ratio"])
            config_tmp.write_bytes(text.encode("utf-8"))
    except OSError as err:
        raise InputError(f"cannot write {out_path} and {onnx_out.name}: {err.strerror or err}; choose a writable "
                         "directory") from None
    return {"config": str(out_path), "onnx": str(onnx_out), "engine": str(engine) if engine else None,
            "custom_lib_path": str(lib) if lib else None, **norm}
