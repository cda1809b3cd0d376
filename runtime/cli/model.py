"""``runtime embed``, ``runtime refine``, ``runtime build``: a model directory's files and what they compute."""
from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np

from export.contract.cli import user_errors
from export.contract.errors import InputError
from export.contract.files import staged_files
from export.contract.manifest import refuse_model_file
from export.contract.variants import PRECISIONS
from runtime.cli.options import batch_size_option, check_writable, load_npy, model_dir_arg, save_npy_atomic, threads_option
from runtime.tensorrt.build import MAX_PROFILE_BATCH, MAX_PROFILE_N

#: what str.splitlines() ends a line at: a name holding one would not be one line of the names file
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def names_file_bytes(files: list[Path]) -> bytes:
    """The names file: one line per row, each the file name byte for byte as the file system holds
    it (``os.fsencode``: a name that is not UTF-8 stays as it is rather than failing or being
    altered); a name with a line break is refused, since it would not be one line."""
    for f in files:
        breaks = sorted(set(f.name) & _LINE_BREAKS)
        if breaks:
            raise InputError(f"crop file name {f.name!r} contains a line break ({', '.join(map(repr, breaks))}), so "
                             "the names file could not hold it as one line per row; rename the file or leave out "
                             "--names-out")
    return b"".join(os.fsencode(f.name) + b"\n" for f in files)


@click.command()
@model_dir_arg
@click.argument("crops", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output .npy: float32 [N, D] raw encoder embeddings (D: the model's feature_dim), one row "
                   "per crop in name order.")
@click.option("--names-out", type=click.Path(path_type=Path), default=None,
              help="Also write the crop file names, one per line in row order, byte for byte as the file system "
                   "holds them (a name with a line break is refused); written together with --out.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="The encoder's precision: int8-cpu runs encoder.int8-cpu.onnx (from `runtime build --precision "
                   "int8-cpu`) on ONNX Runtime; fp16/int8 a TensorRT engine of it where one is usable (else fp32, with "
                   "a warning). Default: the best engine available, else fp32.")
@batch_size_option
@threads_option
@user_errors
def embed(model_dir, crops, out, names_out, precision, batch_size, threads):
    """Embed every image in the folder CROPS with MODEL_DIR's encoder."""
    from tqdm import tqdm

    from runtime.pipeline import Pipeline
    from export.contract.preprocess import list_images, load_image

    check_writable(out)
    refuse_model_file(out, model_dir, what="--out")
    if names_out:
        check_writable(names_out)
        refuse_model_file(names_out, model_dir, what="--names-out")
        if names_out.parent.resolve() / names_out.name == out.parent.resolve() / out.name:
            raise InputError(f"--names-out {names_out} is the same file as --out {out}; give the names a file of "
                             f"their own, such as {out.with_suffix('.names.txt')}")
    files = list_images(crops)
    names = names_file_bytes(files) if names_out else None
    for f in files:  # decode everything first: a bad crop fails before any output is written
        load_image(f)
    pipe = Pipeline.load(model_dir, batch_size=batch_size, threads=threads, precision=precision)
    with tqdm(total=len(files), unit="crop", disable=len(files) < 2 * batch_size) as bar:
        emb = pipe.embed(files, progress=bar.update)
    if names_out:
        with staged_files(out, names_out) as (out_tmp, names_tmp):   # both files or neither
            with open(out_tmp, "wb") as f:
                np.save(f, emb)
            names_tmp.write_bytes(names)
    else:
        save_npy_atomic(out, emb)
    click.echo(f"wrote {out}: {emb.shape[0]} x {emb.shape[1]} embeddings")


@click.command()
@model_dir_arg
@click.argument("embeddings", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output .npy: float32 [N, D] refined embeddings.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the landmark draw.")
@click.option("--landmarks", "landmarks_file", type=click.Path(path_type=Path), default=None,
              help="A .npy of int64 [n_layer, l] landmark rows instead of the seeded draw.")
@click.option("--raw", is_flag=True, help="Write the model's `refined` output as is (default: L2-normalised, "
              "ready for Euclidean or cosine retrieval).")
@threads_option
@user_errors
def refine(model_dir, embeddings, out, seed, landmarks_file, raw, threads):
    """Refine the embeddings in EMBEDDINGS (.npy, [N, D]) as one set with MODEL_DIR's NFormer."""
    from runtime.pipeline import Pipeline

    check_writable(out)
    refuse_model_file(out, model_dir, what="--out")
    features = load_npy(embeddings)
    landmarks = load_npy(landmarks_file) if landmarks_file else None
    pipe = Pipeline.load(model_dir, threads=threads)
    refined = pipe.refine(features, landmarks, seed=seed, normalize_output=not raw)
    save_npy_atomic(out, refined)
    click.echo(f"wrote {out}: {refined.shape[0]} x {refined.shape[1]} refined embeddings")


@click.command()
@model_dir_arg
@click.option("--precision", type=click.Choice(PRECISIONS), required=True,
              help="fp16: FP16 tensors in the ONNX files; int8: Q/DQ encoder calibrated on --calib-data, "
                   "TensorRT's format (symmetric int8 activations); int8-cpu: Q/DQ encoder for ONNX Runtime on "
                   "x86 CPUs (uint8 activations, no engine), same calibration (the refinement is never int8).")
@click.option("--refine-precision", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Precision of the refinement (default: fp32 for --precision fp32 and int8-cpu, else fp16); its "
                   "neighbour ranking is fp32 in every variant.")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None,
              help="INT8 calibration crops (int8, int8-cpu): a Market-1501-layout directory (its training split) "
                   "or a folder of images (unreadable and non-image files are reported and skipped).")
@click.option("--calib-method", type=click.Choice(["entropy", "percentile", "minmax"]), default="entropy",
              show_default=True, help="How activation ranges are chosen from the calibration activations.")
@click.option("--calib-images", type=click.IntRange(1), default=512, show_default=True,
              help="Calibration crops to read (a seeded selection when the folder holds more, all of them "
                   "with a note when it holds fewer).")
@click.option("--min-batch", type=click.IntRange(1, MAX_PROFILE_BATCH), default=1, show_default=True,
              help="Encoder engine profile: smallest batch.")
@click.option("--opt-batch", type=click.IntRange(1, MAX_PROFILE_BATCH), default=32, show_default=True,
              help="Encoder engine profile: batch the kernels are tuned for.")
@click.option("--max-batch", type=click.IntRange(1, MAX_PROFILE_BATCH), default=128, show_default=True,
              help="Encoder engine profile: largest batch.")
@click.option("--min-n", type=click.IntRange(1, MAX_PROFILE_N), default=1, show_default=True,
              help="Refinement engine profile: smallest set size N.")
@click.option("--opt-n", type=click.IntRange(1, MAX_PROFILE_N), default=20000, show_default=True,
              help="Refinement engine profile: N the kernels are tuned for.")
@click.option("--max-n", type=click.IntRange(1, MAX_PROFILE_N), default=100000, show_default=True,
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
