"""CPU benchmark of the precision variants: encoder images/s of the INT8 (Q/DQ) file vs fp32 in ONNX Runtime.

    python benchmarks/bench_precision.py [--json benchmarks/results/precision.json] [--fp16]

Two encoders, batch 1 and 32, each case in a fresh process (like bench_cpu.py):

* resnet50 at 256x128, last stride 1, random weights in the original's layout (the deployment-size
  model; its INT8 ranges come from min-max calibration on 64 synthetic crops: speed does not depend
  on the ranges);
* the shipped small model (export/data/nformer_synthetic.pth: resnet18 widths 16..128, 128x64),
  INT8 calibrated as ``runtime build --precision int8`` does (entropy, 512 crops of the synthetic
  training split).

The INT8 file is exactly what ``runtime build --precision int8`` writes (the one TensorRT builds:
symmetric int8 activations).  The CPU INT8 file (``runtime build --precision int8-cpu``: uint8
activations, ONNX Runtime's x86 format, which TensorRT cannot use) is timed too, with the same
calibration; ``benchmarks/bench_cpu_int8.py`` compares the three encoders in one interleaved run.
``--fp16`` adds the FP16 files (ONNX Runtime's CPU provider runs many fp16 nodes through inserted
casts, so this measures that fallback, not fp16 arithmetic).  Time: median of the timed calls after
one warm-up.  The load average is sampled before and after every case: other processes on this
shared machine take CPU time from the measurement.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from isolated import run_in_subprocess  # noqa: E402  (benchmarks/, this script's folder)


def run_case(case: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import numpy as np

    from runtime.backends import OnnxRuntimeBackend

    h, w = case["input_size_hw"]
    b = case["batch"]
    images = np.random.default_rng(0).standard_normal((b, 3, h, w)).astype(np.float32)
    backend = OnnxRuntimeBackend(case["onnx"], ["CPUExecutionProvider"], case["threads"])
    load_before = os.getloadavg()[0]
    backend.run({"images": images})  # warm-up
    times = []
    for _ in range(case["repeats"]):
        t = time.perf_counter()
        backend.run({"images": images})
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return {**case, "seconds": seconds, "images_per_s": b / seconds, "times": times,
            "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}


def spawn(case: dict) -> dict:
    return run_in_subprocess(__file__, case)


def prepare(work: Path, fp16: bool) -> list[dict]:
    """Export both models, write their INT8 (and FP16) files; one entry per model."""
    from calibration.variants import write_variants
    from export.contract.config import ModelConfig
    from export.reference.testing import save_random_checkpoint
    from export.to_onnx import export_checkpoint
    from export.shipped import SHIPPED, shipped_card
    from runtime.evaluation.synth import generate

    data = work / "synthetic"
    print("generating synthetic crops (runtime synth, 600 identities) ...", flush=True)
    generate(data, identities=600, seed=0)
    models = []
    checkpoint = work / "resnet50.pth"
    save_random_checkpoint(checkpoint, ModelConfig(arch="resnet50"), seed=0)
    print("exporting resnet50 (random weights, 256x128) ...", flush=True)
    export_checkpoint(checkpoint, work / "resnet50", batches=(1,), sizes=(7,), log=lambda *a: None)
    models.append({"model": "resnet50 256x128 (random weights)", "dir": work / "resnet50", "input_size_hw": (256, 128),
                   "calibration": {"calib_method": "minmax", "calib_images": 64}})
    if SHIPPED.is_file():
        size = tuple(shipped_card()["export_options"]["input_size_hw"])
        print("exporting the shipped small model ...", flush=True)
        export_checkpoint(SHIPPED, work / "shipped", input_size_hw=size, batches=(1,), sizes=(7,), log=lambda *a: None)
        models.append({"model": f"shipped resnet18-small {size[0]}x{size[1]}", "dir": work / "shipped",
                       "input_size_hw": size, "calibration": {"calib_method": "entropy", "calib_images": 512}})
    for m in models:
        print(f"writing INT8 encoder of {m['model']} ...", flush=True)
        t = time.perf_counter()
        write_variants(m["dir"], "int8", calib_data=data, refine_precision="fp32", log=lambda *a: None,
                       **m["calibration"])
        m["calibration_seconds"] = time.perf_counter() - t
        m["files"] = {"fp32": m["dir"] / "encoder.onnx", "int8": m["dir"] / "encoder.int8.onnx"}
        write_variants(m["dir"], "int8-cpu", calib_data=data, log=lambda *a: None, **m["calibration"])
        m["files"]["int8-cpu (not TensorRT)"] = m["dir"] / "encoder.int8-cpu.onnx"
        if fp16:
            write_variants(m["dir"], "fp16", log=lambda *a: None)
            m["files"]["fp16"] = m["dir"] / "encoder.fp16.onnx"
    return models


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "precision.json")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--fp16", action="store_true", help="Also time the FP16 files (ONNX Runtime's CPU fallback).")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    from export.contract.parity import format_table

    work = Path(tempfile.mkdtemp(prefix="nformer-bench-precision-"))
    models = prepare(work, args.fp16)
    results = []
    for m in models:
        small = m["input_size_hw"][0] < 256
        for batch, repeats in ((1, 100 if small else 20), (32, 10 if small else 3)):
            for precision, path in m["files"].items():
                case = {"model": m["model"], "precision": precision, "batch": batch, "repeats": repeats,
                        "onnx": str(path), "input_size_hw": list(m["input_size_hw"]), "threads": args.threads}
                print(f"  {m['model']} {precision} batch={batch} ...", flush=True)
                results.append(spawn(case))
    rows = []
    for r in results:
        base = next((x for x in results if x["model"] == r["model"] and x["batch"] == r["batch"]
                     and x["precision"] == "fp32" and "seconds" in x), None)
        rows.append({"model": r["model"], "precision": r["precision"], "batch": r["batch"],
                     "ms_per_batch": 1000 * r["seconds"] if "seconds" in r else float("nan"),
                     "images/s": r.get("images_per_s", float("nan")),
                     "vs_fp32": (base["seconds"] / r["seconds"]) if base and "seconds" in r else "",
                     "load_1min": f"{r.get('loadavg_1min_before', float('nan')):.1f}->"
                                  f"{r.get('loadavg_1min_after', float('nan')):.1f}",
                     "error": r.get("error", "")})
    print(format_table(rows, ["model", "precision", "batch", "ms_per_batch", "images/s", "vs_fp32", "load_1min", "error"]))
    import onnxruntime

    flags = set()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pass
    report = {
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "int8_instructions": sorted(flags & {"avx2", "avx512_vnni", "avx_vnni", "amx_int8"})},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {"onnxruntime": onnxruntime.__version__},
        "models": [{k: (str(v) if isinstance(v, Path) else v) for k, v in m.items() if k != "files"} for m in models],
        "results": results, "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
