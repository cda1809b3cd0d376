"""Runtime benchmark: dynamic batching of the encoder, and incremental vs full gallery refinement.

    python benchmarks/bench_runtime.py [--json benchmarks/results/runtime.json] [--gallery 19281] [--add 100]

Encoder (ONNX Runtime, CPU): ``--producers`` threads each send ``--requests`` single-crop requests,
(a) one request at a time (each request its own encoder call) and (b) through
``runtime.batching.DynamicBatcher`` (``--max-batch``, ``--max-wait-ms``); images/s and latency.

Gallery: ``--gallery`` items (clustered unit vectors with exact duplicates, the size of Market-1501's
query + gallery), then ``--add`` more, refined with ``nformer_layers.onnx``:

* incremental: ``Gallery.add`` keeps the neighbour lists exact (``runtime.neighbors``: the new
  columns merged into every list, full scans for the new rows only), then the layers;
* full recompute: the neighbour lists of the whole set from scratch (same module), then the layers;
* one-shot ``nformer.onnx``: the exported file with its own fp64 neighbour step inside ONNX Runtime.

The lists of the incremental path are checked identical to the full recompute, and the refined
embeddings against ``nformer.onnx``.  Weights are random in the original's layout (resnet50 encoder,
4-layer NFormer): speed does not depend on them.  Timings are single runs on a shared machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "runtime.json")
    parser.add_argument("--gallery", type=int, default=19281)
    parser.add_argument("--add", type=int, default=100)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="Requests per producer (one crop each).")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--build", type=Path, default=None, help="Reuse an exported model directory.")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime

    from export.contract.config import ModelConfig
    from export.contract.parity import format_table
    from export.reference.testing import clustered_features, save_random_checkpoint
    from runtime.evaluation.bench import encoder_throughput
    from runtime.neighbors import NeighborIndex
    from runtime.pipeline import Pipeline

    load_before = os.getloadavg()
    build = args.build
    if build is None:
        build = Path(tempfile.mkdtemp(prefix="nformer-bench-runtime-"))
        from export.to_onnx import export_checkpoint

        print("exporting a resnet50 checkpoint (random weights, original layout) ...", flush=True)
        save_random_checkpoint(build / "resnet50.pth", ModelConfig(arch="resnet50"), seed=0)
        export_checkpoint(build / "resnet50.pth", build, batches=(1,), sizes=(7,), log=lambda *a: None)
    pipe = Pipeline.load(build, providers=["CPUExecutionProvider"])
    rows, results = [], {}

    # ---- encoder: one request at a time vs dynamic batching ----
    for mode in ("sequential", "dynamic"):
        print(f"encoder, {mode}, {args.producers} producers x {args.requests} requests ...", flush=True)
        r = encoder_throughput(pipe.encoder.embed_images, pipe.config.input_size_hw, mode, args.producers,
                               args.requests, 1, args.max_batch, args.max_wait_ms)
        results[f"encoder_{mode}"] = r
        rows.append({"case": f"encoder {mode}", "images/s": r["images_per_s"], "mean_batch": r["mean_batch"],
                     "p50_ms": r["latency_ms_p50"], "p95_ms": r["latency_ms_p95"], "seconds": r["seconds"]})
    rows[-1]["ratio"] = results["encoder_dynamic"]["images_per_s"] / results["encoder_sequential"]["images_per_s"]

    # ---- gallery: add m items to N, refine ----
    n, m = args.gallery, args.add
    x = clustered_features(n + m, seed=0, duplicates=max(1, (n + m) // 200))
    print(f"gallery: building N={n} ...", flush=True)
    g = pipe.gallery(seed=0)
    _, t_build = timed(lambda: g.add(x[:n]))
    timed(g.refine)                                      # warm-up: ONNX Runtime session and arena at this N
    print(f"gallery: adding {m} and refining (incremental) ...", flush=True)
    _, t_inc_add = timed(lambda: g.add(x[n:]))
    stats = g._index.last_update
    t_inc_neighbors = stats.seconds
    refined_inc, t_inc_layers = timed(g.refine)
    print(f"gallery: full recompute of N={n + m} ...", flush=True)
    full = NeighborIndex(pipe.config.topk)
    _, t_full_neighbors = timed(lambda: full.add(x))
    lists_full, lists_inc = full.neighbors(), g._index.neighbors()
    identical = bool(all(np.array_equal(a, b) for a, b in zip(lists_full, lists_inc)))
    refined_full, t_full_layers = timed(lambda: pipe.layers_refiner.refine(full.rows(), *lists_full, seed=0,
                                                                          normalized_input=True))
    print(f"gallery: nformer.onnx one-shot on N={n + m} ...", flush=True)
    refined_onnx, t_onnx = timed(lambda: pipe.refine(x, seed=0))
    print(f"gallery: search of {m} queries (queries and gallery refined together) ...", flush=True)
    queries = clustered_features(m, seed=1)
    _, t_search = timed(lambda: g.search(queries, topn=10))
    results["gallery"] = {
        "n": n, "added": m, "build_seconds": t_build,
        "incremental": {"neighbors_seconds": t_inc_neighbors, "add_seconds": t_inc_add, "layers_seconds": t_inc_layers,
                        "total_seconds": t_inc_add + t_inc_layers, "rows_merged": stats.rows_merged,
                        "rows_scanned": stats.rows_scanned, "pairs_scored": stats.pairs_scored},
        "full": {"neighbors_seconds": t_full_neighbors, "layers_seconds": t_full_layers,
                 "total_seconds": t_full_neighbors + t_full_layers},
        "nformer_onnx_seconds": t_onnx,
        "neighbor_step_ratio": t_full_neighbors / t_inc_neighbors,
        "total_ratio": (t_full_neighbors + t_full_layers) / (t_inc_add + t_inc_layers),
        "total_ratio_vs_nformer_onnx": t_onnx / (t_inc_add + t_inc_layers),
        "lists_identical": identical,
        "max_abs_diff_incremental_vs_full": float(np.abs(refined_inc - refined_full).max()),
        "max_abs_diff_incremental_vs_nformer_onnx": float(np.abs(refined_inc - refined_onnx).max()),
        "search_seconds": t_search,
    }
    gr = results["gallery"]
    rows += [
        {"case": f"gallery +{m} to {n}: incremental neighbours", "seconds": t_inc_neighbors},
        {"case": f"gallery +{m} to {n}: full neighbours", "seconds": t_full_neighbors,
         "ratio": gr["neighbor_step_ratio"]},
        {"case": f"gallery +{m}: layers (nformer_layers.onnx, N={n + m})", "seconds": t_inc_layers},
        {"case": f"gallery +{m}: incremental total (add + refine)", "seconds": gr["incremental"]["total_seconds"]},
        {"case": f"gallery +{m}: full total (neighbours + layers)", "seconds": gr["full"]["total_seconds"],
         "ratio": gr["total_ratio"]},
        {"case": f"gallery +{m}: nformer.onnx one-shot", "seconds": t_onnx, "ratio": gr["total_ratio_vs_nformer_onnx"]},
        {"case": f"search {m} queries in {n + m}", "seconds": t_search},
    ]
    table = format_table(rows, ["case", "images/s", "mean_batch", "p50_ms", "p95_ms", "seconds", "ratio"])
    print(table)
    print(f"lists identical to a full recompute: {identical}; refined max |incremental - nformer.onnx| = "
          f"{gr['max_abs_diff_incremental_vs_nformer_onnx']:.3g}")
    report = {
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "results": results, "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
