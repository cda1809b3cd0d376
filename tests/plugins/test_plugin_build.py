"""The plugin builds: CUDA kernels for every target GPU, the TensorRT glue against TensorRT's headers,
and the libraries' host-side contract (C API, exports, workspace formula, error messages).

Runs on a CPU machine.  Needs nvcc (CUDA 13.0 here and in CI; found on PATH or in /usr/local/cuda/bin)
and CMake; the TensorRT glue needs TensorRT's headers (``TENSORRT_ROOT`` or the standard include paths)
and is skipped, with the reason printed, where they are not found.  One CMake build per session.

``libnformer_plugins_autoreg.so`` links libnvinfer; here it is linked against, and loaded with, a stand-in
``libnvinfer.so.<major>`` built from tests/plugins/fake_libnvinfer.cpp (getPluginRegistry, getLogger and a
registry that does what IPluginRegistry documents), so what is tested is how the library registers itself,
not TensorRT: the real registry, Triton and DeepStream never ran here.
"""
from __future__ import annotations

import os
import re
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


def find_cxx() -> str | None:
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def tensorrt_major(include: Path) -> int:
    """NV_TENSORRT_MAJOR of the headers (10.x writes it directly, 10.16 and 11 through TRT_MAJOR_ENTERPRISE)."""
    text = (include / "NvInferVersion.h").read_text()
    found = re.search(r"#define\s+(?:NV_TENSORRT_MAJOR|TRT_MAJOR_ENTERPRISE)\s+(\d+)", text)
    assert found, f"no major version in {include / 'NvInferVersion.h'}"
    return int(found.group(1))


def cuda_include_dir(nvcc: str) -> Path:
    """The directory of cuda_runtime_api.h (TensorRT's headers include it), as nvcc itself passes it on
    (nvcc may be a wrapper script far from the toolkit)."""
    res = run([nvcc, "-v", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull])
    for found in re.finditer(r'-I"?([^"\s]+)', res.stdout + res.stderr):
        if (Path(found.group(1)) / "cuda_runtime_api.h").is_file():
            return Path(found.group(1))
    return Path(nvcc).resolve().parent.parent / "include"


def build_fake_libnvinfer(out: Path, trt_include: Path, nvcc: str) -> Path | None:
    """libnvinfer.so.<major> from tests/plugins/fake_libnvinfer.cpp (None without a C++ compiler)."""
    cxx = find_cxx()
    if cxx is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    name = f"libnvinfer.so.{tensorrt_major(trt_include)}"
    res = run([cxx, "-shared", "-fPIC", "-std=c++17", "-Wall", "-Wno-deprecated-declarations",
               "-I", trt_include, "-I", cuda_include_dir(nvcc), f"-Wl,-soname,{name}",
               REPO / "tests" / "plugins" / "fake_libnvinfer.cpp", "-o", out / name, "-ldl"])
    assert res.returncode == 0, res.stderr
    return out / name


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
    fake_nvinfer = None
    if trt_include is not None:
        configure.append(f"-DTENSORRT_ROOT={trt_include.parent}")
        fake_nvinfer = build_fake_libnvinfer(out / "fake_nvinfer", trt_include, nvcc)
        if fake_nvinfer is not None:  # link the self-registering library against the stand-in, never a real one
            configure.append(f"-DTENSORRT_NVINFER_LIBRARY={fake_nvinfer}")
    else:
        configure.append("-DNFORMER_BUILD_PLUGIN=OFF")
    cfg = run(configure)
    assert cfg.returncode == 0, f"cmake configure failed:\n{cfg.stdout}\n{cfg.stderr}"
    bld = run([cmake, "--build", out, "-j", str(os.cpu_count() or 2)])
    assert bld.returncode == 0, f"cmake build failed:\n{bld.stdout[-8000:]}\n{bld.stderr[-8000:]}"
    return {"dir": out, "nvcc": nvcc, "trt_include": trt_include, "fake_nvinfer": fake_nvinfer,
            "log": cfg.stdout + bld.stdout}


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
                 "nformer_reciprocal_neighbors_prepare_device", "nformer_status_string"):
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


