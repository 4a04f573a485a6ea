// Embedding lookup, RMSNorm, rotary position embedding, SiLU·mul and residual add, bf16 in and
// out with f32 arithmetic. CPU references: runtime/src/model/ops.rs and rope.rs.

// out[row, :] = table[ids[row], :].  grid: rows, block: any.
extern "C" __global__ void embedding_bf16(const bf16* __restrict__ table, const u32* __restrict__ ids,
                                          bf16* __restrict__ out, int hidden) {
    const bf16* src = table + (size_t)ids[blockIdx.x] * hidden;
    bf16* dst = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
}

// One row's RMSNorm: o = x / rms(x) * (offset + w) over `width` values, in f32 (offset 1: Gemma's
// (1 + w); o may be x: each thread writes only what it read, after the sum). Every thread of the
// block takes part.
__device__ void rms_row(const bf16* x, const bf16* w, bf16* o, int width, float eps, float offset) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = bf16_to_f32(x[i]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss) / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        o[i] = f32_to_bf16(bf16_to_f32(x[i]) * inv * (offset + bf16_to_f32(w[i])));
    }
}

// out = x / sqrt(mean(x²) + eps) * (offset + w), per row.  grid: rows, block: a multiple of 32 (≤ 1024).
extern "C" __global__ void rms_norm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                         bf16* __restrict__ out, int hidden, float eps, float offset) {
    rms_row(x + (size_t)blockIdx.x * hidden, w, out + (size_t)blockIdx.x * hidden, hidden, eps, offset);
}

// RMSNorm of every row in place: x [rows, width] (Qwen3's per-head norm of q and k: one row per
// head).  grid: (rows), block: any multiple of 32.
extern "C" __global__ void rms_norm_inplace_bf16(bf16* __restrict__ x, const bf16* __restrict__ w, int width,
                                                 float eps, float offset) {
    bf16* row = x + (size_t)blockIdx.x * width;
    rms_row(row, w, row, width, eps, offset);
}

// y[r, c] += bias[c] for y [rows, cols] (a projection's bias).  grid: ceil(rows * cols / block).
extern "C" __global__ void add_bias_bf16(bf16* __restrict__ y, const bf16* __restrict__ bias, int rows, int cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)rows * cols) y[i] = f32_to_bf16(bf16_to_f32(y[i]) + bf16_to_f32(bias[i % cols]));
}

// Rotary embedding, Llama's "rotate half" layout, in place on x: [rows, heads, head_dim].
// cos/sin: [max_position, head_dim / 2] (f32, with any rope scaling already applied);
// positions: [rows].  grid: (rows, heads), block: head_dim / 2 threads (or fewer, striding).
extern "C" __global__ void rope_bf16(bf16* __restrict__ x, const float* __restrict__ cos_table,
                                     const float* __restrict__ sin_table, const u32* __restrict__ positions,
                                     int heads, int head_dim) {
    int half = head_dim / 2;
    bf16* h = x + ((size_t)blockIdx.x * heads + blockIdx.y) * head_dim;
    const float* c = cos_table + (size_t)positions[blockIdx.x] * half;
    const float* s = sin_table + (size_t)positions[blockIdx.x] * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float a = bf16_to_f32(h[i]), b = bf16_to_f32(h[i + half]);
        h[i] = f32_to_bf16(a * c[i] - b * s[i]);
        h[i + half] = f32_to_bf16(b * c[i] + a * s[i]);
    }
}

// out = silu(gate) * up, elementwise over n values (the MLP's gate and up projections).
// grid: ceil(n / block).
extern "C" __global__ void silu_mul_bf16(const bf16* __restrict__ gate, const bf16* __restrict__ up,
                                         bf16* __restrict__ out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = bf16_to_f32(gate[i]);
    out[i] = f32_to_bf16(g / (1.0f + __expf(-g)) * bf16_to_f32(up[i]));
}

// out = gelu(gate) * up with GELU's tanh approximation (Gemma's GeGLU), elementwise over n.
extern "C" __global__ void gelu_tanh_mul_bf16(const bf16* __restrict__ gate, const bf16* __restrict__ up,
                                              bf16* __restrict__ out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = bf16_to_f32(gate[i]);
    float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    out[i] = f32_to_bf16(0.5f * g * (1.0f + tanhf(inner)) * bf16_to_f32(up[i]));
}

// x *= s, elementwise over n values (Gemma's embeddings scaled by √hidden).  grid: ceil(n / block).
extern "C" __global__ void scale_bf16(bf16* __restrict__ x, float s, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = f32_to_bf16(bf16_to_f32(x[i]) * s);
}

// x = tanh(x / cap) * cap, elementwise over n f32 logits (final logit soft-capping).
extern "C" __global__ void softcap_f32(float* __restrict__ x, float cap, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = tanhf(x[i] / cap) * cap;
}

// x += y, elementwise over n values.  grid: ceil(n / block).
extern "C" __global__ void add_bf16(bf16* __restrict__ x, const bf16* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(y[i]));
}

// bf16 -> f32 (logits for sampling), n values.  grid: ceil(n / block).
extern "C" __global__ void bf16_to_f32_kernel(const bf16* __restrict__ x, float* __restrict__ out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = bf16_to_f32(x[i]);
}

// Fills n values with uniform noise in [-scale, scale) from a counter-based hash of (seed, i):
// random weights for benchmarks at real model sizes, made on the device.  grid: ceil(n / block).
extern "C" __global__ void fill_random_bf16(bf16* __restrict__ x, unsigned long long n, unsigned long long seed,
                                            float scale) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float u = (float)(splitmix64(seed, i) >> 40) * (1.0f / 16777216.0f);
    x[i] = f32_to_bf16((2.0f * u - 1.0f) * scale);
}
