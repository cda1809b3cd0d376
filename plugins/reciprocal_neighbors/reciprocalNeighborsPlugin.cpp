/*
 * TensorRT glue of the ReciprocalNeighbors op (see reciprocalNeighborsPlugin.h and README.md).
 *
 * Only TensorRT's headers are used: every call into TensorRT goes through virtual interfaces it passes
 * in (IExprBuilder, ILoggerFinder/ILogger), so this file needs no libnvinfer at link or load time. How TensorRT
 * finds the creator is the business of pluginEntryPoints.cpp (loadLibrary) or pluginAutoRegistration.cpp.
 */
#include "reciprocalNeighborsPlugin.h"
#include "reciprocalNeighborsKernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <new>
#include <string>

using namespace nvinfer1;

namespace nformer
{
namespace plugin
{
namespace
{

//! The logger TensorRT hands over through setLoggerFinder(); messages are dropped before that.
class LoggerFinderHolder
{
public:
    void set(ILoggerFinder* finder) noexcept
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mFinder == nullptr && finder != nullptr)
        {
            mFinder = finder;
        }
    }

    void log(ILogger::Severity severity, std::string const& message) noexcept
    {
        try
        {
            std::lock_guard<std::mutex> lock(mMutex);
            if (mFinder == nullptr)
            {
                return;
            }
            ILogger* logger = mFinder->findLogger();
            if (logger != nullptr)
            {
                logger->log(severity, message.c_str());
            }
        }
        catch (...)
        {
        }
    }

private:
    std::mutex mMutex;
    ILoggerFinder* mFinder{nullptr};
};

LoggerFinderHolder& loggerFinder() noexcept
{
    static LoggerFinderHolder holder;
    return holder;
}

void logError(std::string const& message) noexcept
{
    logPluginMessage(ILogger::Severity::kERROR, message);
}

bool toInt32(int64_t v, int32_t& out) noexcept
{
    if (v < 0 || v > std::numeric_limits<int32_t>::max())
    {
        return false;
    }
    out = static_cast<int32_t>(v);
    return true;
}

//! Reads an integer PluginField of any integer width (the ONNX parser sends INT attributes as INT32).
bool readIntField(PluginField const& field, int32_t& out) noexcept
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    switch (field.type)
    {
    case PluginFieldType::kINT32: out = *static_cast<int32_t const*>(field.data); return true;
    case PluginFieldType::kINT64: return toInt32(*static_cast<int64_t const*>(field.data), out);
    case PluginFieldType::kINT16: out = *static_cast<int16_t const*>(field.data); return true;
    case PluginFieldType::kINT8: out = *static_cast<int8_t const*>(field.data); return true;
    default: return false;
    }
}

bool validK(int32_t k) noexcept
{
    return k >= 1 && k <= kReciprocalNeighborsMaxK;
}

} // namespace

// ---------------------------------------------------------------- plugin

ReciprocalNeighborsPlugin::ReciprocalNeighborsPlugin(int32_t k, std::string const& pluginNamespace)
    : mK(k)
    , mNamespace(pluginNamespace)
{
}

ReciprocalNeighborsPlugin::ReciprocalNeighborsPlugin(ReciprocalNeighborsPlugin const& other)
    : mK(other.mK)
    , mNamespace(other.mNamespace)
{
}

IPluginCapability* ReciprocalNeighborsPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* ReciprocalNeighborsPlugin::clone() noexcept
{
    try
    {
        return new ReciprocalNeighborsPlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(std::string("clone failed: ") + e.what());
    }
    return nullptr;
}

char const* ReciprocalNeighborsPlugin::getPluginName() const noexcept
{
    return kRECIPROCAL_NEIGHBORS_NAME;
}

char const* ReciprocalNeighborsPlugin::getPluginVersion() const noexcept
{
    return kRECIPROCAL_NEIGHBORS_VERSION;
}

char const* ReciprocalNeighborsPlugin::getPluginNamespace() const noexcept
{
    return mNamespace.c_str();
}

int32_t ReciprocalNeighborsPlugin::getNbOutputs() const noexcept
{
    return 2;
}

int32_t ReciprocalNeighborsPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (in == nullptr || out == nullptr || nbInputs != 1 || nbOutputs != 2)
    {
        logError("expects 1 input (features) and 2 outputs (neighbor_index, neighbor_valid)");
        return 1;
    }
    if (in[0].desc.dims.nbDims != 3)
    {
        logError("features must be a rank-3 tensor [B, N, D], got rank " + std::to_string(in[0].desc.dims.nbDims));
        return 1;
    }
    return 0;
}