def test_the_self_registering_library_is_found_only_beside_the_plugin_library_in_use(tmp_path, monkeypatch):
    """plugins.autoreg_library_path(): the autoreg library of the same build as libnformer_plugins.so (the one
    the engines' records name), never one from another search directory; a clear error says how to build it."""
    env_dir, build_dir = tmp_path / "env", tmp_path / "build" / "plugins"
    env_dir.mkdir()
    build_dir.mkdir(parents=True)
    monkeypatch.setenv(plugins.ENV_DIR, str(env_dir))
    monkeypatch.setattr(plugins, "DEFAULT_BUILD_DIR", build_dir)
    assert plugins.autoreg_library_path() is None  # nothing built
    with pytest.raises(plugins.PluginNotBuiltError, match="libnformer_plugins.so"):
        plugins.autoreg_library_path(required=True)
    (env_dir / plugins.PLUGIN_LIBRARY).write_bytes(b"")
    (build_dir / plugins.AUTOREG_LIBRARY).write_bytes(b"")  # another build's: not taken
    assert plugins.autoreg_library_path() is None
    with pytest.raises(plugins.PluginNotBuiltError, match=r"libnformer_plugins_autoreg\.so.*Triton and DeepStream.*"
                                                          r"TENSORRT_NVINFER_LIBRARY") as err:
        plugins.autoreg_library_path(required=True)
    assert str(env_dir / plugins.AUTOREG_LIBRARY) in str(err.value)
    (env_dir / plugins.AUTOREG_LIBRARY).write_bytes(b"")
    assert plugins.autoreg_library_path() == (env_dir / plugins.AUTOREG_LIBRARY).resolve()
    assert plugins.autoreg_library_path(required=True) == (env_dir / plugins.AUTOREG_LIBRARY).resolve()


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
    # no load-time registration: it never reaches for TensorRT's registry (only loadLibrary registers it)
    undefined = run(["nm", "-D", "--undefined-only", lib]).stdout
    assert "getPluginRegistry" not in undefined and "getLogger" not in undefined, undefined
    # the creator, fields, serialisation, shapes, formats and workspace, driven through the IPluginV3
    # interfaces without TensorRT (a GPU run of enqueue is in benchmarks/gpu_plugin_run.sh)
    selftest = run([build["dir"] / "nformer_plugin_selftest", lib])
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert "OK: 0 failure(s)" in selftest.stdout


AUTOREG_SKIP = ("libnformer_plugins_autoreg.so was not built: it needs TensorRT's headers (NvInfer.h via "
                f"TENSORRT_ROOT or {', '.join(TRT_STANDARD_INCLUDES)}) and a C++ compiler for the stand-in libnvinfer")


def test_self_registering_library_links_libnvinfer_and_exports_no_loadlibrary_entry_points(build):
    """libnformer_plugins_autoreg.so: libnvinfer is a dependency (DT_NEEDED, so LD_PRELOAD loads TensorRT with
    it), getPluginRegistry resolves there, nothing is exported (no getCreators / setLoggerFinder: it is not for
    loadLibrary), dlclose never unmaps it (NODELETE), and no RUNPATH points at the build machine's TensorRT."""
    if build["fake_nvinfer"] is None:
        pytest.skip(AUTOREG_SKIP)
    lib = build["dir"] / plugins.AUTOREG_LIBRARY
    assert lib.is_file(), build["log"][-4000:]
    exported = [line.split()[-1] for line in run(["nm", "-D", "--defined-only", lib]).stdout.splitlines()
                if " T " in line]
    assert exported == [], exported
    undefined = run(["nm", "-D", "--undefined-only", lib]).stdout.split()
    assert "getPluginRegistry" in undefined and "getLogger" in undefined
    dynamic = run(["readelf", "-d", lib]).stdout
    major = tensorrt_major(build["trt_include"])
    assert f"Shared library: [libnvinfer.so.{major}]" in dynamic and "libcudart.so" not in dynamic, dynamic
    assert "NODELETE" in dynamic and "RPATH" not in dynamic and "RUNPATH" not in dynamic, dynamic
    assert plugins.linked_tensorrt_major(lib) == major
    assert plugins.linked_tensorrt_major(build["dir"] / plugins.PLUGIN_LIBRARY) is None


