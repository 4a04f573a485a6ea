// The SIMT runtime a CUDA C source is compiled against by the stand-in (prepended to the source
// when the driver builds a module for the host). Every thread of a block really runs: each is a
// fiber with its own stack, switched at barriers, so a missing __syncthreads or a race between
// threads gives a wrong result as it would on a device. x86-64 only (the fiber switch).
//
// What a module exports (looked up by the stand-in driver with dlsym):
//   const standin::KernelInfo* __standin_kernel_<name>()   one per `__global__` function
//   void __standin_run(info, grid, block, dyn_smem_bytes, params)   runs every block of a launch
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include <sys/mman.h>
#include <unistd.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static thread_local
#define __constant__ static
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
struct int2 {
    int x, y;
};
struct uint2 {
    unsigned x, y;
};
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline int2 make_int2(int x, int y) { return int2{x, y}; }

namespace standin {

/// What the driver needs to launch one kernel: how to call it and the sizes of its parameters.
struct KernelInfo {
    void (*invoke)(void** params);
    int nargs;
    const size_t* sizes;
    const size_t* aligns;
    const char* name;
};

enum State { RUNNABLE, BLOCK_WAIT, WARP_WAIT, DONE };

struct Fiber {
    void* sp;
    dim3 tid;
    int lane, warp;
    State state;
};

struct Block {
    dim3 bid, bdim, gdim;
    Fiber* fibers;
    int n, live, block_arrived;
    int* warp_live;
    int* warp_arrived;
    uint64_t* warp_slots;  // [warps][32]: what each lane offers in a shuffle
    unsigned char* dyn_smem;
    const KernelInfo* info;
    void** params;
};

inline thread_local Fiber* cur = nullptr;
inline thread_local Block* blk = nullptr;
inline thread_local void* sched_sp = nullptr;

extern "C" void standin_fiber_switch(void** save, void* to);
asm(R"(
.text
.globl standin_fiber_switch
.hidden standin_fiber_switch
.type standin_fiber_switch,@function
standin_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size standin_fiber_switch,.-standin_fiber_switch
)");

[[noreturn]] inline void fail(const char* what) {
    char msg[512];
    int n = snprintf(msg, sizeof msg, "cuda-standin: kernel %s, block (%u,%u,%u): %s\n", blk ? blk->info->name : "?",
                     blk ? blk->bid.x : 0, blk ? blk->bid.y : 0, blk ? blk->bid.z : 0, what);
    if (write(2, msg, n > 0 ? (size_t)n : 0) < 0) {
    }
    abort();
}

inline void yield_to_scheduler() { standin_fiber_switch(&cur->sp, sched_sp); }

inline void release(State waiting, int warp) {
    Block* b = blk;
    for (int i = 0; i < b->n; i++) {
        Fiber& f = b->fibers[i];
        if (f.state == waiting && (warp < 0 || f.warp == warp)) f.state = RUNNABLE;
    }
}

/// __syncthreads(): every live thread of the block arrives before any goes on. The last to
/// arrive yields too, so no thread is first past a barrier by position.
inline void barrier_block() {
    Block* b = blk;
    if (++b->block_arrived == b->live) {
        b->block_arrived = 0;
        release(BLOCK_WAIT, -1);
    } else {
        cur->state = BLOCK_WAIT;
    }
    yield_to_scheduler();
}

/// A warp-wide barrier (what a shuffle or __syncwarp waits for).
inline void barrier_warp() {
    Block* b = blk;
    int w = cur->warp;
    if (++b->warp_arrived[w] == b->warp_live[w]) {
        b->warp_arrived[w] = 0;
        release(WARP_WAIT, w);
    } else {
        cur->state = WARP_WAIT;
    }
    yield_to_scheduler();
}

/// Lane `src`'s value of `v` (the lanes exchange through the warp's slots, between barriers).
template <class T>
inline T exchange(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t* slots = blk->warp_slots + (size_t)cur->warp * 32;
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    slots[cur->lane] = bits;
    barrier_warp();
    uint64_t got = slots[(src >= 0 && src < 32) ? src : cur->lane];
    barrier_warp();
    T out;
    memcpy(&out, &got, sizeof(T));
    return out;
}

inline unsigned char* dyn_smem() { return blk->dyn_smem; }

constexpr size_t STATIC_SMEM_BYTES = 64 << 10;
constexpr int STATIC_SMEM_VARS = 64;

/// The block's static shared memory: a bump arena, NaN bits at the start of every block.
struct StaticSmem {
    alignas(16) unsigned char bytes[STATIC_SMEM_BYTES];
    size_t used = 0;
    int count = 0;
    struct Var {
        const char* function;  // each template instance of a function has its own variables
        int id;
        void* at;
    } vars[STATIC_SMEM_VARS];
    void reset() {
        if (used) memset(bytes, 0xff, used);
        used = 0;
        count = 0;
    }
};

inline StaticSmem& static_smem_arena() {
    static thread_local StaticSmem arena;
    return arena;
}

/// `__shared__ T name[count]`, declaration `id` of the module in `function`: the same memory
/// for every thread of the block (the first to reach the declaration places it).
template <class T>
inline T* static_smem(const char* function, int id, size_t count) {
    StaticSmem& a = static_smem_arena();
    for (int i = 0; i < a.count; i++) {
        if (a.vars[i].id == id && a.vars[i].function == function) return static_cast<T*>(a.vars[i].at);
    }
    if (a.count == STATIC_SMEM_VARS) fail("too many __shared__ variables in one block");
    size_t at = (a.used + alignof(T) - 1) / alignof(T) * alignof(T);
    if (at + sizeof(T) * count > STATIC_SMEM_BYTES) fail("static shared memory beyond 64 KiB");
    a.vars[a.count++] = StaticSmem::Var{function, id, a.bytes + at};
    a.used = at + sizeof(T) * count;
    memset(a.bytes + at, 0xff, sizeof(T) * count);
    return reinterpret_cast<T*>(a.bytes + at);
}

inline void fiber_entry() {
    blk->info->invoke(blk->params);
    Block* b = blk;
    Fiber* f = cur;
    f->state = DONE;
    b->live--;
    b->warp_live[f->warp]--;
    if (b->block_arrived > 0 && b->block_arrived == b->live) {
        b->block_arrived = 0;
        release(BLOCK_WAIT, -1);
    }
    if (b->warp_arrived[f->warp] > 0 && b->warp_arrived[f->warp] == b->warp_live[f->warp]) {
        b->warp_arrived[f->warp] = 0;
        release(WARP_WAIT, f->warp);
    }
    standin_fiber_switch(&f->sp, sched_sp);
    __builtin_unreachable();
}

constexpr size_t STACK_BYTES = 64 << 10;
constexpr size_t GUARD_BYTES = 4096;
constexpr int MAX_THREADS = 1024;

/// Per OS thread: fiber stacks (each above a guard page) and the block's bookkeeping.
struct Workspace {
    unsigned char* stacks = nullptr;
    Fiber fibers[MAX_THREADS];
    int order[MAX_THREADS];  // the order threads run in, this pass
    int warp_live[MAX_THREADS / 32];
    int warp_arrived[MAX_THREADS / 32];
    uint64_t warp_slots[MAX_THREADS];
    unsigned char* smem = nullptr;
    size_t smem_bytes = 0;

