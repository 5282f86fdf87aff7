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


// ---------------------------------------------------------------------------
// Row helpers for attention: dot products, axpy and softmax over fp32 scratch,
// vectorized with AVX-512 where the compiler targets it (scalar otherwise).
// exp uses exp(x) = 2^n * e^y, n = round(x / ln 2), |y| <= ln(2) / 2, with a
// degree-7 Taylor polynomial for e^y: relative error below 1e-8.

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 ld16_f32(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 ld16_bf16(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline __mmask16 tail16(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 y = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.6931471805599453f), x);
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

#define DEFINE_ROW_OPS(SFX, ELEM, LD)                                                                   \
    static inline float dot_##SFX(const float* q, const ELEM* k, int n) {                                \
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();                                         \
        int i = 0;                                                                                       \
        for (; i + 32 <= n; i += 32) {                                                                   \
            a = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), LD(k + i, 0xffff), a);                           \
            b = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16), LD(k + i + 16, 0xffff), b);                 \
        }                                                                                                \
        for (; i < n; i += 16) {                                                                         \
            const __mmask16 m = tail16(n - i);                                                           \
            a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), LD(k + i, m), a);                       \
        }                                                                                                \
        return _mm512_reduce_add_ps(_mm512_add_ps(a, b));                                                \
    }                                                                                                    \
    static inline void axpy_##SFX(float p, const ELEM* v, float* acc, int n) {                          \
        const __m512 pv = _mm512_set1_ps(p);                                                             \
        for (int i = 0; i < n; i += 16) {                                                                \
            const __mmask16 m = tail16(n - i);                                                           \
            _mm512_mask_storeu_ps(acc + i, m, _mm512_fmadd_ps(pv, LD(v + i, m), _mm512_maskz_loadu_ps(m, acc + i))); \
        }                                                                                                \
    }
DEFINE_ROW_OPS(f32, float, ld16_f32)
DEFINE_ROW_OPS(bf16, uint16_t, ld16_bf16)

// A K or V row as fp32, converted once per token rather than once per query head.
static inline const float* row_f32(const float* src, float* buf, int n) { (void)buf; (void)n; return src; }
static inline const float* row_bf16(const uint16_t* src, float* buf, int n) {
    for (int i = 0; i < n; i += 16) _mm512_mask_storeu_ps(buf + i, tail16(n - i), ld16_bf16(src + i, tail16(n - i)));
    return buf;
}

static inline void softmax_row(float* s, int n) {
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < n; i += 16) mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(mv, tail16(n - i), s + i));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = tail16(n - i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), m));
        _mm512_mask_storeu_ps(s + i, k, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = tail16(n - i);
        _mm512_mask_storeu_ps(s + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + i), inv));
    }
}
#else
#define DEFINE_ROW_OPS(SFX, ELEM, LOADER)                                                               \
    static inline float dot_##SFX(const float* q, const ELEM* k, int n) {                                \
        float s = 0.f;                                                                                   \
        for (int i = 0; i < n; i++) s += q[i] * LOADER(k[i]);                                            \
        return s;                                                                                        \
    }                                                                                                    \
    static inline void axpy_##SFX(float p, const ELEM* v, float* acc, int n) {                          \
        for (int i = 0; i < n; i++) acc[i] += p * LOADER(v[i]);                                          \
    }
#define LOAD_F32_SCALAR(x) (x)
DEFINE_ROW_OPS(f32, float, LOAD_F32_SCALAR)
DEFINE_ROW_OPS(bf16, uint16_t, bf16_to_f32)

static inline const float* row_f32(const float* src, float* buf, int n) { (void)buf; (void)n; return src; }
static inline const float* row_bf16(const uint16_t* src, float* buf, int n) {
    for (int i = 0; i < n; i++) buf[i] = bf16_to_f32(src[i]);
    return buf;
}

