// The CUDA stand-in's own tests, through the same C entry points cudarc calls: memcheck catches
// out-of-bounds and freed accesses, a missing __syncthreads gives a wrong result, launches over
// the hardware limits fail as on a device, deferred streams expose a missing wait, and every
// cuBLAS transpose combination equals a naive reference. Run by tests/run.sh; exits non-zero on
// any failure and ends with "N passed, N failed".
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda_types.h"

extern "C" {
CUresult cuInit(unsigned);
CUresult cuDeviceGetAttribute(int*, int, int);
CUresult cuDevicePrimaryCtxRetain(CUcontext*, int);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuMemAlloc_v2(CUdeviceptr*, size_t);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemcpyHtoD_v2(CUdeviceptr, const void*, size_t);
CUresult cuMemcpyDtoH_v2(void*, CUdeviceptr, size_t);
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr, const void*, size_t, CUstream);
CUresult cuMemcpyDtoHAsync_v2(void*, CUdeviceptr, size_t, CUstream);
CUresult cuStreamCreate(CUstream*, unsigned);
CUresult cuStreamSynchronize(CUstream);
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned);
CUresult cuEventCreate(CUevent*, unsigned);
CUresult cuEventRecord(CUevent, CUstream);
CUresult cuModuleLoadData(CUmodule*, const void*);
CUresult cuModuleGetFunction(CUfunction*, CUmodule, const char*);
CUresult cuFuncSetAttribute(CUfunction, int, int);
CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                        void**, void**);
CUresult cuCtxSynchronize();

typedef int nvrtcResult;
typedef void* nvrtcProgram;
nvrtcResult nvrtcCreateProgram(nvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*);
nvrtcResult nvrtcCompileProgram(nvrtcProgram, int, const char* const*);
nvrtcResult nvrtcGetPTXSize(nvrtcProgram, size_t*);
nvrtcResult nvrtcGetPTX(nvrtcProgram, char*);
nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram, size_t*);
nvrtcResult nvrtcGetProgramLog(nvrtcProgram, char*);

typedef void* cublasHandle_t;
int cublasCreate_v2(cublasHandle_t*);
int cublasSetStream_v2(cublasHandle_t, void*);
int cublasGemmEx(cublasHandle_t, int, int, int, int, int, const void*, const void*, int, int, const void*, int, int,
                 const void*, void*, int, int, int, int);
}

static const char* KERNELS = R"(
typedef unsigned short bf16;
extern "C" __global__ void oob_write(float* x, int n) {
    if (threadIdx.x == 0) x[n] = 1.0f;
}
extern "C" __global__ void read_one(const float* x, float* out) {
    if (threadIdx.x == 0) out[0] = x[0];
}
extern "C" __global__ void block_sum(const float* x, float* out, int sync) {
    __shared__ float s[256];
    s[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    if (sync) __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int i = 0; i < (int)blockDim.x; i++) t += s[i];
        out[blockIdx.x] = t;
    }
}
extern "C" __global__ void warp_sums(const float* x, float* out) {
    float v = x[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    out[threadIdx.x] = v;
}
extern "C" __global__ void dyn_fill(float* out) {
    extern __shared__ float scratch[];
    scratch[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = scratch[blockDim.x - 1 - threadIdx.x];
}
extern "C" __global__ void atomic_count(float* total) {
    atomicAdd(total, 1.0f);
}
extern "C" __global__ void divergent(float* out) {
    // Half of warp 0 waits for the block, the other half for its warp: neither can complete.
    if (threadIdx.x < 16) __syncthreads(); else __syncwarp();
    out[threadIdx.x] = 1.0f;
}
)";

static int passed = 0, failed = 0;

static void expect(bool ok, const std::string& what) {
    if (ok) {
        passed++;
        printf("ok   %s\n", what.c_str());
    } else {
        failed++;
        printf("FAIL %s\n", what.c_str());
    }
}

/// Runs `body` in a child process; returns (killed by SIGABRT, what it wrote to stderr).
static std::pair<bool, std::string> in_child(const std::function<void()>& body) {
    int fds[2];
    if (pipe(fds) != 0) return {false, "pipe"};
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
        body();
        _exit(0);
    }
    close(fds[1]);
    std::string err;
    char buf[4096];
    ssize_t n;
    while ((n = read(fds[0], buf, sizeof buf)) > 0) err.append(buf, (size_t)n);
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    return {WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT, err};
}

