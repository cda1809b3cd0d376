/*
 * Loads plugin libraries the ways TensorRT's hosts do, against the stand-in registry of fake_libnvinfer.cpp,
 * and prints what ended up registered (tests/plugins/test_plugin_build.py reads the output). Steps, in order:
 *   dlopen=PATH       dlopen(RTLD_NOW | RTLD_LOCAL), as Triton's `plugins=` option and DeepStream's custom-lib-path
 *   dlclose=PATH      dlclose the handle of an earlier dlopen= of PATH
 *   loadLibrary=PATH  IPluginRegistry::loadLibrary, as trtexec --dynamicPlugins and Python load_library
 * Then every registered V3 creator makes a plugin (k = 20) and the plugin's name and version are printed.
 */
#include "NvInferRuntime.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>

using namespace nvinfer1;

int main(int argc, char** argv)
{
    std::map<std::string, void*> handles;
    for (int a = 1; a < argc; ++a)
    {
        std::string const arg = argv[a];
        std::string const action = arg.substr(0, arg.find('='));
        std::string const path = arg.substr(arg.find('=') + 1);
        if (action == "dlopen")
        {
            void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
            std::printf("dlopen %s -> %s\n", path.c_str(), handle ? "ok" : dlerror());
            handles[path] = handle;
        }
        else if (action == "dlclose")
        {
            std::printf("dlclose %s -> %d\n", path.c_str(), handles[path] ? dlclose(handles[path]) : -1);
        }
        else if (action == "loadLibrary")
        {
            getPluginRegistry()->loadLibrary(path.c_str());
        }
        std::fflush(stdout);
    }
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getPluginRegistry()->getAllCreators(&n);
    std::printf("registered %d\n", n);
    for (int32_t i = 0; i < n; ++i)
    {
        InterfaceInfo const info = creators[i]->getInterfaceInfo();
        if (std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") != 0)
        {
            std::printf("creator %d: kind %s\n", i, info.kind);
            continue;
        }
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[i]);
        int32_t k = 20;
        PluginField field("k", &k, PluginFieldType::kINT32, 1);
        PluginFieldCollection fc{1, &field};
        IPluginV3* plugin = creator->createPlugin("probe", &fc, TensorRTPhase::kRUNTIME);
        IPluginCapability* capability = plugin ? plugin->getCapabilityInterface(PluginCapabilityType::kCORE) : nullptr;
        auto* core = static_cast<IPluginV3OneCore*>(capability);
        std::printf("creator %d: %s %s version %s namespace \"%s\" -> plugin %s %s\n", i, info.kind,
            creator->getPluginName(), creator->getPluginVersion(), creator->getPluginNamespace(),
            core ? core->getPluginName() : "(none)", core ? core->getPluginVersion() : "");
        delete plugin;
    }
    return 0;
}
