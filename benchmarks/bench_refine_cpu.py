"""CPU refinement, end to end: the exact neighbour lists (numpy) + nformer_layers.onnx (ONNX Runtime).

    python benchmarks/bench_refine_cpu.py [--sizes 5000,19281,50000,100000] [--json benchmarks/results/refine_cpu.json]
        [--build DIR] [--no-original]

What ``Pipeline.refine`` runs on a CPU ("lists+layers": ``runtime.neighbors.reciprocal_neighbors``, then
``nformer_layers.onnx``), per N, each size in a fresh process (``isolated.py``: its own memory peak):

* ``neighbours``: the exact lists of the L2-normalised set (the tiled float32 pass, certificate,
  float64 and canonical keys where they decide);
* ``layers``: ``nformer_layers.onnx`` on those lists;
* ``total``: ``Pipeline.refine`` itself (normalisation, lists, layers, output normalisation);
* peak memory: resident memory sampled every 5 ms during the warm-up and timed calls, above what
  the process held before them (``delta``), and the process's whole resident peak (``rss``);
* baselines in the same run: ``nformer.onnx`` one-shot (up to ``--one-shot-max`` rows) and the
  original's dense eval path (``NFormer(dense=True)`` of ``export/reference/nformer.py``: N x N
  similarity, top-k mask, mask * mask^T, dense logits; at N = 19,281 only, one cold call, 8-9 GB);
* the machine's float32 GEMM rate, measured with a plain numpy matmul of the neighbour pass's tile
  shape ([512, D] x [D, 8192]); the neighbour step's share of it is ``N^2 D`` (the upper half of
  the Gram matrix, 2 flops a term) / its time / that rate.

Data: ``clustered_features(N, seed=0, duplicates=N // 10)`` (D = 256, identities of 8 images, exact
duplicates with a group larger than k), k = 20, 4 layers, 5 landmarks, random weights in the
original's layout (speed does not depend on them).  Times: minimum of ``--repeats`` calls after one
warm-up (fewer above 20,000 rows); the load average before and after each case is recorded, since
other jobs on a shared 2-core machine inflate single runs.  The lists are checked identical to
``nformer.onnx``'s and the refined rows against its output wherever the one-shot runs.
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

from bench_cpu import PeakMemory  # noqa: E402  (benchmarks/, this script's folder)
from isolated import cpu_name, run_in_subprocess  # noqa: E402

K, DIM, TILE = 20, 256, (512, 8192)


def _min_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), times, out


def gemm_rate(case: dict) -> dict:
    """float32 GFLOP/s of numpy's matmul on the neighbour pass's tile shape."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((TILE[0], DIM)).astype(np.float32)
    b = rng.standard_normal((TILE[1], DIM)).astype(np.float32)
    out = np.empty(TILE, np.float32)
    np.matmul(a, b.T, out=out)
    calls = 40
    best, times, _ = _min_time(lambda: [np.matmul(a, b.T, out=out) for _ in range(calls)], 5)
    flops = 2.0 * TILE[0] * TILE[1] * DIM * calls
    return {**case, "gflops": flops / best / 1e9, "seconds": best, "all_seconds": times}


