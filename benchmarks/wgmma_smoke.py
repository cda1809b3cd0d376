"""Quick GPU check of the candidate kernels before the long steps of gpu_plugin_run.sh.

    PYTHONPATH=. python3 benchmarks/wgmma_smoke.py

Runs the default path (the wgmma candidate kernel on compute capability 9.0) and the mma.sync resident
path on small random and clustered inputs and compares both with the fp64 reference. On a mismatch or
an error-bound violation it prints the first rows' candidate lists from the workspace beside the exact
cosines (what a wrong fragment layout or descriptor looks like), and exits 1, so that the run script can
stop before spending device time on the long steps.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from export.reference.reciprocal_neighbors import reciprocal_neighbors as reference  # noqa: E402
from export.reference.testing import clustered_features  # noqa: E402
from plugins.reciprocal_neighbors import cuda as rn  # noqa: E402


def align(v, a=256):
    return (v + a - 1) // a * a


def candidate_lists(ws, n, d, c, splits):
    """candIdx / candScore from the workspace (layout of layoutFor() in reciprocalNeighborsKernels.cu, B = 1)."""
    base = (-ws.data_ptr()) % 256
    off = align(256)                      # counters
    off = align(off + n * 8)              # norms
    off = align(off + n * align(d, 64) * 2)  # y
    idx_off = off
    off = align(off + n * splits * c * 4)
    score_off = off
    raw = ws[base:]
    cand_idx = raw[idx_off: idx_off + n * splits * c * 4].view(torch.int32).view(n, splits * c)
    cand_score = raw[score_off: score_off + n * splits * c * 4].view(torch.float32).view(n, splits * c)
    return cand_idx, cand_score


def check(name, x, k, **options):
    p = rn.plan(1, x.shape[1], x.shape[2], k)
    ws = torch.empty(rn.workspace_size(1, x.shape[1], x.shape[2], k), dtype=torch.uint8, device="cuda")
    idx, valid, stats = rn.reciprocal_neighbors(x, k, workspace=ws, stats=True, **options)
    torch.cuda.synchronize()
    ref_idx, ref_valid = reference(x.cpu().float(), k)
    rows = (idx.cpu().long() != ref_idx).any(-1)
    ok = not rows.any() and torch.equal(valid.cpu() != 0, ref_valid) and stats["bound_violations"] == 0
    print(f"{name}: N={x.shape[1]} D={x.shape[2]} k={k} {stats} rows differ {int(rows.sum())} -> "
          f"{'OK' if ok else 'FAIL'}", flush=True)
    if not ok or stats["fallback_rows"] > x.shape[1] // 10:
        ci, cs = candidate_lists(ws, x.shape[1], x.shape[2], p.candidates, p.splits)
        xn = torch.nn.functional.normalize(x[0].double(), dim=-1)
        for i in range(2):
            order = torch.argsort(cs[i], descending=True)[:8]
            js = ci[i][order].long()
            exact = [(xn[i] @ xn[j]).item() if j >= 0 else float("nan") for j in js.tolist()]
            print(f"  row {i}: candidates {js.tolist()}\n    approx {[round(v, 4) for v in cs[i][order].tolist()]}"
                  f"\n    exact  {[round(v, 4) for v in exact]}")
            true = torch.topk(xn @ xn[i], 9).indices.tolist()
            print(f"    true best (self first): {true}")
    return ok


def main():
    torch.manual_seed(0)
    cap = torch.cuda.get_device_capability()
    print(f"{torch.cuda.get_device_name()} (compute capability {cap[0]}.{cap[1]})")
    good = True
    for n, d in ((1, 256), (7, 256), (130, 256), (1000, 256), (5000, 256), (3000, 100), (3000, 33)):
        x = torch.nn.functional.normalize(torch.randn(1, n, d), dim=-1).cuda()
        good &= check("default", x, 20)
        if n >= 1000 and d == 256:
            good &= check("resident", x, 20, no_wgmma=True)
    xc = torch.from_numpy(clustered_features(6000, seed=1, identities=300))[None].cuda()
    good &= check("default clustered", xc, 20)
    good &= check("default clustered c=32", xc, 20, candidates=32)
    print("SMOKE OK" if good else "SMOKE FAILED")
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
