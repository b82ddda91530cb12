/* minigpt2's native decoder: GPT-2's one-token step on x86-64 CPUs with AVX-512.

   Decoding one token reads every weight once, so it runs at the speed weights stream from
   memory; in PyTorch the ~250 small operations around the 49 matrix-vector products of a gpt2
   step cost as much as a quarter of the products themselves (BENCHMARKS.md). Here the whole
   step is one call: the products, LayerNorms, attention over the cache and GELU run in one
   OpenMP parallel region, its threads meeting at a barrier between phases.

   Threads: OpenMP's, linked by soname (libgomp.so.1), so that in a process where torch is
   loaded first they are torch's own pool. A second pool would fight torch's for the cores:
   torch's idle threads spin for milliseconds after each of its parallel operations, and a
   matrix-vector product run by another pool right after one ran at half speed (BENCHMARKS.md).

   Plain C: no Python or torch headers, loaded with ctypes (native.py). Weights
   are float32, bfloat16 or int8 with one float32 scale per output row; activations are
   float32 throughout. Built by `pip install` where a C compiler is present; where it is not,
   or the CPU lacks AVX-512, mg2_supported() says 0 and minigpt2 decodes in PyTorch. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

enum { F32 = 0, BF16 = 1, INT8 = 2 };

/* One linear layer: y = W x + b, W (rows, cols) row-major in `type`, b and scale float32
   (scale: int8 only, one per row; b may be NULL). */
typedef struct {
    const void *w;
    const float *b;
    const float *scale;
    int32_t rows, cols, type;
} Linear;

/* One transformer block's weights: small vectors are float32 copies made by native.py. */
typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    Linear attn, attn_proj, fc, fc_proj;
} Block;

/* A model as native.py describes it; the cache is KVCache.kv for one sequence:
   (n_layer, 2, n_head, room, head_dim) float32. */
typedef struct {
    const Block *blocks;
    const void *wte;         /* token table (vocab, n_embd), float32 or bfloat16 */
    const float *wpe;        /* position table (block_size, n_embd) float32 */
    const float *lnf_w, *lnf_b;
    Linear head;             /* (vocab, n_embd) */
    float *kv;
    float *work;             /* mg2_work_floats() floats of scratch */
    int32_t n_layer, n_head, n_embd, room, threads, wte_type, gelu_exact;
    float eps, tok_scale;
} Model;

/* Floats of scratch a model needs: x, per-thread LayerNorm outputs and attention scores,
   q/k/v, the attention output and the MLP's hidden layer. */
long mg2_work_floats(int n_embd, int room, int threads) {
    return (long)n_embd * (1 + threads + 3 + 1 + 4) + (long)room * threads;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

int mg2_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("fma");
}

#define KERNEL __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

/* lanes of a 16-float chunk at k that lie before n */
KERNEL static inline __mmask16 lanes(int k, int n) {
    return n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1u);
}

/* exp(x) for 16 floats: x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^7
   (relative error under 1e-7 there), times 2^n. */
KERNEL static inline __m512 vexp(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

enum { STORE = 0, ADD = 1, GELU = 2 };

/* GELU of 16 floats: GPT-2's tanh form, x * sigmoid(2u) with u = sqrt(2/pi)(x + 0.044715x^3),
   which is 0.5x(1 + tanh u); or the exact erf form (scalar erff: only nanoGPT-style models) */
KERNEL static inline __m512 gelu16(__m512 x, int exact) {
    if (exact) {
        float v[16];
        _mm512_storeu_ps(v, x);
        for (int i = 0; i < 16; i++) v[i] = 0.5f * v[i] * (1.0f + erff(v[i] * 0.70710678f));
        return _mm512_loadu_ps(v);
    }
    __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    __m512 u = _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), x);
    __m512 e = vexp(_mm512_mul_ps(u, _mm512_set1_ps(-1.5957691216f))); /* -2 sqrt(2/pi) */
    return _mm512_div_ps(x, _mm512_add_ps(e, _mm512_set1_ps(1.0f)));
}