static CUmodule load_module() {
    nvrtcProgram p;
    nvrtcCreateProgram(&p, KERNELS, "selftest.cu", 0, nullptr, nullptr);
    const char* opts[] = {"--gpu-architecture=compute_90"};
    if (nvrtcCompileProgram(p, 1, opts) != 0) {
        size_t n;
        nvrtcGetProgramLogSize(p, &n);
        std::string log(n, '\0');
        nvrtcGetProgramLog(p, &log[0]);
        fprintf(stderr, "selftest kernels do not compile:\n%s\n", log.c_str());
        exit(1);
    }
    size_t n;
    nvrtcGetPTXSize(p, &n);
    std::string ptx(n, '\0');
    nvrtcGetPTX(p, &ptx[0]);
    CUmodule m = nullptr;
    if (cuModuleLoadData(&m, ptx.c_str()) != 0) {
        fprintf(stderr, "module load failed\n");
        exit(1);
    }
    return m;
}

static CUfunction fn(CUmodule m, const char* name) {
    CUfunction f = nullptr;
    if (cuModuleGetFunction(&f, m, name) != 0) {
        fprintf(stderr, "no kernel %s\n", name);
        exit(1);
    }
    return f;
}

static CUdeviceptr upload(const std::vector<float>& v) {
    CUdeviceptr d;
    cuMemAlloc_v2(&d, v.size() * 4);
    cuMemcpyHtoD_v2(d, v.data(), v.size() * 4);
    return d;
}

static std::vector<float> download(CUdeviceptr d, size_t n) {
    std::vector<float> v(n);
    cuMemcpyDtoH_v2(v.data(), d, n * 4);
    return v;
}

static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void gemm_tests() {
    cublasHandle_t h;
    cublasCreate_v2(&h);
    cublasSetStream_v2(h, nullptr);
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const char* names[] = {"N", "T"};
    for (int dtype : {0 /* f32 */, 14 /* bf16 */}) {
        for (int ta = 0; ta < 2; ta++) {
            for (int tb = 0; tb < 2; tb++) {
                int m = 5, n = 7, k = 9;
                int a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
                int lda = a_rows + 3, ldb = b_rows + 2, ldc = m + 1;
                size_t es = dtype == 0 ? 4 : 2;
                std::vector<float> A(lda * a_cols), B(ldb * b_cols), C(ldc * n);
                for (auto* v : {&A, &B, &C})
                    for (auto& x : *v) x = dtype == 0 ? u(rng) : from_bf16(to_bf16(u(rng)));
                auto to_dev = [&](const std::vector<float>& v) {
                    std::vector<uint16_t> half(v.size());
                    for (size_t i = 0; i < v.size(); i++) half[i] = to_bf16(v[i]);
                    CUdeviceptr d;
                    cuMemAlloc_v2(&d, v.size() * es);
                    cuMemcpyHtoD_v2(d, dtype == 0 ? (const void*)v.data() : (const void*)half.data(), v.size() * es);
                    return d;
                };
                CUdeviceptr dA = to_dev(A), dB = to_dev(B), dC = to_dev(C);
                float alpha = 0.75f, beta = -0.5f;
                int rc = cublasGemmEx(h, ta, tb, m, n, k, &alpha, (void*)dA, dtype, lda, (void*)dB, dtype, ldb, &beta,
                                      (void*)dC, dtype, ldc, 68, -1);
                std::vector<float> got(C.size());
                if (dtype == 0) {
                    cuMemcpyDtoH_v2(got.data(), dC, C.size() * 4);
                } else {
                    std::vector<uint16_t> half(C.size());
                    cuMemcpyDtoH_v2(half.data(), dC, C.size() * 2);
                    for (size_t i = 0; i < C.size(); i++) got[i] = from_bf16(half[i]);
                }
                double worst = 0;
                for (int j = 0; j < n; j++) {
                    for (int i = 0; i < m; i++) {
                        double acc = 0;
                        for (int l = 0; l < k; l++) {
                            double a = ta ? A[l + i * lda] : A[i + l * lda];
                            double b = tb ? B[j + l * ldb] : B[l + j * ldb];
                            acc += a * b;
                        }
                        double want = alpha * acc + beta * C[i + j * ldc];
                        worst = std::max(worst, std::fabs(want - got[i + j * ldc]));
                    }
                    // Rows between m and ldc are not touched.
                    for (int i = m; i < ldc; i++) worst = std::max(worst, (double)std::fabs(got[i + j * ldc] - C[i + j * ldc]));
                }
                double tol = dtype == 0 ? 1e-5 : 2e-2;
                expect(rc == 0 && worst <= tol, std::string("cublasGemmEx ") + (dtype ? "bf16 " : "f32 ") + names[ta] +
                                                    names[tb] + " equals the naive reference (worst " +
                                                    std::to_string(worst) + ")");
                cuMemFree_v2(dA);
                cuMemFree_v2(dB);
                cuMemFree_v2(dC);
            }
        }
    }
    // beta = 0: C is not read, so NaN in C does not survive.
    {
        std::vector<float> A(4, 1.0f), B(4, 1.0f), C(4, NAN);
        CUdeviceptr dA = upload(A), dB = upload(B), dC = upload(C);
        float alpha = 1.0f, beta = 0.0f;
        cublasGemmEx(h, 0, 0, 2, 2, 2, &alpha, (void*)dA, 0, 2, (void*)dB, 0, 2, &beta, (void*)dC, 0, 2, 68, -1);
        auto got = download(dC, 4);
        expect(got[0] == 2.0f && got[3] == 2.0f, "cublasGemmEx with beta = 0 does not read C");
    }
    // A leading dimension smaller than the rows is refused, as cuBLAS does.
    {
        float alpha = 1.0f, beta = 0.0f;
        int rc = cublasGemmEx(h, 0, 0, 4, 4, 4, &alpha, (void*)16, 0, 2, (void*)16, 0, 4, &beta, (void*)16, 0, 4, 68, -1);
        expect(rc == 7, "cublasGemmEx refuses lda < m with CUBLAS_STATUS_INVALID_VALUE");
    }
}

