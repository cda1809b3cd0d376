"""The plugin builds: CUDA kernels for every target GPU, the TensorRT glue against TensorRT's headers,
and the libraries' host-side contract (C API, exports, workspace formula, error messages).

Runs on a CPU machine.  Needs nvcc (CUDA 13.0 here and in CI; found on PATH or in /usr/local/cuda/bin)
and CMake; the TensorRT glue needs TensorRT's headers (``TENSORRT_ROOT`` or the standard include paths)
and is skipped, with the reason printed, where they are not found.  One CMake build per session.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import plugins

REPO = Path(__file__).resolve().parents[2]
ARCHS = ("80", "86", "89", "90")
TRT_STANDARD_INCLUDES = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/include",
                         "/usr/local/include", "/usr/local/tensorrt/include", "/opt/tensorrt/include")


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in ("/usr/local/cuda/bin/nvcc", "/usr/local/cuda-13.0/bin/nvcc"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_tensorrt_include() -> Path | None:
    """The directory holding NvInfer.h: $TENSORRT_ROOT/include (or $TENSORRT_ROOT), else a standard path."""
    root = os.environ.get("TENSORRT_ROOT")
    candidates = [Path(root) / "include", Path(root)] if root else []
    candidates += [Path(p) for p in TRT_STANDARD_INCLUDES]
    for d in candidates:
        if (d / "NvInfer.h").is_file():
            return d
    return None


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """One CMake build of plugins/ for sm_80/86/89/90: the kernels always, the glue when headers exist."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, not in /usr/local/cuda/bin): the CUDA kernels were not compiled")
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found on PATH: plugins/CMakeLists.txt was not built")
    trt_include = find_tensorrt_include()
    out = tmp_path_factory.mktemp("plugin_build")
    configure = [cmake, "-S", REPO / "plugins", "-B", out, f"-DCMAKE_CUDA_COMPILER={nvcc}",
                 f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(ARCHS)}", "-DCMAKE_CUDA_FLAGS=--threads=0"]
    if trt_include is not None:
        configure.append(f"-DTENSORRT_ROOT={trt_include.parent}")
    else:
        configure.append("-DNFORMER_BUILD_PLUGIN=OFF")
    cfg = run(configure)
    assert cfg.returncode == 0, f"cmake configure failed:\n{cfg.stdout}\n{cfg.stderr}"
    bld = run([cmake, "--build", out, "-j", str(os.cpu_count() or 2)])
    assert bld.returncode == 0, f"cmake build failed:\n{bld.stdout[-8000:]}\n{bld.stderr[-8000:]}"
    return {"dir": out, "nvcc": nvcc, "trt_include": trt_include, "log": cfg.stdout + bld.stdout}


@pytest.fixture(scope="module")
def kernels(build):
    """The freshly built libnformer_kernels.so, also as the default of plugins.reciprocal_neighbors.cuda.

    It loads on a machine without a GPU: cudart is linked statically and only reaches the driver on the
    first CUDA call.
    """
    from plugins.reciprocal_neighbors import cuda

    mp = pytest.MonkeyPatch()
    mp.setenv(plugins.ENV_DIR, str(build["dir"]))
    mp.setattr(cuda, "_lib", None)
    yield cuda.load_kernels()
    mp.undo()


def test_kernels_compile_for_every_target_gpu(build):
    lib = build["dir"] / plugins.KERNELS_LIBRARY
    assert lib.is_file()
    cuobjdump = shutil.which("cuobjdump") or next(
        (p for p in ("/usr/local/cuda/bin/cuobjdump",) if os.access(p, os.X_OK)), None)
    if cuobjdump:
        listed = run([cuobjdump, "--list-elf", lib])
        assert listed.returncode == 0, listed.stderr
        text = listed.stdout
    else:  # a toolkit without cuobjdump: each embedded SASS image records the ptxas "-arch sm_XX" it was built with
        text = lib.read_bytes().decode("latin-1").replace("-arch sm_", "ELF sm_")
    for arch in ARCHS:
        assert f"sm_{arch}.cubin" in text or f"ELF sm_{arch}" in text, f"no sm_{arch} machine code in {lib}"
    # 90 is among the targets, so the wgmma candidate kernel is there too, as sm_90a machine code
    assert "sm_90a.cubin" in text or "ELF sm_90a" in text, f"no sm_90a (wgmma) machine code in {lib}"


def test_kernels_use_no_local_memory_stack(build, tmp_path):
    """No run-time-indexed arrays spilled to the stack: enqueue must never make the driver grow local memory."""
    src = REPO / "plugins" / "reciprocal_neighbors" / "reciprocalNeighborsKernels.cu"
    res = run([build["nvcc"], "-O3", "-std=c++17", "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v",
               "-c", src, "-o", tmp_path / "k.o"])
    assert res.returncode == 0, res.stderr
    frames = [int(line.split()[0]) for line in res.stderr.splitlines() if "bytes stack frame" in line]
    assert frames and max(frames) <= 64, res.stderr  # a few spilled registers at most, far below the 1 KiB default


