"""``python -m export.to_onnx CHECKPOINT``: checkpoint -> encoder.onnx, nformer.onnx, nformer_layers.onnx, manifest.json.

Both files are checked with ``onnx.checker`` and run in ONNX Runtime against the PyTorch reference
on random inputs before they are published into ``--out-dir``; a failed check publishes nothing
and exits non-zero.  Files appear in the output directory only when complete (temporary
directory, then ``os.replace``; the manifest last).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import click
import numpy as np
import onnx

try:
    import torch
except ImportError as _err:                 # the serving-only install (pip install -e .) has no torch
    if __name__ == "__main__":
        sys.stderr.write(f"error: python -m export.to_onnx needs torch ({_err}); install the export extra: "
                         "pip install -e \".[export]\"\n")
        sys.exit(2)
    raise

from export.reference.checkpoint import load_checkpoint
from export.contract.cli import FiniteFloatRange, int_list_at_most, size_hw
from export.contract.config import MAX_INPUT_SIDE, MIN_INPUT_SIDE
from export.contract.errors import InputError, NFormerError
from export.contract.landmarks import sample_landmarks
from export.contract.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, io_spec
from export.contract.files import sha256_file, work_dir, write_json_atomic
from export.reference.model import NFormerModel
from export.layers_graph import layers_model
from export.onnx_functions import OPSET, OUTPUTS as NEIGHBOR_OUTPUTS, reciprocal_neighbors_function
from export.contract.parity import format_table, max_abs_error, neighbor_set_agreement, relative_error
from export.contract.ops import MAX_K, OP_DOMAIN, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION
from export.reference.testing import clustered_features

ENCODER_FILE = "encoder.onnx"
NFORMER_FILE = "nformer.onnx"
LAYERS_FILE = "nformer_layers.onnx"
FILES = {"encoder": ENCODER_FILE, "nformer": NFORMER_FILE, "nformer_layers": LAYERS_FILE}
#: ONNX Runtime 1.31 reads IR version <= 13; 10 is what opset 20 needs
IR_VERSION = 10
DEFAULT_BATCHES = (1, 4)
DEFAULT_SIZES = (1, 7, 64, 1500)
#: the largest checks the CLI takes: a batch of crops and a set size (Market-1501's query + gallery
#: fits) whose reference runs stay within a few GB; landmark rows per layer
MAX_CHECK_BATCH = 256
MAX_CHECK_SIZE = 20_000
MAX_LANDMARKS = 1024


def _tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop exporter debugging metadata (stack traces with local paths) and pin the IR version."""
    for node in model.graph.node:
        del node.metadata_props[:]
    model.ir_version = IR_VERSION
    return model


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter warns about optional packages (torchvision) and deprecations we don't use."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)


def export_encoder(model: NFormerModel, path: Path) -> None:
    h, w = model.config.input_size_hw
    images = torch.randn(2, 3, h, w)
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter():
        program = torch.onnx.export(
            model.backbone, (images,), dynamo=True, opset_version=OPSET, input_names=["images"],
            output_names=["embeddings"], dynamic_shapes={"images": {0: batch}}, optimize=True, verbose=False)
    onnx.save(_tidy(program.model_proto), path)


def export_nformer(model: NFormerModel, path: Path) -> None:
    c = model.config
    n = 2 * c.topk + 3
    features = torch.nn.functional.normalize(torch.randn(1, n, c.n_embd), dim=-1)
    landmarks = torch.from_numpy(sample_landmarks(n, c.n_layer, c.landmarks))
    dims = {"features": {1: torch.export.Dim("N", min=1)}, "landmarks": {1: torch.export.Dim("l", min=1)}}
    with _quiet_exporter():
        program = torch.onnx.export(
            model.nformer, (features, landmarks), dynamo=True, opset_version=OPSET,
            input_names=["features", "landmarks"], output_names=["refined"], dynamic_shapes=dims,
            optimize=True, verbose=False)
    proto = _tidy(program.model_proto)
    nodes = [nd for nd in proto.graph.node if nd.op_type == OP_TYPE and nd.domain == OP_DOMAIN]
    if len(nodes) != 1:
        raise RuntimeError(f"expected one {OP_DOMAIN}::{OP_TYPE} node in the exported graph, found {len(nodes)}")
    node = nodes[0]
    node.name = "reciprocal_neighbors"
    renames = dict(zip(node.output, NEIGHBOR_OUTPUTS))
    for other in proto.graph.node:
        other.input[:] = [renames.get(i, i) for i in other.input]
    node.output[:] = NEIGHBOR_OUTPUTS
    proto.functions.append(reciprocal_neighbors_function())
    if not any(op.domain == OP_DOMAIN for op in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(OP_DOMAIN, 1))
    onnx.save(proto, path)


