"""``runtime serve``, ``runtime threshold``: the re-identification service and its open-set threshold."""
from __future__ import annotations

from pathlib import Path

import click

from export.contract.cli import user_errors
from export.contract.config import MAX_BATCH
from export.contract.variants import PRECISIONS
from runtime.cli.options import model_dir_arg, threads_option
from runtime.serving.exports import INT32_MAX


def _port(name: str, default: int):
    return click.option(f"--{name}-port", type=click.IntRange(1, 65535), default=default, show_default=True,
                        help=f"Port of Triton's {name.upper() if name != 'metrics' else 'metrics'} endpoint.")


@click.command("serve")
@model_dir_arg
@click.option("--gallery", "gallery_dir", type=click.Path(path_type=Path), default=None,
              help="Gallery directory (created if new; a crash loses no acknowledged change). "
                   "[default: MODEL_DIR/gallery]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address Triton listens on.")
@_port("http", 8000)
@_port("grpc", 8001)
@_port("metrics", 8002)
@click.option("--max-batch", type=click.IntRange(1, MAX_BATCH), default=32, show_default=True,
              help="Largest encoder batch (Triton's dynamic batching for `encoder`, ours for `embed`).")
@click.option("--max-queue-delay-us", type=click.IntRange(0, 10_000_000), default=2000, show_default=True,
              help="Longest a request waits for others to fill an encoder batch.")
@click.option("--max-items", type=click.IntRange(1, INT32_MAX), default=None,
              help="Gallery size cap: the oldest items are evicted to make room.")
@click.option("--ttl-seconds", type=click.FloatRange(0, None, min_open=True), default=None,
              help="Items whose timestamp is older than this are expired.")
@click.option("--unknown-distance", type=click.FloatRange(0, 2), default=None,
              help="Distance beyond which a query is 'unknown' (overrides the threshold stored by `runtime threshold`).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="The encoder's precision, as for `runtime embed`: int8-cpu runs encoder.int8-cpu.onnx (from "
                   "`runtime build --precision int8-cpu`); fp16/int8 a TensorRT engine where usable (else fp32, "
                   "with a warning). Default: the best engine available, else fp32. Fit the open-set threshold at "
                   "the same precision (`runtime threshold --precision`).")
@user_errors
def serve(model_dir, gallery_dir, host, http_port, grpc_port, metrics_port, max_batch, max_queue_delay_us, max_items,
          ttl_seconds, unknown_distance, backend, precision):
    """Serve MODEL_DIR through a Triton Inference Server (PyTriton): embed, encoder, gallery_add,
    gallery_remove, gallery_search.  Blocks until SIGINT/SIGTERM, then saves the gallery."""
    import math

    from export.contract.errors import InputError
    from runtime.serving.triton_server import serve as run

    if ttl_seconds is not None and not math.isfinite(ttl_seconds):
        raise InputError(f"--ttl-seconds must be a finite number of seconds, found {ttl_seconds}")
    ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
    if len(set(ports.values())) != 3:
        raise InputError(f"--http-port, --grpc-port and --metrics-port must differ, found {ports}")
    run(model_dir, gallery_dir, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, max_items=max_items, ttl_seconds=ttl_seconds,
        unknown_distance=unknown_distance, backend=backend, precision=precision)


@click.command("threshold")
@click.argument("dataset_dir", type=click.Path(path_type=Path))
@click.option("--model-dir", type=click.Path(path_type=Path), required=True, help="The exported model.")
@click.option("--far", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01, show_default=True,
              help="False-accept rate of different-identity pairs the threshold allows.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@threads_option
@click.option("--request-size", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Queries per gallery_search request the threshold is fitted for (refined distances depend on it).")
@click.option("--max-queries", type=click.IntRange(1), default=300, show_default=True,
              help="Queries searched (a random sample when the split has more): each refined request refines the "
                   "whole gallery.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the query sample.")
@click.option("--dry-run", is_flag=True, help="Print the table without storing the threshold.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="The encoder's precision, as for `runtime embed`: int8-cpu runs encoder.int8-cpu.onnx (from "
                   "`runtime build --precision int8-cpu`); fp16/int8 a TensorRT engine where usable (else fp32, "
                   "with a warning). Default: the best engine available, else fp32. Use the precision `runtime "
                   "serve` will run at: the file records it.")
@user_errors
def threshold(dataset_dir, model_dir, far, backend, batch_size, threads, request_size, max_queries, seed, dry_run,
              precision):
    """Fit the distance beyond which a query is 'unknown' from labelled data (a Market-1501-layout
    DATASET_DIR), print TAR@FAR for refined and encoder-only ranking, and store it with the model
    (open_set.json) for `runtime serve`."""
    from runtime.evaluation.threshold import fit_thresholds, format_table

    record = fit_thresholds(dataset_dir, model_dir, far, backend=backend, batch_size=batch_size, threads=threads,
                            store=not dry_run, request_size=request_size, max_queries=max_queries, seed=seed,
                            log=click.echo, precision=precision)
    click.echo(format_table(record))
    if not dry_run:
        click.echo(f"stored thresholds {record['thresholds']} (FAR {far:g}) in {record['path']}")
