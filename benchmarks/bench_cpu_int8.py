"""CPU INT8 encoder: fp32 vs TensorRT's INT8 file vs the CPU INT8 file, in ONNX Runtime, in one run.

    python benchmarks/bench_cpu_int8.py [--json benchmarks/results/cpu_int8.json] [--repeats 9]

Three encoder files of one model, each written exactly as `runtime build` writes it
(``calibration.variants.write_variants``):

* ``fp32``     -- ``encoder.onnx`` (the export);
* ``int8``     -- ``encoder.int8.onnx``, TensorRT's format (symmetric int8 activations);
* ``int8-cpu`` -- ``encoder.int8-cpu.onnx``, ONNX Runtime's x86 format (uint8 activations, 7-bit
  per-channel int8 weights), calibrated on the same crops.

Models: resnet50 at 256x128, last stride 1, random weights in the original's layout (speed does not
depend on the weights or the ranges, so both INT8 files take min-max ranges from 64 synthetic crops);
and the shipped small model (``export/data/nformer_synthetic.pth``, resnet18 widths 16..128, 128x64)
with `runtime build`'s defaults (entropy, 512 crops of the synthetic training split).

Timing: each file runs in a fresh process (ONNX Runtime CPU provider, ``--threads`` intra-op
threads, the runtime's defaults otherwise: one session's spinning worker threads never compete with
another's), one warm-up call, then timed calls.  Per model and batch size the three files take turns
in ``--blocks`` blocks (rotating order), so that load from other processes on a shared machine falls
on all three alike; the table gives the median and the minimum over all timed calls of a file and the
speed-ups from each.  The 1-minute load average is sampled before and after every block.

Which int8 kernels ran: ONNX Runtime's optimised graph of each file is counted (``QLinearConv``,
``QLinearAdd``, ``QGemm`` are integer kernels; Conv between DequantizeLinear and QuantizeLinear is
float), and MLAS's kernel choice is derived from the CPU flags with MLAS's own dispatch rules
(``onnxruntime/core/mlas/lib/platform.cpp``, ``convsym.cpp``): a QLinearConv with uint8 input and
symmetric int8 weights uses the ``ConvSym`` kernels (AVX2 < AVX-VNNI < AVX-512 core < AVX-512 VNNI,
the last the CPU has) when its input channels are a multiple of 4 and it has at least 16 output
channels; the u8s8 GEMM (QGemm, and the other convolutions: the 3-channel stem) uses AMX tiles where
the CPU has AMX-INT8 and the kernel granted this process the AMX state (checked with
``arch_prctl(ARCH_GET_XCOMP_PERM)`` after the runs), else the same VNNI / AVX2 chain.  The kernels
themselves are not traced.
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

from isolated import cpu_name, run_in_subprocess  # noqa: E402  (benchmarks/, this script's folder)

FILES = ("fp32", "int8", "int8-cpu")
LABELS = {"fp32": "fp32", "int8": "int8 (TensorRT format, symmetric int8 activations)",
          "int8-cpu": "int8-cpu (ONNX Runtime x86 format, uint8 activations)"}
FLAGS = ("avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx_vnni", "avx_vnni_int8",
         "amx_tile", "amx_int8")
COUNTED = ("QLinearConv", "QLinearAdd", "QGemm", "Conv", "FusedConv", "Gemm", "QuantizeLinear", "DequantizeLinear")


# ---------------------------------------------------------------------------------------------------
# the machine


def cpu_facts() -> dict:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": cpu_name(), "cpus": os.cpu_count(), "int8_flags": [f for f in FLAGS if f in flags]}


def amx_granted() -> bool | None:
    """Whether this process holds the AMX tile state (MLAS asks for it when it selects its AMX GEMM);
    None where the question cannot be asked (not Linux x86-64)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    import ctypes

    sys_arch_prctl, arch_get_xcomp_perm, xfeature_xtiledata = 158, 0x1022, 18
    libc = ctypes.CDLL(None, use_errno=True)
    mask = ctypes.c_uint64(0)
    if libc.syscall(sys_arch_prctl, arch_get_xcomp_perm, ctypes.byref(mask)) != 0:
        return None
    return bool(mask.value >> xfeature_xtiledata & 1)


def conv_paths(path: str) -> dict:
    """How many convolutions of the fp32 encoder ``path`` MLAS's ConvSym kernels take (input channels
    a multiple of 4, >= 16 output channels; module docstring) and how many go to the u8s8 GEMM."""
    import onnx

    model = onnx.load(path)
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    shapes = [weights.get(n.input[1]) for n in model.graph.node if n.op_type == "Conv"]
    convsym = sum(1 for s in shapes if s and s[1] % 4 == 0 and s[0] >= 16)
    return {"convsym": convsym, "gemm": len(shapes) - convsym}


