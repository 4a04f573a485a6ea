// libcublas.so of the CUDA stand-in: the GEMMs the GPU backend calls, as plain column-major loops
// that honour transa/transb, lda/ldb/ldc, alpha and beta exactly as cuBLAS defines them, run in
// order on the handle's stream, with every operand's extent checked against its allocation.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "standin.h"

extern "C" {
typedef int cublasStatus_t;
typedef int cublasOperation_t;
typedef int cudaDataType;
typedef int cublasComputeType_t;
typedef int cublasGemmAlgo_t;
struct StandinBlas {
    void* stream = nullptr;
    int pointer_mode = 0;  // 0: host, 1: device
};
typedef StandinBlas* cublasHandle_t;
}

enum : int {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum : int { OP_N = 0, OP_T = 1, OP_C = 2 };
enum : int { R_32F = 0, R_64F = 1, R_16F = 2, R_16BF = 14 };

namespace {

float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
    if (exp == 0) {
        float f = std::ldexp((float)mant, -24);
        return sign ? -f : f;
    }
    if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000;
    float a = std::fabs(f);
    if (std::isnan(f)) return (uint16_t)(sign | 0x7e00);
    if (a >= 65520.0f) return (uint16_t)(sign | 0x7c00);
    if (a < 6.103515625e-05f) return (uint16_t)(sign | (uint16_t)std::nearbyint(a * 16777216.0f));
    int e;
    float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
    uint32_t mant = (uint32_t)std::nearbyint((m * 2.0f - 1.0f) * 1024.0f);
    uint32_t exp = (uint32_t)(e - 1 + 15);
    if (mant == 1024) {
        mant = 0;
        exp++;
    }
    return (uint16_t)(sign | (exp << 10) | mant);
}

size_t type_bytes(cudaDataType t) {
    switch (t) {
        case R_32F: return 4;
        case R_64F: return 8;
        case R_16F: case R_16BF: return 2;
    }
    return 0;
}

double load(const void* p, size_t i, cudaDataType t) {
    switch (t) {
        case R_32F: return ((const float*)p)[i];
        case R_64F: return ((const double*)p)[i];
        case R_16F: return f16_to_f32(((const uint16_t*)p)[i]);
        case R_16BF: return bf16_to_f32(((const uint16_t*)p)[i]);
    }
    return 0;
}

void store(void* p, size_t i, cudaDataType t, double v) {
    switch (t) {
        case R_32F: ((float*)p)[i] = (float)v; break;
        case R_64F: ((double*)p)[i] = v; break;
        case R_16F: ((uint16_t*)p)[i] = f32_to_f16((float)v); break;
        case R_16BF: ((uint16_t*)p)[i] = f32_to_bf16((float)v); break;
    }
}

/// One GEMM's shape and operands: C = alpha · op(A) · op(B) + beta · C, column-major.
struct Gemm {
    int ta, tb, m, n, k;
    const void *a, *b;
    void* c;
    cudaDataType at, bt, ct;
    int lda, ldb, ldc;
    long long sa, sb, sc;  // batch strides, in elements
    int batch;
    bool wide;  // accumulate in f64 (compute type 64F)
};

/// Whether the leading dimensions fit the shape (cuBLAS's argument checks).
bool valid(const Gemm& g) {
    if (g.m < 0 || g.n < 0 || g.k < 0 || g.batch < 0) return false;
    if (g.ta < OP_N || g.ta > OP_C || g.tb < OP_N || g.tb > OP_C) return false;
    int a_rows = g.ta == OP_N ? g.m : g.k, b_rows = g.tb == OP_N ? g.k : g.n;
    if (g.lda < std::max(1, a_rows) || g.ldb < std::max(1, b_rows) || g.ldc < std::max(1, g.m)) return false;
    return type_bytes(g.at) && type_bytes(g.bt) && type_bytes(g.ct);
}

/// The bytes a stored matrix of rows × cols with leading dimension ld spans.
size_t extent(int rows, int cols, int ld, size_t elem) {
    if (rows == 0 || cols == 0) return 0;
    return ((size_t)(cols - 1) * ld + rows) * elem;
}

void check(const Gemm& g, int i) {
    int a_rows = g.ta == OP_N ? g.m : g.k, a_cols = g.ta == OP_N ? g.k : g.m;
    int b_rows = g.tb == OP_N ? g.k : g.n, b_cols = g.tb == OP_N ? g.n : g.k;
    size_t ea = type_bytes(g.at), eb = type_bytes(g.bt), ec = type_bytes(g.ct);
    if (g.k > 0 && g.m > 0) standin::check_access((uint64_t)g.a + i * g.sa * ea, extent(a_rows, a_cols, g.lda, ea), false, "cublasGemmEx (A)");
    if (g.k > 0 && g.n > 0) standin::check_access((uint64_t)g.b + i * g.sb * eb, extent(b_rows, b_cols, g.ldb, eb), false, "cublasGemmEx (B)");
    standin::check_access((uint64_t)g.c + i * g.sc * ec, extent(g.m, g.n, g.ldc, ec), true, "cublasGemmEx (C)");
}

void run(const Gemm& g, double alpha, double beta) {
    for (int i = 0; i < g.batch; i++) {
        check(g, i);
        const char* a = (const char*)g.a + i * g.sa * (long long)type_bytes(g.at);
        const char* b = (const char*)g.b + i * g.sb * (long long)type_bytes(g.bt);
        char* c = (char*)g.c + i * g.sc * (long long)type_bytes(g.ct);
        for (int col = 0; col < g.n; col++) {
            for (int row = 0; row < g.m; row++) {
                double acc_d = 0;
                float acc_f = 0;
                for (int l = 0; l < g.k; l++) {
                    size_t ai = g.ta == OP_N ? (size_t)row + (size_t)l * g.lda : (size_t)l + (size_t)row * g.lda;
                    size_t bi = g.tb == OP_N ? (size_t)l + (size_t)col * g.ldb : (size_t)col + (size_t)l * g.ldb;
                    double x = load(a, ai, g.at), y = load(b, bi, g.bt);
                    if (g.wide) {
                        acc_d += x * y;
                    } else {
                        acc_f += (float)x * (float)y;
                    }
                }
                double acc = g.wide ? acc_d : acc_f;
                size_t ci = (size_t)row + (size_t)col * g.ldc;
                // beta == 0: C is not read (it may hold anything, NaN included).
                double v = beta == 0.0 ? alpha * acc : alpha * acc + beta * load(c, ci, g.ct);
                store(c, ci, g.ct, g.wide ? v : (double)(float)v);
            }
        }
    }
}

cublasStatus_t submit(cublasHandle_t h, Gemm g, const void* alpha, const void* beta, bool scalars_f64) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!valid(g)) return CUBLAS_STATUS_INVALID_VALUE;
    if (h->pointer_mode != 0) return CUBLAS_STATUS_NOT_SUPPORTED;
    double al = scalars_f64 ? *(const double*)alpha : *(const float*)alpha;
    double be = scalars_f64 ? *(const double*)beta : *(const float*)beta;
    if (g.m == 0 || g.n == 0 || g.batch == 0) return CUBLAS_STATUS_SUCCESS;
    for (int i = 0; i < g.batch; i++) check(g, i);  // now too: C counts as written from here on
    if (!standin::enqueue(h->stream, [g, al, be] {
            const char* old = standin::set_current_op("cublasGemmEx");
            run(g, al, be);
            standin::set_current_op(old);
        })) {
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

#define EXPORT extern "C" __attribute__((visibility("default")))

EXPORT cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    if (!h) return CUBLAS_STATUS_INVALID_VALUE;
    *h = new StandinBlas;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasSetStream_v2(cublasHandle_t h, void* stream) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasGetStream_v2(cublasHandle_t h, void** stream) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    *stream = h->stream;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t h, int mode) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->pointer_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasSetMathMode(cublasHandle_t h, int) { return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED; }
