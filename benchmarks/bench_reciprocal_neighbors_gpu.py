"""GPU benchmark of the reciprocal-neighbour kernels and of the whole refinement built on them.

    PYTHONPATH=. python3 benchmarks/bench_reciprocal_neighbors_gpu.py \
        [--sizes 19281,100000,300000,1000000] [--json benchmarks/results/reciprocal_neighbors_gpu.json]

For each N (D = 256, k = 20, clustered unit-norm features: one identity centre per 25 images, about
Market-1501's 19,281 / 751, plus per-image noise):

* ``kernels``: the neighbour step alone (libnformer_kernels.so through ctypes): prepare, fp16
  tensor-core candidate pass (wgmma on compute capability 9.0, else mma.sync), fp64 rescore +
  certification, exact fallback, reciprocal check;
* ``kernels-resident``: the same with the mma.sync resident-rows candidate kernel (the wgmma kernel's
  baseline, same data, same run); ``kernels-generic``: the generic mma.sync candidate kernel;
* ``phases-*``: per-kernel GPU time of one call (torch.profiler) at ``--profile-n``;
* ``torch-dense-topk``: plain PyTorch fp32 ``topk(xn @ xn^T)`` + the reciprocal check, where the
  N x N matrix fits (else recorded as out of memory, not run);
* ``refine-kernels``: the 4-layer NFormer (``export.reference.nformer.NFormer``, random weights, 5 landmarks)
  with the kernels' neighbour lists, O(N k) layers in eager PyTorch (``row_block`` bounds memory);
* ``refine-dense-original``: the original's dense eval path (``dense=True``) where it fits.

Time: CUDA events, median of ``--repeats`` calls after ``--warmup``.  Memory: peak of
``torch.cuda.max_memory_allocated`` during the calls (the kernels' workspace is a torch tensor, so it
is included; the library allocates nothing itself), with the features, and above them.  Exactness:
at N <= ``--verify-max`` the kernels' lists are compared with ``export.reference.reciprocal_neighbors`` (fp64
reference, run on the GPU).  A table is printed and everything goes to JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from plugins.reciprocal_neighbors import cuda as rn_cuda  # noqa: E402

GB = 1024 ** 3


def clustered_gpu(n, dim=256, per_identity=25, spread=0.35, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    ids = max(1, n // per_identity)
    centres = torch.randn(ids, dim, generator=g, device=device)
    which = torch.randint(0, ids, (n,), generator=g, device=device)
    x = centres[which] + spread * torch.randn(n, dim, generator=g, device=device)
    del centres, which
    return torch.nn.functional.normalize(x, dim=-1)[None].contiguous()


def timed(fn, warmup, repeats):
    """Median seconds (CUDA events) and peak allocated bytes over the calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times), torch.cuda.max_memory_allocated(), times


def free_bytes():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def run_kernels_case(x, k, args, row, repeats=None, **options):
    n = x.shape[1]
    plan = rn_cuda.plan(1, n, x.shape[2], k)
    ws = torch.empty(rn_cuda.workspace_size(1, n, x.shape[2], k), dtype=torch.uint8, device=x.device)
    idx = torch.empty(1, n, min(k, n), dtype=torch.int32, device=x.device)
    valid = torch.empty_like(idx)

    def call():
        rn_cuda.reciprocal_neighbors(x, k, out=(idx, valid), workspace=ws, **options)

    _, _, stats = rn_cuda.reciprocal_neighbors(x, k, out=(idx, valid), workspace=ws, stats=True, **options)
    base = torch.cuda.memory_allocated() - ws.numel() - 2 * idx.numel() * 4
    t, peak, times = timed(call, args.warmup if repeats is None else 1, repeats or args.repeats)
    row.update({
        "time_s": t, "times_s": times, "peak_gb": peak / GB, "above_features_gb": (peak - base) / GB,
        "workspace_gb": ws.numel() / GB, "candidates": plan.candidates, "splits": plan.splits,
        "error_bound": plan.error_bound, "fallback_rows": stats["fallback_rows"],
        "bound_violations": stats["bound_violations"], "candidate_kernel": stats["candidate_kernel"],
    })
    return idx, valid


