/* The native decoder's kernels and step for one instruction set, written once over the vector
   operations of native_simd.h and included by native.c once per set: VW floats a vector,
   every name suffixed with SUFFIX, the target set around the #include. */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define F(name) CAT(name, SUFFIX)

#include "native_simd.h"

/* The VW floats of p from k on, or those before n (zeros after). */
static inline V F(vget)(const float *p, int k, int n) {
    return k + VW <= n ? F(vload)(p + k) : F(vloadn)(p + k, n - k);
}

/* exp(x): x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^7 (relative error
   under 1e-7 there), times 2^n. */
static inline V F(vexp)(V x) {
    x = F(vclamp)(x, -87.0f, 88.0f);
    const V n = F(vround)(x * 1.44269504f);
    V r = x - n * 0.693145752f;
    r = r - n * 1.42860677e-6f;
    V p = F(vset1)(1.0f / 5040);
    static const float c[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 7; i++) p = F(vfma)(p, r, F(vset1)(c[i]));
    return F(pow2)(n, p);
}

/* GELU of v[0..n): GPT-2's tanh form, x * sigmoid(2u) with u = sqrt(2/pi)(x + 0.044715x^3),
   which is 0.5x(1 + tanh u); or the exact erf form (scalar erff: only nanoGPT-style models). */
static void F(gelu)(float *v, int n, int exact) {
    if (exact) {
        for (int k = 0; k < n; k++) v[k] = 0.5f * v[k] * (1.0f + erff(v[k] * 0.70710678f));
        return;
    }
    for (int k = 0; k < n; k += VW) {
        V x = F(vget)(v, k, n);
        const V u = F(vfma)(x * x * x, F(vset1)(0.044715f), x);
        x = x / (F(vexp)(u * -1.5957691216f) + 1.0f);  /* -2 sqrt(2/pi) */
        k + VW <= n ? F(vstore)(v + k, x) : F(vstoren)(v + k, x, n - k);
    }
}

/* Dot product of one weight row (float32, bfloat16 or int8, unscaled) with x, in UNROLL
   sums (bfloat16 in pairs), prefetching AHEAD bytes on; the last columns one vector at a
   time, widened in order. */
__attribute__((always_inline)) static inline float F(dot_row)(const void *w, int type,
                                                            const float *x, int K) {
    const size_t bytes = type == F32 ? 4 : type == BF16 ? 2 : 1;
    const int step = type == BF16 ? 2 * VW : VW;
    V acc[2 * UNROLL];
    for (int u = 0; u < 2 * UNROLL; u++) acc[u] = F(vzero)();
    int k = 0;
    for (; k + step * UNROLL <= K; k += step * UNROLL)
        for (int u = 0; u < UNROLL; u++) {
            const size_t at = (size_t)k + (size_t)step * u;
            if (type != INT8 || u % 4 == 0)  /* a line a prefetch */
                __builtin_prefetch((const char *)w + at * bytes + AHEAD);
            if (type == BF16) F(bf16_pair)((const uint16_t *)w + at, x + at, acc + 2 * u);
            else acc[u] = F(vfma)(F(widen)(w, type, at), F(vload)(x + at), acc[u]);
        }
    for (; k + VW <= K; k += VW) acc[0] = F(vfma)(F(widen)(w, type, k), F(vload)(x + k), acc[0]);
    if (k < K) acc[1] = F(vfma)(F(widenn)(w, type, k, K - k), F(vloadn)(x + k, K - k), acc[1]);
    for (int u = 1; u < 2 * UNROLL; u++) acc[0] = acc[0] + acc[u];
    return F(vhsum)(acc[0]);
}

/* Dot products of R rows (row_bytes apart) with S inputs (K floats, K apart) into
   out[i * S + j]: a tile of R x S sums in registers, so that each load of weights serves S
   inputs and each load of inputs R rows. */
__attribute__((always_inline)) static inline void F(tile)(const char *w, size_t row_bytes,
                                                         int type, const float *x, int K,
                                                         const int R, const int S, float *out) {
    V acc[16], xv[4];
    for (int a = 0; a < R * S; a++) acc[a] = F(vzero)();
    int k = 0;
    for (; k + VW <= K; k += VW) {  /* whole vectors: no masked loads */
        for (int j = 0; j < S; j++) xv[j] = F(vload)(x + (size_t)j * K + k);
        for (int i = 0; i < R; i++) {
            const V wv = F(widen)(w + i * row_bytes, type, k);
            for (int j = 0; j < S; j++) acc[i * S + j] = F(vfma)(wv, xv[j], acc[i * S + j]);
        }
    }
    if (k < K) {
        for (int j = 0; j < S; j++) xv[j] = F(vloadn)(x + (size_t)j * K + k, K - k);
        for (int i = 0; i < R; i++) {
            const V wv = F(widenn)(w + i * row_bytes, type, k, K - k);
            for (int j = 0; j < S; j++) acc[i * S + j] = F(vfma)(wv, xv[j], acc[i * S + j]);
        }
    }
    for (int a = 0; a < R * S; a++) out[a] = F(vhsum)(acc[a]);
}