def refine(case: dict) -> dict:
    import numpy as np

    from runtime.neighbors import one_shot_index
    from runtime.pipeline import Pipeline
    from runtime.refiner import l2_normalize

    n = case["n"]
    x = np.load(case["data"])                 # written by the parent: this process imports no torch
    pipe = Pipeline.load(case["build"], providers=["CPUExecutionProvider"])
    assert pipe.refine_path == "lists+layers", pipe.backend_choice
    xn = l2_normalize(x)
    stats = {}

    def neighbours():                      # what reciprocal_neighbors does, keeping the pass's record
        t = time.perf_counter()
        index = one_shot_index(xn, K)
        scan = dict(vars(index.last_scan), add_seconds=time.perf_counter() - t)
        t = time.perf_counter()
        lists = index.neighbors()
        stats["scan"] = dict(scan, lists_seconds=time.perf_counter() - t)
        return lists

    out = {}
    with PeakMemory() as mem:
        pipe.refine(x, seed=0)                                   # warm-up: sessions, arena, pages
        t_nb, all_nb, lists = _min_time(neighbours, case["repeats"])
        t_layers, all_layers, _ = _min_time(
            lambda: pipe.layers_refiner.refine(xn, *lists, seed=0, normalized_input=True), case["repeats"])
        t_total, all_total, refined = _min_time(lambda: pipe.refine(x, seed=0), case["repeats"])
    out.update(neighbours_seconds=t_nb, layers_seconds=t_layers, total_seconds=t_total,
               all_seconds={"neighbours": all_nb, "layers": all_layers, "total": all_total},
               peak_delta_bytes=mem.delta, peak_rss_bytes=mem.peak, scan=stats.get("scan"))
    if case.get("one_shot"):
        from export.onnx_functions import OUTPUTS
        from runtime.backends import OnnxRuntimeBackend

        del mem
        with PeakMemory() as mem:
            pipe.refiner.refine(x, seed=0)
            t_one, all_one, one_shot = _min_time(lambda: pipe.refiner.refine(x, seed=0), case["one_shot_repeats"])
        out.update(one_shot_seconds=t_one, one_shot_all_seconds=all_one, one_shot_peak_delta_bytes=mem.delta,
                   max_abs_diff_vs_one_shot=float(np.abs(refined - one_shot).max()))
        if case.get("check_lists"):       # the lists inside nformer.onnx, index for index
            import onnx

            proto = onnx.load(Path(case["build"]) / "nformer.onnx")
            for name in OUTPUTS:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            path = Path(tempfile.mkdtemp()) / "nformer_lists.onnx"
            onnx.save(proto, path)
            backend = OnnxRuntimeBackend(path, ["CPUExecutionProvider"], dynamic_shapes=True)
            got = backend.run({"features": xn[None], "landmarks": pipe.refiner.landmarks_for(n, 0)})
            out["lists_identical_to_nformer_onnx"] = bool(
                np.array_equal(got[OUTPUTS[0]][0], lists[0]) and np.array_equal(got[OUTPUTS[1]][0], lists[1]))
    return {**case, **out}


def original(case: dict) -> dict:
    import numpy as np
    import torch

    from export.contract.landmarks import sample_landmarks
    from export.reference.checkpoint import load_checkpoint

    torch.set_num_threads(case["threads"])
    n = case["n"]
    model = load_checkpoint(case["checkpoint"]).nformer
    x = torch.nn.functional.normalize(torch.from_numpy(np.load(case["data"])), dim=-1)
    lm = torch.from_numpy(sample_landmarks(n, 4, 5, seed=0))
    with PeakMemory() as mem, torch.no_grad():
        t = time.perf_counter()
        model(x[None], lm, dense=True)
        seconds = time.perf_counter() - t
    return {**case, "seconds": seconds, "peak_delta_bytes": mem.delta, "peak_rss_bytes": mem.peak}