int32_t ReciprocalNeighborsPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != 2 || nbInputs != 1)
    {
        return 1;
    }
    if (inputTypes[0] != DataType::kFLOAT && inputTypes[0] != DataType::kHALF)
    {
        logError("features must be FLOAT or HALF");
        return 1;
    }
    // int32 rather than bool: plugin bool I/O is not supported (IPluginV3OneBuild::getOutputDataTypes).
    outputTypes[0] = DataType::kINT32;
    outputTypes[1] = DataType::kINT32;
    return 0;
}

int32_t ReciprocalNeighborsPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /* shapeInputs */, int32_t /* nbShapeInputs */, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != 1 || nbOutputs != 2 || inputs[0].nbDims != 3)
    {
        logError("getOutputShapes: expects one rank-3 input [B, N, D] and two outputs");
        return 1;
    }
    IDimensionExpr const* k = exprBuilder.constant(mK);
    if (k == nullptr)
    {
        return 1;
    }
    // k_eff = min(k, N): every N >= 1 works.
    IDimensionExpr const* kEff = exprBuilder.operation(DimensionOperation::kMIN, *k, *inputs[0].d[1]);
    if (kEff == nullptr)
    {
        return 1;
    }
    for (int32_t o = 0; o < 2; ++o)
    {
        outputs[o].nbDims = 3;
        outputs[o].d[0] = inputs[0].d[0];
        outputs[o].d[1] = inputs[0].d[1];
        outputs[o].d[2] = kEff;
    }
    return 0;
}

bool ReciprocalNeighborsPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || nbInputs != 1 || nbOutputs != 2 || pos < 0 || pos >= 3)
    {
        return false;
    }
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == 0)
    {
        return d.type == DataType::kFLOAT || d.type == DataType::kHALF;
    }
    return d.type == DataType::kINT32;
}

size_t ReciprocalNeighborsPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /* outputs */, int32_t /* nbOutputs */) const noexcept
{
    if (inputs == nullptr || nbInputs != 1 || inputs[0].max.nbDims != 3)
    {
        return 0;
    }
    int32_t b = 0;
    int32_t n = 0;
    int32_t d = 0;
    if (!toInt32(inputs[0].max.d[0], b) || !toInt32(inputs[0].max.d[1], n) || !toInt32(inputs[0].max.d[2], d))
    {
        logError("the profile's largest features shape does not fit in int32");
        return 0;
    }
    // Sized for the profile's largest shape; any smaller shape runs in it (fewer column splits if needed).
    size_t bytes = reciprocalNeighborsWorkspaceSize(b, n, d, mK);
    if (bytes == 0)
    {
        logError(std::string("unsupported profile shape: ") + reciprocalNeighborsStatusString(kSTATUS_BAD_SHAPE));
    }
    return bytes;
}

char const* ReciprocalNeighborsPlugin::getMetadataString() noexcept
{
    try
    {
        mMetadata = "k=" + std::to_string(mK);
        return mMetadata.c_str();
    }
    catch (...)
    {
        return nullptr;
    }
}

void ReciprocalNeighborsPlugin::prepareDevice() noexcept
{
    // The device's attribute queries and kernel shared-memory limits, once per device and process, here rather
    // than in enqueue (which may be captured in a CUDA graph). A failure leaves mDevice null: enqueue then tries
    // again and reports the error.
    if (mDevice == nullptr && prepareReciprocalNeighborsDevice(&mDevice) != kSTATUS_SUCCESS)
    {
        mDevice = nullptr;
    }
}

int32_t ReciprocalNeighborsPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /* out */, int32_t nbOutputs) noexcept
{
    if (in == nullptr || nbInputs != 1 || nbOutputs != 2 || in[0].dims.nbDims != 3)
    {
        return 1;
    }
    prepareDevice();
    return 0;
}

