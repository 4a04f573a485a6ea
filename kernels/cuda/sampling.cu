// Token choice on the device, one block per row of f32 logits: greedy (argmax, ties to the lower
// id, as the CPU sampler) or temperature sampling by the Gumbel-max trick with a counter-based
// generator, so a (seed, step) pair always draws the same token. Requests that ask for top-k,
// top-p or penalties copy their logits to the host sampler instead (runtime/src/sampling.rs).

// Uniform in (0, 1) from (seed, index).
__device__ __forceinline__ float uniform01(unsigned long long seed, unsigned long long i) {
    return ((float)(splitmix64(seed, i) >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

// For each row: temperature[row] <= 0 picks the argmax; otherwise argmax of
// logits / T + Gumbel noise drawn from seeds[row].  grid: rows, block: a multiple of 32.
extern "C" __global__ void sample_rows(const float* __restrict__ logits, int vocab, const float* __restrict__ temperature,
                                       const unsigned long long* __restrict__ seeds, u32* __restrict__ out) {
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float t = temperature[blockIdx.x];
    unsigned long long seed = seeds[blockIdx.x];
    float best = NEG_INF;
    int best_id = 0;  // a row of NaN still names a token (the host sampler picks 0 there too)
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = row[i];
        if (t > 0.0f) v = v / t - __logf(-__logf(uniform01(seed, (unsigned long long)i)));
        if (v > best || (v == best && i < best_id)) {
            best = v;
            best_id = i;
        }
    }
    // Reduce (value, id) pairs over the block.
    __shared__ float vals[1024];
    __shared__ int ids[1024];
    vals[threadIdx.x] = best;
    ids[threadIdx.x] = best_id;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float ov = vals[threadIdx.x + stride];
            int oi = ids[threadIdx.x + stride];
            if (ov > vals[threadIdx.x] || (ov == vals[threadIdx.x] && oi < ids[threadIdx.x])) {
                vals[threadIdx.x] = ov;
                ids[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = (u32)ids[0];
}
