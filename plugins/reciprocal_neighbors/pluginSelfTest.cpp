/*
 * Self-test of libnformer_plugins.so without TensorRT: loads the library with dlopen as TensorRT's
 * IPluginRegistry::loadLibrary does, takes the creator from getCreators(), and drives the IPluginV3
 * interfaces the way the builder and runtime would (fields, serialisation round trip, output types and
 * shapes through a stand-in IExprBuilder, formats, workspace). With --gpu it also runs enqueue() on a
 * small input with a known answer. Prints one line per check; exit status 0 when all pass.
 *
 * Usage: nformer_plugin_selftest path/to/libnformer_plugins.so [--gpu]
 */
#include "NvInferRuntime.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gFailures = 0;

void check(bool ok, std::string const& what)
{
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
    if (!ok)
    {
        ++gFailures;
    }
}

class PrintLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        std::printf("  [plugin log %d] %s\n", static_cast<int>(severity), msg);
        ++messages;
    }
    int messages{0};
};

class Finder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &logger;
    }
    PrintLogger logger;
};

// A stand-in for TensorRT's expression builder: constants and their arithmetic only.
class ConstExprImpl : public apiv::VDimensionExpr
{
public:
    explicit ConstExprImpl(int64_t v)
        : value(v)
    {
    }
    bool isConstant() const override
    {
        return true;
    }
    int64_t getConstantValue() const override
    {
        return value;
    }
    bool isSizeTensor() const override
    {
        return false;
    }
    int64_t value;
};

class ConstExpr : public IDimensionExpr
{
public:
    explicit ConstExpr(int64_t v)
        : impl(v)
    {
        mImpl = &impl;
    }
    ~ConstExpr() noexcept override = default;
    ConstExprImpl impl;
};

class BuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override
    {
        exprs.emplace_back(new ConstExpr(value));
        return exprs.back().get();
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override
    {
        int64_t x = a.getConstantValue();
        int64_t y = b.getConstantValue();
        int64_t r = 0;
        switch (op)
        {
        case DimensionOperation::kSUM: r = x + y; break;
        case DimensionOperation::kPROD: r = x * y; break;
        case DimensionOperation::kMAX: r = x > y ? x : y; break;
        case DimensionOperation::kMIN: r = x < y ? x : y; break;
        case DimensionOperation::kSUB: r = x - y; break;
        default: return nullptr;
        }
        return constant(r);
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
    std::vector<std::unique_ptr<ConstExpr>> exprs;
};

class Builder : public IExprBuilder
{
public:
    Builder()
    {
        mImpl = &impl;
    }
    ~Builder() noexcept override = default;
    BuilderImpl impl;
};

DynamicPluginTensorDesc tensorDesc(DataType type, std::vector<int64_t> const& dims)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        d.desc.dims.d[i] = dims[i];
    }
    d.min = d.desc.dims;
    d.max = d.desc.dims;
    d.opt = d.desc.dims;
    return d;
}