def run_case(case: dict) -> dict:
    load = os.getloadavg()
    out = {"gemm": gemm_rate, "refine": refine, "original": original}[case["kind"]](case)
    return {**out, "load_before": load, "load_after": os.getloadavg()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "refine_cpu.json")
    parser.add_argument("--sizes", default="5000,19281,50000,100000")
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls per step (1 above 50,000 rows).")
    parser.add_argument("--one-shot-max", type=int, default=50000, help="Largest N for the nformer.onnx baseline.")
    parser.add_argument("--original-at", type=int, default=19281, help="N of the original's dense path (0: skip).")
    parser.add_argument("--no-original", action="store_true", help="Skip the original's dense path.")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--build", type=Path, help="Reuse an exported model directory (with its checkpoint.pth); "
                        "the data sets are written there too.  Without it a temporary one is made and removed.")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    from export.contract.parity import format_table

    started = time.perf_counter()
    build = args.build
    if build is None:
        from export.contract.config import ModelConfig
        from export.reference.testing import save_random_checkpoint
        from export.to_onnx import export_checkpoint

        build = Path(tempfile.mkdtemp(prefix="nformer-bench-refine-"))
        print("exporting a checkpoint (random weights, original layout; resnet18 encoder, unused here) ...",
              flush=True)
        save_random_checkpoint(build / "checkpoint.pth", ModelConfig(arch="resnet18"), seed=0)
        result = export_checkpoint(build / "checkpoint.pth", build, batches=(1,), sizes=(7,), log=lambda *a: None)
        assert result["ok"], result["checks"]
    common = {"build": str(build), "checkpoint": str(build / "checkpoint.pth"), "threads": args.threads}
    sizes = [int(s) for s in args.sizes.split(",")]
    import numpy as np

    from export.reference.testing import clustered_features

    data = {}
    for n in sorted(set(sizes) | ({args.original_at} if args.original_at and not args.no_original else set())):
        data[n] = build / f"data_{n}.npy"
        if not data[n].exists():
            np.save(data[n], clustered_features(n, seed=0, duplicates=n // 10))
    results = {"gemm": None, "refine": [], "original": None}
    print("float32 GEMM rate (numpy matmul, tile shape) ...", flush=True)
    results["gemm"] = run_in_subprocess(__file__, {**common, "kind": "gemm"})
    for n in sizes:
        one_shot = n <= args.one_shot_max
        case = {**common, "kind": "refine", "n": n, "data": str(data[n]), "repeats": args.repeats if n <= 20000 else 1,
                "one_shot": one_shot, "one_shot_repeats": args.repeats if n <= 20000 else 1,
                "check_lists": n <= 20000}
        print(f"refine N={n} ...", flush=True)
        results["refine"].append(run_in_subprocess(__file__, case))
    if args.original_at and not args.no_original:
        print(f"original dense path N={args.original_at} (one cold call, ~9 GB) ...", flush=True)
        results["original"] = run_in_subprocess(__file__, {**common, "kind": "original", "n": args.original_at,
                                                            "data": str(data[args.original_at])})

    gflops = results["gemm"].get("gflops", float("nan"))
    orig = results["original"] or {}
    rows = []
    for r in results["refine"]:
        n = r["n"]
        if "error" in r:
            rows.append({"N": n, "error": r["error"]})
            continue
        useful = float(n) * n * DIM                         # upper half of the Gram matrix, 2 flops a term
        row = {"N": n, "neighbours_s": r["neighbours_seconds"], "layers_s": r["layers_seconds"],
               "total_s": r["total_seconds"], "peak_GB": r["peak_delta_bytes"] / 1e9,
               "rss_GB": r["peak_rss_bytes"] / 1e9,
               "gemm_share": useful / r["neighbours_seconds"] / 1e9 / gflops,
               "one_shot_s": r.get("one_shot_seconds", "skipped" if n > args.one_shot_max else ""),
               "load": f"{r['load_before'][0]:.1f}/{r['load_after'][0]:.1f}"}
        if "one_shot_seconds" in r:
            row["vs_one_shot"] = r["one_shot_seconds"] / r["total_seconds"]
        if orig.get("n") == n and "seconds" in orig:
            row["original_s"] = orig["seconds"]
            row["vs_original"] = orig["seconds"] / r["total_seconds"]
        elif n > 40000:
            row["original_s"] = "skipped (N x N fp32: out of memory)"
        rows.append(row)
    print(format_table(rows, ["N", "neighbours_s", "layers_s", "total_s", "peak_GB", "rss_GB", "gemm_share",
                              "one_shot_s", "vs_one_shot", "original_s", "vs_original", "load", "error"]))
    print(f"float32 GEMM rate (numpy matmul [{TILE[0]}, {DIM}] x [{DIM}, {TILE[1]}]): {gflops:.1f} GFLOP/s")
    phases = []
    for r in results["refine"]:
        scan = r.get("scan") or {}
        if scan.get("seconds"):
            secs = scan["seconds"]
            rest = scan["add_seconds"] - sum(secs.values())           # normalisation, norms, zero rows
            phases.append({"N": r["n"], "rows_prep_s": rest, **{f"{k}_s": v for k, v in secs.items()},
                           "lists_s": scan["lists_seconds"], "kept_per_row": scan["kept_entries"] / r["n"],
                           "fallback_rows": scan["fallback_rows"]})
    if phases:
        print("where the neighbour step's time goes (last timed call):")
        print(format_table(phases, ["N", "rows_prep_s", "pilot_s", "gemm_s", "extract_s", "finish_s", "fallback_s",
                                    "lists_s", "kept_per_row", "fallback_rows"]))
    if orig:
        print(f"original dense path N={orig.get('n')}: "
              + (f"{orig['seconds']:.1f} s, {orig['peak_delta_bytes'] / 1e9:.2f} GB" if "seconds" in orig
                 else f"error: {orig.get('error')}"))
    for r in results["refine"]:
        if "lists_identical_to_nformer_onnx" in r or "max_abs_diff_vs_one_shot" in r:
            print(f"N={r['n']}: lists identical to nformer.onnx's: {r.get('lists_identical_to_nformer_onnx', '-')}; "
                  f"max |refined - nformer.onnx| = {r.get('max_abs_diff_vs_one_shot', float('nan')):.3g}")
    import numpy
    import onnxruntime

    report = {
        "machine": {"node": platform.node(), "processor": cpu_name(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "platform": platform.platform()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {"numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__},
        "wall_seconds": time.perf_counter() - started,
        "gemm_gflops": gflops, "results": results, "rows": rows, "neighbour_phases": phases,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {args.json} ({report['wall_seconds']:.0f} s in all)")
    if args.build is None:                # the export and data sets this run made (a few hundred MB)
        import shutil

        shutil.rmtree(build, ignore_errors=True)


if __name__ == "__main__":
    main()