    int guarded = 0;  // stacks below which a guard page is set (made as blocks need them)

    Workspace() {
        size_t per = STACK_BYTES + GUARD_BYTES;
        void* m = mmap(nullptr, per * MAX_THREADS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) fail("cannot map fiber stacks");
        stacks = (unsigned char*)m;
    }
    /// Guard pages under the first `n` stacks (each one splits a mapping: only as many as used).
    void guard(int n) {
        for (; guarded < n; guarded++) {
            if (mprotect(stacks + (STACK_BYTES + GUARD_BYTES) * guarded, GUARD_BYTES, PROT_NONE) != 0) {
                fail("cannot protect a fiber stack's guard page (vm.max_map_count?)");
            }
        }
    }
    ~Workspace() {
        munmap(stacks, (STACK_BYTES + GUARD_BYTES) * MAX_THREADS);
        free(smem);
    }
    void* stack_top(int i) { return stacks + (STACK_BYTES + GUARD_BYTES) * (i + 1); }
};

inline Workspace& workspace() {
    static thread_local Workspace ws;
    return ws;
}

inline void* fresh_stack(void* top) {
    uint64_t* sp = (uint64_t*)((uintptr_t)top & ~(uintptr_t)15);
    *--sp = 0;                                 // the entry's return address: it never returns
    *--sp = (uint64_t)(void*)&fiber_entry;     // where the first switch "returns" to
    for (int r = 0; r < 6; r++) *--sp = 0;     // rbp rbx r12 r13 r14 r15
    *--sp = 0x1F80ull | (0x037Full << 32);     // mxcsr, x87 control word
    return sp;
}

/// Runs every block of a launch, one after the other, each with all of its threads.
inline void run(const KernelInfo* info, dim3 grid, dim3 block, size_t dyn_bytes, void** params) {
    Workspace& ws = workspace();
    int n = (int)(block.x * block.y * block.z);
    int warps = (n + 31) / 32;
    if (dyn_bytes > ws.smem_bytes) {
        free(ws.smem);
        ws.smem = (unsigned char*)malloc(dyn_bytes);
        ws.smem_bytes = dyn_bytes;
    }
    Block b;
    b.bdim = block;
    b.gdim = grid;
    b.fibers = ws.fibers;
    b.n = n;
    b.warp_live = ws.warp_live;
    b.warp_arrived = ws.warp_arrived;
    b.warp_slots = ws.warp_slots;
    b.dyn_smem = ws.smem;
    b.info = info;
    b.params = params;
    Block* outer_blk = blk;
    Fiber* outer_cur = cur;
    blk = &b;
    ws.guard(n);
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                b.bid = dim3{bx, by, bz};
                b.live = n;
                b.block_arrived = 0;
                // Shared memory starts as garbage, as on a device: NaN bits.
                if (dyn_bytes) memset(ws.smem, 0xff, dyn_bytes);
                static_smem_arena().reset();
                for (int w = 0; w < warps; w++) {
                    ws.warp_live[w] = (w == warps - 1 && n % 32) ? n % 32 : 32;
                    ws.warp_arrived[w] = 0;
                }
                for (int i = 0; i < n; i++) {
                    Fiber& f = ws.fibers[i];
                    f.tid = dim3{(unsigned)i % block.x, ((unsigned)i / block.x) % block.y, (unsigned)i / (block.x * block.y)};
                    f.lane = i % 32;
                    f.warp = i / 32;
                    f.state = RUNNABLE;
                    f.sp = fresh_stack(ws.stack_top(i));
                }
                // The first pass runs the threads in order, later ones in an order shuffled
                // afresh (from a fixed seed: runs repeat), so a read of shared memory before
                // another thread's write (a missing barrier) shows whichever thread comes first.
                uint64_t rng = 0x9e3779b97f4a7c15ull ^ (bx + 1) * 0xbf58476d1ce4e5b9ull;
                for (int i = 0; i < n; i++) ws.order[i] = i;
                for (int pass = 0; b.live > 0; pass++) {
                    bool ran = false;
                    if (pass > 0) {
                        for (int i = n - 1; i > 0; i--) {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            int j = (int)(rng % (uint64_t)(i + 1));
                            int t = ws.order[i];
                            ws.order[i] = ws.order[j];
                            ws.order[j] = t;
                        }
                    }
                    for (int k = 0; k < n; k++) {
                        Fiber& f = ws.fibers[ws.order[k]];
                        if (f.state != RUNNABLE) continue;
                        ran = true;
                        cur = &f;
                        standin_fiber_switch(&sched_sp, f.sp);
                    }
                    if (!ran) fail("threads wait at barriers that can never complete (a barrier in divergent code)");
                }
            }
    blk = outer_blk;
    cur = outer_cur;
}