#define INLINE __attribute__((always_inline)) static inline
/* A row's dot product is summed in UNROLL accumulators, one row at a time: one sequential
   stream per thread. On gpt2's 49 matrices (2 threads, one sitting): bfloat16 46 GB/s a row
   at a time against 39-44 with 4 rows side by side; int8 54 GB/s with 4 sums against 45
   with 1 (BENCHMARKS.md). */
#define UNROLL 4
/* With each 64 bytes of weights read, the line AHEAD bytes on is prefetched: the hardware's
   stream prefetchers stop at every 4 KiB page. gpt2, one sitting, against none: bfloat16 228
   against 216 tok/s, int8 344 against 316 (2048: 215 and 345; 8192: 235 and 333). */
#define AHEAD 4096

KERNEL INLINE float sum_acc(const __m512 *acc, int n) {
    __m512 s = acc[0];
    for (int j = 1; j < n; j++) s = _mm512_add_ps(s, acc[j]);
    return _mm512_reduce_add_ps(s);
}

/* Dot product of a float32 row with x (K floats). */
KERNEL INLINE float dot_f32(const float *w, const float *x, int K) {
    __m512 acc[UNROLL];
    for (int u = 0; u < UNROLL; u++) acc[u] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 * UNROLL <= K; k += 16 * UNROLL)  /* unmasked: masked loads are slower */
        for (int u = 0; u < UNROLL; u++) {
            _mm_prefetch((const char *)(w + k + 16 * u) + AHEAD, _MM_HINT_T0);
            acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16 * u),
                                     _mm512_loadu_ps(x + k + 16 * u), acc[u]);
        }
    for (; k < K; k += 16) {
        __mmask16 m = lanes(k, K);
        acc[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + k),
                                 acc[0]);
    }
    return sum_acc(acc, UNROLL);
}

/* The same for a bfloat16 row, exactly (a bfloat16 is the top half of its float32): 32
   weights a load, whose even elements shifted up and odd ones masked are 2 x 16 float32,
   multiplied by x's even and odd elements. */
KERNEL INLINE void bf16_step(__m512i v, const float *x, __mmask16 m0, __mmask16 m1,
                             __m512 *acc) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4,
                                          2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    __m512 x0 = _mm512_maskz_loadu_ps(m0, x), x1 = _mm512_maskz_loadu_ps(m1, x + 16);
    __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
    acc[0] = _mm512_fmadd_ps(lo, _mm512_permutex2var_ps(x0, even, x1), acc[0]);
    acc[1] = _mm512_fmadd_ps(hi, _mm512_permutex2var_ps(x0, odd, x1), acc[1]);
}

KERNEL INLINE float dot_bf16(const uint16_t *w, const float *x, int K) {
    __m512 acc[2 * UNROLL];
    for (int u = 0; u < 2 * UNROLL; u++) acc[u] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 * UNROLL <= K; k += 32 * UNROLL)
        for (int u = 0; u < UNROLL; u++) {
            _mm_prefetch((const char *)(w + k + 32 * u) + AHEAD, _MM_HINT_T0);
            bf16_step(_mm512_loadu_si512(w + k + 32 * u), x + k + 32 * u, 0xFFFF, 0xFFFF,
                      acc + 2 * u);
        }
    for (; k < K; k += 32) {
        __mmask32 m = K - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1ull << (K - k)) - 1);
        __mmask16 m1 = k + 16 < K ? lanes(k + 16, K) : 0;
        bf16_step(_mm512_maskz_loadu_epi16(m, w + k), x + k, lanes(k, K), m1, acc);
    }
    return sum_acc(acc, 2 * UNROLL);
}

/* The same for an int8 row (its scale is applied by the caller). */
KERNEL INLINE float dot_int8(const int8_t *w, const float *x, int K) {
    __m512 acc[UNROLL];
    for (int u = 0; u < UNROLL; u++) acc[u] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 * UNROLL <= K; k += 16 * UNROLL)
        for (int u = 0; u < UNROLL; u++) {
            if (u % 4 == 0) _mm_prefetch((const char *)(w + k + 16 * u) + AHEAD, _MM_HINT_T0);
            __m128i q = _mm_loadu_si128((const __m128i *)(w + k + 16 * u));
            acc[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)),
                                     _mm512_loadu_ps(x + k + 16 * u), acc[u]);
        }
    for (; k < K; k += 16) {
        __mmask16 m = lanes(k, K);
        __m128i q = _mm_maskz_loadu_epi8(m, w + k);
        acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)),
                                 _mm512_maskz_loadu_ps(m, x + k), acc[0]);
    }
    return sum_acc(acc, UNROLL);
}