EXPORT cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t h, void*, size_t) {
    return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}
EXPORT cublasStatus_t cublasGetVersion_v2(cublasHandle_t, int* v) {
    *v = 130000;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void* alpha, const void* a, cudaDataType at, int lda, const void* b,
                                   cudaDataType bt, int ldb, const void* beta, void* c, cudaDataType ct, int ldc,
                                   cublasComputeType_t compute, cublasGemmAlgo_t) {
    bool wide = compute == 70 || compute == 71;  // CUBLAS_COMPUTE_64F(_PEDANTIC)
    Gemm g{ta, tb, m, n, k, a, b, c, at, bt, ct, lda, ldb, ldc, 0, 0, 0, 1, wide};
    return submit(h, g, alpha, beta, wide);
}

EXPORT cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                 int n, int k, const void* alpha, const void* a, cudaDataType at,
                                                 int lda, long long sa, const void* b, cudaDataType bt, int ldb,
                                                 long long sb, const void* beta, void* c, cudaDataType ct, int ldc,
                                                 long long sc, int batch, cublasComputeType_t compute,
                                                 cublasGemmAlgo_t) {
    bool wide = compute == 70 || compute == 71;
    Gemm g{ta, tb, m, n, k, a, b, c, at, bt, ct, lda, ldb, ldc, sa, sb, sc, batch, wide};
    return submit(h, g, alpha, beta, wide);
}

EXPORT cublasStatus_t cublasSgemm_v2(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                     const float* alpha, const float* a, int lda, const float* b, int ldb,
                                     const float* beta, float* c, int ldc) {
    Gemm g{ta, tb, m, n, k, a, b, c, R_32F, R_32F, R_32F, lda, ldb, ldc, 0, 0, 0, 1, false};
    return submit(h, g, alpha, beta, false);
}

EXPORT cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                int n, int k, const float* alpha, const float* a, int lda,
                                                long long sa, const float* b, int ldb, long long sb,
                                                const float* beta, float* c, int ldc, long long sc, int batch) {
    Gemm g{ta, tb, m, n, k, a, b, c, R_32F, R_32F, R_32F, lda, ldb, ldc, sa, sb, sc, batch, false};
    return submit(h, g, alpha, beta, false);
}
