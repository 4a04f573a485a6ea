#include "compile.h"

#include <dlfcn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>

namespace standin {

std::string own_dir() {
    Dl_info info;
    if (dladdr((void*)&own_dir, &info) == 0 || info.dli_fname == nullptr) return ".";
    std::string path = info.dli_fname;
    size_t slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
}

std::vector<std::string> kernel_names(const std::string& source) {
    static const std::regex global(R"(__global__\s+void\s+([A-Za-z_]\w*)\s*\()");
    std::vector<std::string> names;
    for (auto it = std::sregex_iterator(source.begin(), source.end(), global); it != std::sregex_iterator(); ++it) {
        names.push_back((*it)[1]);
    }
    return names;
}

std::string make_ptx(const std::string& source, const std::string& name, const std::string& arch) {
    std::ostringstream out;
    out << PTX_MARKER << "\n// .target " << arch << "\n// .name " << name << "\n";
    for (const auto& k : kernel_names(source)) out << "// .entry " << k << "(\n";
    out << "// .source\n" << source;
    return out.str();
}

bool source_of_ptx(const std::string& ptx, std::string* source, std::string* name) {
    if (ptx.rfind(PTX_MARKER, 0) != 0) return false;
    size_t at = ptx.find("// .name ");
    if (at != std::string::npos) {
        size_t end = ptx.find('\n', at);
        *name = ptx.substr(at + 9, end - at - 9);
    }
    at = ptx.find("// .source\n");
    if (at == std::string::npos) return false;
    *source = ptx.substr(at + 11);
    return true;
}

namespace {

uint64_t fnv1a(const std::string& s, uint64_t h = 0xcbf29ce484222325ull) {
    for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
    return h;
}

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::ostringstream s;
    s << f.rdbuf();
    return s.str();
}

/// The source as the host compiler takes it: `extern __shared__ T name[];` becomes a pointer to
/// the launch's dynamic shared memory, and every kernel gets an exported descriptor.
std::string host_source(const std::string& source, const std::string& name) {
    static const std::regex dyn(R"(extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*?)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;)");
    std::string body = std::regex_replace(source, dyn, "$1* $2 = reinterpret_cast<$1*>(::standin::dyn_smem());");
    // Static `__shared__ T name[N];` and `__shared__ T name;`: the block's own memory, which
    // starts as NaN bits in every block (a read before the first write shows), not a C++ static.
    static const std::regex arr(R"(__shared__\s+([A-Za-z_][\w:]*)\s+([A-Za-z_]\w*)\s*\[([^\]]+)\]\s*;)");
    body = std::regex_replace(body, arr, "$1* $2 = ::standin::static_smem<$1>(__PRETTY_FUNCTION__, __COUNTER__, ($3));");
    static const std::regex scalar(R"(__shared__\s+([A-Za-z_][\w:]*)\s+([A-Za-z_]\w*)\s*;)");
    body = std::regex_replace(body, scalar, "$1& $2 = *::standin::static_smem<$1>(__PRETTY_FUNCTION__, __COUNTER__, 1);");
    std::ostringstream out;
    out << "#include \"" << own_dir() << "/simt.h\"\n#line 1 \"" << name << "\"\n" << body << "\n";
    for (const auto& k : kernel_names(source)) {
        out << "extern \"C\" __attribute__((visibility(\"default\"))) const ::standin::KernelInfo* __standin_kernel_" << k
            << "() { static const ::standin::KernelInfo info = ::standin::make_info<&" << k << ">(&" << k << ", \"" << k
            << "\"); return &info; }\n";
    }
    out << "extern \"C\" __attribute__((visibility(\"default\"))) void __standin_run(const ::standin::KernelInfo* k, "
           "dim3 g, dim3 b, size_t smem, void** p) { ::standin::run(k, g, b, smem, p); }\n";
    return out.str();
}

}  // namespace

std::string compile_module(const std::string& source, const std::string& name, std::string* log) {
    std::string dir = own_dir();
    std::string cache = dir + "/cache";
    mkdir(cache.c_str(), 0755);
    std::string text = host_source(source, name);
    const char* cxx = getenv("CXX");
    std::string compiler = cxx && *cxx ? cxx : "c++";
    std::string flags = "-std=c++17 -O2 -fPIC -shared -fvisibility=hidden -fno-strict-aliasing -w";
    char hash[32];
    snprintf(hash, sizeof hash, "%016llx",
             (unsigned long long)fnv1a(text + flags + compiler, fnv1a(read_file(dir + "/simt.h"))));
    std::string so = cache + "/" + hash + ".so";
    struct stat st;
    if (stat(so.c_str(), &st) == 0) return so;
    std::string tmp = cache + "/" + hash + "." + std::to_string(getpid()) + "." + std::to_string((uintptr_t)&text);
    {
        std::ofstream f(tmp + ".cpp");
        f << text;
    }
    std::string cmd = compiler + " " + flags + " -x c++ '" + tmp + ".cpp' -o '" + tmp + ".so' 2> '" + tmp + ".log'";
    int rc = system(cmd.c_str());
    *log = read_file(tmp + ".log");
    unlink((tmp + ".cpp").c_str());
    unlink((tmp + ".log").c_str());
    if (rc != 0 || !WIFEXITED(rc) || WEXITSTATUS(rc) != 0) {
        unlink((tmp + ".so").c_str());
        if (log->empty()) *log = "the host compiler (" + compiler + ") failed to run";
        return "";
    }
    // Atomic: another process compiling the same source renames an identical file.
    if (rename((tmp + ".so").c_str(), so.c_str()) != 0) {
        *log = "cannot write " + so;
        return "";
    }
    return so;
}

}  // namespace standin
