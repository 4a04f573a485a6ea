// libcuda.so of the CUDA stand-in: one device with an H100's attributes, host memory standing
// for device memory (memory.cpp), streams that run their work in order, events, and modules
// built from CUDA C for the host (compile.cpp, simt.h). Strict like a device: launches over the
// hardware limits fail with the driver's error codes, and every device access is checked.
//
// Environment:
//   CUDA_STANDIN_MEMORY_BYTES   the device's memory (default 2 GiB; suffixes K, M, G allowed)
//   CUDA_STANDIN_DEFER_STREAMS  1: work on created streams waits until a synchronisation point
//                               owes it (stream/event/context synchronisation, a wait on an
//                               event recorded after it), so a missing wait gives wrong results
#include <dlfcn.h>
#include <signal.h>
#include <sys/time.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "compile.h"
#include "cuda_types.h"
#include "device.h"
#include "memory.h"
#include "simt.h"
#include "standin.h"

namespace standin {
namespace {

size_t parse_bytes(const char* s, size_t fallback) {
    if (!s || !*s) return fallback;
    char* end = nullptr;
    double v = strtod(s, &end);
    switch (end && *end ? (*end | 0x20) : 0) {
        case 'k': v *= 1024.0; break;
        case 'm': v *= 1024.0 * 1024.0; break;
        case 'g': v *= 1024.0 * 1024.0 * 1024.0; break;
        default: break;
    }
    return v > 0 ? (size_t)v : fallback;
}

struct Op {
    uint64_t seq;
    std::function<void()> work;
};

struct Stream {
    unsigned flags = 0;
    bool deferred = false;
    std::deque<Op> pending;
    uint64_t enqueued = 0, done = 0;
};

struct EventState {
    Stream* stream = nullptr;  // where it was last recorded while deferred
    uint64_t seq = 0;
    double at_ms = 0;
};
struct Event {
    std::shared_ptr<EventState> state = std::make_shared<EventState>();
};

struct Module {
    void* handle;
    void (*run)(const KernelInfo*, dim3, dim3, size_t, void**);
};
struct Function {
    Module* module;
    const KernelInfo* info;
    int max_dynamic_smem = SHARED_PER_BLOCK;
};

struct Driver {
    std::recursive_mutex mu;
    DeviceMemory memory{parse_bytes(getenv("CUDA_STANDIN_MEMORY_BYTES"), size_t(2) << 30)};
    bool defer = getenv("CUDA_STANDIN_DEFER_STREAMS") && strcmp(getenv("CUDA_STANDIN_DEFER_STREAMS"), "0") != 0;
    Stream default_stream;
    std::set<Stream*> streams;
    std::set<Event*> events;
    std::set<Function*> functions;
    std::set<Module*> modules;
    std::map<const unsigned char*, size_t> pinned;  // page-locked host buffers
    int context_tag = 0;
};

Driver* g = nullptr;
std::atomic<bool> g_ready{false};
thread_local const char* t_op = nullptr;
thread_local CUcontext t_ctx = nullptr;
struct sigaction g_old_segv, g_old_bus;

double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void on_fault(int sig, siginfo_t* si, void* uc) {
    uint64_t addr = (uint64_t)si->si_addr;
    if (g && g->memory.owns(addr)) {
        bool is_write = (((ucontext_t*)uc)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
        std::string what = "an address in device memory";
        if (g->mu.try_lock()) {
            what = g->memory.describe(addr, 1);
            g->mu.unlock();
        }
        char msg[768];
        int n = snprintf(msg, sizeof msg, "cuda-standin memcheck: invalid %s in %s: %s\n", is_write ? "write" : "read",
                         t_op ? t_op : "host code", what.c_str());
        if (write(2, msg, n > 0 ? (size_t)n : 0) < 0) {
        }
        abort();
    }
    struct sigaction* old = sig == SIGSEGV ? &g_old_segv : &g_old_bus;
    if (old->sa_flags & SA_SIGINFO) {
        old->sa_sigaction(sig, si, uc);
    } else if (old->sa_handler == SIG_DFL || old->sa_handler == SIG_IGN) {
        signal(sig, SIG_DFL);  // the access faults again and the default action is taken
    } else {
        old->sa_handler(sig);
    }
}

Driver& driver() {
    static std::once_flag once;
    std::call_once(once, [] {
        g = new Driver;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_old_segv);
        sigaction(SIGBUS, &sa, &g_old_bus);
        g_ready = true;
    });
    return *g;
}

[[noreturn]] void memcheck_abort(const std::string& msg) {
    fprintf(stderr, "cuda-standin memcheck: %s\n", msg.c_str());
    fflush(stderr);
    abort();
}

/// The stream a handle names (null, CU_STREAM_LEGACY and CU_STREAM_PER_THREAD: the default).
Stream* resolve(CUstream s) {
    Driver& d = driver();
    if (s == nullptr || s == (CUstream)0x1 || s == (CUstream)0x2) return &d.default_stream;
    Stream* st = (Stream*)s;
    return d.streams.count(st) ? st : nullptr;
}

void flush(Stream* s, uint64_t upto) {
    while (!s->pending.empty() && s->pending.front().seq <= upto) {
        Op op = std::move(s->pending.front());
        s->pending.pop_front();
        op.work();
        s->done = op.seq;
    }
}

void flush_all() {
    Driver& d = driver();
    for (Stream* s : d.streams) flush(s, UINT64_MAX);
}

bool enqueue_on(Stream* s, std::function<void()> work) {
    Driver& d = driver();
    if (s == &d.default_stream) {
        // The legacy default stream waits for every blocking stream.
        for (Stream* other : d.streams)
            if ((other->flags & 1) == 0) flush(other, UINT64_MAX);
    }
    uint64_t seq = ++s->enqueued;
    if (!s->deferred) {
        work();
        s->done = seq;
        return true;
    }
    s->pending.push_back(Op{seq, std::move(work)});
    return true;
}

bool is_pinned(const void* ptr) {
    auto p = (const unsigned char*)ptr;
    Driver& d = driver();
    auto it = d.pinned.upper_bound(p);
    if (it == d.pinned.begin()) return false;
    --it;
    return p < it->first + it->second;
}

Allocation& checked(uint64_t ptr, size_t bytes, bool is_write, const char* what) {
    Allocation* a = driver().memory.find(ptr, bytes);
    if (!a) {
        memcheck_abort(std::string("invalid ") + (is_write ? "write" : "read") + " by " + what + ": " +
                       driver().memory.describe(ptr, bytes));
    }
    if (is_write) a->pristine = false;
    return *a;
}

#define LOCK std::lock_guard<std::recursive_mutex> lock_(driver().mu)

}  // namespace

bool enqueue(void* stream, std::function<void()> work) {
    if (t_ctx == nullptr) return false;  // no context current on this thread
    LOCK;
    Stream* s = resolve(stream);
    return s && enqueue_on(s, std::move(work));
}

void check_access(uint64_t ptr, size_t bytes, bool is_write, const char* what) {
    LOCK;
    if (bytes) checked(ptr, bytes, is_write, what);
}

const char* set_current_op(const char* name) {
    const char* old = t_op;
    t_op = name;
    return old;
}

}  // namespace standin