/* 16 weights of a row from column k as float32 (lanes outside m read nothing). */
KERNEL INLINE __m512 weights16(const void *w, int type, int k, __mmask16 m) {
    if (type == F32) return _mm512_maskz_loadu_ps(m, (const float *)w + k);
    if (type == BF16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + k);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, (const int8_t *)w + k)));
}

/* Dot products of R rows (row_bytes apart) with S inputs (K floats, K apart) into
   out[i * S + j]: a tile of R x S sums in registers, so each load of 16 weights serves S
   inputs and each load of 16 inputs R rows. */
KERNEL INLINE void tile(const char *w, size_t row_bytes, int type, const float *x, int K,
                        const int R, const int S, float *out) {
    __m512 acc[16], xv[4];
    for (int a = 0; a < R * S; a++) acc[a] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {  /* unmasked: masked loads are slower */
        for (int j = 0; j < S; j++) xv[j] = _mm512_loadu_ps(x + (size_t)j * K + k);
        for (int i = 0; i < R; i++) {
            const __m512 wv = weights16(w + i * row_bytes, type, k, 0xFFFF);
            for (int j = 0; j < S; j++) acc[i * S + j] = _mm512_fmadd_ps(wv, xv[j], acc[i * S + j]);
        }
    }
    if (k < K) {
        const __mmask16 m = lanes(k, K);
        for (int j = 0; j < S; j++) xv[j] = _mm512_maskz_loadu_ps(m, x + (size_t)j * K + k);
        for (int i = 0; i < R; i++) {
            const __m512 wv = weights16(w + i * row_bytes, type, k, m);
            for (int j = 0; j < S; j++) acc[i * S + j] = _mm512_fmadd_ps(wv, xv[j], acc[i * S + j]);
        }
    }
    for (int a = 0; a < R * S; a++) out[a] = _mm512_reduce_add_ps(acc[a]);
}

/* Rows r.. r+R (R = 1 or 4) of W times S <= 4 inputs x (S, cols), scaled (int8) into
   out[i * S + j]; each case a constant tile, whose sums stay in registers. */
KERNEL INLINE void rows_times(const Linear *L, int r, int R, const float *x, int S, float *out) {
    const int K = L->cols;
    const size_t row_bytes = (size_t)K * (L->type == F32 ? 4 : L->type == BF16 ? 2 : 1);
    const char *w = (const char *)L->w + r * row_bytes;
    if (R == 1 && S == 1) {  /* one input: sums unrolled over k instead */
        if (L->type == F32) out[0] = dot_f32((const float *)w, x, K);
        else if (L->type == BF16) out[0] = dot_bf16((const uint16_t *)w, x, K);
        else out[0] = dot_int8((const int8_t *)w, x, K);
    } else if (R == 1) {
        if (S == 2) tile(w, row_bytes, L->type, x, K, 1, 2, out);
        else if (S == 3) tile(w, row_bytes, L->type, x, K, 1, 3, out);
        else tile(w, row_bytes, L->type, x, K, 1, 4, out);
    } else {
        if (S == 1) tile(w, row_bytes, L->type, x, K, 4, 1, out);
        else if (S == 2) tile(w, row_bytes, L->type, x, K, 4, 2, out);
        else if (S == 3) tile(w, row_bytes, L->type, x, K, 4, 3, out);
        else tile(w, row_bytes, L->type, x, K, 4, 4, out);
    }
    if (L->type == INT8)
        for (int i = 0; i < R; i++)
            for (int j = 0; j < S; j++) out[i * S + j] *= L->scale[r + i];
}

/* Rows [r0, r1) of y = W x + b for `seqs` inputs x (seqs, cols) into y (seqs, rows), 16 rows
   at a time. A row at a time (one stream from memory) for up to 4 inputs a pass; from 8
   inputs, tiles of 4 rows x 4 inputs. gpt2's 49 matrices, int8 and bfloat16: at 2 inputs
   4.4 and 6.2 ms a row at a time against 7.5 and 9.3 ms in tiles, at 8 inputs 12.4 and
   15.2 against 11.0 and 12.0 ms. */