def mlas_int8_kernels(flags: set[str], amx: bool | None, convs: dict | None = None) -> dict:
    """MLAS's kernels for uint8 x int8 on this CPU, by its dispatch rules (module docstring)."""
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        chain = "AVX-512 VNNI (vpdpbusd)" if "avx512_vnni" in flags else "AVX-512 core (vpmaddubsw, saturating)"
    elif "avx_vnni" in flags:
        chain = "AVX-VNNI (vpdpbusd)"
    elif "avx2" in flags:
        chain = "AVX2 (vpmaddubsw, saturating: the CPU file's 7-bit weights avoid it)"
    else:
        chain = "SSE4.1"
    has_amx = {"amx_tile", "amx_int8"} <= flags
    gemm = "AMX-INT8 tiles" if has_amx and amx else chain
    convs = convs or {}
    return {"qlinearconv_convsym": f"{chain} ({convs.get('convsym', '?')} convolutions of resnet50)",
            "u8s8_gemm": f"{gemm} (QGemm and {convs.get('gemm', '?')} convolution(s) of resnet50)",
            "amx": "granted to this process" if amx else ("not granted" if has_amx else "not in this CPU"),
            "int8_x_int8 (the TensorRT file's symmetric activations)":
                "AVX-VNNI-INT8" if "avx_vnni_int8" in flags else
                "MLAS's int8 x int8 VNNI GEMM needs AVX-VNNI-INT8, absent here (see int8_convs for what fused)"}


# ---------------------------------------------------------------------------------------------------
# one case, in a fresh process