def test_wgmma_kernel_compiles_unserialised_for_sm90a(build, tmp_path):
    """The wgmma candidate pass: sm_90a only, no stack, and ptxas keeps its wgmma asynchronous (no C7510-C7519
    "wgmma.mma_async instructions are serialized" or injected waits, which would cost most of its speed)."""
    src = REPO / "plugins" / "reciprocal_neighbors" / "reciprocalNeighborsWgmma.cu"
    res = run([build["nvcc"], "-O3", "-std=c++17", "-gencode", "arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
               "-c", src, "-o", tmp_path / "w.o"])
    assert res.returncode == 0, res.stderr
    assert "serialized" not in res.stderr and "is injected" not in res.stderr, res.stderr
    frames = [int(line.split()[0]) for line in res.stderr.splitlines() if "bytes stack frame" in line]
    assert frames and max(frames) == 0, res.stderr
    assert res.stderr.count("Compiling entry function") == 4, res.stderr  # padded D = 64, 128, 192, 256


CANONICAL_DOT_HARNESS = r"""
#include "canonicalDot.cuh"
#include <cmath>
#include <cstdio>
#include <vector>
using namespace nformer::canonical;

// Tree-shape probe: a combine that is neither commutative nor associative, so any other pairing or operand
// order of the slots gives another value.
struct HashCombine
{
    DDNode operator()(DDNode a, DDNode b) const
    {
        return DDNode{std::fmod(a.hi * 31.0 + b.hi * 17.0 + 1.0, 1000003.0), 0.0};
    }
};

// The kernels' warpCanonicalDot with the warp emulated: laneNode in each of 32 lanes, then the shuffle-down
// levels w = 16 ... 1 with w < Dp (a lane whose source is past lane 31 reads its own value).
template <int kCarry, typename Combine>
double warpDot(std::vector<double> const& a, std::vector<double> const& b, int dim, Combine const& combine)
{
    DDNode lanes[32];
    for (int l = 0; l < 32; ++l)
        lanes[l] = laneNode<kCarry>(l, dim, [&](int d) { return a[d] * b[d]; }, combine);
    int const dp = 1 << treeLevels(dim);
    for (int w = 16; w >= 1; w >>= 1)
    {
        if (w >= dp)
            continue;
        DDNode next[32];
        for (int l = 0; l < 32; ++l)
            next[l] = combine(lanes[l], lanes[l + w < 32 ? l + w : l]);
        for (int l = 0; l < 32; ++l)
            lanes[l] = next[l];
    }
    return addRn(lanes[0].hi, lanes[0].lo);
}

int main()
{
    char mode[8];
    int carry = 0, dim = 0;
    while (std::scanf("%7s %d %d", mode, &carry, &dim) == 3)
    {
        std::vector<double> a(dim), b(dim);
        for (auto& v : a) std::scanf("%la", &v);
        for (auto& v : b) std::scanf("%la", &v);
        double r = 0.0;
        if (mode[0] == 'h')
            r = carry ? warpDot<kTreeCarryLevels>(a, b, dim, HashCombine{}) : warpDot<0>(a, b, dim, HashCombine{});
        else
            r = carry ? warpDot<kTreeCarryLevels>(a, b, dim, DDCombine{}) : warpDot<0>(a, b, dim, DDCombine{});
        std::printf("%a\n", r);
    }
    return 0;
}
"""