KERNEL static void linear_rows(const Linear *L, const float *x, float *y, int seqs, int r0,
                               int r1, int mode, int exact) {
    for (int r = r0; r < r1; r += 16) {
        const int count = r1 - r < 16 ? r1 - r : 16;
        for (int j0 = 0; j0 < seqs; j0 += 4) {
            const int S = seqs - j0 < 4 ? seqs - j0 : 4;
            float v[4][16] = {{0}}, d[16];
            for (int i = 0; i < count;) {
                const int R = seqs >= 8 && count - i >= 4 ? 4 : 1;
                rows_times(L, r + i, R, x + (size_t)j0 * L->cols, S, d);
                for (int a = 0; a < R; a++, i++)
                    for (int j = 0; j < S; j++) v[j][i] = d[a * S + j] + (L->b ? L->b[r + i] : 0);
            }
            for (int j = 0; j < S; j++) {
                if (mode == GELU) _mm512_storeu_ps(v[j], gelu16(_mm512_loadu_ps(v[j]), exact));
                float *out = y + (size_t)(j0 + j) * L->rows + r;
                for (int i = 0; i < count; i++) out[i] = mode == ADD ? out[i] + v[j][i] : v[j][i];
            }
        }
    }
}

/* This thread's share of the rows: blocks of 16 rows split evenly, the rest to the last. */
static void share(int rows, int tid, int n, int *r0, int *r1) {
    int blocks = rows / 16;
    *r0 = blocks * tid / n * 16;
    *r1 = tid == n - 1 ? rows : blocks * (tid + 1) / n * 16;
}

KERNEL static void linear_part(const Linear *L, const float *x, float *y, int seqs, int tid,
                               int n, int mode, int exact) {
    int r0, r1;
    share(L->rows, tid, n, &r0, &r1);
    linear_rows(L, x, y, seqs, r0, r1, mode, exact);
}

KERNEL static float vsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* LayerNorm of x (n floats) into out, two passes (mean, then variance about it) like torch */
KERNEL static void layer_norm(const float *x, const float *w, const float *b, float eps, int n,
                              float *out) {
    __m512 s = _mm512_setzero_ps();
    for (int k = 0; k < n; k += 16) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(lanes(k, n), x + k));
    __m512 mean = _mm512_set1_ps(vsum(s) / n);
    __m512 q = _mm512_setzero_ps();
    for (int k = 0; k < n; k += 16) {
        __mmask16 m = lanes(k, n);
        __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + k), mean);
        q = _mm512_fmadd_ps(d, d, q);
    }
    __m512 inv = _mm512_set1_ps(1.0f / sqrtf(vsum(q) / n + eps));
    for (int k = 0; k < n; k += 16) {
        __mmask16 m = lanes(k, n);
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + k), mean), inv);
        v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + k));
        if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, b + k));
        _mm512_mask_storeu_ps(out + k, m, v);
    }
}

KERNEL static float dot(const float *a, const float *b, int n) {
    __m512 s = _mm512_setzero_ps();
    for (int k = 0; k < n; k += 16) {
        __mmask16 m = lanes(k, n);
        s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), s);
    }
    return vsum(s);
}

/* One head of attention for the query at pos: store its key and value in the cache, then
   softmax(q k^T / sqrt(hd)) v over positions 0..pos. */