int32_t ReciprocalNeighborsPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
    {
        return 1;
    }
    Dims const& dims = inputDesc[0].dims;
    int32_t b = 0;
    int32_t n = 0;
    int32_t d = 0;
    if (dims.nbDims != 3 || !toInt32(dims.d[0], b) || !toInt32(dims.d[1], n) || !toInt32(dims.d[2], d))
    {
        logError("enqueue: features must be [B, N, D] with int32 sizes");
        return 1;
    }
    FeatureType const type = inputDesc[0].type == DataType::kHALF ? FeatureType::kFLOAT16 : FeatureType::kFLOAT32;
    // TensorRT gives at least getWorkspaceSize() for the profile's max shape; the kernels only need the
    // size for the current shape, which is never larger.
    size_t const wsBytes = reciprocalNeighborsWorkspaceSize(b, n, d, mK);
    // With mDevice prepared (the usual case) this is stream work only: no device query, no attribute call.
    int32_t const status = reciprocalNeighbors(inputs[0], type, b, n, d, mK, static_cast<int32_t*>(outputs[0]),
        static_cast<int32_t*>(outputs[1]), workspace, wsBytes, stream, 0, kFLAG_NONE, mDevice);
    if (status != kSTATUS_SUCCESS)
    {
        logError(std::string("enqueue failed: ") + reciprocalNeighborsStatusString(status));
        return 1;
    }
    return 0;
}

IPluginV3* ReciprocalNeighborsPlugin::attachToContext(IPluginResourceContext* /* context */) noexcept
{
    // The copy serves one execution context, on the device that is current while TensorRT creates it.
    auto* plugin = static_cast<ReciprocalNeighborsPlugin*>(clone());
    if (plugin != nullptr)
    {
        plugin->prepareDevice();
    }
    return plugin;
}

PluginFieldCollection const* ReciprocalNeighborsPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mFieldsToSerialize.clear();
        mFieldsToSerialize.emplace_back("k", &mK, PluginFieldType::kINT32, 1);
        mFieldCollection.nbFields = static_cast<int32_t>(mFieldsToSerialize.size());
        mFieldCollection.fields = mFieldsToSerialize.data();
        return &mFieldCollection;
    }
    catch (...)
    {
        return nullptr;
    }
}

// ---------------------------------------------------------------- creator

ReciprocalNeighborsPluginCreator::ReciprocalNeighborsPluginCreator()
{
    mFields.emplace_back("k", nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

char const* ReciprocalNeighborsPluginCreator::getPluginName() const noexcept
{
    return kRECIPROCAL_NEIGHBORS_NAME;
}

char const* ReciprocalNeighborsPluginCreator::getPluginVersion() const noexcept
{
    return kRECIPROCAL_NEIGHBORS_VERSION;
}

char const* ReciprocalNeighborsPluginCreator::getPluginNamespace() const noexcept
{
    return mNamespace.c_str();
}

PluginFieldCollection const* ReciprocalNeighborsPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* ReciprocalNeighborsPluginCreator::createPlugin(
    char const* /* name */, PluginFieldCollection const* fc, TensorRTPhase /* phase */) noexcept
{
    try
    {
        int32_t k = kRECIPROCAL_NEIGHBORS_DEFAULT_K;
        if (fc != nullptr && fc->fields != nullptr)
        {
            for (int32_t f = 0; f < fc->nbFields; ++f)
            {
                PluginField const& field = fc->fields[f];
                // Other fields (the parser may pass plugin_version / plugin_namespace too) are ignored.
                if (field.name != nullptr && std::strcmp(field.name, "k") == 0 && !readIntField(field, k))
                {
                    logError("attribute k must be an integer");
                    return nullptr;
                }
            }
        }
        if (!validK(k))
        {
            logError("attribute k must be between 1 and " + std::to_string(kReciprocalNeighborsMaxK) + ", got "
                + std::to_string(k));
            return nullptr;
        }
        return new ReciprocalNeighborsPlugin(k, mNamespace);
    }
    catch (std::exception const& e)
    {
        logError(std::string("createPlugin failed: ") + e.what());
    }
    return nullptr;
}

// ---------------------------------------------------------------- the library's creator and logger

ReciprocalNeighborsPluginCreator& reciprocalNeighborsCreator() noexcept
{
    static ReciprocalNeighborsPluginCreator sCreator;
    return sCreator;
}

void setPluginLoggerFinder(ILoggerFinder* finder) noexcept
{
    loggerFinder().set(finder);
}

void logPluginMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        loggerFinder().log(severity, std::string("ReciprocalNeighbors plugin: ") + message);
    }
    catch (...)
    {
    }
}

} // namespace plugin
} // namespace nformer