def export_nformer_layers(model: NFormerModel, path: Path) -> None:
    """The layers with the lists as inputs, written node by node by ``export.layers_graph`` (row
    blocks and landmark algebra for CPUs) rather than traced; checked against the reference like
    the other files."""
    c, nformer = model.config, model.nformer
    proto = layers_model(nformer.state_dict(), c.n_layer, c.n_embd, c.n_head, ln_eps=nformer.h[0].ln_1.e,
                         bn_eps=nformer.bottleneck.eps, opset=OPSET, ir_version=IR_VERSION)
    onnx.save(proto, path)


def _session(path: Path, extra_outputs: list[str] = ()):
    import onnxruntime as ort

    proto = onnx.load(path)
    for name in extra_outputs:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def check_against_reference(model: NFormerModel, out_dir: Path, batches=DEFAULT_BATCHES,
                            sizes=DEFAULT_SIZES, rtol: float = 1e-4, seed: int = 0) -> list[dict]:
    """Run both files in ONNX Runtime against the PyTorch reference; one row per input size."""
    c = model.config
    rows = []
    rng = np.random.default_rng(seed)
    encoder = _session(out_dir / ENCODER_FILE)
    for b in batches:
        images = rng.standard_normal((b, 3, *c.input_size_hw)).astype(np.float32)
        with torch.no_grad():
            expected = model.backbone(torch.from_numpy(images)).numpy()
        (actual,) = encoder.run(["embeddings"], {"images": images})
        rows.append(dict(model="encoder", size=f"batch={b}", max_abs_error=max_abs_error(actual, expected),
                         relative_error=relative_error(actual, expected), neighbor_sets="-"))
    refine = _session(out_dir / NFORMER_FILE, NEIGHBOR_OUTPUTS)
    layers = _session(out_dir / LAYERS_FILE)
    for n in sizes:
        x = clustered_features(n, c.n_embd, seed=seed + n, duplicates=n // 10)[None]
        landmarks = sample_landmarks(n, c.n_layer, c.landmarks, seed=seed)
        with torch.no_grad():
            xt = torch.from_numpy(x)
            idx, valid = model.nformer.neighbors(xt)
            expected = model.nformer(xt, torch.from_numpy(landmarks)).numpy()
        actual, nb_idx, nb_valid = refine.run(["refined", *NEIGHBOR_OUTPUTS], {"features": x, "landmarks": landmarks})
        # the gate compares the index arrays exactly (order and validity), not only the sets
        same_lists = bool(np.array_equal(nb_idx, idx.numpy()) and np.array_equal(nb_valid != 0, valid.numpy()))
        rows.append(dict(model="nformer", size=f"N={n}", max_abs_error=max_abs_error(actual, expected),
                         relative_error=relative_error(actual, expected),
                         neighbor_sets=neighbor_set_agreement(nb_idx, idx.numpy()),
                         neighbor_lists="identical" if same_lists else "differ"))
        (given,) = layers.run(["refined"], {"features": x, "landmarks": landmarks,
                                            NEIGHBOR_OUTPUTS[0]: idx.numpy().astype(np.int32),
                                            NEIGHBOR_OUTPUTS[1]: valid.numpy().astype(np.int32)})
        rows.append(dict(model="nformer_layers", size=f"N={n}", max_abs_error=max_abs_error(given, expected),
                         relative_error=relative_error(given, expected), neighbor_sets="-"))
    for row in rows:
        row.setdefault("neighbor_lists", "-")
        row["ok"] = bool(row["relative_error"] <= rtol and row["neighbor_sets"] in ("-", 1.0)
                         and row["neighbor_lists"] in ("-", "identical"))
    return rows


def build_manifest(model: NFormerModel, out_dir: Path, checkpoint: Path, checks: list[dict]) -> dict:
    import onnxruntime

    files = {}
    for name, file in FILES.items():
        files[name] = {"path": file, "sha256": sha256_file(out_dir / file), **io_spec(out_dir / file)}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_json(),
        "opset": OPSET,
        "files": files,
        "custom_ops": [{"domain": OP_DOMAIN, "op_type": OP_TYPE, "version": 1,
                        "plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE,
                        "attributes": {"k": model.config.topk},
                        "outputs": {"neighbor_index": "int32", "neighbor_valid": "int32"}}],
        "source": {"checkpoint": checkpoint.name, "sha256": sha256_file(checkpoint)},
        "checks": checks,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "nformer_trt": _own_version()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _own_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nformer-trt")
    except PackageNotFoundError:
        return "unknown"


def prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():       # mkdir said only "File exists"
        raise InputError(f"--out-dir {out_dir} is a file; give a directory (a new one is created)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise InputError(f"cannot write to output directory {out_dir}: {err.strerror or err}; choose a "
                         "writable --out-dir") from None


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, n_head: int = 2, topk: int = 20,
                      landmarks: int = 5, last_stride: int = 1, input_size_hw=None, batches=DEFAULT_BATCHES,
                      sizes=DEFAULT_SIZES, rtol: float = 1e-4, seed: int = 0, log=print) -> dict:
    """Export, check and publish.  Returns ``{"ok": bool, "checks": rows, "out_dir": str}``.

    The files are made in a temporary folder ``OUT_DIR/.export-*`` that is removed whatever happens
    (and, should the process be killed, by the next export into ``out_dir``)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not math.isfinite(rtol) or rtol <= 0:
        raise InputError(f"rtol must be a finite number > 0 (the largest relative error accepted, e.g. 1e-4), "
                         f"found {rtol!r}")
    model = load_checkpoint(checkpoint, n_head=n_head, topk=topk, landmarks=landmarks, last_stride=last_stride,
                            input_size_hw=input_size_hw)
    prepare_out_dir(out_dir)
    log(f"model: {model.config.arch} (widths {model.config.widths}), input {model.config.input_size_hw}, "
        f"embeddings {model.config.feature_dim}, last_stride={model.config.last_stride}, n_layer={model.config.n_layer}, "
        f"n_embd={model.config.n_embd}, n_head={model.config.n_head}, topk={model.config.topk}, "
        f"landmarks={model.config.landmarks}")
    with work_dir(out_dir, ".export-") as work:
        log("exporting encoder.onnx ...")
        export_encoder(model, work / ENCODER_FILE)
        log("exporting nformer.onnx ...")
        export_nformer(model, work / NFORMER_FILE)
        log("exporting nformer_layers.onnx (the same layers, neighbour lists as inputs) ...")
        export_nformer_layers(model, work / LAYERS_FILE)
        for file in FILES.values():
            onnx.checker.check_model(str(work / file), full_check=True)
        log(f"onnx.checker: ok; comparing with the PyTorch reference in ONNX Runtime (rtol {rtol:g}) ...")
        checks = check_against_reference(model, work, batches, sizes, rtol, seed)
        log(format_table(checks, ["model", "size", "max_abs_error", "relative_error", "neighbor_sets", "neighbor_lists", "ok"]))
        ok = all(row["ok"] for row in checks)
        if ok:
            manifest = build_manifest(model, work, checkpoint, checks)
            for file in FILES.values():
                (work / file).replace(out_dir / file)
            write_json_atomic(out_dir / MANIFEST_NAME, manifest)
        return {"ok": ok, "checks": checks, "out_dir": str(out_dir)}


def _exit_on_signal(signum, frame):
    sys.exit(128 + signum)


#: options the checkpoint does not store, as a card's ``export_options`` (tools/train_small.py) names them
CARD_OPTIONS = {"input_size_hw": "--input-size", "n_head": "--n-head", "topk": "--topk",
                "landmarks": "--landmarks", "last_stride": "--last-stride"}


def card_mismatches(checkpoint: Path, chosen: dict, defaulted: set) -> list[str]:
    """The options left at their default that the checkpoint's card (``<stem>.json`` beside it, with
    the checkpoint's sha256, as tools/train_small.py and the shipped model have) records otherwise,
    as ``--option VALUE`` to pass.  A missing, unreadable or foreign card gives none: it is only a hint
    (the shipped model exported at the default 256x128 passed every check and scored mAP 0.08)."""
    import json

    card = Path(checkpoint).with_suffix(".json")
    try:
        data = json.loads(card.read_text())
        options = data["export_options"]
        if not isinstance(options, dict) or data.get("sha256") != sha256_file(checkpoint):
            return []
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        return []
    out = []
    for key, option in CARD_OPTIONS.items():
        want, have = options.get(key), chosen[key]
        if key == "input_size_hw" and isinstance(want, list) and len(want) == 2:
            want = tuple(want)
        if option in defaulted and want is not None and want != have:
            out.append(f"{option} {'x'.join(map(str, want)) if isinstance(want, tuple) else want}")
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("build"), show_default=True,
              help="Where encoder.onnx, nformer.onnx, nformer_layers.onnx and manifest.json are written.")
@click.option("--n-head", type=click.IntRange(1, 4096), default=2, show_default=True,
              help="Attention heads of the refinement (not stored in the checkpoint; must divide n_embd).")
@click.option("--topk", type=click.IntRange(1, MAX_K), default=20, show_default=True,
              help=f"k of the reciprocal top-k neighbours (1..{MAX_K}: the plugin's limit).")
@click.option("--landmarks", type=click.IntRange(1, MAX_LANDMARKS), default=5, show_default=True,
              help=f"Landmark rows per layer (recorded in the manifest; the runtime draws them; 1..{MAX_LANDMARKS}).")
@click.option("--last-stride", type=click.Choice(["1", "2"]), default="1", show_default=True,
              help="Stride of ResNet layer4 the model was trained with.")
@click.option("--input-size", default="256x128", show_default=True, callback=size_hw,
              help=f"Crop size HxW the encoder was trained at (the original: 256x128; each side "
              f"{MIN_INPUT_SIDE}..{MAX_INPUT_SIDE}).")
@click.option("--check-batches", default=",".join(map(str, DEFAULT_BATCHES)), show_default=True,
              callback=int_list_at_most(MAX_CHECK_BATCH),
              help=f"Encoder batch sizes compared with the reference (each 1..{MAX_CHECK_BATCH}).")
@click.option("--check-sizes", default=",".join(map(str, DEFAULT_SIZES)), show_default=True,
              callback=int_list_at_most(MAX_CHECK_SIZE),
              help=f"Set sizes N compared with the reference for the refinement (each 1..{MAX_CHECK_SIZE}).")
@click.option("--rtol", type=FiniteFloatRange(0, min_open=True), default=1e-4, show_default=True,
              help="Largest relative error ||onnx - torch|| / ||torch|| accepted (a finite number > 0).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the random check inputs.")
def main(checkpoint, out_dir, n_head, topk, landmarks, last_stride, input_size, check_batches, check_sizes, rtol,
         seed):
    """Export a checkpoint of the original NFormer training code to ONNX.

    Writes encoder.onnx (images -> embeddings), nformer.onnx (features, landmarks -> refined, with
    the nformer::ReciprocalNeighbors node) and manifest.json into --out-dir, after checking both
    files with onnx.checker and against the PyTorch reference in ONNX Runtime.  Exits 1 when a
    check fails (nothing is published) and 2 on bad input.
    """
    ctx = click.get_current_context()
    defaulted = {"--" + name.replace("_", "-") for name in ("input_size", "n_head", "topk", "landmarks", "last_stride")
                 if ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT}
    chosen = {"input_size_hw": tuple(input_size), "n_head": n_head, "topk": topk, "landmarks": landmarks,
              "last_stride": int(last_stride)}
    if checkpoint.is_file() and (wanted := card_mismatches(checkpoint, chosen, defaulted)):
        click.echo(f"error: {checkpoint.with_suffix('.json')}, the card beside the checkpoint, records the options it "
                   f"was trained with and this export left at their defaults: pass {' '.join(wanted)}", err=True)
        sys.exit(2)
    # SIGTERM (timeout, a container stopping) unwinds like Ctrl-C: the temporary folder is removed
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if main_thread else None
    try:
        result = export_checkpoint(checkpoint, out_dir, n_head=n_head, topk=topk, landmarks=landmarks,
                                   last_stride=int(last_stride), input_size_hw=input_size,
                                   batches=check_batches, sizes=check_sizes, rtol=rtol, seed=seed,
                                   log=click.echo)
    except NFormerError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not result["ok"]:
        click.echo("error: the exported files do not match the PyTorch reference (rows with ok=False); "
                   "nothing was written", err=True)
        sys.exit(1)
    click.echo("wrote " + ", ".join(str(out_dir / f) for f in (*FILES.values(), MANIFEST_NAME)))


if __name__ == "__main__":
    main()
