// Batched heterogeneous LoRA over the unified page pool (S-LoRA / Punica), bf16 weights, f32
// accumulation: y[row] += scale · (x[row] · Aᵀ) · Bᵀ, rows carrying different adapters of
// different ranks (or none) in one launch. Layout as the CPU reference (kernels/src/lora.rs):
// each rank-row of A (in_dim wide) and of Bᵀ (out_dim wide) occupies ceil(width / page_elems)
// pages of the pool, found through the module's page table.
//
// Modules are described by parallel arrays indexed by module id = adapter bank ×
// modules_per_adapter + module (layer × 7 + projection): rank (0: the adapter has no such
// module), scale, and the offsets of their A and Bᵀ page tables in `tables`. Rows name an
// adapter bank (or -1 for the base model), so a step uploads only those. The shrink writes
// tmp: [rows, max_rank] (f32); the expand reads it.
//
// The expand also measures what the adapter contributed (the attribution input, as the CPU
// reference's AdapterShare): per sequence, Σ|W·x| of the rows it adapts (y before the delta)
// into sums[2·seq] and Σ|Δy| into sums[2·seq + 1].
//
// Prefill (SGMV) and decode (BGMV) differ only in where a block's rows come from: a segment
// (a sequence's rows) or one row (one sequence's one new token). Both run the same routines
// over a row range.

// The module id of adapter bank `a` (or -1), and whether it has rank-row r of that module.
__device__ __forceinline__ int module_id(int a, int module, int modules_per_adapter) {
    return a < 0 ? -1 : a * modules_per_adapter + module;
}

// Element k of rank-row r of a paged matrix whose rows are `width` wide.
__device__ __forceinline__ float paged(const bf16* __restrict__ pool, const u32* __restrict__ table, int r, int k,
                                       int width, int page_elems) {
    int ppr = (width + page_elems - 1) / page_elems;
    u32 page = table[r * ppr + k / page_elems];
    return bf16_to_f32(pool[(size_t)page * page_elems + k % page_elems]);
}

// tmp[row, r] = x[row] · A[r] for one row (every thread of the block takes part).
__device__ void shrink_row(const bf16* __restrict__ x, float* __restrict__ tmp, const bf16* __restrict__ pool,
                           const u32* __restrict__ table, int row, int r, int in_dim, int max_rank, int page_elems) {
    const bf16* xr = x + (size_t)row * in_dim;
    float s = 0.0f;
    for (int k = threadIdx.x; k < in_dim; k += blockDim.x) s += bf16_to_f32(xr[k]) * paged(pool, table, r, k, in_dim, page_elems);
    s = block_sum(s);
    if (threadIdx.x == 0) tmp[(size_t)row * max_rank + r] = s;
}

// y[row, o] += scale · Σ_r tmp[row, r] · Bᵀ[r, o] for one row and column; returns
// (|y before|, |delta|) for the measure.
__device__ float2 expand_one(const float* __restrict__ tmp, bf16* __restrict__ y, const bf16* __restrict__ pool,
                             const u32* __restrict__ table, int row, int o, int rank, float scale, int out_dim,
                             int max_rank, int page_elems) {
    float acc = 0.0f;
    for (int r = 0; r < rank; r++) acc += tmp[(size_t)row * max_rank + r] * paged(pool, table, r, o, out_dim, page_elems);
    size_t at = (size_t)row * out_dim + o;
    float before = bf16_to_f32(y[at]), delta = scale * acc;
    y[at] = f32_to_bf16(before + delta);
    return make_float2(fabsf(before), fabsf(delta));
}

// Adds a block's measured sums to sequence `seq`'s (every thread of the block calls it).
__device__ void add_share(float2 v, float* __restrict__ sums, int seq) {
    float b = block_sum(v.x), d = block_sum(v.y);
    if (threadIdx.x == 0) {
        atomicAdd(sums + 2 * seq, b);
        atomicAdd(sums + 2 * seq + 1, d);
    }
}

// The shrink of rank-row blockIdx.y of module m (or none: m < 0) for rows first .. first + count.
__device__ void shrink_rows(const bf16* __restrict__ x, float* __restrict__ tmp, const bf16* __restrict__ pool,
                            const u32* __restrict__ tables, int m, int first, int count,
                            const int* __restrict__ ranks, const u32* __restrict__ a_offsets, int in_dim,
                            int max_rank, int page_elems) {
    int r = blockIdx.y;
    if (m < 0 || r >= ranks[m]) return;  // the same for the whole block
    const u32* table = tables + a_offsets[m];
    for (int row = first; row < first + count; row++) shrink_row(x, tmp, pool, table, row, r, in_dim, max_rank, page_elems);
}

