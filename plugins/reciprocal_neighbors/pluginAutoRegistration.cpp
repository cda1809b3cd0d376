/*
 * libnformer_plugins_autoreg.so: the ReciprocalNeighbors creator registered with TensorRT's plugin registry when
 * the library is loaded, for hosts that only dlopen plugin libraries and never call loadLibrary:
 *   Triton's TensorRT backend  tritonserver --backend-config=tensorrt,plugins=<this library>  (or LD_PRELOAD=<it>)
 *   DeepStream's nvinfer       custom-lib-path=<this library>
 * A static initializer calls getPluginRegistry()->registerCreator(creator, "") as TensorRT's own static
 * registration does; the library therefore links libnvinfer (getPluginRegistry, getLogger), which loads with
 * it, and exports no getCreators/setLoggerFinder (it is not meant for loadLibrary / --dynamicPlugins: that is
 * libnformer_plugins.so).
 *
 * Both libraries in one process register the same name, version and namespace twice. registerCreator then
 * returns false: here that is logged (the creator registered first stays in use), never a crash; in the other
 * order loadLibrary returns null. Use one of the two per process.
 *
 * The library is linked with -z nodelete (plugins/CMakeLists.txt): a host that dlcloses it (DeepStream when a
 * pipeline is torn down) leaves it mapped, so the registry never holds a pointer into unmapped code.
 */
#include "reciprocalNeighborsPlugin.h"

#include <cstdio>
#include <string>

using namespace nvinfer1;

namespace nformer
{
namespace plugin
{
namespace
{

//! No builder or runtime exists at load time, so the plugin's messages go to TensorRT's global logger.
class GlobalLoggerFinder : public ILoggerFinder
{
public:
    ILogger* findLogger() noexcept override
    {
        return getLogger();
    }
};

void report(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        ILogger* logger = getLogger();
        std::string const line = "libnformer_plugins_autoreg.so: " + message;
        if (logger != nullptr)
        {
            logger->log(severity, line.c_str());
        }
        else if (severity <= ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", line.c_str());
        }
    }
    catch (...)
    {
    }
}

void registerAtLoad() noexcept
{
    static GlobalLoggerFinder sFinder;
    setPluginLoggerFinder(&sFinder);
    ReciprocalNeighborsPluginCreator& creator = reciprocalNeighborsCreator();
    std::string const what = std::string("plugin creator ") + creator.getPluginName() + " version "
        + creator.getPluginVersion() + " (namespace \"" + creator.getPluginNamespace() + "\")";
    IPluginRegistry* registry = getPluginRegistry();
    if (registry == nullptr)
    {
        report(ILogger::Severity::kERROR, "getPluginRegistry() returned null: " + what + " is not registered");
        return;
    }
    if (registry->registerCreator(creator, creator.getPluginNamespace()))
    {
        report(ILogger::Severity::kVERBOSE, "registered " + what);
        return;
    }
    report(ILogger::Severity::kWARNING,
        "the registry refused " + what + ": one of that name, version and namespace is already registered "
        "(libnformer_plugins.so loaded through loadLibrary / --dynamicPlugins, or another copy of this library). "
        "The one registered first is used; load only one of the two libraries per process.");
}

//! Runs once per process when the dynamic loader maps the library (dlopen, LD_PRELOAD, DT_NEEDED).
struct RegisterAtLoad
{
    RegisterAtLoad() noexcept
    {
        registerAtLoad();
    }
};

RegisterAtLoad const gRegisterAtLoad;

} // namespace
} // namespace plugin
} // namespace nformer
