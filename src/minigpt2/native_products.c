/* The native decoder's matrix products: y = W x + b for one to a few inputs, float32,
   bfloat16 or int8 weights, AVX-512. See native.c. */

#include "native.h"

#ifdef NATIVE_X86

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

KERNEL void linear_part(const Linear *L, const float *x, float *y, int seqs, int tid,
                               int n, int mode, int exact) {
    int r0, r1;
    share(L->rows, tid, n, &r0, &r1);
    linear_rows(L, x, y, seqs, r0, r1, mode, exact);
}

#endif
