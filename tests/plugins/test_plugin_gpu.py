"""The reciprocal-neighbour CUDA kernels against the one reference, on a GPU.

Identical neighbour lists (same rows, same slot order) and validity flags as
``export.reference.reciprocal_neighbors.reciprocal_neighbors`` (canonical keys, run on the CPU) on fresh random inputs
of several sizes, gallery-like clustered features, exact duplicates (a group larger than the candidate
list), zero rows, fp16 input, batches and odd feature sizes; poisoned outputs are fully overwritten.  The
contract tests compare with the brute-force oracle of ``tests/neighbor_oracle.py`` (every pair's canonical
key, export/contract/neighbor_key.py) on duplicates at scattered positions, near-duplicates and rows whose
keys tie only under the canonical summation order, through every kernel path (fast keys with near-tie
resolution, canonical keys throughout, the fallback scan alone).
Skipped, with the reason, without a CUDA GPU or without the built libnformer_kernels.so.  The inputs are
drawn from a fresh seed on every run; a failure prints it (set NFORMER_TEST_SEED to replay).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import plugins  # noqa: E402
from export.reference.reciprocal_neighbors import reciprocal_neighbors as reference  # noqa: E402
from export.reference.reciprocal_neighbors import reciprocal_validity  # noqa: E402
from export.reference.testing import clustered_features  # noqa: E402
from neighbor_oracle import canonical_lists, fsum_lists  # noqa: E402

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: torch.cuda.is_available() is False", allow_module_level=True)
try:
    plugins.kernels_library_path()
except plugins.PluginNotBuiltError as err:
    pytest.skip(f"kernels not built: {err}", allow_module_level=True)

from plugins.reciprocal_neighbors import cuda  # noqa: E402

SEED = int(os.environ.get("NFORMER_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
DEVICE = torch.device("cuda")


def random_unit(n, d=256, seed=0, b=1):
    g = torch.Generator().manual_seed(SEED + seed)
    return torch.nn.functional.normalize(torch.randn(b, n, d, generator=g), dim=-1)


def clustered(n, seed=0, **kw):
    return torch.from_numpy(clustered_features(n, seed=SEED + seed, **kw))[None]


_ref_cache: dict = {}


def reference_lists(x_cpu: torch.Tensor, k: int, key=None):
    """Reference (idx int64, valid bool) on the CPU from the values the kernels see (fp16 -> fp32 exact)."""
    if key is not None and (key, k) in _ref_cache:
        return _ref_cache[(key, k)]
    idx, valid = reference(x_cpu.float(), k)
    if key is not None:
        _ref_cache[(key, k)] = (idx, valid)
    return idx, valid


def reference_prefix(x_cpu, k, key):
    """Top-k lists are prefixes of top-64 lists (one total order): compute once, slice, recheck validity."""
    idx64, _ = reference_lists(x_cpu, 64, key)
    idx = idx64[..., : min(k, x_cpu.shape[1])].contiguous()
    return idx, reciprocal_validity(idx)


def run_kernels(x_cpu, k, dtype=torch.float32, **kw):
    x = x_cpu.to(DEVICE, dtype)
    idx, valid, stats = cuda.reciprocal_neighbors(x, k, stats=True, **kw)
    torch.cuda.synchronize()
    return idx.cpu(), valid.cpu(), stats


def assert_same(got_idx, got_valid, ref_idx, ref_valid, what):
    assert got_idx.dtype == torch.int32 and got_valid.dtype == torch.int32
    assert got_idx.shape == ref_idx.shape, f"{what}: shape {tuple(got_idx.shape)} != {tuple(ref_idx.shape)}"
    diff = (got_idx.long() != ref_idx).any(-1)
    if diff.any():
        b, i = [int(v) for v in diff.nonzero()[0]]
        raise AssertionError(
            f"{what} (seed {SEED}): {int(diff.sum())} rows differ; first b={b} i={i}\n"
            f"  kernels:   {got_idx[b, i].tolist()}\n  reference: {ref_idx[b, i].tolist()}")
    assert torch.equal(got_valid != 0, ref_valid), f"{what} (seed {SEED}): validity differs"
    assert set(got_valid.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("k", [20, 64])
@pytest.mark.parametrize("n", [1, 7, 21, 1000, 19281])
def test_random_features_match_the_reference(n, k):
    x = random_unit(n, seed=n)
    ref_idx, ref_valid = reference_prefix(x, k, ("random", n))
    idx, valid, stats = run_kernels(x, k)
    assert_same(idx, valid, ref_idx, ref_valid, f"random N={n} k={k}")
    assert stats["bound_violations"] == 0, stats


@pytest.mark.parametrize("k", [20, 64])
@pytest.mark.parametrize("n", [1000, 19281])
def test_clustered_gallery_features_match_the_reference(n, k):
    """751 identity centres + per-image noise, like Market-1501's query + gallery set."""
    x = clustered(n, seed=1, identities=751)
    ref_idx, ref_valid = reference_prefix(x, k, ("clustered", n))
    idx, valid, stats = run_kernels(x, k)
    assert_same(idx, valid, ref_idx, ref_valid, f"clustered N={n} k={k}")
    assert stats["bound_violations"] == 0, stats