template <class... A>
struct Params {
    static constexpr size_t sizes[sizeof...(A) + 1] = {sizeof(std::decay_t<A>)..., 0};
    static constexpr size_t aligns[sizeof...(A) + 1] = {alignof(std::decay_t<A>)..., 0};
};

template <auto F, class... A, size_t... I>
inline void call(void (*)(A...), void** p, std::index_sequence<I...>) {
    F(*reinterpret_cast<std::decay_t<A>*>(p[I])...);
}

template <auto F, class... A>
inline void invoke_with(void (*f)(A...), void** p) {
    call<F>(f, p, std::index_sequence_for<A...>{});
}

template <auto F>
inline void invoke(void** p) {
    invoke_with<F>(F, p);
}

template <auto F, class... A>
inline KernelInfo make_info(void (*)(A...), const char* name) {
    return KernelInfo{&invoke<F>, (int)sizeof...(A), Params<A...>::sizes, Params<A...>::aligns, name};
}

template <class T>
inline T atomic_add(T* p, T v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
template <class T, class U>
inline T atomic_float_add(T* p, T v) {
    U old = __atomic_load_n((U*)p, __ATOMIC_SEQ_CST);
    for (;;) {
        T f;
        memcpy(&f, &old, sizeof f);
        T next = f + v;
        U bits;
        memcpy(&bits, &next, sizeof bits);
        if (__atomic_compare_exchange_n((U*)p, &old, bits, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return f;
    }
}

}  // namespace standin

#define threadIdx (::standin::cur->tid)
#define blockIdx (::standin::blk->bid)
#define blockDim (::standin::blk->bdim)
#define gridDim (::standin::blk->gdim)
#define warpSize 32

static inline void __syncthreads() { ::standin::barrier_block(); }
static inline void __syncwarp(unsigned = 0xffffffffu) { ::standin::barrier_warp(); }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <class T>
static inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    int lane = ::standin::cur->lane;
    int src = (lane & ~(width - 1)) | ((lane ^ mask) & (width - 1));
    return ::standin::exchange(v, src);
}
template <class T>
static inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
    int lane = ::standin::cur->lane;
    return ::standin::exchange(v, (lane & ~(width - 1)) | (src_lane & (width - 1)));
}
template <class T>
static inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = ::standin::cur->lane;
    int src = lane + (int)delta;
    return ::standin::exchange(v, ((src & ~(width - 1)) == (lane & ~(width - 1))) ? src : lane);
}
template <class T>
static inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = ::standin::cur->lane;
    int src = lane - (int)delta;
    return ::standin::exchange(v, (src >= (lane & ~(width - 1))) ? src : lane);
}
static inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned bits = 0;
    for (int l = 0; l < 32; l++) {
        // Every lane offers its predicate; each reads all 32 (one exchange per source lane).
        int p = ::standin::exchange(pred ? 1 : 0, l);
        if (p) bits |= 1u << l;
    }
    return bits;
}
static inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
static inline int __all_sync(unsigned m, int pred) { return __ballot_sync(m, !pred) == 0; }

