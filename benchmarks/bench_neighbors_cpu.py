"""CPU benchmark of the neighbour step: this tree against a baseline tree, in the same run.

    python benchmarks/bench_neighbors_cpu.py --baseline /path/to/old/checkout [--sizes 5000,19281]
        [--json benchmarks/results/neighbors_cpu.json]

For each implementation -- ``numpy`` (``runtime.neighbors``, the serving path), ``onnx-body`` (the
``ReciprocalNeighbors`` function body alone in ONNX Runtime, the part of ``nformer.onnx`` that the
exactness work changed) and ``torch-reference`` -- and each N, every case runs in a fresh process
(``isolated.py``) on ``clustered_features(N, seed=0, duplicates=N // 10)`` (D = 256, k = 20): one
warm-up call, then the median of ``--repeats`` calls.  The sha256 of each result's index array is
reported, so that the table shows which implementations agree.  The baseline is any checkout of the
project (e.g. ``git worktree add /tmp/base dfa3657``).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolated import run_in_subprocess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _import_first(*names):
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {names} imports")


def run_case(case: dict) -> dict:
    sys.path.insert(0, case["tree"])
    import numpy as np

    testing = _import_first("export.reference.testing", "export." + "testing")  # this layout, dfa3657's
    n, k = case["n"], 20
    x = testing.clustered_features(n, seed=0, duplicates=n // 10)
    if case["impl"] == "numpy":
        from runtime.neighbors import reciprocal_neighbors

        def call():
            return reciprocal_neighbors(x, k)[0]
    elif case["impl"] == "torch-reference":
        import torch

        rn = _import_first("export.reference.reciprocal_neighbors", "export." + "reciprocal_neighbors")
        torch.set_num_threads(case["threads"])

        def call():
            return rn.reciprocal_neighbors(torch.from_numpy(x)[None], k)[0][0].numpy()
    else:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        fn = _import_first("export.onnx_functions")
        rn = _import_first("export.contract.ops", "export." + "reciprocal_neighbors")
        node = helper.make_node(rn.OP_TYPE, ["features"], ["neighbor_index", "neighbor_valid"], domain=rn.OP_DOMAIN,
                                k=k, plugin_version="1", plugin_namespace="")
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, None, 256])],
                                  [helper.make_tensor_value_info("neighbor_index", TensorProto.INT32, None),
                                   helper.make_tensor_value_info("neighbor_valid", TensorProto.INT32, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", fn.OPSET), helper.make_opsetid(rn.OP_DOMAIN, 1)],
                                  functions=[fn.reciprocal_neighbors_function()], ir_version=10)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = case["threads"]
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

        def call():
            return sess.run(["neighbor_index"], {"features": x[None]})[0][0]
    idx = call()
    times = []
    for _ in range(case["repeats"]):
        t = time.perf_counter()
        idx = call()
        times.append(time.perf_counter() - t)
    digest = hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()[:12]
    return {**case, "seconds": statistics.median(times), "all_seconds": times, "idx_sha256": digest}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case")
    ap.add_argument("--baseline", required=False, help="another checkout of the project to compare with")
    ap.add_argument("--sizes", default="5000,19281")
    ap.add_argument("--impls", default="numpy,onnx-body,torch-reference")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "neighbors_cpu.json"))
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    trees = [("this", str(REPO))] + ([("baseline", str(Path(args.baseline).resolve()))] if args.baseline else [])
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for impl in args.impls.split(","):
            for label, tree in trees:
                case = {"tree": tree, "label": label, "impl": impl, "n": n, "repeats": args.repeats,
                        "threads": args.threads}
                row = run_in_subprocess(__file__, case)
                rows.append(row)
                print(f"{impl:16s} N={n:6d} {label:9s} "
                      + (f"{row['seconds']:8.3f} s  idx {row['idx_sha256']}" if "seconds" in row else f"error: {row['error']}"),
                      flush=True)
    report = {"machine": platform.processor() or platform.machine(), "platform": platform.platform(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "rows": rows}
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