static inline void softmax_row(float* s, int n) {
    float m = -INFINITY, sum = 0.f;
    for (int t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
    for (int t = 0; t < n; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
    const float inv = 1.f / sum;
    for (int t = 0; t < n; t++) s[t] *= inv;
}
#endif


// ---------------------------------------------------------------------------
// Fast decode attention for head_dim 64 and 128 (AVX-512), below.
#if defined(__AVX512F__)
static inline void store16_f32(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
#if defined(__AVX512BF16__)
static inline void store16_bf16(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
#else
static inline void store16_bf16(uint16_t* p, __m512 v) {
    float tmp[16];
    _mm512_storeu_ps(tmp, v);
    for (int i = 0; i < 16; i++) p[i] = f32_to_bf16(tmp[i]);
}
#endif

// Sixteen vectors to one: lane i of the result is the sum of v[i]'s lanes
// (45 shuffles and adds where sixteen separate reductions take about 130).
static inline __m512 hsum16(const __m512* v) {
    __m512 x[8], y[4];
    for (int j = 0; j < 8; j++)
        x[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int j = 0; j < 4; j++) {
        const __m512d a = _mm512_castps_pd(x[2 * j]), b = _mm512_castps_pd(x[2 * j + 1]);
        y[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88), _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

// q . k for one query head and one K row, unscaled. bf16 with AVX512-BF16:
// vdpbf16ps on the stored pairs (no conversion; products exact in fp32).
#if defined(__AVX512BF16__)
#define QK_PREP_bf16(DC, qh, scale, qf) ((void)(qf))
#define QK_DOT_bf16(DC, qh, qf, row, acc)                                                                \
    do {                                                                                                 \
        acc = _mm512_setzero_ps();                                                                       \
        for (int c = 0; c < (DC) / 2; c++)                                                               \
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((qh) + 32 * c),                     \
                                   (__m512bh)_mm512_loadu_si512((row) + 32 * c));                        \
    } while (0)
#define QK_SCALE_bf16(scale) (scale)
#else
#define QK_PREP_bf16(DC, qh, scale, qf) QK_PREP_GENERIC(bf16, DC, qh, scale, qf)
#define QK_DOT_bf16(DC, qh, qf, row, acc) QK_DOT_GENERIC(bf16, DC, qf, row, acc)
#define QK_SCALE_bf16(scale) 1.f
#endif
// Otherwise q is converted and pre-scaled once into qf.
#define QK_PREP_GENERIC(SFX, DC, qh, scale, qf)                                                          \
    for (int c = 0; c < (DC); c++)                                                                       \
        _mm512_storeu_ps((qf) + 16 * c, _mm512_mul_ps(ld16_##SFX((qh) + 16 * c, 0xffff), _mm512_set1_ps(scale)))
#define QK_PREP_f32(DC, qh, scale, qf) QK_PREP_GENERIC(f32, DC, qh, scale, qf)
#define QK_DOT_GENERIC(SFX, DC, qf, row, acc)                                                            \
    do {                                                                                                 \
        acc = _mm512_mul_ps(_mm512_loadu_ps(qf), ld16_##SFX(row, 0xffff));                               \
        for (int c = 1; c < (DC); c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps((qf) + 16 * c), ld16_##SFX((row) + 16 * c, 0xffff), acc); \
    } while (0)
#define QK_DOT_f32(DC, qh, qf, row, acc) QK_DOT_GENERIC(f32, DC, qf, row, acc)
#define QK_SCALE_f32(scale) 1.f

// P @ V for G query rows that share one kv head: out[g] = sum_t p[g][t] * V[t],
// V rows read in place through the block table, each loaded once for all G
// rows; G is a compile-time constant so the G x DC accumulators stay in registers.
#define DEFINE_PV(SFX, ELEM, LD, DC, G)                                                                   \
    static inline void pv_##SFX##_##DC##_##G(const ELEM* v_cache, const int32_t* table, int block_size,  \
                                             long tok_stride, long voff, int nkeys, const float* p,       \
                                             long pstride, long tstride, ELEM* out, long ostride) {       \
        __m512 o[G][DC];                                                                                  \
        for (int g = 0; g < (G); g++)                                                                     \
            for (int c = 0; c < (DC); c++) o[g][c] = _mm512_setzero_ps();                                 \
        for (int b = 0, t = 0; t < nkeys; b++) {                                                          \
            const long base = (long)table[b] * block_size;                                                \
            const int nt = nkeys - t < block_size ? nkeys - t : block_size;                               \
            for (int i = 0; i < nt; i++, t++) {                                                           \
                const ELEM* vp = v_cache + (base + i) * tok_stride + voff;                                \
                __m512 vv[DC];                                                                            \
                for (int c = 0; c < (DC); c++) vv[c] = LD(vp + 16 * c, 0xffff);                           \
                for (int g = 0; g < (G); g++) {                                                           \
                    const __m512 pb = _mm512_set1_ps(p[g * pstride + t * tstride]);                      \
                    for (int c = 0; c < (DC); c++) o[g][c] = _mm512_fmadd_ps(pb, vv[c], o[g][c]);         \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (int g = 0; g < (G); g++)                                                                     \
            for (int c = 0; c < (DC); c++) store16_##SFX(out + g * ostride + 16 * c, o[g][c]);            \
    }
#define DEFINE_PV_ALL(SFX, ELEM, LD, DC)                                                                  \
    DEFINE_PV(SFX, ELEM, LD, DC, 1) DEFINE_PV(SFX, ELEM, LD, DC, 2) DEFINE_PV(SFX, ELEM, LD, DC, 3)       \
    DEFINE_PV(SFX, ELEM, LD, DC, 4) DEFINE_PV(SFX, ELEM, LD, DC, 5) DEFINE_PV(SFX, ELEM, LD, DC, 6)       \
    /* g rows at a time, at most 24 / DC per call. */                                                    \
    static inline void pv_##SFX##_##DC(int g, const ELEM* v_cache, const int32_t* table, int block_size,  \
                                       long tok_stride, long voff, int nkeys, const float* p, long pstride, \
                                       long tstride, ELEM* out, long ostride) {                           \
        enum { GT = 24 / DC };                                                                            \
        for (int g0 = 0; g0 < g; g0 += GT) {                                                              \
            const int n = g - g0 < GT ? g - g0 : GT;                                                      \
            const float* pg = p + g0 * pstride;                                                           \
            ELEM* og = out + g0 * ostride;                                                                \
            switch (n) {                                                                                  \
                case 1: pv_##SFX##_##DC##_1(v_cache, table, block_size, tok_stride, voff, nkeys, pg, pstride, tstride, og, ostride); break; \
                case 2: pv_##SFX##_##DC##_2(v_cache, table, block_size, tok_stride, voff, nkeys, pg, pstride, tstride, og, ostride); break; \
                case 3: pv_##SFX##_##DC##_3(v_cache, table, block_size, tok_stride, voff, nkeys, pg, pstride, tstride, og, ostride); break; \
                case 4: pv_##SFX##_##DC##_4(v_cache, table, block_size, tok_stride, voff, nkeys, pg, pstride, tstride, og, ostride); break; \
                case 5: pv_##SFX##_##DC##_5(v_cache, table, block_size, tok_stride, voff, nkeys, pg, pstride, tstride, og, ostride); break; \
                default: pv_##SFX##_##DC##_6(v_cache, table, block_size, tok_stride, voff, nkeys, pg, pstride, tstride, og, ostride); break; \
            }                                                                                             \
        }                                                                                                 \
    }
// The attention kernels' variants: storage type and head_dim / 16 (64 and 128),
// instantiated by each DEFINE_* below; FAST_ATTEND and the prefill switch pick among them.
#define FOR_EACH_ATTENTION_VARIANT(M) \
    M(f32, float, ld16_f32, 4) M(f32, float, ld16_f32, 8) M(bf16, uint16_t, ld16_bf16, 4) M(bf16, uint16_t, ld16_bf16, 8)
FOR_EACH_ATTENTION_VARIANT(DEFINE_PV_ALL)

// Decode attention for head_dim 64 or 128 (DC = head_dim / 16 vectors per row),
// one sequence and its kv heads [k0, k1): scores for 16 tokens at a time (one
// horizontal sum for all 16), the softmax, then P @ V with each V row loaded
// once for up to 24 / DC query heads whose outputs stay in registers. With all
// kv heads in one task, a block of 16 tokens is one contiguous stretch of
// memory, read whole: 3x the bandwidth of reading one head's rows per task.
#ifndef ATTEND_PREFETCH
#define ATTEND_PREFETCH 16
#endif
#define DEFINE_FAST_ATTEND(SFX, ELEM, LD, DC)                                                            \
    static void attend_##SFX##_##DC(const ELEM* q, const ELEM* k_cache, const ELEM* v_cache,             \
                                    const int32_t* table, int ctx, ELEM* out, int k0, int k1, int group, \
                                    int num_kv_heads, int block_size, float scale, float* scores,        \
                                    float* qf) {                                                         \
        enum { D = DC * 16 };                                                                            \
        const long tok_stride = (long)num_kv_heads * D;                                                   \
        const int row_bytes = (k1 - k0) * D * (int)sizeof(ELEM);                                          \
        const __m512 sc = _mm512_set1_ps(QK_SCALE_##SFX(scale));                                         \
        for (int h = k0 * group; h < k1 * group; h++) {                                                   \
            const ELEM* qh = q + (long)h * D;                                                             \
            float* qfh = qf + (long)h * D;                                                                \
            (void)qh; (void)qfh;                                                                          \
            QK_PREP_##SFX(DC, qh, scale, qfh);                                                            \
        }                                                                                                 \
        const ELEM* krows[16];                                                                            \
        for (int t0 = 0; t0 < ctx; t0 += 16) {                                                            \
            const int n = ctx - t0 < 16 ? ctx - t0 : 16;                                                  \
            int b = t0 / block_size, i = t0 % block_size;                                                 \
            for (int j = 0; j < n; j++) {                                                                 \
                const long row = ((long)table[b] * block_size + i) * tok_stride + (long)k0 * D;           \
                krows[j] = k_cache + row;                                                                 \
                for (int c = 0; c < row_bytes; c += 64) __builtin_prefetch((const char*)(v_cache + row) + c, 0, 1); \
                if (++i == block_size) i = 0, b++;                                                        \
            }                                                                                             \
            if (t0 + ATTEND_PREFETCH < ctx) { /* K rows of a chunk further on */                          \
                const int ahead = t0 + ATTEND_PREFETCH;                                                   \
                int nb = ahead / block_size, ni = ahead % block_size;                                     \
                const int nn = ctx - ahead < 16 ? ctx - ahead : 16;                                       \
                for (int j = 0; j < nn; j++) {                                                            \
                    const char* r = (const char*)(k_cache + ((long)table[nb] * block_size + ni) * tok_stride + (long)k0 * D); \
                    for (int c = 0; c < row_bytes; c += 64) __builtin_prefetch(r + c, 0, 1);                   \
                    if (++ni == block_size) ni = 0, nb++;                                                 \
                }                                                                                         \
            }                                                                                             \
            for (int kvh = k0; kvh < k1; kvh++) {                                                         \
                const long koff = (long)(kvh - k0) * D;                                                   \
                for (int h = kvh * group; h < (kvh + 1) * group; h++) {                                   \
                    const ELEM* qh = q + (long)h * D;                                                     \
                    const float* qfh = qf + (long)h * D;                                                  \
                    (void)qh; (void)qfh;                                                                  \
                    __m512 acc[16];                                                                       \
                    for (int j = 0; j < 16; j++) {                                                        \
                        if (j < n) QK_DOT_##SFX(DC, qh, qfh, krows[j] + koff, acc[j]);                    \
                        else acc[j] = _mm512_setzero_ps();                                                \
                    }                                                                                     \
                    _mm512_mask_storeu_ps(scores + (long)h * ctx + t0, tail16(n), _mm512_mul_ps(hsum16(acc), sc)); \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (int h = k0 * group; h < k1 * group; h++) softmax_row(scores + (long)h * ctx, ctx);          \
        for (int kvh = k0; kvh < k1; kvh++) {                                                             \
            pv_##SFX##_##DC(group, v_cache, table, block_size, tok_stride, (long)kvh * D, ctx,            \
                            scores + (long)kvh * group * ctx, ctx, 1, out + (long)kvh * group * D, D);    \
        }                                                                                                 \
    }
FOR_EACH_ATTENTION_VARIANT(DEFINE_FAST_ATTEND)
#define HAVE_FAST_ATTEND 1
// Rounds 16 fp32 lanes through the storage dtype, as torch's elementwise ops do.
static inline __m512 round_f32(__m512 v) { return v; }
#if defined(__AVX512BF16__)
static inline __m512 round_bf16(__m512 v) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#else
static inline __m512 round_bf16(__m512 v) {
    uint16_t tmp[16];
    store16_bf16(tmp, v);
    return ld16_bf16(tmp, 0xffff);
}
#endif
#endif

#ifdef HAVE_FAST_ATTEND
// Runs the fast kernel when head_dim allows it; 0 when the generic one must run.
#define FAST_ATTEND(SFX, D, ...)                                                                         \
    ((D) == 64 ? (attend_##SFX##_4(__VA_ARGS__), 1) : (D) == 128 ? (attend_##SFX##_8(__VA_ARGS__), 1) : 0)
#else
#define FAST_ATTEND(SFX, D, ...) 0
#endif

// One body for both dtypes: ELEM is the storage type, LOAD converts to float.
#define DEFINE_DECODE(NAME, ELEM, LOAD, STORE, SFX)                                                     \
    static void NAME##_one(const ELEM* q, const ELEM* k_cache, const ELEM* v_cache,                     \
                           const int32_t* table, int32_t ctx, ELEM* out, int kvh, int num_heads,        \
                           int num_kv_heads, int head_dim, int block_size, float scale, float* scores,  \
                           float* qf, float* acc, float* rowf) {                                        \
        const int group = num_heads / num_kv_heads;                                                      \
        const long tok_stride = (long)num_kv_heads * head_dim;                                           \
        for (int g = 0; g < group; g++) {                                                                \
            const ELEM* qh = q + (long)(kvh * group + g) * head_dim;                                     \
            for (int d = 0; d < head_dim; d++) qf[g * head_dim + d] = LOAD(qh[d]) * scale;               \
        }                                                                                                \
        /* scores[g, t] = q_g . k_t, block by block (no division per token). The cache is cold */     \
        /* after a layer's weights streamed through: each block prefetches the next one's K and V. */  \
        const long head_off = (long)kvh * head_dim;                                                      \
        const int row_bytes = head_dim * (int)sizeof(ELEM);                                              \
        for (int b = 0, t = 0; t < ctx; b++) {                                                           \
            const long base = (long)table[b] * block_size;                                               \
            const int n = ctx - t < block_size ? ctx - t : block_size;                                   \
            if (t + n < ctx) {                                                                           \
                const long next = (long)table[b + 1] * block_size;                                       \
                for (int i = 0; i < block_size; i++)                                                     \
                    for (int c = 0; c < row_bytes; c += 64) {                                            \
                        __builtin_prefetch((const char*)(k_cache + (next + i) * tok_stride + head_off) + c); \
                        __builtin_prefetch((const char*)(v_cache + (next + i) * tok_stride + head_off) + c); \
                    }                                                                                    \
            }                                                                                            \
            for (int i = 0; i < n; i++, t++) {                                                           \
                const float* kf = row_##SFX(k_cache + (base + i) * tok_stride + head_off, rowf, head_dim); \
                for (int g = 0; g < group; g++) scores[(long)g * ctx + t] = dot_f32(qf + g * head_dim, kf, head_dim); \
            }                                                                                            \
        }                                                                                                \
        for (int g = 0; g < group; g++) softmax_row(scores + (long)g * ctx, ctx);                        \
        memset(acc, 0, sizeof(float) * group * head_dim);                                                \
        for (int b = 0, t = 0; t < ctx; b++) {                                                           \
            const long base = (long)table[b] * block_size;                                               \
            const int n = ctx - t < block_size ? ctx - t : block_size;                                   \
            for (int i = 0; i < n; i++, t++) {                                                           \
                const float* vf = row_##SFX(v_cache + (base + i) * tok_stride + head_off, rowf, head_dim); \
                for (int g = 0; g < group; g++) axpy_f32(scores[(long)g * ctx + t], vf, acc + g * head_dim, head_dim); \
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
        const long per_thread = (long)num_heads * (max_ctx + 1) + 2L * num_heads * head_dim + head_dim + 16; \
        float* buffers = malloc(sizeof(float) * per_thread * num_threads);                             \
        if (!buffers) return 1;                                                                          \
        /* A parallel region costs a barrier: only worth it with enough context to read. */           \
        const int parallel = (long)num_seqs * num_kv_heads * max_ctx * head_dim > (1L << 13);            \
        /* Whole sequences per task when there are enough of them (contiguous blocks), */              \
        /* else one kv head per task (parallelism at small batch). */                                   \
        const int per_task = num_seqs >= 2 * num_threads ? num_kv_heads : 1;                            \
        const int tasks_per_seq = num_kv_heads / per_task;                                               \
        _Pragma("omp parallel for num_threads(num_threads) schedule(dynamic, 1) if(parallel)")          \
        for (long task = 0; task < (long)num_seqs * tasks_per_seq; task++) {                             \
            float* scores = buffers + per_thread * omp_get_thread_num();                                 \
            float* qf = scores + (long)num_heads * (max_ctx + 1);                                        \
            float* acc = qf + num_heads * head_dim;                                                      \
            float* rowf = acc + num_heads * head_dim;                                                    \
            const int s = (int)(task / tasks_per_seq), k0 = (int)(task % tasks_per_seq) * per_task;      \
            if (FAST_ATTEND(SFX, head_dim, q + (long)s * num_heads * head_dim, k_cache, v_cache,         \
                            block_tables + (long)s * max_blocks, context_lens[s],                        \
                            out + (long)s * num_heads * head_dim, k0, k0 + per_task, group,             \
                            num_kv_heads, block_size, scale, scores, qf))                                \
                continue;                                                                                \
            for (int kvh = k0; kvh < k0 + per_task; kvh++)                                               \
                NAME##_one(q + (long)s * num_heads * head_dim, k_cache, v_cache,                         \
                           block_tables + (long)s * max_blocks, context_lens[s],                         \
                           out + (long)s * num_heads * head_dim, kvh, num_heads, num_kv_heads,           \
                           head_dim, block_size, scale, scores, qf, acc, rowf);                          \
        }                                                                                                \
        free(buffers);                                                                                   \
        return 0;                                                                                   \
    }

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
DEFINE_DECODE(paged_decode_f32, float, LOAD_F32, STORE_F32, f32)
DEFINE_DECODE(paged_decode_bf16, uint16_t, bf16_to_f32, f32_to_bf16, bf16)

// ---------------------------------------------------------------------------
// Prefill attention: causal, variable-length query chunks packed back to back,
// over each sequence's cached prefix, read in place through its block table.
//   query, out: [num_tokens, num_heads, head_dim]; query_start_loc: [num_seqs + 1]
//   context_lens: [num_seqs] tokens cached after this step (prefix plus chunk);
//   a sequence's queries sit at the last positions of its context.
// One task = (sequence, kv head, tile of up to 16 queries), for each query head
// of the group in turn: the scores of each row up to its own position, their
// softmax, then P @ V with each V row loaded once per register tile of query rows.
// A tile of PREFILL_MIN_LANES queries or more runs transposed (prefill_tile_*),
// a smaller one a row at a time (prefill_rows_*: the decode rows of a mixed step,
// a chunk's last few queries), where 16 lanes per key would mostly be padding.
// 12 x 128-token prompts, SmolLM2's 9 / 3 heads of 64, bf16: 1.67 ms a layer
// row by row, 0.86 ms transposed. Head dims 64 and 128 (AVX-512); returns 2 for
// others (the caller runs the torch reference), 1 if scratch allocation fails.
#ifdef HAVE_FAST_ATTEND
#define PREFILL_QT 16
// 16 tiles of n queries over 200 cached keys: at n = 6 a row at a time is 8% faster,
// at n = 8 the transposed tile 14%.
#define PREFILL_MIN_LANES 7
// The transposed tile: query rows sit in the 16 lanes of a vector, so the scores
// of one key for all of them are one vector: QK needs no horizontal sums (a row at
// a time sums 16 keys' vectors into one with 45 shuffles and adds) and the softmax
// runs down the keys with plain vector ops. q is transposed once per tile: bf16
// with AVX512-BF16 keeps (d, d + 1) pairs as dwords for vdpbf16ps against a
// broadcast pair of the K row; otherwise one float per d, pre-scaled.
#if defined(__AVX512BF16__)
#define QT_UNITS_bf16(D) ((D) / 2)
#define QT_PREP_bf16(D, qh, qrow, nq, scale, qt)                                                         \
    for (int u = 0; u < (D) / 2; u++)                                                                    \
        for (int r = 0; r < 16; r++)                                                                     \
            ((uint32_t*)(qt))[u * 16 + r] = r < (nq) ? ((const uint32_t*)((qh) + r * (qrow)))[u] : 0u
#define QT_DOT_bf16(acc, qv, krow, u)                                                                    \
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(((const int32_t*)(krow))[u]), (__m512bh)(qv))
#else
#define QT_UNITS_bf16(D) (D)
#define QT_PREP_bf16(D, qh, qrow, nq, scale, qt) QT_PREP_GENERIC(bf16_to_f32, D, qh, qrow, nq, scale, qt)
#define QT_DOT_bf16(acc, qv, krow, u) acc = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_f32((krow)[u])), qv, acc)
#endif
#define QT_UNITS_f32(D) (D)
#define QT_PREP_f32(D, qh, qrow, nq, scale, qt) QT_PREP_GENERIC(LOAD_F32, D, qh, qrow, nq, scale, qt)
#define QT_DOT_f32(acc, qv, krow, u) acc = _mm512_fmadd_ps(_mm512_set1_ps((krow)[u]), qv, acc)
#define QT_PREP_GENERIC(LOAD, D, qh, qrow, nq, scale, qt)                                                \
    for (int u = 0; u < (D); u++)                                                                        \
        for (int r = 0; r < 16; r++) ((float*)(qt))[u * 16 + r] = r < (nq) ? LOAD((qh)[r * (qrow) + u]) * (scale) : 0.f

// P @ V of a tile from the exponentials E[t * 16 + r] and their row sums' inverse:
// fp32 P through pv_* (P[r][t] at stride 16 per key), or, bf16 with AVX512-BF16,
// P rounded to bf16 and paired over keys for vdpbf16ps against V rows paired the
// same way (pv_pairs_*): half the multiply instructions of fp32 P.
#define PREFILL_PV_FLOAT(SFX, DC, RT, E, inv, nkeys, pos0, nq, v_cache, table, block_size, tok_stride, voff, out, qrow) \
    do {                                                                                                 \
        for (int t = 0; t < (nkeys); t++) _mm512_storeu_ps((E) + (long)t * 16, _mm512_mul_ps(_mm512_loadu_ps((E) + (long)t * 16), inv)); \
        for (int r0 = 0; r0 < (nq); r0 += (RT)) {                                                        \
            const int rn = (nq) - r0 < (RT) ? (nq) - r0 : (RT);                                          \
            pv_##SFX##_##DC(rn, v_cache, table, block_size, tok_stride, voff, (pos0) + r0 + rn, (E) + r0, 1, 16, \
                            (out) + r0 * (qrow), qrow);                                                  \
        }                                                                                                \
    } while (0)
#define PREFILL_PV_f32(...) PREFILL_PV_FLOAT(f32, __VA_ARGS__)
#if defined(__AVX512BF16__)
// Rows r0 .. r0 + G of P (bf16 pairs P2[tp * 16 + r] = (P[r][2tp], P[r][2tp + 1])) times V.
// V rows t, t + 1 interleave by 16-bit words within each 128-bit lane, so accumulator
// 2c holds d = 32c + 8L + j and 2c + 1 holds 32c + 8L + 4 + j (lane L, j < 4): one
// two-source permute per 32 outputs puts them back in order.
#define DEFINE_PV_PAIRS(DC, G)                                                                           \
    static inline void pv_pairs_##DC##_##G(const uint16_t* v_cache, const int32_t* table, int block_size, \
                                           long tok_stride, long voff, int nkeys, const uint32_t* p2,    \
                                           uint16_t* out, long ostride) {                                 \
        __m512 o[G][DC];                                                                                  \
        for (int g = 0; g < (G); g++)                                                                     \
            for (int c = 0; c < (DC); c++) o[g][c] = _mm512_setzero_ps();                                 \
        int b = 0, i = 0;                                                                                 \
        for (int t = 0; t < nkeys; t += 2) {                                                              \
            const uint16_t* v0 = v_cache + ((long)table[b] * block_size + i) * tok_stride + voff;         \
            if (++i == block_size) i = 0, b++;                                                            \
            const uint16_t* v1 = t + 1 < nkeys ? v_cache + ((long)table[b] * block_size + i) * tok_stride + voff : 0; \
            if (++i == block_size) i = 0, b++;                                                            \
            const uint32_t* pt = p2 + (long)(t / 2) * 16;                                                 \
            for (int c = 0; c < (DC) / 2; c++) {                                                          \
                const __m512i a = _mm512_loadu_si512(v0 + 32 * c);                                        \
                const __m512i z = v1 ? _mm512_loadu_si512(v1 + 32 * c) : _mm512_setzero_si512();          \
                const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, z), hi = (__m512bh)_mm512_unpackhi_epi16(a, z); \
                for (int g = 0; g < (G); g++) {                                                           \
                    const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)pt[g]);                          \
                    o[g][2 * c] = _mm512_dpbf16_ps(o[g][2 * c], pb, lo);                                  \
                    o[g][2 * c + 1] = _mm512_dpbf16_ps(o[g][2 * c + 1], pb, hi);                          \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);  \
        const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31); \
        for (int g = 0; g < (G); g++)                                                                     \
            for (int c = 0; c < (DC) / 2; c++) {                                                          \
                store16_bf16(out + g * ostride + 32 * c, _mm512_permutex2var_ps(o[g][2 * c], first, o[g][2 * c + 1])); \
                store16_bf16(out + g * ostride + 32 * c + 16, _mm512_permutex2var_ps(o[g][2 * c], second, o[g][2 * c + 1])); \
            }                                                                                             \
    }
#define DEFINE_PV_PAIRS_ALL(DC)                                                                          \
    DEFINE_PV_PAIRS(DC, 1) DEFINE_PV_PAIRS(DC, 2) DEFINE_PV_PAIRS(DC, 3) DEFINE_PV_PAIRS(DC, 4)          \
    DEFINE_PV_PAIRS(DC, 5) DEFINE_PV_PAIRS(DC, 6)                                                        \
    static inline void pv_pairs_##DC(int g, const uint16_t* v_cache, const int32_t* table, int block_size, \
                                     long tok_stride, long voff, int nkeys, const uint32_t* p2, uint16_t* out, \
                                     long ostride) {                                                      \
        switch (g) {                                                                                      \
            case 1: pv_pairs_##DC##_1(v_cache, table, block_size, tok_stride, voff, nkeys, p2, out, ostride); break; \
            case 2: pv_pairs_##DC##_2(v_cache, table, block_size, tok_stride, voff, nkeys, p2, out, ostride); break; \
            case 3: pv_pairs_##DC##_3(v_cache, table, block_size, tok_stride, voff, nkeys, p2, out, ostride); break; \
            case 4: pv_pairs_##DC##_4(v_cache, table, block_size, tok_stride, voff, nkeys, p2, out, ostride); break; \
            case 5: pv_pairs_##DC##_5(v_cache, table, block_size, tok_stride, voff, nkeys, p2, out, ostride); break; \
            default: pv_pairs_##DC##_6(v_cache, table, block_size, tok_stride, voff, nkeys, p2, out, ostride); break; \
        }                                                                                                 \
    }
DEFINE_PV_PAIRS_ALL(4)
DEFINE_PV_PAIRS_ALL(8)
#define PREFILL_PV_bf16(DC, RT, E, inv, nkeys, pos0, nq, v_cache, table, block_size, tok_stride, voff, out, qrow) \
    do {                                                                                                 \
        /* E -> P2 in place: pair tp is written over E[tp], already read (tp <= 2 tp). */               \
        const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, \
                                                    23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0); \
        for (int t = 0; t < (nkeys); t += 2) {                                                           \
            const __m512 e0 = _mm512_mul_ps(_mm512_loadu_ps((E) + (long)t * 16), inv);                   \
            const __m512 e1 = t + 1 < (nkeys) ? _mm512_mul_ps(_mm512_loadu_ps((E) + (long)(t + 1) * 16), inv) : _mm512_setzero_ps(); \
            const __m512i w = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);                                      \
            _mm512_storeu_si512((E) + (long)(t / 2) * 16, _mm512_permutexvar_epi16(interleave, w));      \
        }                                                                                                \
        for (int r0 = 0; r0 < (nq); r0 += (RT)) {                                                        \
            const int rn = (nq) - r0 < (RT) ? (nq) - r0 : (RT);                                          \
            pv_pairs_##DC(rn, v_cache, table, block_size, tok_stride, voff, (pos0) + r0 + rn,            \
                          (const uint32_t*)(E) + r0, (out) + r0 * (qrow), qrow);                         \
        }                                                                                                \
    } while (0)
#else
#define PREFILL_PV_bf16(...) PREFILL_PV_FLOAT(bf16, __VA_ARGS__)
#endif

// The lanes (query rows pos0 + r of `rows`) that see key t: every row up to pos0, then row r from t = pos0 + r.
static inline __mmask16 causal_lanes(int t, int pos0, __mmask16 rows) {
    return t <= pos0 ? rows : rows & (__mmask16)(0xffffu << (t - pos0));
}
#define PREFILL_KT 8 /* keys per register tile of QK */
#define DEFINE_PREFILL_TILE(SFX, ELEM, LD, DC)                                                           \
    static void prefill_tile_##SFX##_##DC(const ELEM* q, const ELEM* k_cache, const ELEM* v_cache,       \
                                          const int32_t* table, int pos0, int nq, ELEM* out,             \
                                          int kvh, int group, int num_heads, int num_kv_heads,           \
                                          int block_size, float scale, float* S, float* qt) {             \
        enum { D = DC * 16, RT = 24 / DC, U = QT_UNITS_##SFX(D) };                                       \
        const long tok_stride = (long)num_kv_heads * D, qrow = (long)num_heads * D;                       \
        const int nkeys = pos0 + nq; /* keys 0 .. last query's position */                                \
        const __m512 sc = _mm512_set1_ps(QK_SCALE_##SFX(scale));                                          \
        const __mmask16 rows = tail16(nq);                                                               \
        for (int g = 0; g < group; g++) {                                                                 \
            const int h = kvh * group + g;                                                                \
            QT_PREP_##SFX(D, q + (long)h * D, qrow, nq, scale, qt);                                       \
            /* S[t * 16 + r] = q_r . k_t */                                                               \
            for (int t0 = 0; t0 < nkeys; t0 += PREFILL_KT) {                                              \
                const int n = nkeys - t0 < PREFILL_KT ? nkeys - t0 : PREFILL_KT;                          \
                const ELEM* krows[PREFILL_KT];                                                            \
                int b = t0 / block_size, i = t0 % block_size;                                             \
                for (int j = 0; j < PREFILL_KT; j++) {                                                    \
                    krows[j] = k_cache + ((long)table[b] * block_size + i) * tok_stride + (long)kvh * D;  \
                    if (j + 1 < n && ++i == block_size) i = 0, b++;                                       \
                }                                                                                         \
                __m512 acc[PREFILL_KT];                                                                   \
                for (int j = 0; j < PREFILL_KT; j++) acc[j] = _mm512_setzero_ps();                        \
                for (int u = 0; u < U; u++) {                                                             \
                    const __m512 qv = _mm512_loadu_ps((const float*)qt + 16 * u);                         \
                    for (int j = 0; j < PREFILL_KT; j++) QT_DOT_##SFX(acc[j], qv, krows[j], u);           \
                }                                                                                         \
                for (int j = 0; j < n; j++) _mm512_storeu_ps(S + (long)(t0 + j) * 16, _mm512_mul_ps(acc[j], sc)); \
            }                                                                                             \
            /* Softmax down the keys; lane r sees keys up to its position pos0 + r. */                   \
            __m512 m = _mm512_set1_ps(-INFINITY);                                                         \
            for (int t = 0; t < nkeys; t++) {                                                             \
                const __mmask16 ok = causal_lanes(t, pos0, rows);                                         \
                m = _mm512_mask_max_ps(m, ok, m, _mm512_loadu_ps(S + (long)t * 16));                      \
            }                                                                                             \
            __m512 sum = _mm512_setzero_ps();                                                             \
            for (int t = 0; t < nkeys; t++) {                                                             \
                const __mmask16 ok = causal_lanes(t, pos0, rows);                                         \
                const __m512 e = _mm512_maskz_mov_ps(ok, exp512(_mm512_sub_ps(_mm512_loadu_ps(S + (long)t * 16), m))); \
                _mm512_storeu_ps(S + (long)t * 16, e);                                                    \
                sum = _mm512_add_ps(sum, e);                                                              \
            }                                                                                             \
            const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_mask_blend_ps(rows, _mm512_set1_ps(1.f), sum)); \
            PREFILL_PV_##SFX(DC, RT, S, inv, nkeys, pos0, nq, v_cache, table, block_size, tok_stride,     \
                             (long)kvh * D, out + (long)h * D, qrow);                                     \
        }                                                                                                 \
    }
FOR_EACH_ATTENTION_VARIANT(DEFINE_PREFILL_TILE)
// A row at a time: scores against 16 keys at a time (one horizontal sum per 16),
// each row's softmax up to its own position, then P @ V.
#define DEFINE_PREFILL_ROWS(SFX, ELEM, LD, DC)                                                           \
    static void prefill_rows_##SFX##_##DC(const ELEM* q, const ELEM* k_cache, const ELEM* v_cache,       \
                                          const int32_t* table, int pos0, int nq, ELEM* out,     \
                                          int kvh, int group, int num_heads, int num_kv_heads,           \
                                          int block_size, float scale, float* S, float* qf) {             \
        enum { D = DC * 16, RT = 24 / DC };                                                               \
        const long tok_stride = (long)num_kv_heads * D, qrow = (long)num_heads * D;                       \
        const int nkeys = pos0 + nq; /* keys 0 .. last query's position */                                \
        const __m512 sc = _mm512_set1_ps(QK_SCALE_##SFX(scale));                                          \
        const ELEM* krows[16];                                                                            \
        for (int g = 0; g < group; g++) {                                                                 \
            const int h = kvh * group + g;                                                                \
            for (int r = 0; r < nq; r++) {                                                                \
                const ELEM* qh = q + r * qrow + (long)h * D;                                              \
                float* qfr = qf + (long)r * D;                                                            \
                (void)qh; (void)qfr;                                                                      \
                QK_PREP_##SFX(DC, qh, scale, qfr);                                                        \
            }                                                                                             \
            for (int t0 = 0; t0 < nkeys; t0 += 16) {                                                      \
                const int n = nkeys - t0 < 16 ? nkeys - t0 : 16;                                          \
                int b = t0 / block_size, i = t0 % block_size;                                             \
                for (int j = 0; j < n; j++) {                                                             \
                    krows[j] = k_cache + ((long)table[b] * block_size + i) * tok_stride + (long)kvh * D;  \
                    if (++i == block_size) i = 0, b++;                                                    \
                }                                                                                         \
                for (int r = 0; r < nq; r++) {                                                            \
                    if (t0 > pos0 + r) continue; /* every key of the chunk is in this row's future */    \
                    const ELEM* qh = q + r * qrow + (long)h * D;                                          \
                    const float* qfr = qf + (long)r * D;                                                  \
                    (void)qh; (void)qfr;                                                                  \
                    __m512 acc[16];                                                               \
                    for (int j = 0; j < 16; j++) {                                                        \
                        if (j < n) QK_DOT_##SFX(DC, qh, qfr, krows[j], acc[j]);                           \
                        else acc[j] = _mm512_setzero_ps();                                                \
                    }                                                                                     \
                    _mm512_mask_storeu_ps(S + (long)r * nkeys + t0, tail16(n), _mm512_mul_ps(hsum16(acc), sc)); \
                }                                                                                         \
            }                                                                                             \
            for (int r = 0; r < nq; r++) {                                                                \
                float* sr = S + (long)r * nkeys;                                                          \
                softmax_row(sr, pos0 + r + 1);                                                            \
                for (int t = pos0 + r + 1; t < nkeys; t++) sr[t] = 0.f;                                   \
            }                                                                                             \
            for (int r0 = 0; r0 < nq; r0 += RT) {                                                         \
                const int rn = nq - r0 < RT ? nq - r0 : RT;                                               \
                pv_##SFX##_##DC(rn, v_cache, table, block_size, tok_stride, (long)kvh * D,                \
                                pos0 + r0 + rn, S + (long)r0 * nkeys, nkeys, 1, out + r0 * qrow + (long)h * D, qrow); \
            }                                                                                             \
        }                                                                                                 \
    }
FOR_EACH_ATTENTION_VARIANT(DEFINE_PREFILL_ROWS)
#endif

#define DEFINE_PREFILL(NAME, ELEM, SFX)                                                                  \
    int NAME(const ELEM* q, const ELEM* k_cache, const ELEM* v_cache, const int32_t* block_tables,       \
             const int64_t* query_start_loc, const int32_t* context_lens, ELEM* out, int num_seqs,        \
             int num_heads, int num_kv_heads, int head_dim, int block_size, int max_blocks, float scale,   \
             int num_threads) {                                                                           \
        (void)q; (void)k_cache; (void)v_cache; (void)block_tables; (void)query_start_loc;                \
        (void)context_lens; (void)out; (void)num_seqs; (void)num_heads; (void)num_kv_heads;              \
        (void)block_size; (void)max_blocks; (void)scale; (void)num_threads;                              \
        PREFILL_BODY(SFX, ELEM)                                                                           \
    }

#ifdef HAVE_FAST_ATTEND
// KIND##_SFX_4 or _8 by head_dim.
#define PREFILL_RUN(KIND, SFX, head_dim, ...)                                                            \
    do {                                                                                                 \
        if ((head_dim) == 64) KIND##_##SFX##_4(__VA_ARGS__); else KIND##_##SFX##_8(__VA_ARGS__);          \
    } while (0)
#define PREFILL_BODY(SFX, ELEM)                                                                                 \
        if (head_dim != 64 && head_dim != 128) return 2;                                                  \
        const int group = num_heads / num_kv_heads;                                                       \
        int max_ctx = 0;                                                                                  \
        long num_tasks = 0;                                                                               \
        for (int s = 0; s < num_seqs; s++) {                                                              \
            const int nq = (int)(query_start_loc[s + 1] - query_start_loc[s]);                            \
            max_ctx = context_lens[s] > max_ctx ? context_lens[s] : max_ctx;                              \
            num_tasks += (long)num_kv_heads * ((nq + PREFILL_QT - 1) / PREFILL_QT);                        \
        }                                                                                                 \
        /* task -> (sequence, kv head, tile): a flat list, longest contexts first. */                   \
        int* tasks = malloc(sizeof(int) * 3 * (num_tasks + 1));                                          \
        const long per_thread = (long)PREFILL_QT * (max_ctx + 16) + (long)PREFILL_QT * head_dim + 16;     \
        float* buffers = malloc(sizeof(float) * per_thread * num_threads);                              \
        if (!tasks || !buffers) { free(tasks); free(buffers); return 1; }                                 \
        long n = 0;                                                                                       \
        for (int s = num_seqs - 1; s >= 0; s--) {                                                         \
            const int nq = (int)(query_start_loc[s + 1] - query_start_loc[s]);                            \
            for (int tile = (nq + PREFILL_QT - 1) / PREFILL_QT - 1; tile >= 0; tile--)                    \
                for (int kvh = 0; kvh < num_kv_heads; kvh++) {                                            \
                    tasks[3 * n] = s; tasks[3 * n + 1] = kvh; tasks[3 * n + 2] = tile; n++;               \
                }                                                                                         \
        }                                                                                                 \
        _Pragma("omp parallel for num_threads(num_threads) schedule(dynamic, 1)")                         \
        for (long task = 0; task < num_tasks; task++) {                                                   \
            const int s = tasks[3 * task], kvh = tasks[3 * task + 1], tile = tasks[3 * task + 2];         \
            float* S = buffers + per_thread * omp_get_thread_num();                                       \
            float* qf = S + (long)PREFILL_QT * (max_ctx + 16);                                            \
            const long q0 = query_start_loc[s] + (long)tile * PREFILL_QT;                                 \
            const int nq_seq = (int)(query_start_loc[s + 1] - query_start_loc[s]);                        \
            const int nq = nq_seq - tile * PREFILL_QT < PREFILL_QT ? nq_seq - tile * PREFILL_QT : PREFILL_QT; \
            const int pos0 = context_lens[s] - nq_seq + tile * PREFILL_QT;                                \
            const ELEM* qt = q + q0 * num_heads * head_dim;                                               \
            ELEM* ot = out + q0 * num_heads * head_dim;                                                   \
            const int32_t* table = block_tables + (long)s * max_blocks;                                   \
            if (nq < PREFILL_MIN_LANES)                                                                   \
                PREFILL_RUN(prefill_rows, SFX, head_dim, qt, k_cache, v_cache, table, pos0, nq, ot, kvh, group,  \
                            num_heads, num_kv_heads, block_size, scale, S, qf);                           \
            else                                                                                          \
                PREFILL_RUN(prefill_tile, SFX, head_dim, qt, k_cache, v_cache, table, pos0, nq, ot, kvh, group,  \
                            num_heads, num_kv_heads, block_size, scale, S, qf);                           \
        }                                                                                                 \
        free(tasks);                                                                                      \
        free(buffers);                                                                                    \
        return 0;
#else
#define PREFILL_BODY(SFX, ELEM) (void)head_dim; return 2;
#endif
DEFINE_PREFILL(paged_prefill_f32, float, f32)
DEFINE_PREFILL(paged_prefill_bf16, uint16_t, bf16)

// ---------------------------------------------------------------------------
// RMSNorm, optionally fused with the residual add, in Llama's numerics:
// normalize in fp32, round to the storage dtype, then scale by the weight.
//   x, residual, out, residual_out: [num_tokens, dim]; weight: [dim]

#if defined(__AVX512F__)
// 16 lanes at a time (dim a multiple of 16); the same roundings as the scalar rows.
#define RMS_ROW_VECTOR(SFX, xt, res, weight, ot, rt, dim, eps)                                           \
    if ((dim) % 16 == 0) {                                                                               \
        __m512 ss = _mm512_setzero_ps();                                                                 \
        for (int d = 0; d < (dim); d += 16) {                                                            \
            __m512 v = ld16_##SFX((xt) + d, 0xffff);                                                     \
            if (res) {                                                                                   \
                v = round_##SFX(_mm512_add_ps(v, ld16_##SFX((res) + d, 0xffff)));                        \
                store16_##SFX((rt) + d, v);                                                              \
            }                                                                                            \
            ss = _mm512_fmadd_ps(v, v, ss);                                                              \
        }                                                                                                \
        const __m512 r = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(ss) / (dim) + (eps)));          \
        const ELEM_T_##SFX* src = (res) ? (rt) : (xt);                                                   \
        for (int d = 0; d < (dim); d += 16) {                                                            \
            const __m512 n = round_##SFX(_mm512_mul_ps(ld16_##SFX(src + d, 0xffff), r));                 \
            store16_##SFX((ot) + d, _mm512_mul_ps(ld16_##SFX((weight) + d, 0xffff), n));                 \
        }                                                                                                \
        continue;                                                                                        \
    }
#define ELEM_T_f32 float
#define ELEM_T_bf16 uint16_t
#else
#define RMS_ROW_VECTOR(SFX, xt, res, weight, ot, rt, dim, eps)
#endif

#define DEFINE_RMS_NORM(NAME, ELEM, LOAD, STORE, SFX)                                                   \
    void NAME(const ELEM* x, const ELEM* residual, const ELEM* weight, ELEM* out, ELEM* residual_out,  \
              int num_tokens, int dim, float eps, int num_threads) {                                    \
        _Pragma("omp parallel for num_threads(num_threads) if(num_tokens > 16)")                        \
        for (int t = 0; t < num_tokens; t++) {                                                          \
            const ELEM* xt = x + (long)t * dim;                                                         \
            ELEM* ot = out + (long)t * dim;                                                             \
            ELEM* rt = residual ? residual_out + (long)t * dim : 0;                                     \
            const ELEM* res = residual ? residual + (long)t * dim : 0;                                  \
            RMS_ROW_VECTOR(SFX, xt, res, weight, ot, rt, dim, eps)                                      \
            float ss = 0.f;                                                                             \
            for (int d = 0; d < dim; d++) {                                                             \
                float v = LOAD(xt[d]);                                                                  \
                if (residual) {                                                                         \
                    ELEM sum = STORE(v + LOAD(res[d]));                                                 \
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

DEFINE_RMS_NORM(rms_norm_f32, float, LOAD_F32, STORE_F32, f32)
DEFINE_RMS_NORM(rms_norm_bf16, uint16_t, bf16_to_f32, f32_to_bf16, bf16)

// ---------------------------------------------------------------------------
// Rotary embedding (half-split layout) of q and k, written to q_out and k_out.
// q rows may be strided (a view into the fused qkv projection): q_stride and
// k_stride are the element distances between consecutive tokens.
//   cos_sin: [max_positions, head_dim] fp32, cos in the first half, sin in the second.
// Each product is rounded to the storage dtype as torch's elementwise ops do.

#if defined(__AVX512F__)
// 16 lanes at a time when half a head is whole vectors (head_dim 32, 64, 96 or 128), cos and sin
// loaded once per call; the same roundings as the scalar loop (x2 * -s rounds as -(x2 * s)).
// One 512-token prefill pass of SmolLM2 (30 layers, 9 + 3 heads of 64): 4.4 -> 2.5 ms.
#define ROTARY_HEADS_VECTOR(SFX, x, o, heads, head_dim, cs)                                              \
    if ((head_dim) % 32 == 0 && (head_dim) <= 128) {                                                     \
        const int half = (head_dim) / 2, nv = half / 16;                                                 \
        __m512 c[4], s[4];                                                                               \
        for (int v = 0; v < nv; v++) {                                                                   \
            c[v] = round_##SFX(_mm512_loadu_ps((cs) + 16 * v));                                          \
            s[v] = round_##SFX(_mm512_loadu_ps((cs) + half + 16 * v));                                   \
        }                                                                                                \
        for (int h = 0; h < (heads); h++) {                                                              \
            const ELEM_T_##SFX* xh = (x) + (long)h * (head_dim);                                         \
            ELEM_T_##SFX* oh = (o) + (long)h * (head_dim);                                               \
            for (int v = 0; v < nv; v++) {                                                               \
                const __m512 x1 = ld16_##SFX(xh + 16 * v, 0xffff);                                       \
                const __m512 x2 = ld16_##SFX(xh + half + 16 * v, 0xffff);                                \
                store16_##SFX(oh + 16 * v, _mm512_sub_ps(round_##SFX(_mm512_mul_ps(x1, c[v])),          \
                                                         round_##SFX(_mm512_mul_ps(x2, s[v]))));         \
                store16_##SFX(oh + half + 16 * v, _mm512_add_ps(round_##SFX(_mm512_mul_ps(x2, c[v])),   \
                                                                round_##SFX(_mm512_mul_ps(x1, s[v])))); \
            }                                                                                            \
        }                                                                                                \
        return;                                                                                          \
    }
#else
#define ROTARY_HEADS_VECTOR(SFX, x, o, heads, head_dim, cs)
#endif

#define DEFINE_ROTARY(NAME, ELEM, LOAD, STORE, SFX)                                                     \
    static inline void NAME##_heads(const ELEM* x, ELEM* o, int heads, int head_dim, const float* cs) { \
        ROTARY_HEADS_VECTOR(SFX, x, o, heads, head_dim, cs)                                             \
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

DEFINE_ROTARY(rotary_f32, float, LOAD_F32, STORE_F32, f32)
DEFINE_ROTARY(rotary_bf16, uint16_t, bf16_to_f32, f32_to_bf16, bf16)

// ---------------------------------------------------------------------------
// silu(gate) * up over the fused gate/up projection, rounding as torch does
// (silu's result is rounded to the storage dtype before the product).
//   x: [num_tokens, 2 * dim] (gate first); out: [num_tokens, dim]

#if defined(__AVX512F__)
// 16 lanes at a time: ROUND emulates the storage dtype's rounding of silu's result.
#define SILU_VECTOR(ELEM, SFX, gate, up, o, dim)                                                        \
    int d = 0;                                                                                           \
    for (; d + 16 <= dim; d += 16) {                                                                     \
        const __m512 g = ld16_##SFX(gate + d, 0xffff);                                                   \
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g)))); \
        store16_##SFX(o + d, _mm512_mul_ps(round_##SFX(silu), ld16_##SFX(up + d, 0xffff)));             \
    }
#else
#define SILU_VECTOR(ELEM, SFX, gate, up, o, dim) int d = 0;
#endif

#define DEFINE_SILU_AND_MUL(NAME, ELEM, LOAD, STORE, SFX)                                               \
    void NAME(const ELEM* x, ELEM* out, int num_tokens, int dim, int num_threads) {                     \
        _Pragma("omp parallel for num_threads(num_threads) if((long)num_tokens * dim > 65536)")         \
        for (int t = 0; t < num_tokens; t++) {                                                          \
            const ELEM* gate = x + (long)t * 2 * dim;                                                   \
            const ELEM* up = gate + dim;                                                                \
            ELEM* o = out + (long)t * dim;                                                              \
            SILU_VECTOR(ELEM, SFX, gate, up, o, dim)                                                    \
            for (; d < dim; d++) {                                                                      \
                const float g = LOAD(gate[d]);                                                          \
                o[d] = STORE(LOAD(STORE(g / (1.f + expf(-g)))) * LOAD(up[d]));                          \
            }                                                                                           \
        }                                                                                               \
    }

DEFINE_SILU_AND_MUL(silu_and_mul_f32, float, LOAD_F32, STORE_F32, f32)
DEFINE_SILU_AND_MUL(silu_and_mul_bf16, uint16_t, bf16_to_f32, f32_to_bf16, bf16)

// ---------------------------------------------------------------------------
// Write each token's K and V into its cache slot.
//   key, value: [num_tokens, num_kv_heads * head_dim] rows at any stride
//   k_cache, v_cache: [num_slots, num_kv_heads * head_dim]; slot_mapping: [num_tokens]

// Constrained decoding's token mask (engine/structured_output.py), in place: logits[rows[k], t] = -inf
// wherever bit t of mask row k is clear (token t at bit t % 32 of word t / 32; tokens past the mask
// are cleared too). A word with every bit set is skipped, one with none is filled whole: a JSON
// grammar's mask is mostly such words.
void apply_token_bitmask_f32(float* logits, const int32_t* mask, const int64_t* rows, int num_rows, int vocab,
                             int width, long logits_stride) {
    const float ninf = -INFINITY;
    for (int k = 0; k < num_rows; ++k) {
        float* row = logits + rows[k] * logits_stride;
        const uint32_t* m = (const uint32_t*)(mask + (long)k * width);
        for (int w = 0; w < width && w * 32 < vocab; ++w) {
            const uint32_t bits = m[w];
            if (bits == 0xffffffffu) continue;
            const int base = w * 32, n = vocab - base < 32 ? vocab - base : 32;
            if (bits == 0) {
                for (int b = 0; b < n; ++b) row[base + b] = ninf;
            } else {
                for (int b = 0; b < n; ++b)
                    if (!((bits >> b) & 1u)) row[base + b] = ninf;
            }
        }
        for (int t = width * 32; t < vocab; ++t) row[t] = ninf;
    }
}

void write_kv_cache(const char* key, const char* value, char* k_cache, char* v_cache, const int64_t* slot_mapping,
                    int num_tokens, long row_bytes, long key_stride_bytes, long value_stride_bytes) {
    for (int t = 0; t < num_tokens; t++) {
        const long slot = slot_mapping[t];
        memcpy(k_cache + slot * row_bytes, key + t * key_stride_bytes, row_bytes);
        memcpy(v_cache + slot * row_bytes, value + t * value_stride_bytes, row_bytes);
    }
}

// ---------------------------------------------------------------------------
// Packed-weight matmul: y[M, N] = x[M, K] @ w[N, K].T (+ bias), for any M.
// Weights are repacked once into panels of 64 output columns, K-major inside a
// panel, so that 64 outputs accumulate in 4 vectors with no horizontal sums and
// each panel streams front to back:
//   fp32: w[64p + j, k]        at [p][k][j]       (K x 64 per panel)
//   bf16: w[64p + j, 2i + e]   at [p][i][j][e]    (ceil(K/2) x 64 x 2: AVX512-BF16 pairs)
// Columns past N and an odd K's last element are zero. Up to 4 rows of x go
// through a panel at once (4 x 4 accumulators); a panel (K x 64) stays in L2
// while every row of x passes through it.

#define PANEL 64

long packed_numel_f32(int N, int K) { return (long)((N + PANEL - 1) / PANEL) * K * PANEL; }
long packed_numel_bf16(int N, int K) { return (long)((N + PANEL - 1) / PANEL) * ((K + 1) / 2) * PANEL * 2; }

void pack_weight_f32(const float* w, float* out, int N, int K, int num_threads) {
    const int P = (N + PANEL - 1) / PANEL;
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int p = 0; p < P; p++)
        for (int k = 0; k < K; k++)
            for (int j = 0; j < PANEL; j++) {
                const int n = p * PANEL + j;
                out[((long)p * K + k) * PANEL + j] = n < N ? w[(long)n * K + k] : 0.f;
            }
}

