"""The ``runtime`` command: thin click layer over the library (every subcommand is a function call)."""
from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from export.contract.errors import InputError, NFormerError


def user_errors(fn):
    """Turn the project's errors into one line on stderr and exit status 2 (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NFormerError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
    return wrapper


def check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: directory {parent} is not writable; choose another --out")


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` so that a failure leaves no partial file behind."""
    check_writable(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except (ValueError, OSError) as err:
        raise InputError(f"{path} is not a .npy array ({err}); expected a file written by numpy.save") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Run exported NFormer models: embed person crops, refine sets of embeddings."""


model_dir_arg = click.argument("model_dir", type=click.Path(path_type=Path))


@main.command()
@model_dir_arg
@click.argument("crops", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output .npy: float32 [N, 256] raw encoder embeddings, one row per crop in name order.")
@click.option("--names-out", type=click.Path(path_type=Path), default=None,
              help="Also write the crop file names, one per line, in row order.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Crops per encoder call.")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads.")
@user_errors
def embed(model_dir, crops, out, names_out, batch_size, threads):
    """Embed every image in the folder CROPS with MODEL_DIR's encoder."""
    from tqdm import tqdm

    from runtime.pipeline import Pipeline
    from export.contract.preprocess import list_images, load_image

    check_writable(out)
    if names_out:
        check_writable(names_out)
    files = list_images(crops)
    for f in files:  # decode everything first: a bad crop fails before any output is written
        load_image(f)
    pipe = Pipeline.load(model_dir, batch_size=batch_size, threads=threads)
    with tqdm(total=len(files), unit="crop", disable=len(files) < 2 * batch_size) as bar:
        emb = pipe.embed(files, progress=bar.update)
    save_npy_atomic(out, emb)
    if names_out:
        fd, tmp = tempfile.mkstemp(dir=names_out.parent, prefix=f".{names_out.name}.")
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(f"{f.name}\n" for f in files))
        os.replace(tmp, names_out)
    click.echo(f"wrote {out}: {emb.shape[0]} x {emb.shape[1]} embeddings")


@main.command()
@model_dir_arg
@click.argument("embeddings", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output .npy: float32 [N, 256] refined embeddings.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the landmark draw.")
@click.option("--landmarks", "landmarks_file", type=click.Path(path_type=Path), default=None,
              help="A .npy of int64 [n_layer, l] landmark rows instead of the seeded draw.")
@click.option("--raw", is_flag=True, help="Write the model's `refined` output as is (default: L2-normalised, "
              "ready for Euclidean or cosine retrieval).")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads.")
@user_errors
def refine(model_dir, embeddings, out, seed, landmarks_file, raw, threads):
    """Refine the embeddings in EMBEDDINGS (.npy, [N, 256]) as one set with MODEL_DIR's NFormer."""
    from runtime.pipeline import Pipeline

    check_writable(out)
    features = load_npy(embeddings)
    landmarks = load_npy(landmarks_file) if landmarks_file else None
    pipe = Pipeline.load(model_dir, threads=threads)
    refined = pipe.refine(features, landmarks, seed=seed, normalize_output=not raw)
    save_npy_atomic(out, refined)
    click.echo(f"wrote {out}: {refined.shape[0]} x {refined.shape[1]} refined embeddings")


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--identities", type=click.IntRange(4), default=600, show_default=True,
              help="Identities in all (half for training, half for query/gallery).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@user_errors
def synth(out_dir, identities, seed):
    """Write a synthetic re-identification data set in the Market-1501 layout into OUT_DIR."""
    from tqdm import tqdm

    from runtime.evaluation.synth import generate, total_images

    with tqdm(total=total_images(identities, seed), unit="img") as bar:
        counts = generate(out_dir, identities, seed, progress=bar.update)
    click.echo(f"wrote {out_dir}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


@main.command()
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Also write the table as JSON: a list of {backend, precision, stage, mAP, rank1, "
                   "images_per_s, cosine_to_reference_mean}.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("nformer-demo"), show_default=True,
              help="Where the synthetic data, the exported files and the figure go (reused by later runs).")
@click.option("--figure", type=click.Path(path_type=Path), default=None,
              help="PNG with CMC curves and a 2-D projection (default: WORK_DIR/demo.png).")
@click.option("--identities", type=click.IntRange(4), default=600, show_default=True,
              help="Size of the synthetic data set.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data and the landmarks.")
@user_errors
def demo(report, work_dir, figure, identities, seed):
    """Evaluate the shipped small NFormer on synthetic data on every backend available here."""
    from export.contract.parity import format_table

    from runtime.evaluation.demo import REPORT_KEYS, run_demo

    if report:
        check_writable(report)
    rows, figure = run_demo(work_dir, report, figure, identities, seed, log=click.echo)
    click.echo(format_table(rows, list(REPORT_KEYS)))
    click.echo(f"figure: {figure}" + (f"; report: {report}" if report else ""))



@main.command()
@model_dir_arg
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), required=True,
              help="fp16: FP16 tensors in the ONNX files; int8: Q/DQ encoder calibrated on --calib-data "
                   "(the refinement is never int8).")