@pytest.mark.parametrize("k", [20, 64])
def test_duplicates_and_zero_rows_match_the_reference(k):
    """Exact duplicates (a group of 31 from clustered_features, and one of 150 > c) and zero rows: ties
    go to the lower index; rows whose candidate list cannot be certified take the exact fallback."""
    x = clustered(3000, seed=2, identities=300, duplicates=120)
    x[0, 500:650] = x[0, 7]          # 151 identical rows: more than the 64 / 128 candidates kept per row
    x[0, 900] = 0
    x[0, 1900] = 0
    ref_idx, ref_valid = reference_lists(x, k)
    idx, valid, stats = run_kernels(x, k)
    assert_same(idx, valid, ref_idx, ref_valid, f"duplicates k={k}")
    assert stats["fallback_rows"] >= 151, stats  # the big group and the zero rows were ranked exactly
    assert stats["bound_violations"] == 0, stats
    assert idx[0, 900, 0] == 900 and valid[..., 0].all()


@pytest.mark.parametrize("n", [7, 1000, 19281])
def test_fp16_input_ranks_like_its_fp32_values(n):
    x16 = clustered(n, seed=3, identities=751).half()
    ref_idx, ref_valid = reference_lists(x16.float(), 20)
    idx, valid, stats = run_kernels(x16, 20, dtype=torch.float16)
    assert_same(idx, valid, ref_idx, ref_valid, f"fp16 N={n}")
    assert stats["bound_violations"] == 0


def test_poisoned_outputs_are_fully_overwritten():
    n, k = 1000, 20
    x = random_unit(n, seed=4)
    ref_idx, ref_valid = reference_lists(x, k)
    for exact_only in (False, True):
        idx = torch.full((1, n, k), -7, dtype=torch.int32, device=DEVICE)
        valid = torch.full((1, n, k), -7, dtype=torch.int32, device=DEVICE)
        ws = torch.full((cuda.workspace_size(1, n, 256, k),), 0xA5, dtype=torch.uint8, device=DEVICE)
        cuda.reciprocal_neighbors(x.to(DEVICE), k, out=(idx, valid), workspace=ws, exact_only=exact_only)
        torch.cuda.synchronize()
        assert not (idx == -7).any() and not (valid == -7).any()
        assert_same(idx.cpu(), valid.cpu(), ref_idx, ref_valid, f"poisoned exact_only={exact_only}")


@pytest.mark.parametrize("k", [20, 64])
def test_exact_fallback_alone_matches_the_reference(k):
    """Every row through the fp64 scan (the path uncertified rows take), batched."""
    x = torch.cat([random_unit(700, seed=5), clustered(700, seed=6, identities=40)], dim=0)
    ref_idx, ref_valid = reference_lists(x, k)
    idx, valid, stats = run_kernels(x, k, exact_only=True)
    assert stats["fallback_rows"] == 2 * 700
    assert_same(idx, valid, ref_idx, ref_valid, f"exact-only k={k}")


def test_few_candidates_force_fallbacks_and_stay_exact():
    """c = 32 for k = 20 on dense clusters: many rows cannot be certified and take the fallback."""
    x = clustered(4000, seed=7, identities=80)
    ref_idx, ref_valid = reference_lists(x, 20)
    idx, valid, stats = run_kernels(x, 20, candidates=32)
    assert_same(idx, valid, ref_idx, ref_valid, "c=32")
    assert stats["bound_violations"] == 0


def test_batches_odd_dimensions_and_k1():
    x = random_unit(333, d=1000, seed=8, b=3)
    x[1] = random_unit(333, d=1000, seed=9)[0]
    ref_idx, ref_valid = reference_lists(x, 20)
    idx, valid, _ = run_kernels(x, 20)
    assert_same(idx, valid, ref_idx, ref_valid, "B=3 D=1000")

    x = clustered(777, seed=10, dim=33, identities=50)
    ref_idx, ref_valid = reference_lists(x, 64)
    idx, valid, _ = run_kernels(x, 64)
    assert_same(idx, valid, ref_idx, ref_valid, "D=33 k=64")

    x = random_unit(50, seed=11)
    idx, valid, _ = run_kernels(x, 1)
    assert idx.shape == (1, 50, 1) and torch.equal(idx[0, :, 0].long(), torch.arange(50)) and valid.all()


