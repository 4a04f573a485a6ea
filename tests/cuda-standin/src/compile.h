// Building a CUDA C source for the host: shared by the stand-in's NVRTC (which compiles at
// nvrtcCompileProgram so errors come back as the program log) and its driver (which loads the
// result at cuModuleLoadData). Modules are cached by the hash of what is compiled.
#pragma once

#include <string>
#include <vector>

namespace standin {

/// The first line of every "PTX" the stand-in's NVRTC returns; the rest is the CUDA C source.
constexpr const char* PTX_MARKER = "// openlora-cuda-standin module";

/// The `__global__` functions a source defines, in order.
std::vector<std::string> kernel_names(const std::string& source);

/// The "PTX" for a source: the marker, one `.entry NAME(` line per kernel, then the source.
std::string make_ptx(const std::string& source, const std::string& name, const std::string& arch);

/// The source inside a stand-in "PTX" (false if the image is not one).
bool source_of_ptx(const std::string& ptx, std::string* source, std::string* name);

/// Compiles `source` (named `name`, for messages) into a shared object in the cache; returns its
/// path, or "" with the compiler's messages in `log`.
std::string compile_module(const std::string& source, const std::string& name, std::string* log);

/// The folder this library was loaded from (the stand-in's folder).
std::string own_dir();

}  // namespace standin
