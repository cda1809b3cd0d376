"""Benchmark ``runtime serve`` (a real tritonserver on loopback) against the in-process runtime.

Rows, all from one run on one machine:
- embed throughput and p50/p99 latency with 1, 8 and 32 concurrent clients, each request one
  encoded crop: through Triton (HTTP, the ``embed`` model: decode + Triton's dynamic batching) vs
  in process (threads calling ``Pipeline.embed`` with dynamic batching on the same decoded bytes);
- ``gallery_search`` latency at gallery sizes 1k, 10k, 100k, refined and encoder-only (4 queries);
- durable ``gallery_add`` throughput (1 row per request: one fsync each; and 256-row requests).

    python benchmarks/bench_serve.py [--model-dir DIR] [--sizes 1000,10000,100000] [--out benchmarks/results/serve.json]

Without --model-dir a random resnet50 checkpoint (the original's encoder, 256x128) is exported once
into --work-dir.  Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from isolated import cpu_name  # noqa: E402  (benchmarks/, this script's folder)
from runtime.serving.process import infer  # noqa: E402
from PIL import Image  # noqa: E402


def png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (128, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def ensure_model(work: Path) -> Path:
    model = work / "resnet50"
    if (model / "manifest.json").is_file():
        return model
    from export.contract.config import ModelConfig
    from export.reference.testing import save_random_checkpoint
    from export.to_onnx import export_checkpoint

    ckpt = work / "resnet50.pth"
    save_random_checkpoint(ckpt, ModelConfig(arch="resnet50"), seed=1)
    result = export_checkpoint(ckpt, model, batches=(1,), sizes=(9,), log=lambda *a: None)
    assert result["ok"], result["checks"]
    return model


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def run_clients(n_clients: int, requests: int, call) -> dict:
    """``call(client_index, request_index)`` from ``n_clients`` threads; latencies and throughput."""
    lat, errors = [], []
    lock = threading.Lock()
    start = threading.Barrier(n_clients + 1)

    def worker(c):
        mine = []
        ctx = call.setup(c) if hasattr(call, "setup") else None
        start.wait()
        try:
            for r in range(requests):
                t = time.perf_counter()
                call(ctx, c, r)
                mine.append(time.perf_counter() - t)
        except Exception as err:                           # reported, not hidden
            errors.append(repr(err)[:300])
        finally:
            if hasattr(call, "teardown"):
                call.teardown(ctx)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    return {"requests": len(lat), "seconds": wall, "throughput_per_s": len(lat) / wall,
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99)}


class TritonEmbed:
    def __init__(self, server, crops):
        self.server, self.crops = server, crops

    def setup(self, c):
        return self.server.client("http")

    def teardown(self, client):
        client.close()

    def __call__(self, client, c, r):
        import tritonclient.http as httpclient

        arr = np.array([[self.crops[(c * 7 + r) % len(self.crops)]]], dtype=object)
        t = httpclient.InferInput("crops", [1, 1], "BYTES")
        t.set_data_from_numpy(arr)
        client.infer("embed", [t]).as_numpy("embeddings")


class InProcessEmbed:
    def __init__(self, pipe, crops):
        self.pipe, self.crops = pipe, crops

    def __call__(self, ctx, c, r):
        from export.contract.preprocess import decode_image

        self.pipe.embed([decode_image(self.crops[(c * 7 + r) % len(self.crops)])])


def add_rows(client, x, start):
    ids = np.array([f"id{start + i}".encode() for i in range(len(x))], dtype=object)
    return infer(client, "gallery_add", {"embeddings": (x, "FP32"), "ids": (ids, "BYTES"),
                                         "camids": (np.arange(len(x), dtype=np.int64) % 6, "INT64")}, ["count"])[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "nformer-bench-serve")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=16, help="requests per client per embed row")
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--searches", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    args = ap.parse_args(argv)

    from runtime.pipeline import Pipeline
    from runtime.serving.process import ServeProcess

    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = args.model_dir or ensure_model(args.work_dir)
    crops = [png(i) for i in range(64)]
    rows = []
    gallery = Path(tempfile.mkdtemp(prefix="gallery-", dir=args.work_dir))
    with ServeProcess(model, gallery, args.work_dir / "serve.log", "--max-batch", str(args.max_batch),
                      "--max-queue-delay-us", "2000") as server:
        with Pipeline.load(model, batch_size=args.max_batch, dynamic_batching=True, max_batch=args.max_batch,
                           max_wait_ms=2.0) as pipe:
            width = pipe.config.n_embd
            for n in [int(v) for v in args.clients.split(",")]:
                base = run_clients(n, args.requests, InProcessEmbed(pipe, crops))
                served = run_clients(n, args.requests, TritonEmbed(server, crops))
                rows.append({"what": "embed", "clients": n, "in_process": base, "triton": served,
                             "throughput_ratio": served["throughput_per_s"] / base["throughput_per_s"]})
                print(f"embed {n:>3} clients: in-process {base['throughput_per_s']:7.1f}/s p50 {base['p50_ms']:7.1f} "
                      f"p99 {base['p99_ms']:7.1f} ms | triton {served['throughput_per_s']:7.1f}/s p50 "
                      f"{served['p50_ms']:7.1f} p99 {served['p99_ms']:7.1f} ms | ratio {rows[-1]['throughput_ratio']:.2f}",
                      flush=True)
        client = server.client("http")
        rng = np.random.default_rng(0)
        # durable adds: one fsync per request
        t = time.perf_counter()
        for i in range(50):
            add_rows(client, rng.standard_normal((1, width)).astype(np.float32), i)
        single = 50 / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(8):
            add_rows(client, rng.standard_normal((256, width)).astype(np.float32), 1000 + 256 * i)
        batched = 8 * 256 / (time.perf_counter() - t)
        rows.append({"what": "gallery_add", "rows_per_request": 1, "rows_per_s": single})
        rows.append({"what": "gallery_add", "rows_per_request": 256, "rows_per_s": batched})
        print(f"durable gallery_add: {single:.1f} requests/s (1 row each), {batched:.0f} rows/s (256-row requests)",
              flush=True)
        # the search sizes start from an empty gallery: the rows of the add benchmark go again
        added = [f"id{i}".encode() for i in range(50)] + [f"id{1000 + i}".encode() for i in range(8 * 256)]
        count = int(infer(client, "gallery_remove", {"ids": (np.array(added, dtype=object), "BYTES")}, ["count"])[0][0])
        assert count == 0, f"the gallery still holds {count} rows after the add benchmark"
        next_id = 1000 + 8 * 256
        queries = rng.standard_normal((4, width)).astype(np.float32)
        for size in [int(v) for v in args.sizes.split(",")]:
            t_fill = time.perf_counter()
            while count < size:
                m = min(10_000, size - count)
                count = int(add_rows(client, rng.standard_normal((m, width)).astype(np.float32), next_id)[0])
                next_id += m
            fill = time.perf_counter() - t_fill
            for mode in ("encoder", "refined"):
                lat = []
                for _ in range(args.searches):
                    t = time.perf_counter()
                    infer(client, "gallery_search",
                          {"embeddings": (queries, "FP32"), "camids": (np.full(4, -1, np.int64), "INT64"),
                           "topn": (np.array([10], np.int32), "INT32"),
                           "mode": (np.array([mode.encode()], dtype=object), "BYTES")}, ["ids"])
                    lat.append(time.perf_counter() - t)
                rows.append({"what": "gallery_search", "gallery": count, "mode": mode, "queries": 4,
                             "median_ms": statistics.median(lat) * 1000, "min_ms": min(lat) * 1000,
                             "fill_seconds": fill})
                print(f"gallery_search {count:>7} items {mode:>8}: median {rows[-1]['median_ms']:9.1f} ms "
                      f"(min {rows[-1]['min_ms']:.1f})", flush=True)
        client.close()
        code = server.terminate(timeout=600)
    import onnxruntime

    report = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "machine": {"cpu": cpu_name(), "cores": _cores(), "python": platform.python_version(),
                                          "onnxruntime": onnxruntime.__version__},
              "model": str(model), "server_exit_code": code, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