def test_kernels_canonical_dot_is_the_contracts_tree(tmp_path):
    """The kernels' canonical dot (plugins/reciprocal_neighbors/canonicalDot.cuh: the lane-local levels in
    chunks and a bit-reversed carry, then the warp's shuffle levels, emulated here on the host) is the tree of
    export/contract/neighbor_key.py: the same pairing and operand order (a non-commutative, non-associative
    probe combine) and, with the real double-double combine, bitwise the same dot, for D = 1 ... 65536 and
    both register variants (no carry levels for D <= 256, 8 carry levels above)."""
    import numpy as np

    from export.contract.neighbor_key import exact_dots, padded_dim

    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH: the host build of canonicalDot.cuh was not checked")
    src = tmp_path / "canonical_dot.cpp"
    src.write_text(CANONICAL_DOT_HARNESS)
    exe = tmp_path / "canonical_dot"
    res = run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
               "-I", REPO / "plugins" / "reciprocal_neighbors", src, "-o", exe])
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr, res.stderr

    def hash_tree(p):
        h = list(p)
        w = len(h)
        while w > 1:
            w //= 2
            h = [(h[j] * 31.0 + h[j + w] * 17.0 + 1.0) % 1000003.0 for j in range(w)]
        return h[0]

    dims = list(range(1, 70)) + [95, 96, 97, 127, 128, 129, 200, 255, 256, 257, 300, 511, 512, 513, 1000,
                                 1024, 1025, 2048, 4095, 4097, 8192, 8193, 12345, 16384, 33000, 65535, 65536]
    cases = [(carry, d) for d in dims for carry in ((0, 1) if d <= 256 else (1,))]
    rng = np.random.default_rng(0)
    lines, expect = [], []

    def case(mode, carry, a, b):
        lines.append(f"{mode} {carry} {len(a)}\n" + " ".join(float(v).hex() for v in a) + "\n"
                     + " ".join(float(v).hex() for v in b) + "\n")

    for carry, d in cases:
        a = np.arange(1.0, d + 1.0)
        case("h", carry, a, np.ones(d))
        p = np.zeros(padded_dim(d))
        p[:d] = a
        expect.append(hash_tree(p))
        for rep in range(3):  # wide exponent ranges, cancellation, a plain norm
            a32 = (rng.standard_normal(d) * np.exp2(rng.integers(-40, 40, d))).astype(np.float32)
            b32 = (rng.standard_normal(d) * np.exp2(rng.integers(-40, 40, d))).astype(np.float32)
            if rep == 1:
                b32 = a32.copy()
                b32[::2] *= -1
            if rep == 2:
                a32 = rng.standard_normal(d).astype(np.float32)
                b32 = a32
            case("n", carry, a32, b32)
            expect.append(exact_dots(a32[None], b32[None])[0])
    out = subprocess.run([str(exe)], input="".join(lines), capture_output=True, text=True, check=True).stdout.split()
    assert len(out) == len(expect)
    got = np.array([float.fromhex(v) for v in out])
    bad = np.flatnonzero(got.view(np.int64) != np.asarray(expect, dtype=np.float64).view(np.int64))
    assert bad.size == 0, [(lines[i].split("\n")[0], got[i], expect[i]) for i in bad[:5]]


def test_c_api_exports(build):
    syms = run(["nm", "-D", "--defined-only", build["dir"] / plugins.KERNELS_LIBRARY])
    assert syms.returncode == 0
    for name in ("nformer_reciprocal_neighbors", "nformer_reciprocal_neighbors_ex",
                 "nformer_reciprocal_neighbors_workspace", "nformer_reciprocal_neighbors_plan",
                 "nformer_status_string"):
        assert f" T {name}\n" in syms.stdout
    # only the C API is visible: the kernels' C++ symbols stay hidden
    exported = [line.split()[-1] for line in syms.stdout.splitlines() if " T " in line]
    assert all(s.startswith("nformer_") for s in exported), exported


def test_invalid_arguments_are_refused_before_any_cuda_call(kernels):
    """Status codes come back on a machine without a GPU: argument checks precede every CUDA call."""
    call = kernels.nformer_reciprocal_neighbors_ex
    assert call(None, 0, 1, 10, 256, 0, None, None, None, 0, None, 0, 0) == -2      # k = 0
    assert call(None, 0, 1, 10, 256, 129, None, None, None, 0, None, 0, 0) == -2    # k > 128
    assert call(None, 0, 0, 10, 256, 20, None, None, None, 0, None, 0, 0) == -1     # B = 0
    assert call(None, 0, 1, 0, 256, 20, None, None, None, 0, None, 0, 0) == -1      # N = 0
    assert call(None, 7, 1, 10, 256, 20, None, None, None, 0, None, 0, 0) == -3     # dtype
    assert call(None, 0, 1, 100, 256, 20, None, None, None, 16, None, 0, 0) == -4   # workspace
    assert call(None, 0, 1, 100, 256, 20, None, None, None, 0, None, 5, 0) == -6    # candidates <= k - 1
    need = kernels.nformer_reciprocal_neighbors_workspace(1, 100, 256, 20)
    assert call(None, 0, 1, 100, 256, 20, None, None, None, need, None, 0, 0) == -5  # null pointers
    for status in (-1, -2, -3, -4, -5, -6):
        assert len(kernels.nformer_status_string(status)) > 10