void pack_weight_bf16(const uint16_t* w, uint16_t* out, int N, int K, int num_threads) {
    const int P = (N + PANEL - 1) / PANEL, K2 = (K + 1) / 2;
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int p = 0; p < P; p++)
        for (int i = 0; i < K2; i++)
            for (int j = 0; j < PANEL; j++)
                for (int e = 0; e < 2; e++) {
                    const int n = p * PANEL + j, k = 2 * i + e;
                    out[(((long)p * K2 + i) * PANEL + j) * 2 + e] = (n < N && k < K) ? w[(long)n * K + k] : 0;
                }
}

// Rows of x per microkernel call: 6 x 4 fp32 accumulators (24 of 32 registers)
// reuse each loaded weight vector 6 times; bf16 stays at 4 rows.
#define MR_MAX 6
#define MR_f32 6
#define MR_bf16 4
#if defined(__AVX512F__)
static inline void panel_f32(const float* x, long ldx, int mr, const float* panel, int K, __m512 acc[MR_MAX][4]) {
    for (int m = 0; m < MR_MAX; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
#define PANEL_F32_BODY(MR)                                                                              \
    for (int k = 0; k < K; k++) {                                                                        \
        const float* pw = panel + (long)k * PANEL;                                                       \
        const __m512 w0 = _mm512_loadu_ps(pw), w1 = _mm512_loadu_ps(pw + 16);                            \
        const __m512 w2 = _mm512_loadu_ps(pw + 32), w3 = _mm512_loadu_ps(pw + 48);                       \
        for (int m = 0; m < MR; m++) {                                                                   \
            const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);                                            \
            acc[m][0] = _mm512_fmadd_ps(xb, w0, acc[m][0]);                                              \
            acc[m][1] = _mm512_fmadd_ps(xb, w1, acc[m][1]);                                              \
            acc[m][2] = _mm512_fmadd_ps(xb, w2, acc[m][2]);                                              \
            acc[m][3] = _mm512_fmadd_ps(xb, w3, acc[m][3]);                                              \
        }                                                                                                \
    }
    switch (mr) {
        case 1: PANEL_F32_BODY(1) break;
        case 2: PANEL_F32_BODY(2) break;
        case 3: PANEL_F32_BODY(3) break;
        case 4: PANEL_F32_BODY(4) break;
        case 5: PANEL_F32_BODY(5) break;
        default: PANEL_F32_BODY(6) break;
    }
}
static inline void store_panel_f32(float* y, long ldy, int mr, int cols, const float* bias, __m512 acc[MR_MAX][4]) {
    for (int j = 0; j < 4; j++) {
        const int c = cols - 16 * j;
        if (c <= 0) break;
        const __mmask16 mask = tail16(c);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();
        for (int m = 0; m < mr; m++) _mm512_mask_storeu_ps(y + m * ldy + 16 * j, mask, _mm512_add_ps(acc[m][j], b));
    }
}
#define HAVE_PACKED_F32 1
#endif

