// What the stand-in's driver (libcuda.so) offers its cuBLAS: stream-ordered work and memcheck.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace standin {

/// Runs `work` in order on `stream` (0: the default stream): now, or when the stream is flushed
/// in deferred mode. Returns false for an unknown stream.
__attribute__((visibility("default"))) bool enqueue(void* stream, std::function<void()> work);

/// Aborts with a memcheck report unless [ptr, ptr + bytes) lies inside one live device
/// allocation. `what` names the operation for the report.
__attribute__((visibility("default"))) void check_access(uint64_t ptr, size_t bytes, bool write, const char* what);

/// Sets the name memcheck reports for faults on this thread (a kernel's name), returning the
/// previous one.
__attribute__((visibility("default"))) const char* set_current_op(const char* name);

}  // namespace standin
