"""CPU benchmark of the exported files: ONNX Runtime vs PyTorch, encoder and refinement.

    python benchmarks/bench_cpu.py [--json benchmarks/results/cpu.json] [--sizes 1000,5000,19281]

Encoder: images/s of encoder.onnx in ONNX Runtime vs the PyTorch reference in eager mode (resnet50,
256x128, last stride 1), batch 1 and 32.  Refinement: nformer.onnx in ONNX Runtime vs a dense
PyTorch implementation of the original's eval path (N x N similarity, top-k mask, mask * mask^T,
dense logits, sparse softmax) -- time and peak memory.  Every case runs in a fresh process so that
its peak resident memory (sampled every 5 ms, minus the resident memory before the call) is its
own.  The weights are random in the original's layout: speed and memory do not depend on them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from isolated import run_in_subprocess  # noqa: E402  (benchmarks/, this script's folder)


class PeakMemory:
    """Peak resident memory of this process while the block runs, above what it held before."""

    def __init__(self, interval=0.005):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta(self):
        return self.peak - self.base


def _timed(fn, repeats):
    """Median time of ``repeats`` calls after one warm-up; peak memory over all of them, warm-up
    included (the first call is where allocators and ONNX Runtime's arena grow)."""
    times = []
    with PeakMemory() as mem:
        fn()
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times), mem


def run_case(case: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import numpy as np

    threads = case["threads"]
    if case["backend"] == "pytorch":
        import torch

        torch.set_num_threads(threads)
    build = Path(case["build"])
    if case["stage"] == "encoder":
        b = case["batch"]
        images = np.random.default_rng(0).standard_normal((b, 3, 256, 128)).astype(np.float32)
        if case["backend"] == "onnxruntime":
            from runtime.backends import OnnxRuntimeBackend

            backend = OnnxRuntimeBackend(build / "encoder.onnx", ["CPUExecutionProvider"], threads)
            fn = lambda: backend.run({"images": images})  # noqa: E731
        else:
            import torch

            from export.reference.checkpoint import load_checkpoint

            model = load_checkpoint(case["checkpoint"])
            x = torch.from_numpy(images)

            def fn():
                with torch.no_grad():
                    model.backbone(x)
        seconds, mem = _timed(fn, case["repeats"])
        return {**case, "seconds": seconds, "images_per_s": b / seconds, "peak_mem_bytes": mem.delta}
    n = case["n"]
    from export.contract.landmarks import sample_landmarks
    from export.reference.testing import clustered_features

    x = clustered_features(n, seed=0)[None]
    lm = sample_landmarks(n, 4, 5, seed=0)
    if case["backend"] == "onnxruntime":
        from runtime.backends import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(build / "nformer.onnx", ["CPUExecutionProvider"], threads, dynamic_shapes=True)
        fn = lambda: backend.run({"features": x, "landmarks": lm})  # noqa: E731
    else:
        import torch

        from export.reference.checkpoint import load_checkpoint

        model = load_checkpoint(case["checkpoint"]).nformer
        xt, lmt = torch.from_numpy(x), torch.from_numpy(lm)
        dense = case["backend"] == "pytorch-dense-original"

        def fn():
            with torch.no_grad():
                model(xt, lmt, dense=dense)
    # the dense path at large N takes a minute a call: time it once, after no warm-up
    if case["repeats"] == 0:
        with PeakMemory() as mem:
            t = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t
    else:
        seconds, mem = _timed(fn, case["repeats"])
    return {**case, "seconds": seconds, "peak_mem_bytes": mem.delta}


def spawn(case: dict) -> dict:
    return run_in_subprocess(__file__, case)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "cpu.json")
    parser.add_argument("--sizes", default="1000,5000,19281")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-dense-above", type=int, default=10**9,
                        help="Skip the dense original path above this N (it needs ~9 GB and a minute at 19,281).")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    from export.contract.config import ModelConfig
    from export.contract.parity import format_table
    from export.reference.testing import save_random_checkpoint
    from export.to_onnx import export_checkpoint

    work = Path(tempfile.mkdtemp(prefix="nformer-bench-"))
    checkpoint = work / "resnet50.pth"
    save_random_checkpoint(checkpoint, ModelConfig(arch="resnet50"), seed=0)
    print("exporting a resnet50 checkpoint (random weights, original layout) ...", flush=True)
    export_checkpoint(checkpoint, work, batches=(1,), sizes=(7,), log=lambda *a: None)
    common = {"build": str(work), "checkpoint": str(checkpoint), "threads": args.threads}
    cases = []
    for batch, repeats in ((1, 20), (32, 3)):
        for backend in ("onnxruntime", "pytorch"):
            cases.append({**common, "stage": "encoder", "backend": backend, "batch": batch, "repeats": repeats})
    for n in (int(s) for s in args.sizes.split(",")):
        reps = 3 if n <= 5000 else 1
        cases.append({**common, "stage": "refine", "backend": "onnxruntime", "n": n, "repeats": reps})
        cases.append({**common, "stage": "refine", "backend": "pytorch-sparse", "n": n, "repeats": reps})
        if n <= args.skip_dense_above:
            cases.append({**common, "stage": "refine", "backend": "pytorch-dense-original", "n": n,
                          "repeats": 0 if n > 5000 else 1})
    results = []
    for case in cases:
        label = f"{case['stage']} {case['backend']} " + (f"batch={case['batch']}" if "batch" in case else f"N={case['n']}")
        print(f"  {label} ...", flush=True)
        results.append(spawn(case))
    rows = []
    for r in results:
        rows.append({"stage": r["stage"], "backend": r["backend"],
                     "size": f"batch={r['batch']}" if "batch" in r else f"N={r['n']}",
                     "seconds": r.get("seconds", float("nan")),
                     "images/s": r.get("images_per_s", ""),
                     "peak_mem_GB": r["peak_mem_bytes"] / 1e9 if "peak_mem_bytes" in r else "",
                     "error": r.get("error", "")})
    for n in {r["n"] for r in results if "n" in r}:  # speed-up and memory ratio vs the dense original
        by = {r["backend"]: r for r in results if r.get("n") == n and "seconds" in r}
        if "onnxruntime" in by and "pytorch-dense-original" in by:
            d, o = by["pytorch-dense-original"], by["onnxruntime"]
            for row in rows:
                if row["size"] == f"N={n}" and row["backend"] == "onnxruntime":
                    row["vs_dense_speedup"] = d["seconds"] / o["seconds"]
                    row["vs_dense_mem_ratio"] = o["peak_mem_bytes"] / max(d["peak_mem_bytes"], 1)
    table = format_table(rows, ["stage", "backend", "size", "seconds", "images/s", "peak_mem_GB",
                                "vs_dense_speedup", "vs_dense_mem_ratio", "error"])
    print(table)
    report = {
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "results": results, "rows": rows,
    }
    import onnxruntime
    import torch

    report["versions"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