def profile_phases(x, k, results, n):
    """Per-kernel GPU time of one call of the default and the resident path (torch.profiler / CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    for label, options in (("default", {}), ("resident", {"no_wgmma": True})):
        rn_cuda.reciprocal_neighbors(x, k, **options)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            rn_cuda.reciprocal_neighbors(x, k, **options)
            torch.cuda.synchronize()
        phases = {}
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if t:
                phases[ev.key[:80]] = round(t / 1e3, 4)  # ms
        results.append({"case": f"phases-{label}", "n": n, "phases_ms": phases})
        print(f"phases ({label}, N={n:,}): " + "; ".join(f"{k_}: {v} ms" for k_, v in sorted(
            phases.items(), key=lambda kv: -kv[1])), flush=True)


def verify(x, idx, valid, k):
    from export.reference.reciprocal_neighbors import reciprocal_neighbors as reference

    ref_idx, ref_valid = reference(x, k)
    rows_differ = int((ref_idx != idx.long()).any(-1).sum())
    valid_differ = int((ref_valid != (valid != 0)).sum())
    return {"rows_differ": rows_differ, "valid_differ": valid_differ,
            "identical": rows_differ == 0 and valid_differ == 0}


def dense_topk(x, k):
    from export.reference.reciprocal_neighbors import reciprocal_validity

    sim = torch.matmul(x, x.transpose(1, 2))
    idx = torch.topk(sim, k, dim=-1).indices
    del sim
    return idx, reciprocal_validity(idx)


def make_model(k, seed=0):
    from export.reference.nformer import NFormer

    torch.manual_seed(seed)
    model = NFormer(n_layer=4, n_embd=256, n_head=2, k=k, num_classes=751)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.normal_(0, 0.02)  # the original's Conv1D init
            elif name.endswith(".b"):
                p.normal_(0, 0.02)
        model.bottleneck.running_mean.normal_(0, 0.1)
        model.bottleneck.running_var.uniform_(0.5, 1.5)
    return model.cuda().eval()


def bench_size(n, args, model, results):
    k, dim = args.k, args.dim
    print(f"--- N = {n:,}", flush=True)
    torch.cuda.empty_cache()
    x = clustered_gpu(n, dim, per_identity=args.per_identity, seed=n)
    features_gb = x.numel() * 4 / GB
    landmarks = torch.stack([torch.randperm(n, device=x.device)[: min(5, n)] for _ in range(4)])

    row = {"case": "kernels", "n": n, "features_gb": features_gb}
    idx, valid = run_kernels_case(x, k, args, row)
    results.append(row)
    print(f"kernels: {row['time_s'] * 1e3:.2f} ms, peak {row['peak_gb']:.2f} GB, "
          f"fallback rows {row['fallback_rows']}, violations {row['bound_violations']}", flush=True)
    if n <= args.verify_max:
        t0 = time.time()
        row["verify"] = verify(x, idx, valid, k)
        print(f"  vs fp64 reference: {row['verify']} ({time.time() - t0:.1f} s)", flush=True)

    if n <= args.resident_max:  # the mma.sync resident-rows kernel: the baseline of the wgmma kernel, same run
        rrow = {"case": "kernels-resident", "n": n, "features_gb": features_gb}
        r_idx, r_valid = run_kernels_case(x, k, args, rrow, repeats=None if n < 500_000 else 2, no_wgmma=True)
        rrow["same_as_default"] = bool(torch.equal(r_idx, idx) and torch.equal(r_valid, valid))
        results.append(rrow)
        print(f"kernels-resident: {rrow['time_s'] * 1e3:.2f} ms ({rrow['candidate_kernel']}), "
              f"same lists: {rrow['same_as_default']}", flush=True)
        del r_idx, r_valid

    if n == args.profile_n:
        profile_phases(x, k, results, n)

    if n <= args.generic_max:  # the generic candidate kernel (other GPUs, larger k or D) on the same data
        grow = {"case": "kernels-generic", "n": n, "features_gb": features_gb}
        g_idx, g_valid = run_kernels_case(x, k, args, grow, generic=True)
        grow["same_as_default"] = bool(torch.equal(g_idx, idx) and torch.equal(g_valid, valid))
        results.append(grow)
        print(f"kernels-generic: {grow['time_s'] * 1e3:.2f} ms, same lists: {grow['same_as_default']}", flush=True)
        del g_idx, g_valid

    # plain PyTorch fp32 dense top-k, where the N x N matrix fits
    need = 4.0 * n * n + 8.0 * n * k * k
    row = {"case": "torch-dense-topk", "n": n, "features_gb": features_gb, "estimated_gb": need / GB}
    if need < 0.8 * free_bytes():
        try:
            t, peak, times = timed(lambda: dense_topk(x, k), 1, args.repeats)
            row.update({"time_s": t, "times_s": times, "peak_gb": peak / GB})
            if n <= args.verify_max:
                d_idx, _ = dense_topk(x, k)
                row["sets_differ_from_fp64_rows"] = int(
                    (torch.sort(d_idx, -1).values != torch.sort(idx.long(), -1).values).any(-1).sum())
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
    else:
        row["status"] = f"not run: N x N fp32 needs {need / GB:.0f} GB"
    results.append(row)
    print(f"torch-dense-topk: {row.get('time_s', row.get('status'))}", flush=True)
    del idx, valid
    torch.cuda.empty_cache()

    if model is None:
        return
    # whole refinement with the kernels' lists
    row = {"case": "refine-kernels", "n": n, "features_gb": features_gb, "row_block": args.row_block}

    def refine():
        i32, v32 = rn_cuda.reciprocal_neighbors(x, k)
        with torch.no_grad():
            return model(x, landmarks, neighbors=(i32.long(), v32 != 0), row_block=args.row_block)

    try:
        t, peak, times = timed(refine, 1, max(1, args.repeats if n < 500_000 else min(args.repeats, 3)))
        row.update({"time_s": t, "times_s": times, "peak_gb": peak / GB})
        out = refine()
        row["finite"] = bool(torch.isfinite(out).all())
        del out
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    results.append(row)
    print(f"refine-kernels: {row.get('time_s', row.get('status'))} s, peak {row.get('peak_gb', float('nan')):.2f} GB",
          flush=True)
    torch.cuda.empty_cache()

    # the original's dense eval path, where it fits (8.5 GB at N = 19,281 measured; grows as N^2)
    need = 8.5 * GB * (n / 19281) ** 2
    row = {"case": "refine-dense-original", "n": n, "features_gb": features_gb, "estimated_gb": need / GB}
    if need < 0.7 * free_bytes():
        try:
            with torch.no_grad():
                t, peak, times = timed(lambda: model(x, landmarks, dense=True), 1, args.repeats)
            row.update({"time_s": t, "times_s": times, "peak_gb": peak / GB})
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
    else:
        row["status"] = f"not run: about {need / GB:.0f} GB of N x N matrices"
    results.append(row)
    print(f"refine-dense-original: {row.get('time_s', row.get('status'))}", flush=True)
    del x
    torch.cuda.empty_cache()


def environment():
    env = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "command": " ".join(sys.argv)}
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = "unavailable"
    return env


def fmt_row(r):
    t = r.get("time_s")
    time_s = (f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.3f} s") if t is not None else r.get("status", "-")
    peak = f"{r['peak_gb']:.2f}" if "peak_gb" in r else "-"
    extra = []
    if r["case"].startswith("phases"):
        return f"| {r['case']} | {r['n']:,} | - | - | " + "; ".join(
            f"{k}: {v} ms" for k, v in sorted(r["phases_ms"].items(), key=lambda kv: -kv[1])) + " |"
    if r["case"].startswith("kernels") and "time_s" in r:
        extra.append(f"{r['candidate_kernel']} candidates, ws {r['workspace_gb']:.2f} GB, c={r['candidates']} S={r['splits']}, "
                     f"fallback rows {r['fallback_rows']}, bound violations {r['bound_violations']}")
        if "same_as_default" in r:
            extra.append("same lists as the default kernel" if r["same_as_default"] else "LISTS DIFFER")
        if "verify" in r:
            extra.append("identical to fp64 reference" if r["verify"]["identical"] else f"DIFFERS {r['verify']}")
    if "sets_differ_from_fp64_rows" in r:
        extra.append(f"{r['sets_differ_from_fp64_rows']} rows' sets differ from the fp64 ranking")
    if r["case"].startswith("refine") and "finite" in r:
        extra.append("finite" if r["finite"] else "NON-FINITE OUTPUT")
    return f"| {r['case']} | {r['n']:,} | {time_s} | {peak} | {'; '.join(extra)} |"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="19281,100000,300000,1000000")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--per-identity", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--row-block", type=int, default=65536)
    ap.add_argument("--verify-max", type=int, default=100_000)
    ap.add_argument("--generic-max", type=int, default=19281,
                    help="also time the generic candidate kernel up to this N")
    ap.add_argument("--resident-max", type=int, default=1_000_000,
                    help="also time the mma.sync resident-rows kernel (the wgmma kernel's baseline) up to this N")
    ap.add_argument("--profile-n", type=int, default=19281,
                    help="per-kernel times (torch.profiler) of one call at this N")
    ap.add_argument("--no-refine", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=25.0,
                    help="skip a size whose neighbour step is estimated (N^2 from the last size) above this")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "reciprocal_neighbors_gpu.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this benchmark needs one")
    env = environment()
    print(json.dumps(env, indent=1), flush=True)
    model = None
    if not args.no_refine:
        try:
            model = make_model(args.k)
        except (ImportError, TypeError, AttributeError) as err:
            print(f"refinement skipped: export.reference.nformer.NFormer unavailable ({err})", flush=True)
    results = []
    last = None
    for n in [int(s) for s in args.sizes.split(",")]:
        if last is not None:
            est = last[1] * (n / last[0]) ** 2
            if est > args.max_seconds:
                results.append({"case": "kernels", "n": n, "status": f"skipped: estimated {est:.1f} s"})
                print(f"N = {n:,} skipped (estimated {est:.1f} s)", flush=True)
                continue
        bench_size(n, args, model, results)
        t = next((r.get("time_s") for r in results if r["case"] == "kernels" and r["n"] == n), None)
        last = (n, t) if t else last
    print()
    print(f"{env['gpu']}, {env['date']}, torch {env['torch']}, D={args.dim}, k={args.k}")
    print("| case | N | time | peak GPU memory (GB) | notes |")
    print("|---|---|---|---|---|")
    for r in results:
        print(fmt_row(r))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"environment": env, "args": vars(args), "results": results}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
