/*
 * The entry points of libnformer_plugins.so that IPluginRegistry::loadLibrary looks up (trtexec --dynamicPlugins,
 * Python `registry.load_library`): getCreators() hands TensorRT the creator to register, setLoggerFinder()
 * where the plugin's messages go. Nothing runs when the library is loaded: a host that only dlopens it
 * (Triton's `plugins=` option, LD_PRELOAD, DeepStream's custom-lib-path) registers nothing, and needs
 * libnformer_plugins_autoreg.so (pluginAutoRegistration.cpp) instead.
 */
#include "reciprocalNeighborsPlugin.h"

#define NFORMER_PLUGIN_EXPORT extern "C" __attribute__((visibility("default")))

NFORMER_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static nvinfer1::IPluginCreatorInterface* const sCreators[] = {&nformer::plugin::reciprocalNeighborsCreator()};
    nbCreators = 1;
    return sCreators;
}

NFORMER_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    nformer::plugin::setPluginLoggerFinder(finder);
}