@click.option("--refine-precision", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Precision of the refinement (default: fp32 for --precision fp32, else fp16); its neighbour "
                   "ranking is fp32 in every variant.")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None,
              help="INT8 calibration crops: a Market-1501-layout directory (its training split) or a folder of "
                   "images (unreadable and non-image files are reported and skipped).")
@click.option("--calib-method", type=click.Choice(["entropy", "percentile", "minmax"]), default="entropy",
              show_default=True, help="How activation ranges are chosen from the calibration activations.")
@click.option("--calib-images", type=click.IntRange(1), default=512, show_default=True,
              help="Calibration crops to read (a seeded selection when the folder holds more).")
@click.option("--min-batch", type=click.IntRange(1), default=1, show_default=True, help="Encoder engine profile.")
@click.option("--opt-batch", type=click.IntRange(1), default=32, show_default=True, help="Encoder engine profile.")
@click.option("--max-batch", type=click.IntRange(1), default=128, show_default=True, help="Encoder engine profile.")
@click.option("--min-n", type=click.IntRange(1), default=1, show_default=True,
              help="Refinement engine profile: smallest set size N.")
@click.option("--opt-n", type=click.IntRange(1), default=20000, show_default=True,
              help="Refinement engine profile: N the kernels are tuned for.")
@click.option("--max-n", type=click.IntRange(1), default=100000, show_default=True,
              help="Refinement engine profile: largest N.")
@click.option("--engine-tool", type=click.Choice(["auto", "trtexec", "python", "none"]), default="auto",
              show_default=True, help="auto: trtexec when on PATH, else the TensorRT Python API, else ONNX "
                                      "files only; none: ONNX files only.")
@click.option("--trtexec", "trtexec_path", type=click.Path(path_type=Path), default=None,
              help="trtexec executable (default: the one on PATH).")
@user_errors
def build(model_dir, precision, refine_precision, calib_data, calib_method, calib_images, min_batch, opt_batch,
          max_batch, min_n, opt_n, max_n, engine_tool, trtexec_path):
    """Write MODEL_DIR's ONNX files for a precision and, where TensorRT is available, its engines."""
    from runtime.tensorrt.build import BuildOptions, build as build_engines

    options = BuildOptions(precision=precision, refine_precision=refine_precision, calib_data=calib_data,
                           calib_method=calib_method, calib_images=calib_images,
                           batch=(min_batch, opt_batch, max_batch), n=(min_n, opt_n, max_n),
                           engine_tool=engine_tool, trtexec=str(trtexec_path) if trtexec_path else None)
    result = build_engines(model_dir, options, log=click.echo)
    files = [v["path"] for v in result["variants"].values()] + [e["path"] for e in result["engines"].values()]
    click.echo(f"{model_dir}: " + ", ".join(files) + " (listed in manifest.json)")


@main.command()
@model_dir_arg
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="Market-1501-layout directory; its query/gallery split is evaluated.")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the report as JSON.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The checkpoint MODEL_DIR was exported from, for the PyTorch reference (default: found by the "
                   "manifest's name and sha256 beside MODEL_DIR, or the shipped one).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the landmark draw (same for all).")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--min-cosine-mean", type=float, default=0.99, show_default=True,
              help="Tolerance: mean cosine of encoder embeddings to the reference.")
@click.option("--min-cosine-min", type=float, default=0.95, show_default=True,
              help="Tolerance: smallest cosine of an encoder embedding to the reference.")
