/* Shared by native.c (the step) and native_products.c (the matrix products): what native.py
   describes through ctypes, and the vector helpers both use. */

#ifndef MINIGPT2_NATIVE_H
#define MINIGPT2_NATIVE_H

#include <math.h>
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

enum { STORE = 0, ADD = 1, GELU = 2 };  /* what a product does with its rows: y =, y +=, GELU */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NATIVE_X86 1
#include <immintrin.h>

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

/* Rows of y = W x + b (this thread's share of n), for seqs inputs x (seqs, cols). */
KERNEL void linear_part(const Linear *L, const float *x, float *y, int seqs, int tid, int n,
                        int mode, int exact);

#endif
#endif
