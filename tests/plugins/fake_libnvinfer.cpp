/*
 * A stand-in for the two libnvinfer functions libnformer_plugins_autoreg.so calls (getPluginRegistry, getLogger),
 * built by tests/plugins/test_plugin_build.py as libnvinfer.so.<major> so that the library can be linked and
 * loaded on a machine without TensorRT. Its registry does what IPluginRegistry documents, no more:
 * registerCreator returns false for a second creator of the same name, version and namespace; loadLibrary
 * dlopens the library, passes setLoggerFinder a finder when the library exports it, registers every creator
 * getCreators returns and returns null when one of them was already registered (or the entry point is missing).
 * Every call is printed on stdout for the test to read. It is not TensorRT: the real registry never ran here.
 */
#include "NvInferRuntime.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

class PrintLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        std::printf("log %d: %s\n", static_cast<int>(severity), msg);
        std::fflush(stdout);
    }
};

PrintLogger gLogger;

class PrintLoggerFinder : public ILoggerFinder
{
public:
    ILogger* findLogger() noexcept override
    {
        return &gLogger;
    }
};

PrintLoggerFinder gFinder;

//! "name/version/namespace" of a V3 creator, or its interface kind for any other creator.
std::string describe(IPluginCreatorInterface& creator)
{
    InterfaceInfo const info = creator.getInterfaceInfo();
    if (info.kind != nullptr && std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0)
    {
        auto& v3 = static_cast<IPluginCreatorV3One&>(creator);
        return std::string(v3.getPluginName()) + "/" + v3.getPluginVersion() + "/" + v3.getPluginNamespace();
    }
    return std::string("kind ") + (info.kind != nullptr ? info.kind : "?");
}

class FakeRegistry : public IPluginRegistry
{
public:
    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const pluginNamespace) noexcept override
    {
        std::string const key = describe(creator);
        bool const fresh = find(key) == nullptr;
        if (fresh)
        {
            mKeys.push_back(key);
            mCreators.push_back(&creator);
        }
        std::printf("registerCreator %s (namespace argument \"%s\") -> %s\n", key.c_str(),
            pluginNamespace != nullptr ? pluginNamespace : "(null)", fresh ? "true" : "false");
        std::fflush(stdout);
        return fresh;
    }

    IPluginCreatorInterface* const* getAllCreators(int32_t* const numCreators) const noexcept override
    {
        *numCreators = static_cast<int32_t>(mCreators.size());
        return mCreators.empty() ? nullptr : mCreators.data();
    }

    IPluginCreatorInterface* getCreator(AsciiChar const* const pluginName, AsciiChar const* const pluginVersion,
        AsciiChar const* const pluginNamespace) noexcept override
    {
        return find(std::string(pluginName) + "/" + pluginVersion + "/" + (pluginNamespace ? pluginNamespace : ""));
    }

    PluginLibraryHandle loadLibrary(AsciiChar const* pluginPath) noexcept override
    {
        void* handle = dlopen(pluginPath, RTLD_NOW | RTLD_LOCAL);
        using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
        using SetLoggerFinder = void (*)(ILoggerFinder*);
        auto getCreators = handle ? reinterpret_cast<GetCreators>(dlsym(handle, "getCreators")) : nullptr;
        auto setFinder = handle ? reinterpret_cast<SetLoggerFinder>(dlsym(handle, "setLoggerFinder")) : nullptr;
        bool ok = getCreators != nullptr;
        if (setFinder != nullptr)
        {
            setFinder(&gFinder);
        }
        if (ok)
        {
            int32_t n = 0;
            IPluginCreatorInterface* const* creators = getCreators(n);
            for (int32_t i = 0; i < n; ++i)
            {
                ok = registerCreator(*creators[i], "") && ok;
            }
        }
        std::printf("loadLibrary %s -> %s\n", pluginPath,
            handle == nullptr ? dlerror() : ok ? "handle" : "null (no getCreators, or a creator already registered)");
        std::fflush(stdout);
        return ok ? handle : nullptr;
    }

    bool deregisterCreator(IPluginCreatorInterface const&) noexcept override
    {
        return false;
    }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return nullptr;
    }
    bool isParentSearchEnabled() const override
    {
        return true;
    }
    void setParentSearchEnabled(bool const) override {}
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override
    {
        return nullptr;
    }
    int32_t releasePluginResource(AsciiChar const*) noexcept override
    {
        return 0;
    }
#if NV_TENSORRT_MAJOR > 10 || NV_TENSORRT_MINOR >= 10
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const numCreators) noexcept override
    {
        return getAllCreators(numCreators);
    }
#endif
#if NV_TENSORRT_MAJOR < 11
    // TensorRT 10's deprecated IPluginCreator (V2) methods: the plugin never uses them.
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override
    {
        std::printf("registerCreator (deprecated IPluginCreator overload) -> false\n");
        return false;
    }
    IPluginCreator* const* getPluginCreatorList(int32_t* const numCreators) const noexcept override
    {
        *numCreators = 0;
        return nullptr;
    }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept
        override
    {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreator const&) noexcept override
    {
        return false;
    }
#endif

private:
    IPluginCreatorInterface* find(std::string const& key) const
    {
        for (size_t i = 0; i < mKeys.size(); ++i)
        {
            if (mKeys[i] == key)
            {
                return mCreators[i];
            }
        }
        return nullptr;
    }

    std::vector<std::string> mKeys;
    std::vector<IPluginCreatorInterface*> mCreators;
};

FakeRegistry gRegistry;

} // namespace

extern "C" __attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept
{
    return &gRegistry;
}

extern "C" __attribute__((visibility("default"))) ILogger* getLogger() noexcept
{
    return &gLogger;
}