@click.option("--max-map-drop", type=float, default=1.0, show_default=True,
              help="Tolerance: largest drop of refined mAP below the reference, in points.")
@user_errors
def parity(model_dir, data_dir, report, checkpoint, seed, threads, min_cosine_mean, min_cosine_min, max_map_drop):
    """Compare every backend and precision of MODEL_DIR with the fp32 reference on DATA's query/gallery split.

    Exits 1 when a row is outside the tolerances (printed with the table).
    """
    from export.contract.files import write_json_atomic
    from export.contract.parity import format_table

    from runtime.evaluation.parity import COLUMNS, run_parity

    if report:
        check_writable(report)
    tolerances = {"min_cosine_mean": min_cosine_mean, "min_cosine_min": min_cosine_min,
                  "max_map_drop_points": max_map_drop}
    result = run_parity(model_dir, data_dir, checkpoint=checkpoint, seed=seed, threads=threads,
                        tolerances=tolerances, log=click.echo)
    ref = result["reference"]
    click.echo(f"reference: {ref['backend']} {ref['precision']}; query {result['query']}, gallery {result['gallery']}; "
               "tolerances: " + ", ".join(f"{k}={v:g}" for k, v in result["tolerances"].items())
               + "; mAP_diff and rank1_diff in points")
    click.echo(format_table(result["rows"], COLUMNS))
    for s in result["skipped"]:
        click.echo(f"not compared: {s['backend']} {s['precision']}: {s['reason']}")
    if report:
        write_json_atomic(report, result)
        click.echo(f"report: {report}")
    if not all(r["ok"] for r in result["rows"]):
        click.echo("error: rows with ok=False are outside the tolerances", err=True)
        sys.exit(1)


def _comma_ints(ctx, param, value):
    if value is None or value == "":
        return ()
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if min(values, default=1) < 1:
        raise click.BadParameter(f"expected integers >= 1, got {value!r}")
    return values


def _write_report(path: Path | None, report) -> None:
    if path is None:
        return
    from export.contract.files import write_json_atomic

    check_writable(path)
    write_json_atomic(path, report)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("dataset_dir", type=click.Path(path_type=Path))
@click.option("--model-dir", type=click.Path(path_type=Path), default=Path("build"), show_default=True,
              help="Directory written by the export (manifest.json, ONNX files, engines).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["onnxruntime", "tensorrt"]),
              help="Backend(s) to evaluate (repeatable); default: every backend usable here.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Crops per encoder call.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the landmark draw of the refinement.")
@click.option("--max-rank", type=click.IntRange(1), default=50, show_default=True, help="Length of the CMC curve.")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the results as JSON.")
@user_errors
def evaluate(dataset_dir, model_dir, backends, batch_size, seed, max_rank, threads, report):
    """mAP and CMC Rank-1/5/10 on DATASET_DIR (Market-1501 layout: query/ and bounding_box_test/).

    Two rows per backend: encoder-only embeddings, and embeddings refined with query and gallery as
    one set (the original's protocol); ranking by Euclidean distance of L2-normalised vectors.
    """
    from export.contract.parity import format_table

    from runtime.evaluation.evaluate import check_backends, evaluate as run_evaluation

    if report:
        check_writable(report)
    result = run_evaluation(dataset_dir, model_dir, check_backends(backends, model_dir), batch_size, seed, threads,
                            max_rank, progress=True)
    d = result["dataset"]
    click.echo(f"{d['root']}: {d['query']['images']} queries, {d['gallery']['images']} gallery images")
    click.echo(format_table(result["results"], ["backend", "mode", "mAP", "rank1", "rank5", "rank10", "seconds"]))
    _write_report(report, result)


@main.command()
@model_dir_arg
@click.option("--producers", type=click.IntRange(1), default=8, show_default=True,
              help="Threads sending encoder requests at the same time.")
@click.option("--requests", type=click.IntRange(1), default=20, show_default=True, help="Requests per producer.")
@click.option("--request-size", type=click.IntRange(1), default=1, show_default=True, help="Crops per request.")
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True,
              help="Largest batch the dynamic batcher forms.")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Longest the batcher waits for a batch to fill after its first request.")