static inline int atomicAdd(int* p, int v) { return ::standin::atomic_add(p, v); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return ::standin::atomic_add(p, v); }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return ::standin::atomic_add(p, v); }
static inline float atomicAdd(float* p, float v) { return ::standin::atomic_float_add<float, uint32_t>(p, v); }
static inline double atomicAdd(double* p, double v) { return ::standin::atomic_float_add<double, uint64_t>(p, v); }
namespace standin {
template <class T, bool MAX>
inline T atomic_extreme(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while ((MAX ? v > old : v < old) &&
           !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
}  // namespace standin
static inline int atomicMax(int* p, int v) { return ::standin::atomic_extreme<int, true>(p, v); }
static inline int atomicMin(int* p, int v) { return ::standin::atomic_extreme<int, false>(p, v); }
static inline unsigned atomicMax(unsigned* p, unsigned v) { return ::standin::atomic_extreme<unsigned, true>(p, v); }
static inline unsigned atomicMin(unsigned* p, unsigned v) { return ::standin::atomic_extreme<unsigned, false>(p, v); }
static inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline int atomicCAS(int* p, int expected, int v) {
    __atomic_compare_exchange_n(p, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
static inline unsigned atomicCAS(unsigned* p, unsigned expected, unsigned v) {
    __atomic_compare_exchange_n(p, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}

static inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
static inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, 4);
    return i;
}
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
// glibc declares these names itself: macros, so that its declarations do not clash.
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __powf(x, y) powf(x, y)
static inline float __fdividef(float x, float y) { return x / y; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
template <class T>
static inline T __ldg(const T* p) { return *p; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