@pytest.fixture(scope="module")
def probe(build, tmp_path_factory):
    """tests/plugins/plugin_registry_probe.cpp linked against the stand-in libnvinfer: load(*steps) runs it."""
    if build["fake_nvinfer"] is None:
        pytest.skip(AUTOREG_SKIP)
    exe = tmp_path_factory.mktemp("probe") / "plugin_registry_probe"
    res = run([find_cxx(), "-std=c++17", "-Wall", "-Wno-deprecated-declarations", "-I", build["trt_include"],
               "-I", cuda_include_dir(build["nvcc"]),
               REPO / "tests" / "plugins" / "plugin_registry_probe.cpp", "-o", exe, build["fake_nvinfer"], "-ldl"])
    assert res.returncode == 0, res.stderr
    env = {**os.environ, "LD_LIBRARY_PATH": str(build["fake_nvinfer"].parent)}

    def load(*steps):
        res = run([exe, *steps], env=env, timeout=120)
        assert res.returncode == 0, f"{steps}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
        return res.stdout
    return load


CREATOR_USABLE = ('creator 0: PLUGIN CREATOR_V3ONE ReciprocalNeighbors version 1 namespace "" '
                  "-> plugin ReciprocalNeighbors 1")


def test_self_registering_library_registers_when_dlopened(build, probe):
    """As Triton's plugins= option and DeepStream's custom-lib-path load it (dlopen RTLD_NOW | RTLD_LOCAL),
    libnformer_plugins_autoreg.so registers its V3 creator under ReciprocalNeighbors / 1 / "" and the
    registered creator makes plugins; libnformer_plugins.so dlopen'ed the same way registers nothing."""
    autoreg, loadable = build["dir"] / plugins.AUTOREG_LIBRARY, build["dir"] / plugins.PLUGIN_LIBRARY
    out = probe(f"dlopen={autoreg}")
    assert 'registerCreator ReciprocalNeighbors/1/ (namespace argument "") -> true' in out, out
    assert "registered 1\n" in out and CREATOR_USABLE in out, out
    out = probe(f"dlopen={loadable}")
    assert "registerCreator" not in out and "registered 0\n" in out, out
    out = probe(f"loadLibrary={loadable}")  # trtexec --dynamicPlugins / Python load_library
    assert f"loadLibrary {loadable} -> handle" in out and CREATOR_USABLE in out, out


def test_both_libraries_in_one_process_register_once_and_do_not_crash(build, probe):
    """The second registration of ReciprocalNeighbors / 1 / "" is refused either way: after the autoreg library,
    loadLibrary(libnformer_plugins.so) returns null; after loadLibrary, the autoreg library logs a warning that
    names the cause; the first creator stays registered and usable."""
    autoreg, loadable = build["dir"] / plugins.AUTOREG_LIBRARY, build["dir"] / plugins.PLUGIN_LIBRARY
    out = probe(f"dlopen={autoreg}", f"loadLibrary={loadable}")
    assert f"loadLibrary {loadable} -> null" in out and "registered 1\n" in out and CREATOR_USABLE in out, out
    out = probe(f"loadLibrary={loadable}", f"dlopen={autoreg}")
    assert "-> false" in out and "registered 1\n" in out and CREATOR_USABLE in out, out
    warning = next(line for line in out.splitlines() if line.startswith("log 2: "))  # Severity::kWARNING
    assert "already registered" in warning and "libnformer_plugins.so" in warning, out


