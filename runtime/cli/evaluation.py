"""``runtime synth``, ``demo``, ``parity``, ``evaluate``, ``bench``: evaluation around the serving core."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from export.contract.cli import FiniteFloatRange, int_list_at_most, user_errors
from export.contract.errors import InputError
from export.contract.variants import PRECISIONS
from runtime.evaluation.synth import MAX_IDENTITIES, MIN_IDENTITIES
from runtime.cli.options import batch_size_option, check_writable, model_dir_arg, threads_option, write_report


@click.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--identities", type=click.IntRange(MIN_IDENTITIES, MAX_IDENTITIES), default=600, show_default=True,
              help="Identities in all (half for training, half for query/gallery).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Same seed, same bytes.")
@user_errors
def synth(out_dir, identities, seed):
    """Write a synthetic re-identification data set in the Market-1501 layout into OUT_DIR."""
    from tqdm import tqdm

    from runtime.evaluation.synth import generate, total_images

    with tqdm(total=total_images(identities, seed), unit="img") as bar:
        counts = generate(out_dir, identities, seed, progress=bar.update)
    click.echo(f"wrote {out_dir}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


@click.command()
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Also write the table as JSON: a list of {backend, precision, stage, mAP, rank1, "
                   "images_per_s, cosine_to_reference_mean}.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("nformer-demo"), show_default=True,
              help="Where the synthetic data, the exported files and the figure go (reused by later runs).")
@click.option("--figure", type=click.Path(path_type=Path), default=None,
              help="PNG with CMC curves and a 2-D projection (default: WORK_DIR/demo.png).")
@click.option("--identities", type=click.IntRange(MIN_IDENTITIES, MAX_IDENTITIES), default=600, show_default=True,
              help="Size of the synthetic data set.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the data and the landmarks.")
@user_errors
def demo(report, work_dir, figure, identities, seed):
    """Evaluate the shipped small NFormer on synthetic data on every backend available here."""
    from export.contract.parity import format_table

    from runtime.evaluation.demo import REPORT_KEYS, run_demo

    for path, option in ((report, "--report"), (figure, "--figure")):
        if path and not (path.parent.resolve() == work_dir.resolve() and not work_dir.exists()):
            check_writable(path, work_dir / "build", what=option)   # (an output in the work dir it makes: fine)
    if figure and figure.suffix.lower() != ".png":
        raise InputError(f"--figure {figure} must be a .png file (the figure is a PNG), found suffix "
                         f"{figure.suffix or 'none'!r}")
    rows, figure = run_demo(work_dir, report, figure, identities, seed, log=click.echo)
    click.echo(format_table(rows, list(REPORT_KEYS)))
    click.echo(f"figure: {figure}" + (f"; report: {report}" if report else ""))


@click.command()
@model_dir_arg
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="Market-1501-layout directory; its query/gallery split is evaluated.")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the report as JSON.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The checkpoint MODEL_DIR was exported from, for the PyTorch reference (default: found by the "
                   "manifest's name and sha256 beside MODEL_DIR, or the shipped one).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the landmark draw (same for all).")
@threads_option
@click.option("--min-cosine-mean", type=FiniteFloatRange(-1, 1), default=0.99, show_default=True,
              help="Tolerance: mean cosine of encoder embeddings to the reference.")
@click.option("--min-cosine-min", type=FiniteFloatRange(-1, 1), default=0.95, show_default=True,
              help="Tolerance: smallest cosine of an encoder embedding to the reference.")
@click.option("--max-map-drop", type=FiniteFloatRange(0, 100), default=1.0, show_default=True,
              help="Tolerance: largest drop of refined mAP below the reference, in points.")
@user_errors
def parity(model_dir, data_dir, report, checkpoint, seed, threads, min_cosine_mean, min_cosine_min, max_map_drop):
    """Compare every backend and precision of MODEL_DIR with the fp32 reference on DATA's query/gallery split.

    Exits 1 when a row is outside the tolerances (printed with the table).
    """
    from export.contract.parity import format_table

    from runtime.evaluation.parity import COLUMNS, run_parity

    if report:
        check_writable(report, model_dir, what="--report")
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
    write_report(report, result)
    if not all(r["ok"] for r in result["rows"]):
        click.echo("error: rows with ok=False are outside the tolerances", err=True)
        sys.exit(1)


@click.command()
@click.argument("dataset_dir", type=click.Path(path_type=Path))
@click.option("--model-dir", type=click.Path(path_type=Path), default=Path("build"), show_default=True,
              help="Directory written by the export (manifest.json, ONNX files, engines).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["onnxruntime", "tensorrt"]),
              help="Backend(s) to evaluate (repeatable); default: every backend usable here.")
@batch_size_option
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the landmark draw of the refinement.")
@click.option("--max-rank", type=click.IntRange(1), default=50, show_default=True, help="Length of the CMC curve written to --report (each row's cmc: Rank-1 to Rank-MAX_RANK); the printed "
                   "Rank-1/5/10 are computed in full whatever it is.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="The encoder's precision, as for `runtime embed`: int8-cpu runs encoder.int8-cpu.onnx (from "
                   "`runtime build --precision int8-cpu`); fp16/int8 a TensorRT engine where usable (else fp32, "
                   "with a warning). Default: the best engine available, else fp32. `runtime parity` compares all.")
@threads_option
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the results as JSON.")
@user_errors
def evaluate(dataset_dir, model_dir, backends, batch_size, seed, max_rank, precision, threads, report):
    """mAP and CMC Rank-1/5/10 on DATASET_DIR (Market-1501 layout: query/ and bounding_box_test/).

    Two rows per backend: encoder-only embeddings, and embeddings refined with query and gallery as
    one set (the original's protocol); ranking by Euclidean distance of L2-normalised vectors.
    """
    from export.contract.parity import format_table

    from runtime.evaluation.evaluate import check_backends, evaluate as run_evaluation

    if report:
        check_writable(report, model_dir, what="--report")
    result = run_evaluation(dataset_dir, model_dir, check_backends(backends, model_dir), batch_size, seed, threads,
                            max_rank, progress=True, precision=precision)
    d = result["dataset"]
    click.echo(f"{d['root']}: {d['query']['images']} queries, {d['gallery']['images']} gallery images")
    for note in d["notes"]:
        click.echo(f"note: {note}", err=True)
    click.echo(format_table(result["results"], ["backend", "precision", "mode", "mAP", "rank1", "rank5", "rank10",
                                                "seconds"]))
    write_report(report, result)


#: largest set ``runtime bench`` refines (the README's largest GPU profile; about 1 GB of rows on a CPU)
MAX_BENCH_SET = 1_000_000


@click.command()
@model_dir_arg
@click.option("--producers", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Threads sending encoder requests at the same time.")
@click.option("--requests", type=click.IntRange(1, 100_000), default=20, show_default=True, help="Requests per producer.")
@click.option("--request-size", type=click.IntRange(1, 1024), default=1, show_default=True, help="Crops per request.")
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True,
              help="Largest batch the dynamic batcher forms.")
@click.option("--max-wait-ms", type=FiniteFloatRange(0, 60_000), default=5.0, show_default=True,
              help="Longest the batcher waits for a batch to fill after its first request.")
@click.option("--refine-sizes", default="1000", show_default=True, callback=int_list_at_most(MAX_BENCH_SET, allow_empty=True),
              help=f"Set sizes N for the refinement timing (comma-separated, each 1..{MAX_BENCH_SET:,}; empty to skip).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@threads_option
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
        check_writable(json_out, model_dir, what="--json")
    with Pipeline.load(model_dir, threads=threads, backend=backend) as pipe:
        rows = bench_pipeline(pipe, producers, requests, request_size, max_batch, max_wait_ms, refine_sizes,
                              progress=lambda msg: click.echo(f"  {msg}", err=True))
    click.echo(format_table(rows, ["stage", "backend", "mode", "n", "producers", "images_per_s", "mean_batch",
                                   "latency_ms_p50", "latency_ms_p95", "seconds", "vs_sequential"]))
    write_report(json_out, {"model_dir": str(model_dir), "rows": rows})