#if defined(__AVX512BF16__)
static inline void panel_bf16(const uint16_t* x, long ldx, int mr, const uint16_t* panel, int K2, __m512 acc[MR_MAX][4]) {
    for (int m = 0; m < MR_MAX; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
#define PANEL_BF16_BODY(MR)                                                                             \
    for (int i = 0; i < K2; i++) {                                                                       \
        const uint16_t* pw = panel + (long)i * PANEL * 2;                                                \
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(pw), w1 = (__m512bh)_mm512_loadu_si512(pw + 32); \
        const __m512bh w2 = (__m512bh)_mm512_loadu_si512(pw + 64), w3 = (__m512bh)_mm512_loadu_si512(pw + 96); \
        for (int m = 0; m < MR; m++) {                                                                   \
            int32_t pair;                                                                                \
            memcpy(&pair, x + m * ldx + 2 * i, 4);                                                       \
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);                                       \
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);                                             \
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);                                             \
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], xb, w2);                                             \
            acc[m][3] = _mm512_dpbf16_ps(acc[m][3], xb, w3);                                             \
        }                                                                                                \
    }
    switch (mr) {
        case 1: PANEL_BF16_BODY(1) break;
        case 2: PANEL_BF16_BODY(2) break;
        case 3: PANEL_BF16_BODY(3) break;
        case 4: PANEL_BF16_BODY(4) break;
        case 5: PANEL_BF16_BODY(5) break;
        default: PANEL_BF16_BODY(6) break;
    }
}
static inline void store_panel_bf16(uint16_t* y, long ldy, int mr, int cols, const float* bias, __m512 acc[MR_MAX][4]) {
    for (int j = 0; j < 4; j++) {
        const int c = cols - 16 * j;
        if (c <= 0) break;
        const __mmask16 mask = tail16(c);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();
        for (int m = 0; m < mr; m++)
            _mm256_mask_storeu_epi16(y + m * ldy + 16 * j, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][j], b)));
    }
}
#define HAVE_PACKED_BF16 1
#endif

