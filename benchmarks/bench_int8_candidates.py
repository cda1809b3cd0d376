"""Would an int8 candidate pass speed up the exact CPU neighbour step?  Measured, not estimated.

    python benchmarks/bench_int8_candidates.py [--n 19281] [--json benchmarks/results/int8_candidates.json]

The neighbour step's float32 pass (``runtime.neighbors``, the "GEMM" phase) could run as an int8
GEMM (ONNX Runtime's ``MatMulInteger``, uint8 x int8 with VNNI/AMX kernels) if the int8 scores,
with a rigorous error bound, still certified the exact lists.  This script measures both halves of
that trade on the benchmark's data (``clustered_features(N, seed=0, duplicates=N // 10)``, D = 256,
k = 20, C = k - 1 + reserve = 35 candidates a row), in one run:

* **speed**: GFLOP/s (Gop/s) of numpy's float32 matmul, ONNX Runtime's float32 Gemm and its
  ``MatMulInteger`` (uint8 x int8 -> int32) on the pass's tile shape [512, 256] x [256, 8192];
* **the bound**: rows quantised to int8 with one global scale ``s = max|x| / 127`` (the tiles are used
  transposed too, so rows and columns need one scale); the error of ``s^2 q_i . q_j`` against the
  exact cosine is at most ``E_i = s/2 (||x_i||_1 + max_j ||s q_j||_1)`` (Hoelder, per component
  rounding error <= s/2); the largest error actually seen on 2,000 sampled rows;
* **the price**: a column can be dropped only when its int8 score is more than ``2 E`` below the
  row's C-th best, so ``int8 >= T_C - 2 E_i`` counts the entries per row that would have to be
  rescored exactly (T_C from the float32 Gram matrix, within 1e-5 of exact), against the entries
  the float32 pass keeps today (``ScanStats.kept_entries / N``) -- and the time of rescoring that
  many pairs in float64 by gather (``NeighborIndex._fast_keys``, the path the candidates take).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from isolated import cpu_name  # noqa: E402  (benchmarks/, this script's folder)

K, DIM, TILE, C = 20, 256, (512, 8192), 35


def _best(fn, calls, repeats=5):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def gemm_rates(threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, n = TILE

    def session(kind):
        if kind == "int8":
            inputs = [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, DIM]),
                      helper.make_tensor_value_info("b", TensorProto.INT8, [DIM, None])]
            node = helper.make_node("MatMulInteger", ["a", "b", "zero"], ["c"])
            init = [numpy_helper.from_array(np.array(128, np.uint8), "zero")]
            out = helper.make_tensor_value_info("c", TensorProto.INT32, [None, None])
        else:
            inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [None, DIM]) for x in "ab"]
            node = helper.make_node("Gemm", ["a", "b"], ["c"], transB=1)
            init = []
            out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [None, None])
        model = helper.make_model(helper.make_graph([node], "g", inputs, [out], init),
                                  opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    a32 = rng.standard_normal((m, DIM)).astype(np.float32)
    b32 = rng.standard_normal((n, DIM)).astype(np.float32)
    a8 = rng.integers(0, 256, (m, DIM), dtype=np.uint8)
    b8 = rng.integers(-127, 128, (DIM, n), dtype=np.int8)
    s32, s8 = session("fp32"), session("int8")
    out = np.empty(TILE, np.float32)
    flops = 2.0 * m * n * DIM
    times = {
        "numpy_fp32": _best(lambda: np.matmul(a32, b32.T, out=out), 20),
        "onnxruntime_fp32_gemm": _best(lambda: s32.run(None, {"a": a32, "b": b32}), 20),
        "onnxruntime_int8_matmulinteger": _best(lambda: s8.run(None, {"a": a8, "b": b8}), 40),
    }
    return {name: {"seconds": t, "gflops": flops / t / 1e9} for name, t in times.items()}


def band_counts(n: int) -> dict:
    import numpy as np

    from export.reference.testing import clustered_features
    from runtime.neighbors import one_shot_index
    from runtime.refiner import l2_normalize

    y = l2_normalize(clustered_features(n, seed=0, duplicates=n // 10)).astype(np.float32)
    one_shot_index(y, K)                                   # warm-up
    t = time.perf_counter()
    index = one_shot_index(y, K)
    neighbour_seconds = time.perf_counter() - t
    scan = index.last_scan
    kept_per_row = scan.kept_entries / n
    amax = float(np.abs(y).max())
    s = amax / 127.0
    q = np.rint(y / s).astype(np.int8)
    sq = q.astype(np.float64) * s
    bound = s / 2 * (np.abs(y).astype(np.float64).sum(1) + np.abs(sq).sum(1).max())      # E_i
    need = np.empty(n, np.int64)
    within_fp32_margin = np.empty(n, np.int64)
    sample = set(np.random.default_rng(0).choice(n, min(n, 2000), replace=False).tolist())
    max_err = 0.0
    sq32 = sq.astype(np.float32)
    step = 1024
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        g = y[r0:r1] @ y.T
        gq = sq32[r0:r1] @ sq32.T                                # s^2 q_i . q_j (exact integers, scaled)
        d = np.arange(r1 - r0)
        g[d, d + r0] = -np.inf
        gq[d, d + r0] = -np.inf
        tc = np.partition(g, n - C, axis=1)[:, n - C]
        need[r0:r1] = (gq >= (tc - 2 * bound[r0:r1])[:, None]).sum(1)
        within_fp32_margin[r0:r1] = (g >= (tc - 1e-4)[:, None]).sum(1)
        rows = [i - r0 for i in range(r0, r1) if i in sample]
        if rows:
            with np.errstate(invalid="ignore"):                  # -inf - -inf on the diagonal
                e = np.abs(g[rows] - gq[rows])
            max_err = max(max_err, float(e[np.isfinite(e)].max()))
    # the price of rescoring the band exactly: float64 keys of that many pairs, as the candidates get them
    per_row = int(np.median(need))
    pairs_rows = np.repeat(np.arange(n), per_row)
    pairs_cols = np.random.default_rng(1).integers(0, n, len(pairs_rows))
    t = time.perf_counter()
    index._fast_keys(pairs_rows, pairs_cols)
    rescore_seconds = time.perf_counter() - t
    kept_rows = np.repeat(np.arange(n), int(round(kept_per_row)))
    t = time.perf_counter()
    index._fast_keys(kept_rows, np.random.default_rng(2).integers(0, n, len(kept_rows)))
    rescore_kept_seconds = time.perf_counter() - t
    return {
        "n": n, "max_abs_x": amax, "scale": s,
        "bound_median": float(np.median(bound)), "bound_max": float(bound.max()),
        "observed_max_error_2000_rows": max_err,
        "int8_band_per_row": {"median": float(np.median(need)), "p90": float(np.quantile(need, 0.9)),
                              "max": int(need.max())},
        "exact_within_1e-4_of_T_C_per_row_median": float(np.median(within_fp32_margin)),
        "fp32_pass_kept_per_row": kept_per_row,
        "neighbour_step_seconds": neighbour_seconds, "fp32_pass_phase_seconds": scan.seconds,
        "rescore_band_float64_seconds": rescore_seconds,
        "rescore_fp32_kept_float64_seconds": rescore_kept_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=19281)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "int8_candidates.json")
    args = parser.parse_args()
    started = time.time()
    rates = gemm_rates(args.threads)
    bands = band_counts(args.n)
    print(f"tile [{TILE[0]}, {DIM}] x [{DIM}, {TILE[1]}], {args.threads} threads:")
    print(f"{'kernel':34s} {'ms':>8s} {'G(FL)OP/s':>10s}")
    for name, r in rates.items():
        print(f"{name:34s} {r['seconds'] * 1e3:8.2f} {r['gflops']:10.1f}")
    speedup = rates["numpy_fp32"]["seconds"] / rates["onnxruntime_int8_matmulinteger"]["seconds"]
    print(f"int8 vs numpy fp32: {speedup:.2f}x")
    b = bands
    print(f"\nN = {b['n']}: int8 scale {b['scale']:.3g} (max |x| {b['max_abs_x']:.3f}); rigorous bound E median "
          f"{b['bound_median']:.4f}, max {b['bound_max']:.4f}; largest error seen (2,000 rows) "
          f"{b['observed_max_error_2000_rows']:.4f}")
    print(f"{'entries per row to score exactly':44s} {'median':>8s}")
    print(f"{'  int8 pass (int8 >= T_C - 2E)':44s} {b['int8_band_per_row']['median']:8.0f}   (p90 "
          f"{b['int8_band_per_row']['p90']:.0f}, max {b['int8_band_per_row']['max']})")
    print(f"{'  float32 pass today (kept entries)':44s} {b['fp32_pass_kept_per_row']:8.1f}")
    print(f"float64 rescoring of the int8 band: {b['rescore_band_float64_seconds']:.3f} s; of today's kept entries: "
          f"{b['rescore_fp32_kept_float64_seconds']:.3f} s; today's whole neighbour step "
          f"{b['neighbour_step_seconds']:.3f} s (its GEMM phase {b['fp32_pass_phase_seconds']['gemm']:.3f} s)")
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "threads": args.threads, "gemm": rates, "int8_vs_numpy_fp32": speedup, "bands": bands,
        "seconds": time.time() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