/* Rows r..r+R (R = 1 or 4) of W times S <= 4 inputs x (S, cols), scaled (int8) into
   out[i * S + j]; each case a constant tile, whose sums stay in registers. */
static inline void F(rows_times)(const Linear *L, int r, int R, const float *x, int S,
                                 float *out) {
    const int K = L->cols;
    const size_t row_bytes = (size_t)K * (L->type == F32 ? 4 : L->type == BF16 ? 2 : 1);
    const char *w = (const char *)L->w + r * row_bytes;
    if (R == 1 && S == 1) {  /* a constant type in each: the compiler drops the others */
        if (L->type == F32) out[0] = F(dot_row)(w, F32, x, K);
        else if (L->type == BF16) out[0] = F(dot_row)(w, BF16, x, K);
        else out[0] = F(dot_row)(w, INT8, x, K);
    } else if (R == 1 && S == 2) F(tile)(w, row_bytes, L->type, x, K, 1, 2, out);
    else if (R == 1 && S == 3) F(tile)(w, row_bytes, L->type, x, K, 1, 3, out);
    else if (R == 1) F(tile)(w, row_bytes, L->type, x, K, 1, 4, out);
    else if (S == 1) F(tile)(w, row_bytes, L->type, x, K, 4, 1, out);
    else if (S == 2) F(tile)(w, row_bytes, L->type, x, K, 4, 2, out);
    else if (S == 3) F(tile)(w, row_bytes, L->type, x, K, 4, 3, out);
    else F(tile)(w, row_bytes, L->type, x, K, 4, 4, out);
    if (L->type == INT8)
        for (int i = 0; i < R; i++)
            for (int j = 0; j < S; j++) out[i * S + j] *= L->scale[r + i];
}

/* Rows [r0, r1) of y = W x + b for `seqs` inputs x (seqs, cols) into y (seqs, rows), 16 rows
   at a time. A row at a time (one stream from memory) for up to 4 inputs a pass; from 8
   inputs, tiles of 4 rows x 4 inputs. gpt2's 49 matrices, int8 and bfloat16: at 2 inputs
   4.4 and 6.2 ms a row at a time against 7.5 and 9.3 ms in tiles, at 8 inputs 12.4 and
   15.2 against 11.0 and 12.0 ms. */
static void F(linear_rows)(const Linear *L, const float *x, float *y, int seqs, int r0, int r1,
                           int mode, int exact) {
    for (int r = r0; r < r1; r += 16) {
        const int count = r1 - r < 16 ? r1 - r : 16;
        for (int j0 = 0; j0 < seqs; j0 += 4) {
            const int S = seqs - j0 < 4 ? seqs - j0 : 4;
            float v[4][16], d[16];
            for (int i = 0; i < count;) {
                const int R = seqs >= 8 && count - i >= 4 ? 4 : 1;
                F(rows_times)(L, r + i, R, x + (size_t)j0 * L->cols, S, d);
                for (int a = 0; a < R; a++, i++)
                    for (int j = 0; j < S; j++) v[j][i] = d[a * S + j] + (L->b ? L->b[r + i] : 0);
            }
            for (int j = 0; j < S; j++) {
                if (mode == GELU) F(gelu)(v[j], count, exact);
                float *out = y + (size_t)(j0 + j) * L->rows + r;
                for (int i = 0; i < count; i++) out[i] = mode == ADD ? out[i] + v[j][i] : v[j][i];
            }
        }
    }
}

static void F(linear_part)(const Linear *L, const float *x, float *y, int seqs, int tid, int n,
                           int mode, int exact) {
    int r0, r1;
    share(L->rows, tid, n, &r0, &r1);
    F(linear_rows)(L, x, y, seqs, r0, r1, mode, exact);
}

static float F(dot)(const float *a, const float *b, int n) {
    V s = F(vzero)();
    for (int k = 0; k < n; k += VW) s = F(vfma)(F(vget)(a, k, n), F(vget)(b, k, n), s);
    return F(vhsum)(s);
}