int32_t serialisedK(IPluginV3OneRuntime* runtime)
{
    PluginFieldCollection const* fc = runtime->getFieldsToSerialize();
    if (fc == nullptr)
    {
        return -1;
    }
    for (int32_t f = 0; f < fc->nbFields; ++f)
    {
        if (std::strcmp(fc->fields[f].name, "k") == 0 && fc->fields[f].type == PluginFieldType::kINT32)
        {
            return *static_cast<int32_t const*>(fc->fields[f].data);
        }
    }
    return -1;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 2)
    {
        std::fprintf(stderr, "usage: %s libnformer_plugins.so [--gpu]\n", argv[0]);
        return 2;
    }
    bool const gpu = argc > 2 && std::strcmp(argv[2], "--gpu") == 0;
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    check(lib != nullptr, std::string("dlopen ") + argv[1] + (lib ? "" : std::string(": ") + dlerror()));
    if (lib == nullptr)
    {
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    check(getCreators != nullptr, "exports getCreators");
    check(setLoggerFinder != nullptr, "exports setLoggerFinder");
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        return 1;
    }
    static Finder finder;
    setLoggerFinder(&finder);

    int32_t nb = 0;
    IPluginCreatorInterface* const* creators = getCreators(nb);
    check(nb == 1 && creators != nullptr && creators[0] != nullptr, "getCreators returns one creator");
    if (nb != 1 || creators == nullptr || creators[0] == nullptr)
    {
        return 1;
    }
    InterfaceInfo info = creators[0]->getInterfaceInfo();
    check(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1,
        std::string("creator interface is IPluginCreatorV3One (") + info.kind + ")");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    check(std::strcmp(creator->getPluginName(), "ReciprocalNeighbors") == 0, "creator name ReciprocalNeighbors");
    check(std::strcmp(creator->getPluginVersion(), "1") == 0, "creator version 1");
    check(std::strcmp(creator->getPluginNamespace(), "") == 0, "creator namespace empty");
    PluginFieldCollection const* names = creator->getFieldNames();
    check(names != nullptr && names->nbFields == 1 && std::strcmp(names->fields[0].name, "k") == 0
            && names->fields[0].type == PluginFieldType::kINT32,
        "field names: k (INT32)");

    // As the ONNX parser sends the node's attributes: k INT32, the plugin_* strings as CHAR.
    int32_t k = 64;
    char const version[] = "1";
    std::vector<PluginField> fields{PluginField("k", &k, PluginFieldType::kINT32, 1),
        PluginField("plugin_version", version, PluginFieldType::kCHAR, 1),
        PluginField("plugin_namespace", "", PluginFieldType::kCHAR, 0)};
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("rn", &fc, TensorRTPhase::kBUILD));
    check(plugin != nullptr, "createPlugin(k=64, plugin_version, plugin_namespace)");
    if (!plugin)
    {
        return 1;
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core && build && runtime, "capabilities CORE, BUILD, RUNTIME");
    check(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0
            && std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0
            && std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        "capability interface kinds");
    check(std::strcmp(core->getPluginName(), "ReciprocalNeighbors") == 0 && std::strcmp(core->getPluginVersion(), "1") == 0
            && std::strcmp(core->getPluginNamespace(), "") == 0,
        "plugin name / version / namespace match the creator");
    check(serialisedK(runtime) == 64, "getFieldsToSerialize holds k = 64");

    // Engine deserialisation: the creator receives the serialised fields in the runtime phase.
    std::unique_ptr<IPluginV3> restored(
        creator->createPlugin("rn", runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
    check(restored != nullptr
            && serialisedK(static_cast<IPluginV3OneRuntime*>(
                   restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME)))
                == 64,
        "serialisation round trip keeps k");
    std::unique_ptr<IPluginV3> cloned(plugin->clone());
    check(cloned != nullptr
            && serialisedK(static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME)))
                == 64,
        "clone keeps k");
    std::unique_ptr<IPluginV3> attached(runtime->attachToContext(nullptr));
    check(attached != nullptr, "attachToContext returns a clone");

    for (int32_t bad : {0, -3, 129})
    {
        int32_t kb = bad;
        PluginField f("k", &kb, PluginFieldType::kINT32, 1);
        PluginFieldCollection bfc{1, &f};
        int before = finder.logger.messages;
        std::unique_ptr<IPluginV3> p(creator->createPlugin("rn", &bfc, TensorRTPhase::kBUILD));
        check(p == nullptr && finder.logger.messages > before, "k = " + std::to_string(bad) + " refused with a log message");
    }
    {
        int64_t k64 = 20;
        PluginField f("k", &k64, PluginFieldType::kINT64, 1);
        PluginFieldCollection f64{1, &f};
        std::unique_ptr<IPluginV3> p(creator->createPlugin("rn", &f64, TensorRTPhase::kBUILD));
        check(p != nullptr
                && serialisedK(static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME)))
                    == 20,
            "k as INT64 field accepted");
        std::unique_ptr<IPluginV3> d(creator->createPlugin("rn", nullptr, TensorRTPhase::kBUILD));
        check(d != nullptr
                && serialisedK(static_cast<IPluginV3OneRuntime*>(d->getCapabilityInterface(PluginCapabilityType::kRUNTIME)))
                    == 20,
            "k defaults to 20");
    }

    check(build->getNbOutputs() == 2, "two outputs");
    DataType in = DataType::kFLOAT;
    DataType out[2] = {DataType::kFLOAT, DataType::kFLOAT};
    check(build->getOutputDataTypes(out, 2, &in, 1) == 0 && out[0] == DataType::kINT32 && out[1] == DataType::kINT32,
        "FLOAT features -> INT32, INT32");
    in = DataType::kHALF;
    check(build->getOutputDataTypes(out, 2, &in, 1) == 0 && out[0] == DataType::kINT32 && out[1] == DataType::kINT32,
        "HALF features -> INT32, INT32");
    in = DataType::kINT32;
    check(build->getOutputDataTypes(out, 2, &in, 1) != 0, "INT32 features refused");

    Builder eb;
    for (int64_t n : {int64_t{19281}, int64_t{7}, int64_t{1}})
    {
        DimsExprs inputs{};
        inputs.nbDims = 3;
        inputs.d[0] = eb.constant(1);
        inputs.d[1] = eb.constant(n);
        inputs.d[2] = eb.constant(256);
        DimsExprs outs[2]{};
        int32_t rc = build->getOutputShapes(&inputs, 1, nullptr, 0, outs, 2, eb);
        bool ok = rc == 0;
        for (auto& o : outs)
        {
            ok = ok && o.nbDims == 3 && o.d[0]->getConstantValue() == 1 && o.d[1]->getConstantValue() == n
                && o.d[2]->getConstantValue() == (n < 64 ? n : 64);
        }
        check(ok, "output shapes [1, " + std::to_string(n) + ", min(64, N)]");
    }

    std::vector<DynamicPluginTensorDesc> io{tensorDesc(DataType::kFLOAT, {1, -1, 256}),
        tensorDesc(DataType::kINT32, {1, -1, 64}), tensorDesc(DataType::kINT32, {1, -1, 64})};
    check(build->supportsFormatCombination(0, io.data(), 1, 2), "supports FLOAT linear features");
    io[0].desc.type = DataType::kHALF;
    check(build->supportsFormatCombination(0, io.data(), 1, 2), "supports HALF linear features");
    io[0].desc.type = DataType::kINT8;
    check(!build->supportsFormatCombination(0, io.data(), 1, 2), "refuses INT8 features");
    check(build->supportsFormatCombination(1, io.data(), 1, 2) && build->supportsFormatCombination(2, io.data(), 1, 2),
        "supports INT32 linear outputs");
    io[1].desc.type = DataType::kBOOL;
    check(!build->supportsFormatCombination(1, io.data(), 1, 2), "refuses BOOL outputs");
    io[1].desc.type = DataType::kINT32;
    io[0].desc.type = DataType::kFLOAT;
    check(build->configurePlugin(io.data(), 1, io.data() + 1, 2) == 0, "configurePlugin accepts [B, N, D]");

    for (int64_t n : {int64_t{1000}, int64_t{19281}, int64_t{1000000}})
    {
        DynamicPluginTensorDesc wsIn = tensorDesc(DataType::kFLOAT, {1, n, 256});
        size_t ws = build->getWorkspaceSize(&wsIn, 1, io.data() + 1, 2);
        double perRow = static_cast<double>(ws) / static_cast<double>(n);
        std::printf("  workspace N=%lld: %zu bytes (%.0f per row)\n", static_cast<long long>(n), ws, perRow);
        // O(N (D + S c)) bytes, not N x N: below a tenth of an fp32 N x N matrix from Market-1501 size up.
        check(ws > 0 && (n < 19281 || static_cast<double>(ws) < 0.4 * n * n),
            "workspace for N=" + std::to_string(n) + " is O(N), not N x N");
    }

    if (gpu)
    {
        // N = 6 rows e_0..e_5 in D = 8: all off-diagonal keys are 0, so ties go to the lower index.
        int const n = 6;
        int const d = 8;
        std::vector<float> host(n * d, 0.0f);
        for (int i = 0; i < n; ++i)
        {
            host[i * d + i] = 1.0f + i;
        }
        DynamicPluginTensorDesc wsIn = tensorDesc(DataType::kFLOAT, {1, n, d});
        size_t ws = build->getWorkspaceSize(&wsIn, 1, io.data() + 1, 2);
        int const ke = n < 64 ? n : 64;
        void* dx = nullptr;
        void* didx = nullptr;
        void* dvalid = nullptr;
        void* dws = nullptr;
        bool ok = cudaMalloc(&dx, host.size() * sizeof(float)) == cudaSuccess
            && cudaMalloc(&didx, n * ke * sizeof(int32_t)) == cudaSuccess
            && cudaMalloc(&dvalid, n * ke * sizeof(int32_t)) == cudaSuccess && cudaMalloc(&dws, ws) == cudaSuccess
            && cudaMemcpy(dx, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess
            && cudaMemset(didx, 0xff, n * ke * sizeof(int32_t)) == cudaSuccess;
        check(ok, "GPU buffers");
        PluginTensorDesc inDesc = tensorDesc(DataType::kFLOAT, {1, n, d}).desc;
        PluginTensorDesc outDesc[2] = {tensorDesc(DataType::kINT32, {1, n, ke}).desc, tensorDesc(DataType::kINT32, {1, n, ke}).desc};
        void const* ins[1] = {dx};
        void* outs[2] = {didx, dvalid};
        check(runtime->onShapeChange(&inDesc, 1, outDesc, 2) == 0, "onShapeChange");
        int32_t rc = runtime->enqueue(&inDesc, outDesc, ins, outs, dws, nullptr);
        check(rc == 0 && cudaDeviceSynchronize() == cudaSuccess, "enqueue runs");
        std::vector<int32_t> idx(n * ke);
        std::vector<int32_t> valid(n * ke);
        cudaMemcpy(idx.data(), didx, idx.size() * sizeof(int32_t), cudaMemcpyDeviceToHost);
        cudaMemcpy(valid.data(), dvalid, valid.size() * sizeof(int32_t), cudaMemcpyDeviceToHost);
        bool right = true;
        for (int i = 0; i < n; ++i)
        {
            std::vector<int32_t> expect{i};
            for (int j = 0; j < n; ++j)
            {
                if (j != i)
                {
                    expect.push_back(j);
                }
            }
            for (int t = 0; t < ke; ++t)
            {
                right = right && idx[i * ke + t] == expect[t] && valid[i * ke + t] == 1;
            }
        }
        check(right, "enqueue result: self first, ties by lower index, all reciprocal (N <= k)");
        cudaFree(dx);
        cudaFree(didx);
        cudaFree(dvalid);
        cudaFree(dws);
    }

    std::printf("%s: %d failure(s)\n", gFailures == 0 ? "OK" : "FAILED", gFailures);
    return gFailures == 0 ? 0 : 1;
}
