/*
 * TensorRT glue of the ReciprocalNeighbors op: an IPluginV3 (OneCore / OneBuild / OneRuntime) and its
 * IPluginCreatorV3One. The ONNX parser maps the node nformer::ReciprocalNeighbors (attributes k,
 * plugin_version "1", plugin_namespace "") to this creator; `k` arrives as an INT32 PluginField and is
 * serialised with the engine. The kernels live in reciprocalNeighborsKernels.cu.
 *
 * Built into two libraries (plugins/CMakeLists.txt) that differ only in how TensorRT learns of the creator:
 *   libnformer_plugins.so exports getCreators() and setLoggerFinder() (pluginEntryPoints.cpp) and does not link
 *     libnvinfer: load it with `trtexec --dynamicPlugins=...` or IPluginRegistry::loadLibrary() (Python
 *     load_library); it registers nothing when it is merely dlopen'ed;
 *   libnformer_plugins_autoreg.so registers the creator with getPluginRegistry() when it is loaded
 *     (pluginAutoRegistration.cpp, links libnvinfer) and exports neither entry point: for hosts that only
 *     dlopen plugin libraries (Triton's TensorRT backend, DeepStream's nvinfer).
 * One process uses one of the two: the second would register the same creator again (refused, logged).
 */
#ifndef NFORMER_RECIPROCAL_NEIGHBORS_PLUGIN_H
#define NFORMER_RECIPROCAL_NEIGHBORS_PLUGIN_H

#include "NvInferRuntime.h"

#include <cstdint>
#include <string>
#include <vector>

namespace nformer
{
struct ReciprocalNeighborsDevice;

namespace plugin
{

constexpr char const* kRECIPROCAL_NEIGHBORS_NAME = "ReciprocalNeighbors";
constexpr char const* kRECIPROCAL_NEIGHBORS_VERSION = "1";
constexpr int32_t kRECIPROCAL_NEIGHBORS_DEFAULT_K = 20;

class ReciprocalNeighborsPlugin : public nvinfer1::IPluginV3,
                                  public nvinfer1::IPluginV3OneCore,
                                  public nvinfer1::IPluginV3OneBuild,
                                  public nvinfer1::IPluginV3OneRuntime
{
public:
    ReciprocalNeighborsPlugin(int32_t k, std::string const& pluginNamespace);
    ReciprocalNeighborsPlugin(ReciprocalNeighborsPlugin const& other);
    ReciprocalNeighborsPlugin& operator=(ReciprocalNeighborsPlugin const&) = delete;
    ~ReciprocalNeighborsPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    int32_t k() const noexcept
    {
        return mK;
    }

private:
    void prepareDevice() noexcept;

    int32_t mK;
    std::string mNamespace;
    //! The execution context's device, prepared outside enqueue (attachToContext, onShapeChange); null until then,
    //! and enqueue then looks it up itself. Not copied by clone(): a clone may serve another context.
    ReciprocalNeighborsDevice const* mDevice{nullptr};
    std::string mMetadata;
    std::vector<nvinfer1::PluginField> mFieldsToSerialize;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class ReciprocalNeighborsPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    ReciprocalNeighborsPluginCreator();
    ~ReciprocalNeighborsPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::string mNamespace;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

//! The library's creator (a static object that lives as long as the library): the one getCreators() hands to
//! IPluginRegistry::loadLibrary, and the one libnformer_plugins_autoreg.so registers when it is loaded.
ReciprocalNeighborsPluginCreator& reciprocalNeighborsCreator() noexcept;

//! Where the plugin's messages go (the first non-null finder is kept; before one is set they are dropped).
void setPluginLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

//! A message through that logger, prefixed with the plugin's name.
void logPluginMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;

} // namespace plugin
} // namespace nformer

#endif // NFORMER_RECIPROCAL_NEIGHBORS_PLUGIN_H