KERNEL static void attend_head(const Model *m, int layer, int h, int pos, const float *qkv,
                               float *scores, float *y) {
    const int E = m->n_embd, hd = E / m->n_head;
    float *keys = m->kv + (((size_t)layer * 2 * m->n_head + h) * m->room) * hd;
    float *vals = keys + (size_t)m->n_head * m->room * hd;
    const float *q = qkv + h * hd;
    for (int d = 0; d < hd; d++) {
        keys[(size_t)pos * hd + d] = qkv[E + h * hd + d];
        vals[(size_t)pos * hd + d] = qkv[2 * E + h * hd + d];
    }
    const float scale = 1.0f / sqrtf((float)hd);
    float top = -INFINITY;
    for (int t = 0; t <= pos; t++) {
        scores[t] = dot(q, keys + (size_t)t * hd, hd) * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    __m512 total = _mm512_setzero_ps();
    for (int t = 0; t <= pos; t += 16) {
        __mmask16 k = lanes(t, pos + 1);
        __m512 e = vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, scores + t), _mm512_set1_ps(top)));
        e = _mm512_maskz_mov_ps(k, e);
        total = _mm512_add_ps(total, e);
        _mm512_mask_storeu_ps(scores + t, k, e);
    }
    const float inv = 1.0f / vsum(total);
    float *out = y + h * hd;
    for (int d = 0; d < hd; d += 16) {
        __mmask16 k = lanes(d, hd);
        __m512 acc = _mm512_setzero_ps();
        for (int t = 0; t <= pos; t++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[t]),
                                  _mm512_maskz_loadu_ps(k, vals + (size_t)t * hd + d), acc);
        _mm512_mask_storeu_ps(out + d, k, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
    }
}

typedef struct {
    const Model *m;
    int token, pos;
    float *logits;
} Step;

/* One thread's part of a decode step; five barriers per block. */
KERNEL static void step_task(const Step *s, int tid, int n) {
    const Model *m = s->m;
    const int E = m->n_embd, exact = m->gelu_exact;
    float *x = m->work, *h = x + E * (1 + tid), *qkv = x + E * (1 + n), *y = qkv + 3 * E;
    float *f = y + E, *scores = f + 4 * E + (size_t)m->room * tid;
    if (tid == 0) {
        for (int k = 0; k < E; k++) {
            float t = m->wte_type == F32
                          ? ((const float *)m->wte)[(size_t)s->token * E + k]
                          : (float)0;
            if (m->wte_type == BF16) {
                uint32_t bits = (uint32_t)((const uint16_t *)m->wte)[(size_t)s->token * E + k]
                                << 16;
                __builtin_memcpy(&t, &bits, 4);
            }
            x[k] = t * m->tok_scale + m->wpe[(size_t)s->pos * E + k];
        }
    }
    _Pragma("omp barrier")
    for (int l = 0; l < m->n_layer; l++) {
        const Block *b = &m->blocks[l];
        layer_norm(x, b->ln1_w, b->ln1_b, m->eps, E, h);
        linear_part(&b->attn, h, qkv, 1, tid, n, STORE, exact);
        _Pragma("omp barrier")
        for (int head = tid; head < m->n_head; head += n)
            attend_head(m, l, head, s->pos, qkv, scores, y);
        _Pragma("omp barrier")
        linear_part(&b->attn_proj, y, x, 1, tid, n, ADD, exact);
        _Pragma("omp barrier")
        layer_norm(x, b->ln2_w, b->ln2_b, m->eps, E, h);
        linear_part(&b->fc, h, f, 1, tid, n, GELU, exact);
        _Pragma("omp barrier")
        linear_part(&b->fc_proj, f, x, 1, tid, n, ADD, exact);
        _Pragma("omp barrier")
    }
    layer_norm(x, m->lnf_w, m->lnf_b, m->eps, E, h);
    linear_part(&m->head, h, s->logits, 1, tid, n, STORE, exact);
}

/* Logits (head rows) after `token` at position `pos`, whose key and value go into the cache
   at pos; positions before it must be there already. */
void mg2_step(const Model *m, int token, int pos, float *logits) {
    Step s = {m, token, pos, logits};
#pragma omp parallel num_threads(m->threads)
    step_task(&s, omp_get_thread_num(), omp_get_num_threads());
}

/* y (seqs, rows) = x (seqs, cols) W^T + b, on `threads` threads. */
void mg2_linear(const Linear *L, const float *x, float *y, int seqs, int threads) {
#pragma omp parallel num_threads(threads)
    linear_part(L, x, y, seqs, omp_get_thread_num(), omp_get_num_threads(), STORE, 0);
}

#else /* not x86-64 with GCC or clang: no native decoder, minigpt2 decodes in PyTorch */

int mg2_supported(void) { return 0; }
void mg2_step(const Model *m, int token, int pos, float *logits) {}
void mg2_linear(const Linear *L, const float *x, float *y, int seqs, int threads) {}

#endif