// silu(gate) * up for 16 columns of MR rows, rounding as silu_and_mul does (gate and up through the
// storage dtype first, as the unfused path stores them). Out of line: inlined, its exp constants
// and the live gate accumulators took the registers of the up panel's loop, which then reloaded
// every weight vector for each row (2048 x 576 x 3072 bf16: 21.4 ms, against 17.2 out of line and
// 16.7 for the plain matmul of the same shape).
#define DEFINE_STORE_SILU(SFX, ELEM)                                                                    \
    static __attribute__((noinline)) void store_silu_##SFX(ELEM* y, long ldy, int mr, __m512 g[MR_MAX][4], __m512 u[MR_MAX][4]) { \
        for (int j = 0; j < 4; j++)                                                                      \
            for (int m = 0; m < mr; m++) {                                                               \
                const __m512 gv = round_##SFX(g[m][j]), uv = round_##SFX(u[m][j]);                       \
                const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv)))); \
                store16_##SFX(y + m * ldy + 16 * j, _mm512_mul_ps(round_##SFX(silu), uv));              \
            }                                                                                            \
    }

// One tile: rows [b0, b1) of x through output panel p (GATED: gate panel p and its up panel).
// One copy per kind, inlined into its driver's single parallel region: fp32 decode at batch 128
// ran 9-11% slower with the tile out of line, and as slow with a region per schedule.
#define DEFINE_PACKED_TILE(NAME, ELEM, SFX, KSTEPS, GATED)                                           \
    static inline __attribute__((always_inline)) void NAME##_tile_##GATED(const ELEM* xs, long ldx, const ELEM* wp, long panel_len, \
                                   const float* bf, ELEM* y, int N, int K, int b0, int b1, int p) {       \
        const ELEM* panel = wp + p * panel_len;                                                          \
        const int ldy = GATED ? N / 2 : N;                                                               \
        const int cols = ldy - p * PANEL < PANEL ? ldy - p * PANEL : PANEL;                              \
        for (int m0 = b0; m0 < b1; m0 += MR_##SFX) {                                                     \
            const int mr = b1 - m0 < MR_##SFX ? b1 - m0 : MR_##SFX;                                      \
            __m512 acc[MR_MAX][4];                                                                       \
            panel_##SFX(xs + m0 * ldx, ldx, mr, panel, KSTEPS, acc);                                     \
            if (GATED) {                                                                                 \
                __m512 up[MR_MAX][4];                                                                    \
                panel_##SFX(xs + m0 * ldx, ldx, mr, panel + (long)(ldy / PANEL) * panel_len, KSTEPS, up); \
                store_silu_##SFX(y + (long)m0 * ldy + p * PANEL, ldy, mr, acc, up);                      \
            } else {                                                                                     \
                store_panel_##SFX(y + (long)m0 * ldy + p * PANEL, ldy, mr, cols, bf ? bf + p * PANEL : 0, acc); \
            }                                                                                            \
        }                                                                                                \
    }