@click.option("--refine-sizes", default="1000", show_default=True, callback=_comma_ints,
              help="Set sizes N for the refinement timing (comma-separated; empty to skip).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON.")
@user_errors
def bench(model_dir, producers, requests, request_size, max_batch, max_wait_ms, refine_sizes, backend, threads,
          json_out):
    """Throughput of MODEL_DIR: encoder images/s with dynamic batching vs one request at a time
    (PRODUCERS threads), and refinement time per set size."""
    from export.contract.parity import format_table

    from runtime.evaluation.bench import bench_pipeline
    from runtime.pipeline import Pipeline

    if json_out:
        check_writable(json_out)
    with Pipeline.load(model_dir, threads=threads, backend=backend) as pipe:
        rows = bench_pipeline(pipe, producers, requests, request_size, max_batch, max_wait_ms, refine_sizes,
                              progress=lambda msg: click.echo(f"  {msg}", err=True))
    click.echo(format_table(rows, ["stage", "backend", "mode", "n", "producers", "images_per_s", "mean_batch",
                                   "latency_ms_p50", "latency_ms_p95", "seconds", "vs_sequential"]))
    _write_report(json_out, {"model_dir": str(model_dir), "rows": rows})


@main.command("triton-repo")
@model_dir_arg
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True,
              help="max_batch_size of the encoder model (dynamic batching up to it).")
@click.option("--max-queue-delay-us", type=click.IntRange(0), default=2000, show_default=True,
              help="Longest Triton waits to fill an encoder batch.")
@click.option("--instance-kind", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True)
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True, help="Model instances each.")
@click.option("--engines", is_flag=True, help="Use the TensorRT engines listed in the manifest (model.plan) "
              "instead of the ONNX files.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it holds a repository written by this command.")
@user_errors
def triton_repo(model_dir, out_dir, max_batch, max_queue_delay_us, instance_kind, instances, engines, overwrite):
    """Write a Triton model repository to OUT_DIR: the encoder (dynamic batching) and the
    refinement (one request = one set) as two models with their config.pbtxt."""
    from runtime.serving.exports import write_triton_repository

    record = write_triton_repository(model_dir, out_dir, max_batch, max_queue_delay_us, instance_kind, instances,
                                     engines, overwrite)
    for name, entry in record["models"].items():
        click.echo(f"{name}: {out_dir / entry['config']}, {out_dir / entry['file']}")
    click.echo(f"wrote {out_dir}")


@main.command("deepstream-config")
@model_dir_arg
@click.argument("out_file", type=click.Path(path_type=Path))
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Objects per encoder batch.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp16", show_default=True,
              help="network-mode of the engine nvinfer builds.")
@click.option("--gpu-id", type=click.IntRange(0), default=0, show_default=True)
@click.option("--gie-unique-id", type=click.IntRange(1), default=2, show_default=True)
@click.option("--operate-on-gie-id", type=click.IntRange(1), default=1, show_default=True,
              help="gie-unique-id of the person detector.")
@click.option("--operate-on-class-ids", default="0", show_default=True,
              help="Class id(s) of 'person' in the detector (semicolon-separated).")
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="An engine built from the written .encoder.onnx for nvinfer to load.")
@click.option("--plugin-lib", default="auto", show_default=True,
              help="custom-lib-path: 'auto' (the plugin library when built), a path, or 'none'.")
@user_errors
def deepstream_config(model_dir, out_file, batch_size, precision, gpu_id, gie_unique_id, operate_on_gie_id,
                      operate_on_class_ids, engine, plugin_lib):
    """Write OUT_FILE, an nvinfer secondary-GIE config for the encoder (embeddings as output tensor
    meta), and OUT_FILE's stem + .encoder.onnx beside it (the encoder with the per-channel std
    folded in, so nvinfer's one scale factor and offsets reproduce the original's normalisation)."""
    from runtime.serving.exports import write_deepstream_config

    out = write_deepstream_config(model_dir, out_file, batch_size, gpu_id, gie_unique_id, operate_on_gie_id,
                                  operate_on_class_ids, precision, engine,
                                  None if plugin_lib == "none" else plugin_lib)
    click.echo(f"wrote {out['config']} and {out['onnx']}"
               + (f" (custom-lib-path {out['custom_lib_path']})" if out["custom_lib_path"] else ""))


if __name__ == "__main__":
    main()