@pytest.mark.parametrize("tile_rows", [64, 32])
@pytest.mark.parametrize("k", [20, 64])
def test_smaller_candidate_tiles_match_the_reference(tile_rows, k):
    """The 64- and 32-row tile variants (chosen on GPUs with less shared memory per block)."""
    x = clustered(3000, seed=14, identities=300)
    ref_idx, ref_valid = reference_prefix(x, k, ("tiles", 3000))
    idx, valid, stats = run_kernels(x, k, tile_rows=tile_rows)
    assert_same(idx, valid, ref_idx, ref_valid, f"tile_rows={tile_rows} k={k}")
    assert stats["bound_violations"] == 0


def is_hopper():
    return torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("n", [1, 7, 21, 130, 1000, 19281])
def test_default_candidate_kernel_on_hopper_is_wgmma(n):
    """On compute capability 9.0 (H100/H200) with D <= 256 and k <= 33 the sm_90a wgmma kernel runs."""
    if not is_hopper():
        pytest.skip(f"not a compute capability 9.0 GPU ({torch.cuda.get_device_name()}): the wgmma kernel never runs")
    x = random_unit(n, seed=20 + n)
    ref_idx, ref_valid = reference_prefix(x, 20, ("random", n, "wgmma"))
    idx, valid, stats = run_kernels(x, 20)
    assert_same(idx, valid, ref_idx, ref_valid, f"wgmma N={n}")
    if n > 1:
        assert stats["candidate_kernel"] == "wgmma", stats
    assert stats["bound_violations"] == 0, stats


@pytest.mark.parametrize("dim", [33, 100, 150, 256])
def test_every_padded_dimension_and_batches(dim):
    """Padded D = 64, 128, 192, 256 (the wgmma kernel's four instances on Hopper), two batch items."""
    x = torch.cat([clustered(2500, seed=21, dim=dim, identities=120),
                   random_unit(2500, d=dim, seed=22)], dim=0)
    ref_idx, ref_valid = reference_lists(x, 33)
    idx, valid, stats = run_kernels(x, 33)
    assert_same(idx, valid, ref_idx, ref_valid, f"D={dim} B=2 k=33")
    assert stats["bound_violations"] == 0, stats
    if is_hopper():
        assert stats["candidate_kernel"] == "wgmma", stats


@pytest.mark.parametrize("n", [3000, 19281])
def test_resident_candidate_kernel_matches_the_reference(n):
    """The mma.sync resident-rows kernel (what sm_80-sm_89 run, and Hopper with no_wgmma) must agree too."""
    x = clustered(n, seed=23, identities=751)
    ref_idx, ref_valid = reference_prefix(x, 20, ("resident", n))
    idx, valid, stats = run_kernels(x, 20, no_wgmma=True)
    assert_same(idx, valid, ref_idx, ref_valid, f"resident kernel N={n}")
    assert stats["candidate_kernel"] in ("resident", "generic"), stats
    assert stats["bound_violations"] == 0


@pytest.mark.parametrize("n", [3000, 19281])
def test_generic_candidate_kernel_matches_the_reference(n):
    """k = 20 runs the resident-rows kernel by default on an H100; the generic one must agree too."""
    x = clustered(n, seed=15, identities=751)
    ref_idx, ref_valid = reference_prefix(x, 20, ("generic", n))
    idx, valid, stats = run_kernels(x, 20, generic=True)
    assert_same(idx, valid, ref_idx, ref_valid, f"generic kernel N={n}")
    assert stats["candidate_kernel"] == "generic", stats
    assert stats["bound_violations"] == 0


def test_k_128_on_a_larger_set():
    x = clustered(5000, seed=12, identities=100)
    ref_idx, ref_valid = reference_lists(x, 128)
    idx, valid, stats = run_kernels(x, 128)
    assert_same(idx, valid, ref_idx, ref_valid, "k=128")
    assert stats["bound_violations"] == 0


