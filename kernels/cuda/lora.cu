// Batched heterogeneous LoRA over the unified page pool (S-LoRA / Punica), bf16 weights, f32
// accumulation: y[row] += scale · (x[row] · Aᵀ) · Bᵀ, rows carrying different adapters of
// different ranks (or none) in one launch. Layout as the CPU reference (kernels/src/lora.rs):
// each rank-row of A (in_dim wide) and of Bᵀ (out_dim wide) occupies ceil(width / page_elems)
// pages of the pool, found through the module's page table.
//
// Modules are described by parallel arrays indexed by module id: rank, scale, and the offsets
// of their A and Bᵀ page tables in `tables`. The shrink writes tmp: [rows, max_rank] (f32);
// the expand reads it.

// Element k of rank-row r of a paged matrix whose rows are `width` wide.
__device__ __forceinline__ float paged(const bf16* __restrict__ pool, const u32* __restrict__ table, int r, int k,
                                       int width, int page_elems) {
    int ppr = (width + page_elems - 1) / page_elems;
    u32 page = table[r * ppr + k / page_elems];
    return bf16_to_f32(pool[(size_t)page * page_elems + k % page_elems]);
}

// Prefill, shrink: segment s (rows seg_start[s] .. + seg_len[s], module seg_module[s] or -1),
// rank-row blockIdx.y. Each block reads its A row once for all the segment's rows.
// grid: (segments, max_rank), block: a multiple of 32.
extern "C" __global__ void lora_shrink_sgmv_bf16(const bf16* __restrict__ x, float* __restrict__ tmp,
                                                 const bf16* __restrict__ pool, const u32* __restrict__ tables,
                                                 const int* __restrict__ seg_start, const int* __restrict__ seg_len,
                                                 const int* __restrict__ seg_module, const int* __restrict__ ranks,
                                                 const u32* __restrict__ a_offsets, int in_dim, int max_rank,
                                                 int page_elems) {
    int m = seg_module[blockIdx.x], r = blockIdx.y;
    if (m < 0 || r >= ranks[m]) return;
    const u32* table = tables + a_offsets[m];
    for (int row = seg_start[blockIdx.x]; row < seg_start[blockIdx.x] + seg_len[blockIdx.x]; row++) {
        const bf16* xr = x + (size_t)row * in_dim;
        float s = 0.0f;
        for (int k = threadIdx.x; k < in_dim; k += blockDim.x) s += bf16_to_f32(xr[k]) * paged(pool, table, r, k, in_dim, page_elems);
        s = block_sum(s);
        if (threadIdx.x == 0) tmp[(size_t)row * max_rank + r] = s;
    }
}

// Prefill, expand: y[row, o] += scale · Σ_r tmp[row, r] · Bᵀ[r, o] for the segment's rows.
// grid: (segments, ceil(out_dim / block)).
extern "C" __global__ void lora_expand_sgmv_bf16(const float* __restrict__ tmp, bf16* __restrict__ y,
                                                 const bf16* __restrict__ pool, const u32* __restrict__ tables,
                                                 const int* __restrict__ seg_start, const int* __restrict__ seg_len,
                                                 const int* __restrict__ seg_module, const int* __restrict__ ranks,
                                                 const float* __restrict__ scales, const u32* __restrict__ bt_offsets,
                                                 int out_dim, int max_rank, int page_elems) {
    int m = seg_module[blockIdx.x];
    int o = blockIdx.y * blockDim.x + threadIdx.x;
    if (m < 0 || o >= out_dim) return;
    const u32* table = tables + bt_offsets[m];
    int rank = ranks[m];
    for (int row = seg_start[blockIdx.x]; row < seg_start[blockIdx.x] + seg_len[blockIdx.x]; row++) {
        float acc = 0.0f;
        for (int r = 0; r < rank; r++) acc += tmp[(size_t)row * max_rank + r] * paged(pool, table, r, o, out_dim, page_elems);
        size_t at = (size_t)row * out_dim + o;
        y[at] = f32_to_bf16(bf16_to_f32(y[at]) + scales[m] * acc);
    }
}

// Decode, shrink: every row gathers its own module (row_module[row] or -1).
// grid: (rows, max_rank), block: a multiple of 32.
extern "C" __global__ void lora_shrink_bgmv_bf16(const bf16* __restrict__ x, float* __restrict__ tmp,
                                                 const bf16* __restrict__ pool, const u32* __restrict__ tables,
                                                 const int* __restrict__ row_module, const int* __restrict__ ranks,
                                                 const u32* __restrict__ a_offsets, int in_dim, int max_rank,
                                                 int page_elems) {
    int row = blockIdx.x, r = blockIdx.y, m = row_module[row];
    if (m < 0 || r >= ranks[m]) return;
    const u32* table = tables + a_offsets[m];
    const bf16* xr = x + (size_t)row * in_dim;
    float s = 0.0f;
    for (int k = threadIdx.x; k < in_dim; k += blockDim.x) s += bf16_to_f32(xr[k]) * paged(pool, table, r, k, in_dim, page_elems);
    s = block_sum(s);
    if (threadIdx.x == 0) tmp[(size_t)row * max_rank + r] = s;
}

// Decode, expand.  grid: (rows, ceil(out_dim / block)).
extern "C" __global__ void lora_expand_bgmv_bf16(const float* __restrict__ tmp, bf16* __restrict__ y,
                                                 const bf16* __restrict__ pool, const u32* __restrict__ tables,
                                                 const int* __restrict__ row_module, const int* __restrict__ ranks,
                                                 const float* __restrict__ scales, const u32* __restrict__ bt_offsets,
                                                 int out_dim, int max_rank, int page_elems) {
    int row = blockIdx.x, m = row_module[row];
    int o = blockIdx.y * blockDim.x + threadIdx.x;
    if (m < 0 || o >= out_dim) return;
    const u32* table = tables + bt_offsets[m];
    float acc = 0.0f;
    for (int r = 0; r < ranks[m]; r++) acc += tmp[(size_t)row * max_rank + r] * paged(pool, table, r, o, out_dim, page_elems);
    size_t at = (size_t)row * out_dim + o;
    y[at] = f32_to_bf16(bf16_to_f32(y[at]) + scales[m] * acc);
}
