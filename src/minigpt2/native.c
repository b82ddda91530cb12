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

   Plain C in three files: this one (the step and what native.py calls through ctypes),
   native_products.c (the matrix products) and native.h (what both share). No Python or torch
   headers. Weights
   are float32, bfloat16 or int8 with one float32 scale per output row; activations are
   float32 throughout. Built by `pip install` where a C compiler is present; where it is not,
   or the CPU lacks AVX-512, mg2_supported() says 0 and minigpt2 decodes in PyTorch. */

#include <omp.h>

#include "native.h"

/* Floats of scratch a model needs: x, per-thread LayerNorm outputs and attention scores,
   q/k/v, the attention output and the MLP's hidden layer. */
long mg2_work_floats(int n_embd, int room, int threads) {
    return (long)n_embd * (1 + threads + 3 + 1 + 4) + (long)room * threads;
}

#ifdef NATIVE_X86

int mg2_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("fma");
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