def test_self_registering_library_survives_reopening_and_dlclose(build, probe):
    """Opened twice, it registers once (static initialisers run once per load); after a dlclose (DeepStream
    tearing a pipeline down) it stays mapped (NODELETE), so the registered creator still works."""
    autoreg = build["dir"] / plugins.AUTOREG_LIBRARY
    out = probe(f"dlopen={autoreg}", f"dlopen={autoreg}")
    assert out.count("registerCreator") == 1 and CREATOR_USABLE in out, out
    out = probe(f"dlopen={autoreg}", f"dlclose={autoreg}")
    assert f"dlclose {autoreg} -> 0" in out and CREATOR_USABLE in out, out


ALLOWED_DEVICE_SETUP = {"fillDevice", "prepareReciprocalNeighborsDevice", "allowMaxDynamicSharedMemory",
                        "prepareWgmmaCandidates"}
STREAM_WORK = {"cudaMemsetAsync", "cudaGetLastError", "cudaGetErrorString"}


def top_level_functions(text: str):
    """(name, body) of each function defined at namespace level: a header at column 0 (its parameter list may
    continue on indented lines), the body from a "{" to the next "}" at column 0 (the layout of these sources).
    Namespaces and extern "C" blocks are entered; class and struct bodies (ending in "};") are skipped."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i] == "{" and i > 0:
            j = i - 1
            while j > 0 and lines[j].startswith((" ", "\t")):  # continued parameter lists
                j -= 1
            if lines[j].startswith(("namespace", 'extern "C"')):
                i += 1
                continue
            end = next(k for k in range(i, len(lines)) if lines[k] in ("}", "};"))
            found = re.search(r"(\w+)\s*\(", lines[j])
            if found and lines[end] == "}":
                yield found.group(1), "\n".join(lines[i:end])
            i = end
        i += 1


def test_the_launch_path_is_stream_work_only():
    """enqueue is capturable: outside the once-per-device preparation (the device table), the kernels' host code
    calls no CUDA API but cudaMemsetAsync, cudaGetLastError (and cudaGetErrorString for messages): no
    cudaGetDevice, attribute query or cudaFuncSetAttribute per call, no allocation, no synchronisation; the
    plugin's enqueue passes its prepared device and calls CUDA only through the kernels."""
    rn = REPO / "plugins" / "reciprocal_neighbors"
    seen = set()
    for name in ("reciprocalNeighborsKernels.cu", "reciprocalNeighborsWgmma.cu", "reciprocalNeighborsDevice.cuh",
                 "reciprocalNeighborsPlugin.cpp", "capi.cu"):
        for function, body in top_level_functions((rn / name).read_text()):
            seen.add(function)
            calls = set(re.findall(r"\b(cuda[A-Z]\w*)\s*\(", body))
            if function not in ALLOWED_DEVICE_SETUP:
                assert calls <= STREAM_WORK, f"{name}: {function} calls {sorted(calls - STREAM_WORK)}"
            if function == "enqueue":
                assert not calls and "mDevice)" in body, body
    assert ALLOWED_DEVICE_SETUP | {"run", "enqueue", "launchCandidates", "launchFor", "reciprocalNeighbors",
                                   "launchWgmmaCandidates", "onShapeChange", "attachToContext"} <= seen, sorted(seen)


def test_device_preparation_reports_a_missing_gpu_and_retries(kernels):
    """Without a usable GPU the preparation returns the CUDA error (a positive status), again on the next
    call (a failure is not remembered); with one it succeeds and stays prepared."""
    first = kernels.nformer_reciprocal_neighbors_prepare_device()
    second = kernels.nformer_reciprocal_neighbors_prepare_device()
    assert first >= 0 and second == first, (first, second)
    if first > 0:
        assert len(kernels.nformer_status_string(first)) > 5