/// With CUDA_STANDIN_DEFER_STREAMS=1: an upload on a side stream is seen by the default stream
/// only when it waits for an event recorded after the upload.
static int deferred(CUmodule m) {
    CUstream side;
    cuStreamCreate(&side, 1);
    for (bool wait : {false, true}) {
        CUdeviceptr x, out;
        cuMemAlloc_v2(&x, 4);
        cuMemAlloc_v2(&out, 4);
        float zero = 0.0f, one = 1.0f;
        cuMemcpyHtoD_v2(x, &zero, 4);
        cuMemcpyHtoDAsync_v2(x, &one, 4, side);
        if (wait) {
            CUevent ev;
            cuEventCreate(&ev, 0);
            cuEventRecord(ev, side);
            cuStreamWaitEvent(nullptr, ev, 0);
        }
        void* args[] = {&x, &out};
        cuLaunchKernel(fn(m, "read_one"), 1, 1, 1, 32, 1, 1, 0, nullptr, args, nullptr);
        float got = download(out, 1)[0];
        if (wait) {
            expect(got == 1.0f, "deferred: a kernel that waits for the copy stream's event sees the upload");
        } else {
            expect(got == 0.0f, "deferred: a kernel that does not wait for the copy stream reads stale memory");
        }
        cuStreamSynchronize(side);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}

int main(int argc, char** argv) {
    cuInit(0);
    CUcontext ctx;
    cuDevicePrimaryCtxRetain(&ctx, 0);
    cuCtxSetCurrent(ctx);
    if (argc > 1 && strcmp(argv[1], "deferred") == 0) return deferred(load_module());
    int major = 0, optin = 0;
    cuDeviceGetAttribute(&major, 75, 0);
    cuDeviceGetAttribute(&optin, 97, 0);
    expect(major == 9 && optin == 232448, "the device reports an H100 (compute 9.0, 227 KiB opt-in shared memory)");

    CUmodule m = load_module();

    // Work needs a current context on the calling thread, as with the real driver.
    {
        CUresult rc = -1;
        std::thread([&] {
            CUdeviceptr p;
            rc = cuMemAlloc_v2(&p, 16);
        }).join();
        expect(rc == CUDA_ERROR_INVALID_CONTEXT, "an allocation on a thread with no current context fails with CUDA_ERROR_INVALID_CONTEXT");
    }

    // Memcheck: a write one element past the end, a read of freed memory, a host copy too long.
    auto oob = in_child([&] {
        CUdeviceptr x;
        cuMemAlloc_v2(&x, 10 * 4);
        int n = 10;
        void* args[] = {&x, &n};
        cuLaunchKernel(fn(m, "oob_write"), 1, 1, 1, 32, 1, 1, 0, nullptr, args, nullptr);
        cuCtxSynchronize();
    });
    expect(oob.first && oob.second.find("memcheck: invalid write in oob_write") != std::string::npos &&
               oob.second.find("past the end of a 40-byte allocation") != std::string::npos,
           "memcheck catches an out-of-bounds write, naming the kernel: " + oob.second.substr(0, 160));
    auto uaf = in_child([&] {
        CUdeviceptr x, out;
        cuMemAlloc_v2(&x, 64);
        cuMemAlloc_v2(&out, 64);
        cuMemFree_v2(x);
        void* args[] = {&x, &out};
        cuLaunchKernel(fn(m, "read_one"), 1, 1, 1, 32, 1, 1, 0, nullptr, args, nullptr);
        cuCtxSynchronize();
    });
    expect(uaf.first && uaf.second.find("invalid read in read_one") != std::string::npos &&
               uaf.second.find("use after free") != std::string::npos,
           "memcheck catches a use after free, naming the kernel: " + uaf.second.substr(0, 160));
    auto copy = in_child([&] {
        CUdeviceptr x;
        cuMemAlloc_v2(&x, 64);
        std::vector<char> host(65);
        cuMemcpyHtoD_v2(x, host.data(), 65);
    });
    expect(copy.first && copy.second.find("cuMemcpyHtoD") != std::string::npos, "memcheck catches a copy past the end");
    {
        CUdeviceptr x;
        cuMemAlloc_v2(&x, 64);
        CUresult first = cuMemFree_v2(x);
        CUresult second = cuMemFree_v2(x);
        expect(first == CUDA_SUCCESS && second == CUDA_ERROR_INVALID_VALUE, "a double free fails with CUDA_ERROR_INVALID_VALUE");
    }

    // Every thread of a block runs: a missing barrier gives a wrong sum, the barrier a right one.
    {
        std::vector<float> x(512);
        for (size_t i = 0; i < x.size(); i++) x[i] = (float)(i % 7);
        CUdeviceptr dx = upload(x), out;
        cuMemAlloc_v2(&out, 8);
        float want = 0;
        for (int i = 0; i < 256; i++) want += x[i];
        for (int sync : {1, 0}) {
            void* args[] = {&dx, &out, &sync};
            cuLaunchKernel(fn(m, "block_sum"), 2, 1, 1, 256, 1, 1, 0, nullptr, args, nullptr);
            auto got = download(out, 2);
            if (sync) {
                expect(got[0] == want, "a block reduction with __syncthreads is right");
            } else {
                expect(got[0] != want, "a block reduction missing __syncthreads gives a wrong result");
            }
        }
    }
    {
        std::vector<float> x(32);
        float want = 0;
        for (int i = 0; i < 32; i++) want += (x[i] = (float)i);
        CUdeviceptr dx = upload(x), out;
        cuMemAlloc_v2(&out, 32 * 4);
        void* args[] = {&dx, &out};
        cuLaunchKernel(fn(m, "warp_sums"), 1, 1, 1, 32, 1, 1, 0, nullptr, args, nullptr);
        auto got = download(out, 32);
        bool all = true;
        for (float v : got) all = all && v == want;
        expect(all, "__shfl_xor_sync sums across the warp in every lane");
    }
    {
        CUdeviceptr total;
        cuMemAlloc_v2(&total, 4);
        float zero = 0;
        cuMemcpyHtoD_v2(total, &zero, 4);
        void* args[] = {&total};
        cuLaunchKernel(fn(m, "atomic_count"), 8, 2, 1, 64, 1, 1, 0, nullptr, args, nullptr);
        expect(download(total, 1)[0] == 8 * 2 * 64, "atomicAdd counts every thread of every block");
    }
    {
        auto div = in_child([&] {
            CUdeviceptr out;
            cuMemAlloc_v2(&out, 64 * 4);
            void* args[] = {&out};
            cuLaunchKernel(fn(m, "divergent"), 1, 1, 1, 64, 1, 1, 0, nullptr, args, nullptr);
            cuCtxSynchronize();
        });
        expect(div.first && div.second.find("divergent") != std::string::npos, "a barrier in divergent code is reported");
    }

    // Launch limits: threads per block, and dynamic shared memory beyond what was opted in.
    {
        CUfunction f = fn(m, "dyn_fill");
        CUdeviceptr out;
        cuMemAlloc_v2(&out, 1024 * 4);
        void* args[] = {&out};
        expect(cuLaunchKernel(f, 1, 1, 1, 1025, 1, 1, 0, nullptr, args, nullptr) == CUDA_ERROR_INVALID_VALUE,
               "1025 threads per block fail with CUDA_ERROR_INVALID_VALUE");
        expect(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 64 << 10, nullptr, args, nullptr) == CUDA_ERROR_INVALID_VALUE,
               "64 KiB of dynamic shared memory without opting in fails");
        expect(cuFuncSetAttribute(f, 8, 232448 + 1) == CUDA_ERROR_INVALID_VALUE, "opting in beyond the device's maximum fails");
        expect(cuFuncSetAttribute(f, 8, 64 << 10) == 0 &&
                   cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 64 << 10, nullptr, args, nullptr) == 0,
               "64 KiB of dynamic shared memory after opting in launches");
        auto got = download(out, 256);
        expect(got[0] == 255.0f && got[255] == 0.0f, "extern __shared__ memory is the launch's, shared by the block");
    }

    // Deferred streams (a fresh process: the driver reads its mode at first use).
    {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            setenv("CUDA_STANDIN_DEFER_STREAMS", "1", 1);
            execl("/proc/self/exe", "selftest", "deferred", (char*)nullptr);
            _exit(127);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "deferred streams (the run above)");
    }
    gemm_tests();

    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
