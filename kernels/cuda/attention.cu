// Paged attention over vLLM's block-table KV layout, bf16 cache, f32 softmax. The layout and
// semantics are those of the CPU reference (kernels/src/attention.rs): one layer's cache is
// [block][slot][kv_head][head_dim]; token p of a sequence lives in block table[p / block_size],
// slot p % block_size. Grouped-query: query head h reads kv head h / (heads / kv_heads).

// Writes new keys and values ([rows, kv_heads * head_dim]) at their cache slots:
// slot_mapping[row] = block * block_size + slot.  grid: rows, block: any.
extern "C" __global__ void write_kv_bf16(const bf16* __restrict__ k, const bf16* __restrict__ v,
                                         bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                         const u32* __restrict__ slot_mapping, int token_elems) {
    size_t dst = (size_t)slot_mapping[blockIdx.x] * token_elems;
    size_t src = (size_t)blockIdx.x * token_elems;
    for (int i = threadIdx.x; i < token_elems; i += blockDim.x) {
        k_cache[dst + i] = k[src + i];
        v_cache[dst + i] = v[src + i];
    }
}

// One query row of one head against `len` cached tokens: scores into shared memory, softmax,
// then the weighted sum of values. Every thread of the block takes part (blockDim.x a multiple
// of 32). Each score is one warp's: its lanes read the key's values side by side (coalesced)
// and the dot product is summed across the warp.
__device__ void attend(const bf16* __restrict__ q, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                       const u32* __restrict__ table, int len, int kv_head, int kv_heads, int head_dim,
                       int block_size, float scale, float* scores, bf16* __restrict__ out) {
    int token_elems = kv_heads * head_dim;
    int block_elems = block_size * token_elems;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int j = warp; j < len; j += warps) {
        const bf16* kj = k_cache + (size_t)table[j / block_size] * block_elems + (j % block_size) * token_elems +
                         kv_head * head_dim;
        float s = 0.0f;
        for (int d = lane; d < head_dim; d += 32) s += bf16_to_f32(q[d]) * bf16_to_f32(kj[d]);
        s = warp_sum(s);
        if (lane == 0) scores[j] = s * scale;
    }
    __syncthreads();
    float local_max = NEG_INF;
    for (int j = threadIdx.x; j < len; j += blockDim.x) local_max = fmaxf(local_max, scores[j]);
    float max = block_max(local_max);
    float local_sum = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        float e = __expf(scores[j] - max);
        scores[j] = e;
        local_sum += e;
    }
    float inv = 1.0f / block_sum(local_sum);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < len; j++) {
            const bf16* vj = v_cache + (size_t)table[j / block_size] * block_elems + (j % block_size) * token_elems +
                             kv_head * head_dim;
            acc += scores[j] * bf16_to_f32(vj[d]);
        }
        out[d] = f32_to_bf16(acc * inv);
    }
}

// Decode: one new token per sequence. q, out: [seqs, heads, head_dim]; block_tables:
// [seqs, max_blocks]; context_lens[seq] counts the cached tokens including the new one.
// grid: (heads, seqs), block: a multiple of 32; dynamic shared memory: max context × 4 bytes.
extern "C" __global__ void paged_attention_decode_bf16(bf16* __restrict__ out, const bf16* __restrict__ q,
                                                       const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                                                       const u32* __restrict__ block_tables, const u32* __restrict__ context_lens,
                                                       int max_blocks, int heads, int kv_heads, int head_dim,
                                                       int block_size, float scale) {
    extern __shared__ float scores[];
    int h = blockIdx.x, seq = blockIdx.y;
    size_t at = ((size_t)seq * heads + h) * head_dim;
    attend(q + at, k_cache, v_cache, block_tables + (size_t)seq * max_blocks, (int)context_lens[seq],
           h / (heads / kv_heads), kv_heads, head_dim, block_size, scale, scores, out + at);
}

// Prefill (and mixed batches): every query row attends causally to its sequence's tokens up to
// its own position. row_seq[row] names the row's sequence (its block table), row_pos[row] its
// position. q, out: [rows, heads, head_dim].  grid: (heads, rows), block: a multiple of 32;
// dynamic shared memory: (max position + 1) × 4 bytes.
extern "C" __global__ void paged_attention_prefill_bf16(bf16* __restrict__ out, const bf16* __restrict__ q,
                                                        const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                                                        const u32* __restrict__ block_tables, const u32* __restrict__ row_seq,
                                                        const u32* __restrict__ row_pos, int max_blocks, int heads,
                                                        int kv_heads, int head_dim, int block_size, float scale) {
    extern __shared__ float scores[];
    int h = blockIdx.x, row = blockIdx.y;
    size_t at = ((size_t)row * heads + h) * head_dim;
    attend(q + at, k_cache, v_cache, block_tables + (size_t)row_seq[row] * max_blocks, (int)row_pos[row] + 1,
           h / (heads / kv_heads), kv_heads, head_dim, block_size, scale, scores, out + at);
}