// The driver for one kind of tile (GATED: 0 or 1): tiles split over threads.
#define DEFINE_PACKED_RUN(NAME, ELEM, LOAD, SFX, KSTEPS, GATED)                                      \
    static int NAME##_run_##GATED(const ELEM* x, const ELEM* wp, const ELEM* bias, ELEM* y, int M, int N, int K, \
                                  int num_threads) {                                                     \
        const int P = GATED ? N / 2 / PANEL : (N + PANEL - 1) / PANEL; /* output panels */               \
        const ELEM* xs = x;                                                                              \
        ELEM* padded = 0;                                                                                \
        if (sizeof(ELEM) == 2 && (K & 1)) { /* bf16 pairs read one past an odd K: pad x */             \
            padded = calloc((size_t)M * (K + 1), sizeof(ELEM));                                          \
            if (!padded) return 2;                                                                       \
            for (int m = 0; m < M; m++) memcpy(padded + (long)m * (K + 1), x + (long)m * K, sizeof(ELEM) * K); \
            xs = padded;                                                                                 \
        }                                                                                                \
        const long ldx = sizeof(ELEM) == 2 && (K & 1) ? K + 1 : K;                                       \
        float* bf = 0;                                                                                   \
        if (bias) {                                                                                      \
            bf = malloc(sizeof(float) * (size_t)P * PANEL);                                              \
            if (!bf) { free(padded); return 2; }                                                         \
            for (int n = 0; n < P * PANEL; n++) bf[n] = n < N ? LOAD(bias[n]) : 0.f;                     \
        }                                                                                                \
        const long panel_len = (long)(KSTEPS) * PANEL * (sizeof(ELEM) == 2 ? 2 : 1);                      \
        /* Blocks of rows of x small enough to stay in L2 while every panel passes through them. */    \
        /* Up to 256 rows, one block, unless the panels do not split evenly over the threads (576 */     \
        /* columns: 9 panels, 5 and 4): from 64 rows on (compute bound) the rows split too. 30 layers' */ \
        /* SmolLM2 projections, bf16, 128 rows: 70.2 -> 67.8 ms; 200 rows 109.0 -> 103.8 ms. */           \
        int rows_per_block = 256;                                                                         \
        if (M <= rows_per_block && M >= 64 && P % num_threads)                                           \
            rows_per_block = ((M + num_threads - 1) / num_threads + MR_##SFX - 1) / MR_##SFX * MR_##SFX; \
        const int blocks = (M + rows_per_block - 1) / rows_per_block;                                    \
        /* One block (decode, short prefill): guided, so each thread first takes a run of adjacent */   \
        /* panels, one sequential stream the prefetcher follows (a panel at a time made every thread */  \
        /* jump a panel's length at each step: batch-1 decode ran 4-20% slower). Several blocks (long */ \
        /* prefill): every (block, panel) tile in one region, a tile at a time, so a thread the OS */    \
        /* preempts holds up one tile while the other goes on, not a block's region at its join. */      \
        _Pragma("omp parallel num_threads(num_threads) if((long)M * N * K > (1L << 18))")                 \
        {                                                                                                \
            if (blocks > 1) {                                                                            \
                _Pragma("omp for schedule(dynamic, 1) nowait")                                           \
                for (int t = 0; t < blocks * P; t++) {                                                   \
                    const int b0 = (t / P) * rows_per_block, b1 = b0 + rows_per_block < M ? b0 + rows_per_block : M; \
                    NAME##_tile_##GATED(xs, ldx, wp, panel_len, bf, y, N, K, b0, b1, t % P);             \
                }                                                                                        \
            } else {                                                                                     \
                _Pragma("omp for schedule(guided) nowait")                                               \
                for (int p = 0; p < P; p++) NAME##_tile_##GATED(xs, ldx, wp, panel_len, bf, y, N, K, 0, M, p); \
            }                                                                                            \
        }                                                                                                \
        free(bf);                                                                                        \
        free(padded);                                                                                    \
        return 0;                                                                                        \
    }

// linear_silu_packed_*'s answer when the gate/up split does not fall on a panel boundary (the caller
// runs the two steps); kernels/cpu_native.py names the same status.
#define STATUS_SPLIT_OFF_PANEL 3

// x [M, K] through a packed weight of N rows. Plain: y [M, N] = x @ W.T + bias. Gated (W is a
// fused gate/up projection, N = 2 * inter with inter a multiple of PANEL): y [M, inter] =
// silu(x @ gate.T) * (x @ up.T), each tile running gate panel p and up panel p + inter / PANEL
// over the same rows, so the [M, 2 * inter] product is never written.
#define DEFINE_PACKED_LINEAR(NAME, NAME_SILU, ELEM, LOAD, SFX, KSTEPS)                                   \
    DEFINE_PACKED_TILE(NAME, ELEM, SFX, KSTEPS, 0)                                                      \
    DEFINE_PACKED_TILE(NAME, ELEM, SFX, KSTEPS, 1)                                                      \
    DEFINE_PACKED_RUN(NAME, ELEM, LOAD, SFX, KSTEPS, 0)                                                  \
    DEFINE_PACKED_RUN(NAME, ELEM, LOAD, SFX, KSTEPS, 1)                                                  \
    int NAME(const ELEM* x, const ELEM* wp, const ELEM* bias, ELEM* y, int M, int N, int K, int num_threads) { \
        return NAME##_run_0(x, wp, bias, y, M, N, K, num_threads);                                         \
    }                                                                                                    \
    int NAME_SILU(const ELEM* x, const ELEM* wp, ELEM* y, int M, int N, int K, int num_threads) {        \
        if (N % (2 * PANEL)) return STATUS_SPLIT_OFF_PANEL;                                              \
        return NAME##_run_1(x, wp, 0, y, M, N, K, num_threads);                                            \
    }

#define PACKED_LINEAR_MISSING(NAME, NAME_SILU, ELEM)                                                    \
    int NAME(const ELEM* x, const ELEM* wp, const ELEM* b, ELEM* y, int M, int N, int K, int t) {       \
        (void)x; (void)wp; (void)b; (void)y; (void)M; (void)N; (void)K; (void)t;                        \
        return 1;                                                                                        \
    }                                                                                                    \
    int NAME_SILU(const ELEM* x, const ELEM* wp, ELEM* y, int M, int N, int K, int t) {                 \
        (void)x; (void)wp; (void)y; (void)M; (void)N; (void)K; (void)t;                                  \
        return 1;                                                                                        \
    }
#ifdef HAVE_PACKED_F32
DEFINE_STORE_SILU(f32, float)
DEFINE_PACKED_LINEAR(linear_packed_f32, linear_silu_packed_f32, float, LOAD_F32, f32, K)
#else
PACKED_LINEAR_MISSING(linear_packed_f32, linear_silu_packed_f32, float)
#endif
#ifdef HAVE_PACKED_BF16
DEFINE_STORE_SILU(bf16, uint16_t)
DEFINE_PACKED_LINEAR(linear_packed_bf16, linear_silu_packed_bf16, uint16_t, bf16_to_f32, bf16, (K + 1) / 2)
#else
PACKED_LINEAR_MISSING(linear_packed_bf16, linear_silu_packed_bf16, uint16_t)
#endif

// ---------------------------------------------------------------------------
// A whole step through every decoder layer, then the final norm, in one call:
// the per-layer Python dispatch (about ten calls per layer) is what a
// small-batch decode step otherwise spends most of its time on, and a few
// milliseconds of every prefill pass. Rows [0, num_decodes) are decodes (one
// token per sequence, attending through decode_tables / decode_lens); the rest
// are prefill chunks packed back to back (query_start_loc), as in
// engine/model.py's AttentionMetadata. The steps and their rounding points are
// those of the modular path:
//   residual = hidden (+ residual); normed = rmsnorm(residual)
//   qkv = normed @ wqkv.T (+ bias); rotate q, k; write k, v to the cache
//   attn = paged_decode(q[:nd]), paged_prefill(q[nd:]); hidden = attn @ wo.T
//   residual = hidden + residual; normed = rmsnorm(residual)
//   hidden = (silu(gate) * up)(normed @ w13.T) @ w2.T
// The four projections arrive packed (pack_weight_*), for linear_packed_*;
// per-layer tensors as arrays of addresses (index = layer). `hidden` [M, H]
// holds the embeddings on entry and the final normed hidden states on return.
// With out_rows (ascending, num_out of them; kernels/step.py OutputRows), the
// last layer writes every row's K/V, then goes on with those rows alone,
// attending as out_at says, and the first num_out rows of `hidden` return
// their states: the rows no one reads skip a layer's attention and MLP.
// Returns 2 where the prefill attention has no native kernel (head_dim not 64
// or 128: the caller checks first), 1 if scratch allocation fails.

typedef struct {
    const int32_t* decode_tables;   // [num_decodes, decode_max_blocks]
    const int32_t* decode_lens;     // [num_decodes]
    int decode_max_blocks, num_decodes;
    const int32_t* prefill_tables;  // [num_prefills, prefill_max_blocks]
    const int64_t* query_start_loc; // [num_prefills + 1], offsets within the prefill rows
    const int32_t* prefill_lens;    // [num_prefills]
    int prefill_max_blocks, num_prefills;
} StepAttention;

// Elements of one layer's scratch (step_layer_* carves it in this order): normed [M, H], qkv,
// q, k, attn, the residual sum [M, H], gate/up [M, 2 * inter] and their product [M, inter].
static long step_scratch_elems(int M, int H, int q_size, int kv_size, int inter) {
    return (long)M * (H + (q_size + 2 * kv_size) + q_size + kv_size + q_size + H + 2 * inter + inter);
}

#define DEFINE_STEP_LAYER(ELEM, SFX)                                                                    \
    static int step_layer_##SFX(ELEM* hidden, ELEM* residual, int first, const int64_t* positions,       \
                                const int64_t* slots, const StepAttention* at, const int64_t* out_rows,  \
                                int num_out, const StepAttention* out_at, const float* rope,             \
                                const ELEM* attn_norm, const ELEM* wqkv, const ELEM* bqkv, const ELEM* wo, \
                                const ELEM* ffn_norm, const ELEM* w13, const ELEM* w2, ELEM* k_cache,   \
                                ELEM* v_cache, ELEM* buf, int M, int H, int num_heads, int num_kv_heads, \
                                int head_dim, int inter, int block_size, float eps, float scale,        \
                                int num_threads) {                                                       \
        const int q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;                      \
        const int qkv_size = q_size + 2 * kv_size;                                                       \
        ELEM *normed = buf, *qkv = normed + (long)M * H, *q = qkv + (long)M * qkv_size;                  \
        ELEM *k = q + (long)M * q_size, *attn = k + (long)M * kv_size, *res2 = attn + (long)M * q_size;  \
        ELEM *gu = res2 + (long)M * H, *act = gu + (long)M * 2 * inter;                                  \
        int rc = 0;                                                                                      \
        if (first) {                                                                                     \
            memcpy(residual, hidden, sizeof(ELEM) * (long)M * H);                                        \
            rms_norm_##SFX(hidden, 0, attn_norm, normed, 0, M, H, eps, num_threads);                     \
        } else {                                                                                         \
            rms_norm_##SFX(hidden, residual, attn_norm, normed, res2, M, H, eps, num_threads);           \
            memcpy(residual, res2, sizeof(ELEM) * (long)M * H);                                          \
        }                                                                                                \
        rc |= linear_packed_##SFX(normed, wqkv, bqkv, qkv, M, qkv_size, H, num_threads);               \
        rotary_##SFX(qkv, qkv + q_size, positions, rope, q, k, M, num_heads, num_kv_heads, head_dim,    \
                     qkv_size, qkv_size, num_threads);                                                   \
        const long row_bytes = (long)kv_size * sizeof(ELEM);                                             \
        write_kv_cache((const char*)k, (const char*)(qkv + q_size + kv_size), (char*)k_cache,           \
                       (char*)v_cache, slots, M, row_bytes, row_bytes, (long)qkv_size * sizeof(ELEM));   \
        if (out_rows) { /* every row's K/V is written; only out_rows go on (ascending: moved in place) */ \
            for (int i = 0; i < num_out; i++) {                                                          \
                memmove(q + (long)i * q_size, q + out_rows[i] * q_size, sizeof(ELEM) * q_size);          \
                memmove(residual + (long)i * H, residual + out_rows[i] * H, sizeof(ELEM) * H);           \
            }                                                                                            \
            at = out_at;                                                                                 \
            M = num_out;                                                                                 \
            if (M == 0) return rc;                                                                       \
        }                                                                                                \
        const int nd = at->num_decodes;                                                                  \
        if (nd)                                                                                          \
            rc |= paged_decode_##SFX(q, k_cache, v_cache, at->decode_tables, at->decode_lens, attn, nd,   \
                                     num_heads, num_kv_heads, head_dim, block_size, at->decode_max_blocks,\
                                     scale, num_threads);                                                \
        if (nd < M)                                                                                      \
            rc |= paged_prefill_##SFX(q + (long)nd * q_size, k_cache, v_cache, at->prefill_tables,       \
                                      at->query_start_loc, at->prefill_lens, attn + (long)nd * q_size,   \
                                      at->num_prefills, num_heads, num_kv_heads, head_dim, block_size,   \
                                      at->prefill_max_blocks, scale, num_threads);                       \
        rc |= linear_packed_##SFX(attn, wo, 0, hidden, M, H, q_size, num_threads);                     \
        rms_norm_##SFX(hidden, residual, ffn_norm, normed, res2, M, H, eps, num_threads);                \
        memcpy(residual, res2, sizeof(ELEM) * (long)M * H);                                              \
        const int fused = linear_silu_packed_##SFX(normed, w13, act, M, 2 * inter, H, num_threads);     \
        if (fused == STATUS_SPLIT_OFF_PANEL) { /* the two steps */                                       \
            rc |= linear_packed_##SFX(normed, w13, 0, gu, M, 2 * inter, H, num_threads);               \
            silu_and_mul_##SFX(gu, act, M, inter, num_threads);                                          \
        } else {                                                                                         \
            rc |= fused;                                                                                 \
        }                                                                                                \
        rc |= linear_packed_##SFX(act, w2, 0, hidden, M, H, inter, num_threads);                       \
        return rc;                                                                                       \
    }