/* LayerNorm of x (n floats) into out, two passes (mean, then variance about it) like torch. */
static void F(layer_norm)(const float *x, const float *w, const float *b, float eps, int n,
                          float *out) {
    V s = F(vzero)(), q = F(vzero)();
    for (int k = 0; k < n; k += VW) s = s + F(vget)(x, k, n);
    const float mean = F(vhsum)(s) / n;
    for (int k = 0; k < n; k += VW) {
        V d = F(vget)(x, k, n) - mean;
        if (k + VW > n) {  /* the lanes past n hold -mean: keep the first n - k */
            float part[VW];
            F(vstore)(part, d);
            d = F(vloadn)(part, n - k);
        }
        q = F(vfma)(d, d, q);
    }
    const float inv = 1.0f / sqrtf(F(vhsum)(q) / n + eps);
    for (int k = 0; k < n; k += VW) {
        V v = (F(vget)(x, k, n) - mean) * inv * F(vget)(w, k, n);
        if (b) v = v + F(vget)(b, k, n);
        k + VW <= n ? F(vstore)(out + k, v) : F(vstoren)(out + k, v, n - k);
    }
}

/* One head of attention for the query at pos: store its key and value in the cache, then
   softmax(q k^T / sqrt(hd)) v over positions 0..pos. */
static void F(attend_head)(const Model *m, int layer, int h, int pos, const float *qkv,
                           float *scores, float *y) {
    const int E = m->n_embd, hd = E / m->n_head, n = pos + 1;
    float *keys = m->kv + (((size_t)layer * 2 * m->n_head + h) * m->room) * hd;
    float *vals = keys + (size_t)m->n_head * m->room * hd;
    const float *q = qkv + h * hd, scale = 1.0f / sqrtf((float)hd);
    for (int d = 0; d < hd; d++) {
        keys[(size_t)pos * hd + d] = qkv[E + h * hd + d];
        vals[(size_t)pos * hd + d] = qkv[2 * E + h * hd + d];
    }
    float top = -INFINITY, total = 0;
    for (int t = 0; t < n; t++) {
        scores[t] = F(dot)(q, keys + (size_t)t * hd, hd) * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    for (int t = 0; t < n; t += VW) {
        const V e = F(vexp)(F(vget)(scores, t, n) - top);
        t + VW <= n ? F(vstore)(scores + t, e) : F(vstoren)(scores + t, e, n - t);
        for (int i = 0; i < VW && t + i < n; i++) total += scores[t + i];
    }
    for (int d = 0; d < hd; d += VW) {
        V acc = F(vzero)();
        for (int t = 0; t < n; t++)
            acc = F(vfma)(F(vset1)(scores[t]), F(vget)(vals + (size_t)t * hd, d, hd), acc);
        acc = acc * (1.0f / total);
        d + VW <= hd ? F(vstore)(y + h * hd + d, acc) : F(vstoren)(y + h * hd + d, acc, hd - d);
    }
}

/* One thread's part of a decode step; five barriers per block. */
static void F(step_task)(const Step *s, int tid, int n) {
    const Model *m = s->m;
    const int E = m->n_embd, exact = m->gelu_exact;
    float *x = m->work, *h = x + E * (1 + tid), *qkv = x + E * (1 + n), *y = qkv + 3 * E;
    float *f = y + E, *scores = f + 4 * E + (size_t)m->room * tid;
    if (tid == 0)
        for (int k = 0; k < E; k += VW) {
            const int c = E - k < VW ? E - k : VW;
            const V t = c == VW ? F(widen)(m->wte, m->wte_type, (size_t)s->token * E + k)
                                : F(widenn)(m->wte, m->wte_type, (size_t)s->token * E + k, c);
            const V e = t * m->tok_scale + F(vget)(m->wpe + (size_t)s->pos * E, k, E);
            c == VW ? F(vstore)(x + k, e) : F(vstoren)(x + k, e, c);
        }
    _Pragma("omp barrier")
    for (int l = 0; l < m->n_layer; l++) {
        const Block *b = &m->blocks[l];
        F(layer_norm)(x, b->ln1_w, b->ln1_b, m->eps, E, h);
        F(linear_part)(&b->attn, h, qkv, 1, tid, n, STORE, exact);
        _Pragma("omp barrier")
        for (int head = tid; head < m->n_head; head += n)
            F(attend_head)(m, l, head, s->pos, qkv, scores, y);
        _Pragma("omp barrier")
        F(linear_part)(&b->attn_proj, y, x, 1, tid, n, ADD, exact);
        _Pragma("omp barrier")
        F(layer_norm)(x, b->ln2_w, b->ln2_b, m->eps, E, h);
        F(linear_part)(&b->fc, h, f, 1, tid, n, GELU, exact);
        _Pragma("omp barrier")
        F(linear_part)(&b->fc_proj, f, x, 1, tid, n, ADD, exact);
        _Pragma("omp barrier")
    }
    F(layer_norm)(x, m->lnf_w, m->lnf_b, m->eps, E, h);
    F(linear_part)(&m->head, h, s->logits, 1, tid, n, STORE, exact);
}

#undef V
#undef F