// The expand of module m (or none) for rows first .. first + count, column
// blockIdx.y · blockDim.x + threadIdx.x, measured into sequence `seq`'s sums.
__device__ void expand_rows(const float* __restrict__ tmp, bf16* __restrict__ y, const bf16* __restrict__ pool,
                            const u32* __restrict__ tables, int m, int first, int count, int seq,
                            const int* __restrict__ ranks, const float* __restrict__ scales,
                            const u32* __restrict__ bt_offsets, int out_dim, int max_rank, int page_elems,
                            float* __restrict__ sums) {
    if (m < 0 || ranks[m] == 0) return;  // the same for the whole block
    int o = blockIdx.y * blockDim.x + threadIdx.x;
    const u32* table = tables + bt_offsets[m];
    float2 sum = make_float2(0.0f, 0.0f);
    if (o < out_dim) {
        for (int row = first; row < first + count; row++) {
            float2 v = expand_one(tmp, y, pool, table, row, o, ranks[m], scales[m], out_dim, max_rank, page_elems);
            sum.x += v.x;
            sum.y += v.y;
        }
    }
    add_share(sum, sums, seq);
}

// Prefill, shrink: segment s = blockIdx.x (rows seg_start[s] .. + seg_len[s], adapter
// seg_adapter[s] or -1), rank-row blockIdx.y. Each block reads its A row once for all the
// segment's rows.  grid: (segments, max_rank), block: a multiple of 32.
extern "C" __global__ void lora_shrink_sgmv_bf16(const bf16* __restrict__ x, float* __restrict__ tmp,
                                                 const bf16* __restrict__ pool, const u32* __restrict__ tables,
                                                 const int* __restrict__ seg_start, const int* __restrict__ seg_len,
                                                 const int* __restrict__ seg_adapter, int module, int modules_per_adapter,
                                                 const int* __restrict__ ranks, const u32* __restrict__ a_offsets,
                                                 int in_dim, int max_rank, int page_elems) {
    int s = blockIdx.x;
    shrink_rows(x, tmp, pool, tables, module_id(seg_adapter[s], module, modules_per_adapter), seg_start[s], seg_len[s],
                ranks, a_offsets, in_dim, max_rank, page_elems);
}

// Prefill, expand: y[row, o] += scale · Σ_r tmp[row, r] · Bᵀ[r, o] for the segment's rows.
// grid: (segments, ceil(out_dim / block)), block: a multiple of 32; segment s is sequence s.
extern "C" __global__ void lora_expand_sgmv_bf16(const float* __restrict__ tmp, bf16* __restrict__ y,
                                                 const bf16* __restrict__ pool, const u32* __restrict__ tables,
                                                 const int* __restrict__ seg_start, const int* __restrict__ seg_len,
                                                 const int* __restrict__ seg_adapter, int module, int modules_per_adapter,
                                                 const int* __restrict__ ranks, const float* __restrict__ scales,
                                                 const u32* __restrict__ bt_offsets, int out_dim, int max_rank,
                                                 int page_elems, float* __restrict__ sums) {
    int s = blockIdx.x;
    expand_rows(tmp, y, pool, tables, module_id(seg_adapter[s], module, modules_per_adapter), seg_start[s], seg_len[s],
                s, ranks, scales, bt_offsets, out_dim, max_rank, page_elems, sums);
}

// Decode, shrink: every row gathers its own adapter's module (row_adapter[row] or -1).
// grid: (rows, max_rank), block: a multiple of 32.
extern "C" __global__ void lora_shrink_bgmv_bf16(const bf16* __restrict__ x, float* __restrict__ tmp,
                                                 const bf16* __restrict__ pool, const u32* __restrict__ tables,
                                                 const int* __restrict__ row_adapter, int module, int modules_per_adapter,
                                                 const int* __restrict__ ranks, const u32* __restrict__ a_offsets,
                                                 int in_dim, int max_rank, int page_elems) {
    int row = blockIdx.x;
    shrink_rows(x, tmp, pool, tables, module_id(row_adapter[row], module, modules_per_adapter), row, 1, ranks,
                a_offsets, in_dim, max_rank, page_elems);
}

// Decode, expand.  grid: (rows, ceil(out_dim / block)), block: a multiple of 32; row r is
// sequence r (one new token each).
extern "C" __global__ void lora_expand_bgmv_bf16(const float* __restrict__ tmp, bf16* __restrict__ y,
                                                 const bf16* __restrict__ pool, const u32* __restrict__ tables,
                                                 const int* __restrict__ row_adapter, int module, int modules_per_adapter,
                                                 const int* __restrict__ ranks, const float* __restrict__ scales,
                                                 const u32* __restrict__ bt_offsets, int out_dim, int max_rank,
                                                 int page_elems, float* __restrict__ sums) {
    int row = blockIdx.x;
    expand_rows(tmp, y, pool, tables, module_id(row_adapter[row], module, modules_per_adapter), row, 1, row, ranks,
                scales, bt_offsets, out_dim, max_rank, page_elems, sums);
}

// Copies staged pages into the pool: page i of `staging` goes to pool page table[i]. An adapter
// is uploaded as one contiguous run of pages (one host-to-device copy) and scattered here.
// grid: pages, block: any.
extern "C" __global__ void scatter_pages_bf16(const bf16* __restrict__ staging, bf16* __restrict__ pool,
                                              const u32* __restrict__ table, int page_elems) {
    const bf16* src = staging + (size_t)blockIdx.x * page_elems;
    bf16* dst = pool + (size_t)table[blockIdx.x] * page_elems;
    for (int i = threadIdx.x; i < page_elems; i += blockDim.x) dst[i] = src[i];
}
