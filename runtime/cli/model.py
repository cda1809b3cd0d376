"""``runtime embed``, ``runtime refine``, ``runtime build``: a model directory's files and what they compute."""
from __future__ import annotations

from pathlib import Path

import click

from export.contract.cli import user_errors
from export.contract.files import write_text_atomic
from runtime.cli.options import batch_size_option, check_writable, load_npy, model_dir_arg, save_npy_atomic, threads_option


@click.command()
@model_dir_arg
@click.argument("crops", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output .npy: float32 [N, 256] raw encoder embeddings, one row per crop in name order.")
@click.option("--names-out", type=click.Path(path_type=Path), default=None,
              help="Also write the crop file names, one per line, in row order.")
@batch_size_option
@threads_option
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
        write_text_atomic(names_out, "".join(f"{f.name}\n" for f in files))
    click.echo(f"wrote {out}: {emb.shape[0]} x {emb.shape[1]} embeddings")


@click.command()
@model_dir_arg
@click.argument("embeddings", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output .npy: float32 [N, 256] refined embeddings.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the landmark draw.")
@click.option("--landmarks", "landmarks_file", type=click.Path(path_type=Path), default=None,
              help="A .npy of int64 [n_layer, l] landmark rows instead of the seeded draw.")
@click.option("--raw", is_flag=True, help="Write the model's `refined` output as is (default: L2-normalised, "
              "ready for Euclidean or cosine retrieval).")
@threads_option
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


@click.command()
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
