// Native CPU kernels, built at first use by kernels/cpu_native.py and called
// through ctypes; their torch references are in kernels/reference.py.
//
// Paged-attention decode reads K/V blocks in place through the block table
// (no gathered copy), with fp32 accumulation and one (sequence, kv head) pair
// per OpenMP task. Layouts (row-major):
//   q, out:             [num_seqs, num_heads, head_dim]
//   k_cache, v_cache:   [num_blocks, block_size, num_kv_heads, head_dim]
//   block_tables:       [num_seqs, max_blocks] int32
//   context_lens:       [num_seqs] int32

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);  // NaN stays NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
    return (uint16_t)(bits >> 16);
}

// One body for both dtypes: ELEM is the storage type, LOAD converts to float.
#define DEFINE_DECODE(NAME, ELEM, LOAD, STORE)                                                          \
    static void NAME##_one(const ELEM* q, const ELEM* k_cache, const ELEM* v_cache,                     \
                           const int32_t* table, int32_t ctx, ELEM* out, int kvh, int num_heads,        \
                           int num_kv_heads, int head_dim, int block_size, float scale, float* scores,  \
                           float* qf, float* acc) {                                                     \
        const int group = num_heads / num_kv_heads;                                                      \
        const long tok_stride = (long)num_kv_heads * head_dim;                                           \
        for (int g = 0; g < group; g++) {                                                                \
            const ELEM* qh = q + (long)(kvh * group + g) * head_dim;                                     \
            for (int d = 0; d < head_dim; d++) qf[g * head_dim + d] = LOAD(qh[d]) * scale;               \
        }                                                                                                \
        /* scores[g, t] = q_g . k_t */                                                                   \
        for (int t = 0; t < ctx; t++) {                                                                  \
            const ELEM* kp = k_cache + ((long)table[t / block_size] * block_size + t % block_size) *    \
                                           tok_stride + (long)kvh * head_dim;                            \
            for (int g = 0; g < group; g++) {                                                            \
                const float* qg = qf + g * head_dim;                                                     \
                float s = 0.f;                                                                           \
                _Pragma("omp simd reduction(+:s)") for (int d = 0; d < head_dim; d++) s += qg[d] * LOAD(kp[d]); \
                scores[(long)g * ctx + t] = s;                                                           \
            }                                                                                            \
        }                                                                                                \
        for (int g = 0; g < group; g++) {                                                                \
            float* sg = scores + (long)g * ctx;                                                          \
            float m = -INFINITY;                                                                         \
            for (int t = 0; t < ctx; t++) m = sg[t] > m ? sg[t] : m;                                     \
            float sum = 0.f;                                                                             \
            for (int t = 0; t < ctx; t++) { sg[t] = expf(sg[t] - m); sum += sg[t]; }                     \
            float inv = 1.f / sum;                                                                       \
            for (int t = 0; t < ctx; t++) sg[t] *= inv;                                                  \
        }                                                                                                \
        memset(acc, 0, sizeof(float) * group * head_dim);                                                \
        for (int t = 0; t < ctx; t++) {                                                                  \
            const ELEM* vp = v_cache + ((long)table[t / block_size] * block_size + t % block_size) *    \
                                           tok_stride + (long)kvh * head_dim;                            \
            for (int g = 0; g < group; g++) {                                                            \
                const float p = scores[(long)g * ctx + t];                                               \
                float* ag = acc + g * head_dim;                                                          \
                _Pragma("omp simd") for (int d = 0; d < head_dim; d++) ag[d] += p * LOAD(vp[d]);        \
            }                                                                                            \
        }                                                                                                \
        for (int g = 0; g < group; g++) {                                                                \
            ELEM* oh = out + (long)(kvh * group + g) * head_dim;                                         \
            for (int d = 0; d < head_dim; d++) oh[d] = STORE(acc[g * head_dim + d]);                     \
        }                                                                                                \
    }                                                                                                    \
                                                                                                         \
    int NAME(const ELEM* q, const ELEM* k_cache, const ELEM* v_cache, const int32_t* block_tables,      \
             const int32_t* context_lens, ELEM* out, int num_seqs, int num_heads, int num_kv_heads,      \
             int head_dim, int block_size, int max_blocks, float scale, int num_threads) {              \
        int max_ctx = 0;                                                                                 \
        for (int s = 0; s < num_seqs; s++) max_ctx = context_lens[s] > max_ctx ? context_lens[s] : max_ctx; \
        const int group = num_heads / num_kv_heads;                                                      \
        const long per_thread = (long)group * (max_ctx + 1) + 2L * group * head_dim;                    \
        float* buffers = malloc(sizeof(float) * per_thread * num_threads);                             \
        if (!buffers) return 1;                                                                          \
        _Pragma("omp parallel for num_threads(num_threads) schedule(dynamic, 1)")                       \
        for (long task = 0; task < (long)num_seqs * num_kv_heads; task++) {                              \
            float* scores = buffers + per_thread * omp_get_thread_num();                                 \
            float* qf = scores + (long)group * (max_ctx + 1);                                            \
            float* acc = qf + group * head_dim;                                                          \
            const int s = (int)(task / num_kv_heads), kvh = (int)(task % num_kv_heads);                  \
            NAME##_one(q + (long)s * num_heads * head_dim, k_cache, v_cache,                             \
                       block_tables + (long)s * max_blocks, context_lens[s],                             \
                       out + (long)s * num_heads * head_dim, kvh, num_heads, num_kv_heads,               \
                       head_dim, block_size, scale, scores, qf, acc);                                    \
        }                                                                                                \
        free(buffers);                                                                                   \
        return 0;                                                                                   \
    }

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
DEFINE_DECODE(paged_decode_f32, float, LOAD_F32, STORE_F32)
DEFINE_DECODE(paged_decode_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

// ---------------------------------------------------------------------------
// RMSNorm, optionally fused with the residual add, in Llama's numerics:
// normalize in fp32, round to the storage dtype, then scale by the weight.
//   x, residual, out, residual_out: [num_tokens, dim]; weight: [dim]

#define DEFINE_RMS_NORM(NAME, ELEM, LOAD, STORE)                                                        \
    void NAME(const ELEM* x, const ELEM* residual, const ELEM* weight, ELEM* out, ELEM* residual_out,  \
              int num_tokens, int dim, float eps, int num_threads) {                                    \
        _Pragma("omp parallel for num_threads(num_threads) if(num_tokens > 16)")                        \
        for (int t = 0; t < num_tokens; t++) {                                                          \
            const ELEM* xt = x + (long)t * dim;                                                         \
            ELEM* ot = out + (long)t * dim;                                                             \
            ELEM* rt = residual ? residual_out + (long)t * dim : 0;                                     \
            float ss = 0.f;                                                                             \
            for (int d = 0; d < dim; d++) {                                                             \
                float v = LOAD(xt[d]);                                                                  \
                if (residual) {                                                                         \
                    ELEM sum = STORE(v + LOAD(residual[(long)t * dim + d]));                            \
                    rt[d] = sum;                                                                        \
                    v = LOAD(sum);                                                                      \
                }                                                                                       \
                ss += v * v;                                                                            \
            }                                                                                           \
            const float r = 1.f / sqrtf(ss / dim + eps);                                                \
            const ELEM* src = residual ? rt : xt;                                                       \
            for (int d = 0; d < dim; d++) ot[d] = STORE(LOAD(weight[d]) * LOAD(STORE(LOAD(src[d]) * r))); \
        }                                                                                               \
    }

DEFINE_RMS_NORM(rms_norm_f32, float, LOAD_F32, STORE_F32)
DEFINE_RMS_NORM(rms_norm_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

// ---------------------------------------------------------------------------
// Rotary embedding (half-split layout) of q and k, written to q_out and k_out.
// q rows may be strided (a view into the fused qkv projection): q_stride and
// k_stride are the element distances between consecutive tokens.
//   cos_sin: [max_positions, head_dim] fp32, cos in the first half, sin in the second.
// Each product is rounded to the storage dtype as torch's elementwise ops do.

#define DEFINE_ROTARY(NAME, ELEM, LOAD, STORE)                                                          \
    static inline void NAME##_heads(const ELEM* x, ELEM* o, int heads, int head_dim, const float* cs) { \
        const int half = head_dim / 2;                                                                  \
        for (int h = 0; h < heads; h++) {                                                               \
            const ELEM* xh = x + (long)h * head_dim;                                                    \
            ELEM* oh = o + (long)h * head_dim;                                                          \
            for (int i = 0; i < half; i++) {                                                            \
                const float c = LOAD(STORE(cs[i])), s = LOAD(STORE(cs[half + i]));                      \
                const float x1 = LOAD(xh[i]), x2 = LOAD(xh[half + i]);                                  \
                oh[i] = STORE(LOAD(STORE(x1 * c)) + LOAD(STORE(-x2 * s)));                              \
                oh[half + i] = STORE(LOAD(STORE(x2 * c)) + LOAD(STORE(x1 * s)));                        \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    void NAME(const ELEM* q, const ELEM* k, const int64_t* positions, const float* cos_sin, ELEM* q_out, \
              ELEM* k_out, int num_tokens, int num_heads, int num_kv_heads, int head_dim, long q_stride, \
              long k_stride, int num_threads) {                                                         \
        _Pragma("omp parallel for num_threads(num_threads) if(num_tokens > 16)")                        \
        for (int t = 0; t < num_tokens; t++) {                                                          \
            const float* cs = cos_sin + positions[t] * head_dim;                                        \
            NAME##_heads(q + t * q_stride, q_out + (long)t * num_heads * head_dim, num_heads, head_dim, cs); \
            NAME##_heads(k + t * k_stride, k_out + (long)t * num_kv_heads * head_dim, num_kv_heads, head_dim, cs); \
        }                                                                                               \
    }

DEFINE_ROTARY(rotary_f32, float, LOAD_F32, STORE_F32)
DEFINE_ROTARY(rotary_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

// ---------------------------------------------------------------------------
// silu(gate) * up over the fused gate/up projection, rounding as torch does
// (silu's result is rounded to the storage dtype before the product).
//   x: [num_tokens, 2 * dim] (gate first); out: [num_tokens, dim]

#define DEFINE_SILU_AND_MUL(NAME, ELEM, LOAD, STORE)                                                    \
    void NAME(const ELEM* x, ELEM* out, int num_tokens, int dim, int num_threads) {                     \
        _Pragma("omp parallel for num_threads(num_threads) if((long)num_tokens * dim > 65536)")         \
        for (int t = 0; t < num_tokens; t++) {                                                          \
            const ELEM* gate = x + (long)t * 2 * dim;                                                   \
            const ELEM* up = gate + dim;                                                                \
            ELEM* o = out + (long)t * dim;                                                              \
            for (int d = 0; d < dim; d++) {                                                             \
                const float g = LOAD(gate[d]);                                                          \
                o[d] = STORE(LOAD(STORE(g / (1.f + expf(-g)))) * LOAD(up[d]));                          \
            }                                                                                           \
        }                                                                                               \
    }

DEFINE_SILU_AND_MUL(silu_and_mul_f32, float, LOAD_F32, STORE_F32)
DEFINE_SILU_AND_MUL(silu_and_mul_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

// ---------------------------------------------------------------------------
// Write each token's K and V into its cache slot.
//   key, value: [num_tokens, num_kv_heads * head_dim] rows at any stride
//   k_cache, v_cache: [num_slots, num_kv_heads * head_dim]; slot_mapping: [num_tokens]

void write_kv_cache(const char* key, const char* value, char* k_cache, char* v_cache, const int64_t* slot_mapping,
                    int num_tokens, long row_bytes, long key_stride_bytes, long value_stride_bytes) {
    for (int t = 0; t < num_tokens; t++) {
        const long slot = slot_mapping[t];
        memcpy(k_cache + slot * row_bytes, key + t * key_stride_bytes, row_bytes);
        memcpy(v_cache + slot * row_bytes, value + t * value_stride_bytes, row_bytes);
    }
}

// ---------------------------------------------------------------------------
// y = x @ w.T (+ bias) for bf16 with few rows in x (decode at small batch),
// where the matmul is a stream over the weight: every weight byte is read once
// per 4 rows of x and fed to AVX512-BF16 dot products (fp32 accumulation).
//   x: [M, K]; w: [N, K]; bias: [N] or NULL; y: [M, N]. All bf16, contiguous.

#if defined(__AVX512BF16__)
#include <immintrin.h>

// One tile: rows m0..m0+mb (mb <= 4) of x against weight rows n0..n0+4.
static inline void gemv_tile_bf16(const uint16_t* x, const uint16_t* w, float out[4][4], int mb, int n0, int nb,
                                  int K) {
    __m512 acc[4][4];
    for (int m = 0; m < 4; m++)
        for (int r = 0; r < 4; r++) acc[m][r] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512i wv[4];
        for (int r = 0; r < nb; r++) wv[r] = _mm512_loadu_si512((const void*)(w + (long)(n0 + r) * K + k));
        for (int m = 0; m < mb; m++) {
            __m512i xv = _mm512_loadu_si512((const void*)(x + (long)m * K + k));
            for (int r = 0; r < nb; r++)
                acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)xv, (__m512bh)wv[r]);
        }
    }
    if (k < K) {
        const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
        __m512i wv[4];
        for (int r = 0; r < nb; r++) wv[r] = _mm512_maskz_loadu_epi16(mask, w + (long)(n0 + r) * K + k);
        for (int m = 0; m < mb; m++) {
            __m512i xv = _mm512_maskz_loadu_epi16(mask, x + (long)m * K + k);
            for (int r = 0; r < nb; r++)
                acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)xv, (__m512bh)wv[r]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < nb; r++) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

int linear_bf16_small_m(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int M, int N, int K,
                        int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int n0 = 0; n0 < N; n0 += 4) {
        const int nb = N - n0 < 4 ? N - n0 : 4;
        for (int m0 = 0; m0 < M; m0 += 4) {
            const int mb = M - m0 < 4 ? M - m0 : 4;
            float out[4][4];
            gemv_tile_bf16(x + (long)m0 * K, w, out, mb, n0, nb, K);
            for (int m = 0; m < mb; m++)
                for (int r = 0; r < nb; r++) {
                    float v = out[m][r];
                    if (bias) v += bf16_to_f32(bias[n0 + r]);
                    y[(long)(m0 + m) * N + n0 + r] = f32_to_bf16(v);
                }
        }
    }
    return 0;
}
#else
int linear_bf16_small_m(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int M, int N, int K,
                        int num_threads) {
    (void)x; (void)w; (void)bias; (void)y; (void)M; (void)N; (void)K; (void)num_threads;
    return 1;  // no AVX512-BF16 on this machine: the caller keeps torch's matmul
}
#endif