#define DEFINE_DECODER_STACK(NAME, ELEM, SFX)                                                           \
    DEFINE_STEP_LAYER(ELEM, SFX)                                                                        \
    int NAME(ELEM* hidden, int num_layers, const int64_t* positions, const int64_t* slots,              \
             const StepAttention* at, const int64_t* out_rows, int num_out, const StepAttention* out_at,  \
             const float* rope,                                                                          \
             const int64_t* attn_norm, const int64_t* wqkv, const int64_t* bqkv, const int64_t* wo,      \
             const int64_t* ffn_norm, const int64_t* w13, const int64_t* w2, const int64_t* k_cache,     \
             const int64_t* v_cache, const ELEM* final_norm, int M, int H, int num_heads,                \
             int num_kv_heads, int head_dim, int inter, int block_size, float eps, float scale,          \
             int num_threads) {                                                                          \
        if (at->num_decodes < M && head_dim != 64 && head_dim != 128) return 2;                         \
        /* the residual stream, then one layer's scratch, allocated once for the whole stack */         \
        const long need = step_scratch_elems(M, H, num_heads * head_dim, num_kv_heads * head_dim, inter); \
        ELEM* residual = malloc(sizeof(ELEM) * ((long)M * H + need));                                    \
        if (!residual) return 1;                                                                         \
        ELEM* buf = residual + (long)M * H;                                                              \
        int rc = 0;                                                                                      \
        for (int l = 0; l < num_layers && rc == 0; l++)                                                  \
            rc = step_layer_##SFX(hidden, residual, l == 0, positions, slots, at,                        \
                                  l == num_layers - 1 ? out_rows : 0, num_out, out_at, rope,             \
                                  (const ELEM*)attn_norm[l], (const ELEM*)wqkv[l], (const ELEM*)bqkv[l], \
                                  (const ELEM*)wo[l], (const ELEM*)ffn_norm[l], (const ELEM*)w13[l],    \
                                  (const ELEM*)w2[l], (ELEM*)k_cache[l], (ELEM*)v_cache[l], buf, M, H,  \
                                  num_heads, num_kv_heads, head_dim, inter, block_size, eps, scale,     \
                                  num_threads);                                                          \
        if (rc == 0) {                                                                                   \
            const int rows = out_rows ? num_out : M;                                                     \
            rms_norm_##SFX(hidden, residual, final_norm, buf, residual, rows, H, eps, num_threads);      \
            memcpy(hidden, buf, sizeof(ELEM) * (long)rows * H);                                          \
        }                                                                                                \
        free(residual);                                                                                  \
        return rc;                                                                                       \
    }

DEFINE_DECODER_STACK(decoder_stack_f32, float, f32)
DEFINE_DECODER_STACK(decoder_stack_bf16, uint16_t, bf16)