def optimized_ops(path: str, threads: int) -> dict:
    """Counts of the ops ONNX Runtime runs for ``path`` (its optimised graph, saved at the extended
    level so that it stays hardware independent)."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        counts = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return {op: counts.get(op, 0) for op in COUNTED}


def run_case(case: dict) -> dict:
    """One file: warm-up, ``repeats`` timed calls; its embeddings saved to ``case["out"]``."""
    import numpy as np

    from runtime.backends import OnnxRuntimeBackend

    h, w = case["input_size_hw"]
    images = np.random.default_rng(0).standard_normal((case["batch"], 3, h, w)).astype(np.float32)
    session = OnnxRuntimeBackend(case["path"], ["CPUExecutionProvider"], case["threads"], precision=case["file"])
    load_before = os.getloadavg()[0]
    np.save(case["out"], session.run({"images": images})["embeddings"])  # warm-up
    times = []
    for _ in range(case["repeats"]):
        t = time.perf_counter()
        session.run({"images": images})
        times.append(time.perf_counter() - t)
    return {**case, "times": times, "amx_granted": amx_granted(), "loadavg_1min_before": load_before,
            "loadavg_1min_after": os.getloadavg()[0],
            "ops": optimized_ops(case["path"], case["threads"]) if case["count_ops"] else None}


def run_model(m: dict, batch: int, repeats: int, blocks: int, threads: int, work: Path) -> dict:
    """The three files of one model at one batch size, in ``blocks`` rotating rounds of fresh processes."""
    import numpy as np

    per_block = max(1, repeats // blocks)
    runs = {name: [] for name in FILES}
    for b in range(blocks):
        order = FILES[b % len(FILES):] + FILES[:b % len(FILES)]
        for name in order:
            case = {"model": m["model"], "file": name, "path": m["files"][name], "batch": batch,
                    "repeats": per_block, "threads": threads, "input_size_hw": list(m["input_size_hw"]),
                    "out": str(work / f"out-{name}.npy"), "count_ops": b == 0}
            runs[name].append(run_in_subprocess(__file__, case))
    errors = [r["error"] for rs in runs.values() for r in rs if "error" in r]
    if errors:
        return {"model": m["model"], "batch": batch, "error": errors[0]}

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    ref = unit(np.load(work / "out-fp32.npy"))
    results = {}
    for name, rs in runs.items():
        times = [t for r in rs for t in r["times"]]
        cosine = np.sum(unit(np.load(work / f"out-{name}.npy")) * ref, axis=1)
        results[name] = {"median_s": statistics.median(times), "min_s": min(times), "times": times,
                         "cosine_to_fp32_mean": float(np.mean(cosine)),
                         "ops": rs[0]["ops"], "amx_granted": rs[0]["amx_granted"]}
    loads = [x for rs in runs.values() for r in rs for x in (r["loadavg_1min_before"], r["loadavg_1min_after"])]
    return {"model": m["model"], "batch": batch, "repeats": per_block * blocks, "blocks": blocks, "threads": threads,
            "results": results, "amx_granted": results["int8-cpu"]["amx_granted"],
            "loadavg_1min_min": min(loads), "loadavg_1min_max": max(loads)}


# ---------------------------------------------------------------------------------------------------
# preparation and the report


def prepare(work: Path) -> list[dict]:
    """Export both models and write their two INT8 encoders; one entry per model."""
    from calibration.variants import write_variants
    from export.contract.config import ModelConfig
    from export.contract.variants import variant_file
    from export.reference.testing import save_random_checkpoint
    from export.shipped import SHIPPED, shipped_card
    from export.to_onnx import export_checkpoint
    from runtime.evaluation.synth import generate

    data = work / "synthetic"
    print("generating synthetic crops (runtime synth, 600 identities) ...", flush=True)
    generate(data, identities=600, seed=0)
    checkpoint = work / "resnet50.pth"
    save_random_checkpoint(checkpoint, ModelConfig(arch="resnet50"), seed=0)
    print("exporting resnet50 (random weights, 256x128) ...", flush=True)
    export_checkpoint(checkpoint, work / "resnet50", batches=(1,), sizes=(7,), log=lambda *a: None)
    models = [{"model": "resnet50 256x128 (random weights)", "dir": work / "resnet50", "input_size_hw": (256, 128),
               "calibration": {"calib_method": "minmax", "calib_images": 64}}]
    if SHIPPED.is_file():
        size = tuple(shipped_card()["export_options"]["input_size_hw"])
        print("exporting the shipped small model ...", flush=True)
        export_checkpoint(SHIPPED, work / "shipped", input_size_hw=size, batches=(1,), sizes=(7,), log=lambda *a: None)
        models.append({"model": f"shipped resnet18-small {size[0]}x{size[1]}", "dir": work / "shipped",
                       "input_size_hw": size, "calibration": {"calib_method": "entropy", "calib_images": 512}})
    for m in models:
        m["calibration_seconds"] = {}
        for precision in FILES[1:]:
            print(f"writing {variant_file('encoder', precision)} of {m['model']} ...", flush=True)
            t = time.perf_counter()
            write_variants(m["dir"], precision, calib_data=data, refine_precision="fp32", log=lambda *a: None,
                           **m["calibration"])
            m["calibration_seconds"][precision] = time.perf_counter() - t
        m["files"] = {p: str(m["dir"] / variant_file("encoder", p)) for p in FILES}
    return models


def table_rows(cases: list[dict]) -> list[dict]:
    rows = []
    for case in cases:
        if "error" in case:
            rows.append({"model": case["model"], "batch": case["batch"], "error": case["error"]})
            continue
        base = case["results"]["fp32"]
        for name, r in case["results"].items():
            ops = r["ops"]
            convs = ops["QLinearConv"] + ops["Conv"] + ops["FusedConv"]
            rows.append({"model": case["model"], "file": name, "batch": case["batch"],
                         "ms_median": 1000 * r["median_s"], "ms_min": 1000 * r["min_s"],
                         "images/s": case["batch"] / r["median_s"],
                         "vs_fp32_median": base["median_s"] / r["median_s"], "vs_fp32_min": base["min_s"] / r["min_s"],
                         "int8_convs": f"{ops['QLinearConv']}/{convs}", "cos_fp32": r["cosine_to_fp32_mean"],
                         "load_1min": f"{case['loadavg_1min_min']:.1f}-{case['loadavg_1min_max']:.1f}"})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "cpu_int8.json")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=9, help="Timed calls per file at batch 32 (x4 at batch 1).")
    parser.add_argument("--blocks", type=int, default=3, help="Rounds of fresh processes the calls are split into.")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    import onnxruntime

    from export.contract.files import write_json_atomic
    from export.contract.parity import format_table

    machine = cpu_facts()
    print(f"CPU: {machine['model']}, {machine['cpus']} cpus, int8 flags: {' '.join(machine['int8_flags']) or 'none'}")
    work = Path(tempfile.mkdtemp(prefix="nformer-bench-cpu-int8-"))
    models = prepare(work)
    cases = []
    for m in models:
        for batch in (32, 1):
            repeats = args.repeats if batch == 32 else 4 * args.repeats
            print(f"  {m['model']} batch={batch}: {repeats} calls of each of {', '.join(FILES)} in {args.blocks} "
                  "blocks ...", flush=True)
            cases.append(run_model(m, batch, repeats, args.blocks, args.threads, work))
    rows = table_rows(cases)
    print(format_table(rows, ["model", "file", "batch", "ms_median", "ms_min", "images/s", "vs_fp32_median",
                              "vs_fp32_min", "int8_convs", "cos_fp32", "load_1min", "error"]))
    amx = next((c.get("amx_granted") for c in cases if "error" not in c), None)
    kernels = mlas_int8_kernels(set(machine["int8_flags"]), amx, conv_paths(models[0]["files"]["fp32"]))
    print("int8 kernels (MLAS dispatch for this CPU): " + "; ".join(f"{k}: {v}" for k, v in kernels.items()))
    report = {
        "machine": {**machine, "node": platform.node(), "python": platform.python_version(),
                    "int8_kernels": kernels},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {"onnxruntime": onnxruntime.__version__},
        "models": [{k: (str(v) if isinstance(v, Path) else v) for k, v in m.items() if k not in ("files", "dir")}
                   for m in models],
        "cases": cases, "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, report)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