def test_plan_candidates_splits_and_error_bound(kernels):
    from plugins.reciprocal_neighbors import cuda

    for n, k in ((1, 20), (7, 20), (21, 20), (1000, 20), (19281, 20), (19281, 64), (10**6, 20), (5000, 128)):
        p = cuda.plan(1, n, 256, k)
        k_eff = min(n, k)
        assert p.candidates % 32 == 0 and p.candidates >= k_eff, (n, k, p)
        assert p.candidates <= 256 and 1 <= p.splits <= 4 and p.splits * p.candidates <= 256
        assert 5e-4 < p.error_bound < 2e-3  # fp16 operands: about 1.1e-3 in cosine units at D = 256
    assert cuda.plan(1, 10**6, 256, 20).splits == 1
    assert cuda.plan(1, 19281, 256, 20).splits == 4  # few row blocks: the columns are split for occupancy


def test_workspace_is_linear_in_n_and_grows_with_the_shape(kernels):
    """No N x N anywhere: O(N (D + S c)) bytes; monotone so a TensorRT profile's max shape covers the rest."""
    from plugins.reciprocal_neighbors import cuda

    ws = kernels.nformer_reciprocal_neighbors_workspace
    for k in (20, 64, 128):
        sizes = [(n, ws(1, n, 256, k)) for n in (1, 2, 7, 20, 21, 64, 65, 100, 1000, 5000, 16383, 16385, 20000,
                                                 40000, 65535, 65537, 100000, 300000, 10**6)]
        for (n0, s0), (n1, s1) in zip(sizes, sizes[1:]):
            assert s1 >= s0, f"k={k}: workspace({n1})={s1} < workspace({n0})={s0}"
        for n, s in sizes:
            kk = min(n, k) - 1  # the declared size uses one split's default c (>= the plan's c where S > 1)
            c = max(cuda.plan(1, n, 256, k).candidates, 32 if kk == 0 else -(-(kk + max(16, min(kk, 64))) // 32) * 32)
            # per row: fp64 norm, fp16 copy, fallback slot, and up to 4 splits of c (index, score) + threshold
            per_row = 8 + 2 * 256 + 4 + 4 * (8 * c + 4)
            assert s <= n * per_row + (1 << 20), (k, n, s)
            rows_x_splits = min(4 * n, 128 * 512 + n + 127)  # README.md: the workspace formula
            assert s <= n * (8 + 2 * 256 + 4) + rows_x_splits * (8 * c + 4) + 2048, (k, n, s)
            if n >= 19281:
                assert s < 0.1 * 4 * n * n, (k, n, s)
    assert ws(2, 5000, 256, 20) >= ws(1, 5000, 256, 20)
    assert ws(1, 5000, 512, 20) >= ws(1, 5000, 256, 20)


def test_plugins_import_is_light():
    code = "import sys, plugins, plugins.reciprocal_neighbors.cuda; print('torch' in sys.modules)"
    res = run([sys.executable, "-c", code], cwd=REPO)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stdout + res.stderr


def test_missing_libraries_raise_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(plugins.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(plugins, "DEFAULT_BUILD_DIR", tmp_path / "build" / "plugins")
    with pytest.raises(plugins.PluginNotBuiltError) as err:
        plugins.kernels_library_path()
    msg = str(err.value)
    assert "libnformer_kernels.so" in msg and "cmake -S plugins -B build/plugins" in msg and str(tmp_path) in msg
    (tmp_path / plugins.KERNELS_LIBRARY).write_bytes(b"")
    assert plugins.kernels_library_path() == (tmp_path / plugins.KERNELS_LIBRARY).resolve()
    with pytest.raises(plugins.PluginNotBuiltError, match="TENSORRT_ROOT") as err:
        plugins.library_path()  # the kernels are there, the TensorRT library is not: say why
    assert isinstance(err.value, RuntimeError)
    (tmp_path / plugins.PLUGIN_LIBRARY).write_bytes(b"")
    assert plugins.library_path().name == plugins.PLUGIN_LIBRARY


def test_tensorrt_glue_builds_against_tensorrt_headers(build):
    if build["trt_include"] is None:
        pytest.skip("TensorRT headers (NvInfer.h) not found via TENSORRT_ROOT or "
                    f"{', '.join(TRT_STANDARD_INCLUDES)}: libnformer_plugins.so was not built")
    lib = build["dir"] / plugins.PLUGIN_LIBRARY
    assert lib.is_file(), build["log"][-4000:]
    syms = run(["nm", "-D", "--defined-only", lib]).stdout
    assert " T getCreators\n" in syms and " T setLoggerFinder\n" in syms
    needed = run(["readelf", "-d", lib]).stdout
    assert "libnvinfer" not in needed and "libcudart.so" not in needed, needed
    # the creator, fields, serialisation, shapes, formats and workspace, driven through the IPluginV3
    # interfaces without TensorRT (a GPU run of enqueue is in benchmarks/gpu_plugin_run.sh)
    selftest = run([build["dir"] / "nformer_plugin_selftest", lib])
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert "OK: 0 failure(s)" in selftest.stdout