using namespace standin;

#define EXPORT extern "C" __attribute__((visibility("default")))

// ---- errors, init, device ----

EXPORT CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_NOT_INITIALIZED: *s = "CUDA_ERROR_NOT_INITIALIZED"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; break;
        case CUDA_ERROR_INVALID_PTX: *s = "CUDA_ERROR_INVALID_PTX"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_NOT_READY: *s = "CUDA_ERROR_NOT_READY"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

EXPORT CUresult cuInit(unsigned flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    driver();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}

#define INITIALISED                                  \
    do {                                             \
        if (!g_ready) return CUDA_ERROR_NOT_INITIALIZED; \
    } while (0)

// Work on the device needs a context current on the calling thread, as with the real driver.
#define CONTEXT                                          \
    do {                                                 \
        INITIALISED;                                     \
        if (t_ctx == nullptr) return CUDA_ERROR_INVALID_CONTEXT; \
    } while (0)

EXPORT CUresult cuDeviceGetCount(int* n) {
    INITIALISED;
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = 1;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice* dev, int ordinal) {
    INITIALISED;
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *dev = 0;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice dev) {
    INITIALISED;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, (size_t)len, "NVIDIA H100 80GB HBM3 (openlora CUDA stand-in)");
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice dev) {
    INITIALISED;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    for (int i = 0; i < 16; i++) uuid[i] = (unsigned char)(0x5a + i);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice dev) { return cuDeviceGetUuid(uuid, dev); }

EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice dev) {
    INITIALISED;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = driver().memory.capacity();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice dev) {
    INITIALISED;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = device_attribute(attr);
    return CUDA_SUCCESS;
}

// ---- contexts: one primary context ----

EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice dev) {
    INITIALISED;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = (CUcontext)&driver().context_tag;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) { return dev == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE; }
EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
    INITIALISED;
    if (ctx && ctx != (CUcontext)&driver().context_tag) return CUDA_ERROR_INVALID_CONTEXT;
    t_ctx = ctx;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetCurrent(CUcontext* ctx) {
    INITIALISED;
    *ctx = t_ctx;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetDevice(CUdevice* dev) {
    INITIALISED;
    *dev = 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSynchronize() {
    INITIALISED;
    LOCK;
    flush_all();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }
EXPORT CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return CUDA_SUCCESS;
}

// ---- memory ----

EXPORT CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    INITIALISED;
    LOCK;
    Driver& d = driver();
    if (free_bytes) *free_bytes = d.memory.capacity() - d.memory.used();
    if (total) *total = d.memory.capacity();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    CONTEXT;
    LOCK;
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    uint64_t ptr = driver().memory.alloc(bytes);
    if (!ptr) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = ptr;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream stream) {
    {
        LOCK;
        if (!resolve(stream)) return CUDA_ERROR_INVALID_HANDLE;
    }
    return cuMemAlloc_v2(p, bytes);
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr p) {
    INITIALISED;
    LOCK;
    if (p == 0) return CUDA_SUCCESS;
    flush_all();  // cuMemFree waits for the device
    if (!driver().memory.free(p)) {
        fprintf(stderr, "cuda-standin: cuMemFree of 0x%llx: %s\n", p, driver().memory.describe(p, 1).c_str());
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream stream) {
    INITIALISED;
    LOCK;
    Stream* s = resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    if (p == 0) return CUDA_SUCCESS;
    if (!driver().memory.find(p, 0)) {
        fprintf(stderr, "cuda-standin: cuMemFreeAsync of 0x%llx: %s\n", p, driver().memory.describe(p, 1).c_str());
        return CUDA_ERROR_INVALID_VALUE;
    }
    enqueue_on(s, [p] {
        if (!driver().memory.free(p)) memcheck_abort("cuMemFreeAsync: double free of " + driver().memory.describe(p, 1));
    });
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    INITIALISED;
    LOCK;
    *p = malloc(bytes ? bytes : 1);
    if (!*p) return CUDA_ERROR_OUT_OF_MEMORY;
    driver().pinned[(const unsigned char*)*p] = bytes;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
EXPORT CUresult cuMemFreeHost(void* p) {
    INITIALISED;
    LOCK;
    flush_all();
    if (!driver().pinned.erase((const unsigned char*)p)) return CUDA_ERROR_INVALID_VALUE;
    free(p);
    return CUDA_SUCCESS;
}

namespace {

CUresult htod(CUdeviceptr dst, const void* src, size_t n, CUstream stream, bool sync) {
    CONTEXT;
    LOCK;
    Stream* s = sync ? &driver().default_stream : resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    if (n == 0) return CUDA_SUCCESS;
    checked(dst, n, true, "cuMemcpyHtoD");
    if (s->deferred && is_pinned(src)) {
        enqueue_on(s, [=] {
            checked(dst, n, true, "cuMemcpyHtoDAsync");
            memcpy((void*)dst, src, n);
        });
    } else {
        // From pageable memory the source is staged at the call, as CUDA does.
        auto staged = std::make_shared<std::vector<unsigned char>>((const unsigned char*)src, (const unsigned char*)src + n);
        enqueue_on(s, [=] {
            checked(dst, n, true, "cuMemcpyHtoDAsync");
            memcpy((void*)dst, staged->data(), n);
        });
    }
    return CUDA_SUCCESS;
}

CUresult dtoh(void* dst, CUdeviceptr src, size_t n, CUstream stream, bool sync) {
    CONTEXT;
    LOCK;
    Stream* s = sync ? &driver().default_stream : resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    if (n == 0) return CUDA_SUCCESS;
    checked(src, n, false, "cuMemcpyDtoH");
    auto work = [=] {
        checked(src, n, false, "cuMemcpyDtoHAsync");
        memcpy(dst, (const void*)src, n);
    };
    enqueue_on(s, work);
    // To pageable memory the copy is complete when the call returns.
    if (sync || !is_pinned(dst)) flush(s, UINT64_MAX);
    return CUDA_SUCCESS;
}

CUresult dtod(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream stream, bool sync) {
    CONTEXT;
    LOCK;
    Stream* s = sync ? &driver().default_stream : resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    if (n == 0) return CUDA_SUCCESS;
    checked(src, n, false, "cuMemcpyDtoD");
    checked(dst, n, true, "cuMemcpyDtoD");
    enqueue_on(s, [=] {
        checked(src, n, false, "cuMemcpyDtoDAsync");
        checked(dst, n, true, "cuMemcpyDtoDAsync");
        memmove((void*)dst, (const void*)src, n);
    });
    return CUDA_SUCCESS;
}

CUresult memset8(CUdeviceptr dst, unsigned char v, size_t n, CUstream stream, bool sync) {
    CONTEXT;
    LOCK;
    Stream* s = sync ? &driver().default_stream : resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    if (n == 0) return CUDA_SUCCESS;
    Allocation& a = checked(dst, n, false, "cuMemsetD8");
    // Zeroing a whole allocation nothing has written yet: its pages are still zero.
    if (v == 0 && a.pristine && dst == a.ptr && n == a.bytes) return CUDA_SUCCESS;
    a.pristine = false;
    enqueue_on(s, [=] {
        checked(dst, n, true, "cuMemsetD8Async");
        memset((void*)dst, v, n);
    });
    return CUDA_SUCCESS;
}

}  // namespace

EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) { return htod(dst, src, n, nullptr, true); }
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    return htod(dst, src, n, s, false);
}
EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) { return dtoh(dst, src, n, nullptr, true); }
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    return dtoh(dst, src, n, s, false);
}
EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) { return dtod(dst, src, n, nullptr, true); }
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    return dtod(dst, src, n, s, false);
}
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { return memset8(dst, v, n, nullptr, true); }
EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    return memset8(dst, v, n, s, false);
}

