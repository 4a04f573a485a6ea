// Paged attention over vLLM's block-table KV layout, bf16 cache, f32 softmax. The layout and
// semantics are those of the CPU reference (kernels/src/attention.rs): one layer's cache is
// [block][offset][kv_head][head_dim]; token p of a sequence lives in block table[p / block_size],
// offset p % block_size. Grouped-query: query head h reads kv head h / (heads / kv_heads).

// Writes new keys and values ([rows, kv_heads * head_dim]) at their cache offsets:
// cache_rows[row] = block * block_size + offset.  grid: rows, block: any.
extern "C" __global__ void write_kv_bf16(const bf16* __restrict__ k, const bf16* __restrict__ v,
                                         bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                         const u32* __restrict__ cache_rows, int token_elems) {
    size_t dst = (size_t)cache_rows[blockIdx.x] * token_elems;
    size_t src = (size_t)blockIdx.x * token_elems;
    for (int i = threadIdx.x; i < token_elems; i += blockDim.x) {
        k_cache[dst + i] = k[src + i];
        v_cache[dst + i] = v[src + i];
    }
}

// Keys scored per tile: the scores of one tile sit in shared memory, so any context fits.
#define ATTN_TILE 256
// Output dimensions one thread accumulates: head_dim <= ATTN_DIMS * blockDim.x.
#define ATTN_DIMS 4

// One query row of one head against cached tokens `first..len` (`first` > 0 under a sliding
// window), a tile of keys at a time with an
// online softmax (running max and sum, earlier tiles' weighted values rescaled when the max
// grows): no shared memory grows with the context. Every thread of the block takes part
// (blockDim.x a multiple of 32). Each score is one warp's: its lanes read the key's values side
// by side (coalesced) and the dot product is summed across the warp.
__device__ void attend(const bf16* __restrict__ q, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                       const u32* __restrict__ table, int first, int len, int kv_head, int kv_heads, int head_dim,
                       int block_size, float scale, bf16* __restrict__ out) {
    __shared__ float scores[ATTN_TILE];
    int token_elems = kv_heads * head_dim;
    int block_elems = block_size * token_elems;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float acc[ATTN_DIMS];
    for (int i = 0; i < ATTN_DIMS; i++) acc[i] = 0.0f;
    float running_max = NEG_INF, running_sum = 0.0f;
    for (int t0 = first; t0 < len; t0 += ATTN_TILE) {
        int tn = min(ATTN_TILE, len - t0);
        for (int j = warp; j < tn; j += warps) {
            int t = t0 + j;
            const bf16* kj = k_cache + (size_t)table[t / block_size] * block_elems + (t % block_size) * token_elems +
                             kv_head * head_dim;
            float s = 0.0f;
            for (int d = lane; d < head_dim; d += 32) s += bf16_to_f32(q[d]) * bf16_to_f32(kj[d]);
            s = warp_sum(s);
            if (lane == 0) scores[j] = s * scale;
        }
        __syncthreads();
        float local_max = NEG_INF;
        for (int j = threadIdx.x; j < tn; j += blockDim.x) local_max = fmaxf(local_max, scores[j]);
        float new_max = fmaxf(running_max, block_max(local_max));
        float local_sum = 0.0f;
        for (int j = threadIdx.x; j < tn; j += blockDim.x) {
            float e = __expf(scores[j] - new_max);
            scores[j] = e;
            local_sum += e;
        }
        float tile_sum = block_sum(local_sum);  // its barriers also publish the weights above
        float rescale = __expf(running_max - new_max);  // 0 for the first tile
        running_sum = running_sum * rescale + tile_sum;
        for (int i = 0; i < ATTN_DIMS; i++) {
            int d = threadIdx.x + i * blockDim.x;
            if (d >= head_dim) break;
            float a = acc[i] * rescale;
            for (int j = 0; j < tn; j++) {
                int t = t0 + j;
                const bf16* vj = v_cache + (size_t)table[t / block_size] * block_elems + (t % block_size) * token_elems +
                                 kv_head * head_dim;
                a += scores[j] * bf16_to_f32(vj[d]);
            }
            acc[i] = a;
        }
        running_max = new_max;
        __syncthreads();  // the next tile overwrites the scores
    }
    float inv = 1.0f / running_sum;
    for (int i = 0; i < ATTN_DIMS; i++) {
        int d = threadIdx.x + i * blockDim.x;
        if (d < head_dim) out[d] = f32_to_bf16(acc[i] * inv);
    }
}

// The first token a query at position len - 1 sees: under a sliding window of `window` tokens
// (itself included) the last `window`; 0 (no window): every one.
__device__ int window_start(int len, int window) { return window > 0 && len > window ? len - window : 0; }

// Decode: one new token per sequence. q, out: [seqs, heads, head_dim]; block_tables:
// [seqs, max_blocks]; context_lens[seq] counts the cached tokens including the new one; window:
// the sliding window in tokens (0: none).
// grid: (seqs, heads), block: a multiple of 32 with head_dim <= 4 × block.
extern "C" __global__ void paged_attention_decode_bf16(bf16* __restrict__ out, const bf16* __restrict__ q,
                                                       const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                                                       const u32* __restrict__ block_tables, const u32* __restrict__ context_lens,
                                                       int max_blocks, int heads, int kv_heads, int head_dim,
                                                       int block_size, float scale, int window) {
    int seq = blockIdx.x, h = blockIdx.y;
    size_t at = ((size_t)seq * heads + h) * head_dim;
    int len = (int)context_lens[seq];
    attend(q + at, k_cache, v_cache, block_tables + (size_t)seq * max_blocks, window_start(len, window), len,
           h / (heads / kv_heads), kv_heads, head_dim, block_size, scale, out + at);
}

// Prefill (and mixed batches): every query row attends causally to its sequence's tokens up to
// its own position. row_seq[row] names the row's sequence (its block table), row_pos[row] its
// position. q, out: [rows, heads, head_dim].  grid: (rows, heads) (rows in x: a step may hold
// more than the 65,535 blocks grid y allows), block: a multiple of 32
// with head_dim <= 4 × block.
extern "C" __global__ void paged_attention_prefill_bf16(bf16* __restrict__ out, const bf16* __restrict__ q,
                                                        const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                                                        const u32* __restrict__ block_tables, const u32* __restrict__ row_seq,
                                                        const u32* __restrict__ row_pos, int max_blocks, int heads,
                                                        int kv_heads, int head_dim, int block_size, float scale,
                                                        int window) {
    int row = blockIdx.x, h = blockIdx.y;
    size_t at = ((size_t)row * heads + h) * head_dim;
    int len = (int)row_pos[row] + 1;
    attend(q + at, k_cache, v_cache, block_tables + (size_t)row_seq[row] * max_blocks, window_start(len, window), len,
           h / (heads / kv_heads), kv_heads, head_dim, block_size, scale, out + at);
}