def test_workspace_is_bounded_and_no_nxn_memory_is_used():
    """Workspace O(N (D + S c)); the call allocates nothing beyond outputs and workspace (torch's view)."""
    n, k = 100_000, 20
    p = cuda.plan(1, n, 256, k)
    ws = cuda.workspace_size(1, n, 256, k)
    rows_x_splits = min(4 * n, 128 * 512 + n + 127)  # README.md: the workspace formula
    assert ws <= n * (8 + 2 * 256 + 4) + rows_x_splits * (8 * p.candidates + 4) + 2048
    assert ws < 0.02 * 4 * n * n
    x = random_unit(n, seed=13).to(DEVICE)
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    idx, valid = cuda.reciprocal_neighbors(x, k)
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= ws + 2 * idx.numel() * 4 + (4 << 20)
    # the library itself allocates nothing (small slack for lazily loaded kernel images)
    assert free_before - free_after <= peak + (64 << 20)
    assert torch.equal(idx[0, :, 0].cpu().long(), torch.arange(n))


def test_errors_for_bad_inputs():
    from export.contract.errors import InputError

    with pytest.raises(InputError, match="CUDA"):
        cuda.reciprocal_neighbors(torch.zeros(1, 5, 8), 3)
    with pytest.raises(InputError, match=r"\[B, N, D\]"):
        cuda.reciprocal_neighbors(torch.zeros(5, 8, device=DEVICE), 3)
    with pytest.raises(InputError, match="float32 or float16"):
        cuda.reciprocal_neighbors(torch.zeros(1, 5, 8, dtype=torch.float64, device=DEVICE), 3)
    with pytest.raises(InputError, match="k must be"):
        cuda.reciprocal_neighbors(torch.zeros(1, 5, 8, device=DEVICE), 0)


def test_seed_is_reported():
    print(f"test inputs drawn with seed {SEED}")
    assert isinstance(SEED, int) and np.isfinite(SEED)


# ---------------------------------------------------------------- the contract's key (export/contract/neighbor_key.py)

#: the kernel paths that must give one answer: fast keys + near-tie resolution (default), canonical keys for
#: every rescored candidate and fallback column, and every row through the fallback scan
KEY_PATHS = {"default": {}, "canonical_keys": {"canonical_keys": True}, "exact_only": {"exact_only": True}}
ORACLE_MAX_N = 2000  # canonical_lists evaluates every pair (numpy); above it, the torch reference