// ---- streams and events ----

EXPORT CUresult cuStreamCreate(CUstream* out, unsigned flags) {
    CONTEXT;
    LOCK;
    if (!out || flags > 1) return CUDA_ERROR_INVALID_VALUE;
    auto* s = new Stream;
    s->flags = flags;
    s->deferred = driver().defer;
    driver().streams.insert(s);
    *out = (CUstream)s;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamCreateWithPriority(CUstream* out, unsigned flags, int) { return cuStreamCreate(out, flags); }

EXPORT CUresult cuStreamDestroy_v2(CUstream stream) {
    INITIALISED;
    LOCK;
    Stream* s = resolve(stream);
    if (!s || s == &driver().default_stream) return CUDA_ERROR_INVALID_HANDLE;
    flush(s, UINT64_MAX);  // its work still completes
    driver().streams.erase(s);
    delete s;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamSynchronize(CUstream stream) {
    INITIALISED;
    LOCK;
    Stream* s = resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    if (s == &driver().default_stream) {
        for (Stream* other : driver().streams)
            if ((other->flags & 1) == 0) flush(other, UINT64_MAX);
    }
    flush(s, UINT64_MAX);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamQuery(CUstream stream) {
    INITIALISED;
    LOCK;
    Stream* s = resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    return s->pending.empty() ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

EXPORT CUresult cuEventCreate(CUevent* out, unsigned) {
    INITIALISED;
    LOCK;
    auto* e = new Event;
    driver().events.insert(e);
    *out = (CUevent)e;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventDestroy_v2(CUevent event) {
    INITIALISED;
    LOCK;
    Event* e = (Event*)event;
    if (!driver().events.erase(e)) return CUDA_ERROR_INVALID_HANDLE;
    delete e;  // pending work holds its state, not the event
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventRecord(CUevent event, CUstream stream) {
    INITIALISED;
    LOCK;
    Event* e = (Event*)event;
    Stream* s = resolve(stream);
    if (!driver().events.count(e) || !s) return CUDA_ERROR_INVALID_HANDLE;
    std::shared_ptr<EventState> st = e->state;
    enqueue_on(s, [st] { st->at_ms = now_ms(); });
    st->stream = s->deferred ? s : nullptr;
    st->seq = s->enqueued;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventRecordWithFlags(CUevent event, CUstream stream, unsigned) { return cuEventRecord(event, stream); }

namespace {
CUresult complete_event(CUevent event) {
    INITIALISED;
    LOCK;
    Event* e = (Event*)event;
    if (!driver().events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    Stream* s = e->state->stream;
    if (s && driver().streams.count(s)) flush(s, e->state->seq);
    return CUDA_SUCCESS;
}
}  // namespace

EXPORT CUresult cuEventSynchronize(CUevent event) { return complete_event(event); }
EXPORT CUresult cuEventQuery(CUevent event) { return complete_event(event); }

EXPORT CUresult cuStreamWaitEvent(CUstream stream, CUevent event, unsigned) {
    INITIALISED;
    LOCK;
    if (!resolve(stream)) return CUDA_ERROR_INVALID_HANDLE;
    // The waiting stream's later work runs after the event's: run the event's work now.
    return complete_event(event);
}

EXPORT CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    INITIALISED;
    LOCK;
    Event *a = (Event*)start, *b = (Event*)end;
    if (!driver().events.count(a) || !driver().events.count(b)) return CUDA_ERROR_INVALID_HANDLE;
    complete_event(start);
    complete_event(end);
    *ms = (float)(b->state->at_ms - a->state->at_ms);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) { return cuEventElapsedTime(ms, start, end); }

EXPORT CUresult cuLaunchHostFunc(CUstream stream, CUhostFn fn, void* data) {
    INITIALISED;
    LOCK;
    Stream* s = resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    enqueue_on(s, [=] { fn(data); });
    return CUDA_SUCCESS;
}

// ---- modules and launches ----

EXPORT CUresult cuModuleLoadData(CUmodule* out, const void* image) {
    CONTEXT;
    if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
    std::string source, name = "module.cu";
    if (!source_of_ptx((const char*)image, &source, &name)) {
        fprintf(stderr, "cuda-standin: cuModuleLoadData: not a module of the stand-in's NVRTC\n");
        return CUDA_ERROR_INVALID_PTX;
    }
    std::string log;
    std::string path = compile_module(source, name, &log);
    if (path.empty()) {
        fprintf(stderr, "cuda-standin: %s does not build for the host:\n%s\n", name.c_str(), log.c_str());
        return CUDA_ERROR_INVALID_PTX;
    }
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        fprintf(stderr, "cuda-standin: %s\n", dlerror());
        return CUDA_ERROR_INVALID_IMAGE;
    }
    auto* m = new Module{handle, (void (*)(const KernelInfo*, dim3, dim3, size_t, void**))dlsym(handle, "__standin_run")};
    if (!m->run) return CUDA_ERROR_INVALID_IMAGE;
    LOCK;
    driver().modules.insert(m);
    *out = (CUmodule)m;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleUnload(CUmodule module) {
    INITIALISED;
    LOCK;
    // The code stays mapped: work already queued may still run it.
    return driver().modules.count((Module*)module) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

EXPORT CUresult cuModuleGetFunction(CUfunction* out, CUmodule module, const char* name) {
    INITIALISED;
    LOCK;
    Module* m = (Module*)module;
    if (!driver().modules.count(m)) return CUDA_ERROR_INVALID_HANDLE;
    auto get = (const KernelInfo* (*)())dlsym(m->handle, (std::string("__standin_kernel_") + name).c_str());
    if (!get) return CUDA_ERROR_NOT_FOUND;
    auto* f = new Function{m, get()};
    driver().functions.insert(f);
    *out = (CUfunction)f;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncGetAttribute(int* v, int attr, CUfunction func) {
    INITIALISED;
    LOCK;
    Function* f = (Function*)func;
    if (!driver().functions.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    switch (attr) {
        case 0: *v = MAX_THREADS_PER_BLOCK; break;  // MAX_THREADS_PER_BLOCK
        case 4: *v = 32; break;                     // NUM_REGS
        case 5: case 6: *v = 90; break;             // PTX_VERSION, BINARY_VERSION
        case 8: *v = f->max_dynamic_smem; break;    // MAX_DYNAMIC_SHARED_SIZE_BYTES
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncSetAttribute(CUfunction func, int attr, int value) {
    INITIALISED;
    LOCK;
    Function* f = (Function*)func;
    if (!driver().functions.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    if (attr == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES: at most the opt-in maximum
        if (value < 0 || value > SHARED_PER_BLOCK_OPTIN) return CUDA_ERROR_INVALID_VALUE;
        f->max_dynamic_smem = value;
    }
    return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncSetCacheConfig(CUfunction, int) { return CUDA_SUCCESS; }

EXPORT CUresult cuLaunchKernel(CUfunction func, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned smem, CUstream stream, void** params, void** extra) {
    CONTEXT;
    LOCK;
    Function* f = (Function*)func;
    if (!driver().functions.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    Stream* s = resolve(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    // The hardware's limits, with the errors a device gives.
    if (bx == 0 || by == 0 || bz == 0 || gx == 0 || gy == 0 || gz == 0) return CUDA_ERROR_INVALID_VALUE;
    if (bx > 1024 || by > 1024 || bz > 64 || (size_t)bx * by * bz > MAX_THREADS_PER_BLOCK) return CUDA_ERROR_INVALID_VALUE;
    if (gx > 2147483647u || gy > 65535 || gz > 65535) return CUDA_ERROR_INVALID_VALUE;
    if ((int)smem > f->max_dynamic_smem) return CUDA_ERROR_INVALID_VALUE;
    if (extra != nullptr || (f->info->nargs > 0 && params == nullptr)) return CUDA_ERROR_INVALID_VALUE;
    // The arguments are copied now: the caller's values may be gone when the launch runs.
    std::vector<size_t> offsets;
    size_t total = 0;
    for (int i = 0; i < f->info->nargs; i++) {
        size_t al = f->info->aligns[i];
        total = (total + al - 1) / al * al;
        offsets.push_back(total);
        total += f->info->sizes[i];
    }
    auto args = std::make_shared<std::vector<unsigned char>>(total + 16);
    for (int i = 0; i < f->info->nargs; i++) memcpy(args->data() + offsets[i], params[i], f->info->sizes[i]);
    const KernelInfo* info = f->info;
    auto run = f->module->run;
    driver().memory.touch_all();  // from now on, a memset may not assume any allocation is zero
    enqueue_on(s, [=] {
        std::vector<void*> ptrs;
        for (size_t off : offsets) ptrs.push_back(args->data() + off);
        const char* old = set_current_op(info->name);
        run(info, dim3{gx, gy, gz}, dim3{bx, by, bz}, smem, ptrs.data());
        set_current_op(old);
    });
    return CUDA_SUCCESS;
}

// ---- occupancy (what a tuned launch asks) ----

EXPORT CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, CUfunction, int block, size_t smem) {
    if (!n || block <= 0) return CUDA_ERROR_INVALID_VALUE;
    int by_threads = 2048 / block;
    int by_smem = smem ? (int)(SHARED_PER_SM / smem) : 32;
    *n = std::max(0, std::min({by_threads, by_smem, 32}));
    return CUDA_SUCCESS;
}
