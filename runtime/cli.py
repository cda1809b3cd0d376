"""The ``runtime`` command: thin click layer over the library (every subcommand is a function call)."""
from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from export.errors import InputError, NFormerError


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

    from .pipeline import Pipeline
    from .preprocess import list_images, load_image

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
    from .pipeline import Pipeline

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

    from .synth import generate, total_images

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
    from export.parity import format_table

    from .demo import REPORT_KEYS, run_demo

    if report:
        check_writable(report)
    rows, figure = run_demo(work_dir, report, figure, identities, seed, log=click.echo)
    click.echo(format_table(rows, list(REPORT_KEYS)))
    click.echo(f"figure: {figure}" + (f"; report: {report}" if report else ""))


if __name__ == "__main__":
    main()