def duplicate_heavy(n, d=256, seed=0, dtype=np.float32):
    """Unit rows with exact duplicates at scattered positions (groups of up to 40, some larger than the
    candidate lists) and near-duplicates (a copy with one component moved by 1e-6), as [1, N, D]."""
    rng = np.random.default_rng(SEED + seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if n >= 2:
        for src in rng.choice(n, size=max(1, n // 40), replace=False):
            dst = rng.choice(n, size=int(rng.integers(1, min(40, n - 1) + 1)), replace=False)
            x[dst] = x[src]
        for src in rng.choice(n, size=max(1, n // 40), replace=False):
            for t in rng.choice(n, size=min(3, n), replace=False):
                if t != src:
                    x[t] = x[src]
                    x[t, rng.integers(d)] += np.float32(1e-6)
    return torch.from_numpy(x.astype(dtype))[None]


def contract_lists(x_cpu, k):
    """(idx int64, valid bool) [1, N, k_eff] of the contract: the every-pair oracle, or the torch reference
    (same contract, candidates + canonical rescoring) above ORACLE_MAX_N rows."""
    assert x_cpu.shape[0] == 1
    if x_cpu.shape[1] <= ORACLE_MAX_N:
        idx, valid = canonical_lists(x_cpu[0].numpy(), k)
        return torch.from_numpy(idx).long()[None], torch.from_numpy(valid != 0)[None]
    return reference(x_cpu.float(), k)


def assert_every_path_matches(x_cpu, k, what, dtype=torch.float32, paths=KEY_PATHS, ref=None):
    ref_idx, ref_valid = contract_lists(x_cpu, k) if ref is None else ref
    for name, kw in paths.items():
        idx, valid, stats = run_kernels(x_cpu, k, dtype=dtype, **kw)
        assert_same(idx, valid, ref_idx, ref_valid, f"{what} [{name}]")
        assert stats["bound_violations"] == 0, (what, name, stats)


@pytest.mark.parametrize("n", [1, 7, 64, 1500, 5000])
def test_duplicates_and_near_duplicates_follow_the_contract(n):
    """Exact duplicates anywhere in the set get one key (ties to the lower index), near-duplicates
    (1e-6 apart) are ordered by their keys: every kernel path gives the contract's lists."""
    x = duplicate_heavy(n, seed=30 + n)
    if n <= 64:  # the oracle itself: the canonical key gives the correctly rounded key's lists here
        f_idx, f_valid = fsum_lists(x[0].numpy(), 20)
        c_idx, c_valid = canonical_lists(x[0].numpy(), 20)
        assert np.array_equal(f_idx, c_idx) and np.array_equal(f_valid, c_valid)
    assert_every_path_matches(x, 20, f"duplicates N={n}")


def test_summation_order_ties_follow_the_contract():
    """Rows that are permutations of one vector whose components span 2^-30 ... 2^11: against all-ones rows
    their exact keys are equal and so are their canonical keys (the double-double tree holds the sums
    exactly), but fp64 sums in different orders differ in the last bits (3 distinct fast keys among the 60
    rows, a few 1e-15 apart). Only keys by the contract, ties to the lower index, give the oracle's lists:
    11 ones rows, then the lowest-indexed permutations fill the list."""
    rng = np.random.default_rng(SEED + 40)
    n, d = 900, 256
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    v = ((1.0 + rng.random(d)) * np.exp2(np.where(rng.random(d) < 0.5, 10.0, -30.0))).astype(np.float32)
    perm_rows = rng.choice(n, size=60, replace=False)
    for r in perm_rows:
        x[r] = v[rng.permutation(d)]
    for r in rng.choice(np.setdiff1d(np.arange(n), perm_rows), size=12, replace=False):
        x[r] = 1.0  # 12 duplicate rows whose keys are sums of v's components
    x_cpu = torch.from_numpy(x)[None]
    idx64, _ = contract_lists(x_cpu, 64)
    assert_every_path_matches(x_cpu, 64, "permutations k=64", ref=(idx64, reciprocal_validity(idx64)))
    idx20 = idx64[..., :20].contiguous()  # top-k lists are prefixes of one total order
    assert_every_path_matches(x_cpu, 20, "permutations k=20", ref=(idx20, reciprocal_validity(idx20)))


@pytest.mark.parametrize("dim", [1, 3, 20, 33, 300, 1000])
def test_contract_lists_for_narrow_and_wide_rows(dim):
    """Dp = 1 (no level), Dp < 32 (shuffle levels only), Dp = 32 and 64, and D > 256 (the kernels with the tree's carry
    levels), with duplicates and near-duplicates; fp16 input once (ranked as its fp32 values)."""
    x = duplicate_heavy(500, d=dim, seed=50 + dim)
    assert_every_path_matches(x, 20, f"D={dim}")
    if dim == 300:
        x16 = duplicate_heavy(500, d=dim, seed=60, dtype=np.float16)
        assert_every_path_matches(x16.float(), 20, "fp16 D=300", dtype=torch.float16)


def test_fallback_and_rescore_rank_alike_on_the_candidate_kernels():
    """The fallback scan (exact_only) and the rescore through each candidate kernel: one set of lists."""
    x = duplicate_heavy(ORACLE_MAX_N, seed=70)
    paths = {"default": {}, "resident": {"no_wgmma": True}, "generic": {"generic": True},
             "canonical_keys": {"canonical_keys": True}, "exact_only": {"exact_only": True},
             "c=32": {"candidates": 32}, "c=32 canonical_keys": {"candidates": 32, "canonical_keys": True}}
    assert_every_path_matches(x, 20, f"N={ORACLE_MAX_N}", paths=paths)


@pytest.mark.parametrize("paths", [{}, {"generic": True}])
def test_a_prepared_call_replays_from_a_cuda_graph(paths):
    """Once the device is prepared (nformer_reciprocal_neighbors_prepare_device; a plugin does it outside
    enqueue), a call is stream work only: torch captures it (global capture mode refuses non-capturable CUDA
    calls), and replays on new inputs give the reference lists."""
    assert cuda.load_kernels().nformer_reciprocal_neighbors_prepare_device() == 0
    n, k = 700, 20
    x = random_unit(n, seed=80).to(DEVICE)
    idx = torch.empty((1, n, k), dtype=torch.int32, device=DEVICE)
    valid = torch.empty_like(idx)
    ws = torch.empty(cuda.workspace_size(1, n, x.shape[-1], k), dtype=torch.uint8, device=DEVICE)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # a warm-up on the capture's side stream, as torch advises
        cuda.reciprocal_neighbors(x, k, out=(idx, valid), workspace=ws, **paths)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="global"):
        cuda.reciprocal_neighbors(x, k, out=(idx, valid), workspace=ws, **paths)
    for seed in (81, 82):
        fresh = random_unit(n, seed=seed)
        x.copy_(fresh.to(DEVICE))
        idx.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        ref_idx, ref_valid = reference_lists(fresh, k)
        assert_same(idx.cpu(), valid.cpu(), ref_idx, ref_valid, f"graph replay {paths} seed {seed}")

