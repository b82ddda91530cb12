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

/* GELU of values[0..count): GPT-2's tanh form, x * sigmoid(2u) with u = sqrt(2/pi)(x +
   0.044715x^3), which is 0.5x(1 + tanh u); or the exact erf form (scalar erff: only
   nanoGPT-style models). */
static void F(gelu)(float *values, int count, int exact) {
    if (exact) {
        for (int k = 0; k < count; k++)
            values[k] = 0.5f * values[k] * (1.0f + erff(values[k] * 0.70710678f));
        return;
    }
    for (int k = 0; k < count; k += VW) {
        V x = F(vget)(values, k, count);
        const V u = F(vfma)(x * x * x, F(vset1)(0.044715f), x);
        x = x / (F(vexp)(u * -1.5957691216f) + 1.0f);  /* -2 sqrt(2/pi) */
        k + VW <= count ? F(vstore)(values + k, x) : F(vstoren)(values + k, x, count - k);
    }
}

/* Dot product of one weight row (float32, bfloat16 or int8, unscaled; `cols` of them) with
   input, in UNROLL sums (bfloat16 in pairs), prefetching AHEAD bytes on (not float32); the
   last columns one vector at a time, widened in order.
   The loops over sums here and in tile() are unrolled by pragma, and rows_times is inlined:
   left to GCC 12, the arrays of sums lived on the stack, zeroed by `rep stos` for every row
   (whose vector loads then waited on those stores), and each row was a call; so built, a gpt2
   one-token step ran 1.06-1.23x faster (BENCHMARKS.md, "The native decoder's kernels"). */
__attribute__((always_inline)) static inline float F(dot_row)(const void *row, int type,
                                                            const float *input, int cols) {
    const size_t bytes = weight_bytes(type);
    const int step = type == BF16 ? 2 * VW : VW;
    V acc[2 * UNROLL];
#pragma GCC unroll 8
    for (int u = 0; u < 2 * UNROLL; u++) acc[u] = F(vzero)();
    int k = 0;
    for (; k + step * UNROLL <= cols; k += step * UNROLL)
#pragma GCC unroll 8
        for (int u = 0; u < UNROLL; u++) {
            const size_t at = (size_t)k + (size_t)step * u;
            if (type == BF16 || (type == INT8 && u % 4 == 0))  /* a line a prefetch */
                __builtin_prefetch((const char *)row + at * bytes + AHEAD);
            if (type == BF16) F(bf16_pair)((const uint16_t *)row + at, input + at, acc + 2 * u);
            else acc[u] = F(vfma)(F(widen)(row, type, at), F(vload)(input + at), acc[u]);
        }
    for (; k + VW <= cols; k += VW)
        acc[0] = F(vfma)(F(widen)(row, type, k), F(vload)(input + k), acc[0]);
    if (k < cols)
        acc[1] = F(vfma)(F(widenn)(row, type, k, cols - k), F(vloadn)(input + k, cols - k),
                         acc[1]);
#pragma GCC unroll 8
    for (int u = 1; u < 2 * UNROLL; u++) acc[0] = acc[0] + acc[u];
    return F(vhsum)(acc[0]);
}

/* Dot products of tile_rows rows (row_bytes apart, from rows) with tile_inputs inputs (cols
   floats each, cols apart) into out[i * tile_inputs + j]: the sums of the tile stay in
   registers, so that each load of weights serves every input and each load of inputs every
   row. Each row's stream is prefetched a page ahead, float32 too: without it the products of
   4 to 16 rows ran 1.07-1.30x slower (BENCHMARKS.md, "The native decoder's kernels"). */
__attribute__((always_inline)) static inline void F(tile)(const char *rows, size_t row_bytes,
                                                         int type, const float *inputs,
                                                         int cols, const int tile_rows,
                                                         const int tile_inputs, float *out) {
    V acc[16], xv[4];
#pragma GCC unroll 16
    for (int a = 0; a < tile_rows * tile_inputs; a++) acc[a] = F(vzero)();
    int k = 0;
    const size_t bytes = weight_bytes(type);
    for (; k + VW <= cols; k += VW) {  /* whole vectors: no masked loads */
        if ((k * bytes) % 64 == 0)  /* each row's next line: AHEAD bytes on (native.h) */
#pragma GCC unroll 16
            for (int i = 0; i < tile_rows; i++)
                __builtin_prefetch(rows + i * row_bytes + k * bytes + AHEAD);
#pragma GCC unroll 16
        for (int j = 0; j < tile_inputs; j++) xv[j] = F(vload)(inputs + (size_t)j * cols + k);
#pragma GCC unroll 16
        for (int i = 0; i < tile_rows; i++) {
            const V wv = F(widen)(rows + i * row_bytes, type, k);
#pragma GCC unroll 16
            for (int j = 0; j < tile_inputs; j++)
                acc[i * tile_inputs + j] = F(vfma)(wv, xv[j], acc[i * tile_inputs + j]);
        }
    }
    if (k < cols) {
#pragma GCC unroll 16
        for (int j = 0; j < tile_inputs; j++)
            xv[j] = F(vloadn)(inputs + (size_t)j * cols + k, cols - k);
#pragma GCC unroll 16
        for (int i = 0; i < tile_rows; i++) {
            const V wv = F(widenn)(rows + i * row_bytes, type, k, cols - k);
#pragma GCC unroll 16
            for (int j = 0; j < tile_inputs; j++)
                acc[i * tile_inputs + j] = F(vfma)(wv, xv[j], acc[i * tile_inputs + j]);
        }
    }
#pragma GCC unroll 16
    for (int a = 0; a < tile_rows * tile_inputs; a++) out[a] = F(vhsum)(acc[a]);
}

/* Rows first..first+count (count = 1 or 4) of the layer's weights times seqs <= 4 inputs
   (seqs, cols), scaled (int8), into out[i * seqs + j]; each case a constant tile, whose sums
   stay in registers. parts: the one input as split3 made it (bfloat16 weights, DPBF16
   builds), or NULL. */
__attribute__((always_inline)) static inline void F(rows_times)(const Linear *layer, int first,
                                                               int count, const float *inputs,
                                                               const void *parts, int seqs,
                                                               float *out) {
    const int cols = layer->cols, type = layer->type;
    const size_t row_bytes = (size_t)cols * weight_bytes(type);
    const char *rows = (const char *)layer->w + first * row_bytes;
    if (count == 1 && seqs == 1) {  /* a constant type in each: the compiler drops the others */
        if (type == F32) out[0] = F(dot_row)(rows, F32, inputs, cols);
#if DPBF16
        else if (type == BF16 && parts)
            out[0] = F(dot_parts)((const uint16_t *)rows, (const P *)parts, cols);
#endif
        else if (type == BF16) out[0] = F(dot_row)(rows, BF16, inputs, cols);
        else out[0] = F(dot_row)(rows, INT8, inputs, cols);
    } else if (count == 1 && seqs == 2) F(tile)(rows, row_bytes, type, inputs, cols, 1, 2, out);
    else if (count == 1 && seqs == 3) F(tile)(rows, row_bytes, type, inputs, cols, 1, 3, out);
    else if (count == 1) F(tile)(rows, row_bytes, type, inputs, cols, 1, 4, out);
    else if (seqs == 1) F(tile)(rows, row_bytes, type, inputs, cols, 4, 1, out);
    else if (seqs == 2) F(tile)(rows, row_bytes, type, inputs, cols, 4, 2, out);
    else if (seqs == 3) F(tile)(rows, row_bytes, type, inputs, cols, 4, 3, out);
    else F(tile)(rows, row_bytes, type, inputs, cols, 4, 4, out);
    if (type == INT8)
        for (int i = 0; i < count; i++)
            for (int j = 0; j < seqs; j++) out[i * seqs + j] *= layer->scale[first + i];
}

/* Rows [begin, end) of output = W input + b for `seqs` inputs (seqs, cols) into output
   (seqs, rows), 16 rows at a time. Up to 4 inputs a pass, a row at a time (one stream from
   memory); from 8 inputs, tiles of 4 rows x 4 inputs, whose loads each serve more sums: each
   the faster there (BENCHMARKS.md, the batched products). */
static void F(linear_rows)(const Linear *layer, const float *input, const void *parts,
                           float *output, int seqs, int begin, int end, int mode, int exact) {
    for (int r = begin; r < end; r += 16) {
        const int count = end - r < 16 ? end - r : 16;
        for (int j0 = 0; j0 < seqs; j0 += 4) {
            const int pass = seqs - j0 < 4 ? seqs - j0 : 4;
            float v[4][16], d[16];
            for (int i = 0; i < count;) {
                const int tile_rows = seqs >= 8 && count - i >= 4 ? 4 : 1;
                F(rows_times)(layer, r + i, tile_rows, input + (size_t)j0 * layer->cols, parts,
                              pass, d);
                for (int a = 0; a < tile_rows; a++, i++)
                    for (int j = 0; j < pass; j++)
                        v[j][i] = d[a * pass + j] + (layer->b ? layer->b[r + i] : 0);
            }
            for (int j = 0; j < pass; j++) {
                if (mode == GELU) F(gelu)(v[j], count, exact);
                float *out = output + (size_t)(j0 + j) * layer->rows + r;
                for (int i = 0; i < count; i++) out[i] = mode == ADD ? out[i] + v[j][i] : v[j][i];
            }
        }
    }
}

/* Thread tid's part (of `threads`) of linear_rows over the layer's rows: chunks of its own
   share, then of the others' (native.h: CHUNK), taken[t * APART] counting those of thread
   t's share (zero before the product). */
static void F(linear_shares)(const Linear *layer, const float *input, const void *parts,
                             float *output, int seqs, int tid, int threads, int *taken, int mode,
                             int exact) {
    for (int k = 0; k < threads; k++) {
        const int owner = (tid + k) % threads;
        int *counter = taken + owner * APART, begin, end, at;
        share(layer->rows, owner, threads, &begin, &end);
        while ((at = begin + __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED) * CHUNK) < end) {
            const int stop = end - at < CHUNK ? end : at + CHUNK;
            F(linear_rows)(layer, input, parts, output, seqs, at, stop, mode, exact);
        }
    }
}

/* linear_shares, one input of bfloat16 weights (of at most SPLIT_COLS columns) split first
   (split3: each thread its own copy, on its stack) in DPBF16 builds. */
static void F(linear_part)(const Linear *layer, const float *input, float *output, int seqs,
                           int tid, int threads, int *taken, int mode, int exact) {
#if DPBF16
    if (layer->type == BF16 && seqs == 1 && layer->cols <= SPLIT_COLS) {
        P parts[(layer->cols + 31) / 32 * 3];
        F(split3)(input, layer->cols, parts);
        F(linear_shares)(layer, input, parts, output, seqs, tid, threads, taken, mode, exact);
        return;
    }
#endif
    F(linear_shares)(layer, input, NULL, output, seqs, tid, threads, taken, mode, exact);
}

static float F(dot)(const float *a, const float *b, int count) {
    V s = F(vzero)();
    for (int k = 0; k < count; k += VW)
        s = F(vfma)(F(vget)(a, k, count), F(vget)(b, k, count), s);
    return F(vhsum)(s);
}

/* LayerNorm of input (width floats) into out, two passes (mean, then variance about it) like
   torch; bias may be NULL. */
static void F(layer_norm)(const float *input, const float *weight, const float *bias, float eps,
                          int width, float *out) {
    V s = F(vzero)(), q = F(vzero)();
    for (int k = 0; k < width; k += VW) s = s + F(vget)(input, k, width);
    const float mean = F(vhsum)(s) / width;
    for (int k = 0; k < width; k += VW) {
        V d = F(vget)(input, k, width) - mean;
        if (k + VW > width) {  /* the lanes past width hold -mean: keep the first width - k */
            float part[VW];
            F(vstore)(part, d);
            d = F(vloadn)(part, width - k);
        }
        q = F(vfma)(d, d, q);
    }
    const float inv = 1.0f / sqrtf(F(vhsum)(q) / width + eps);
    for (int k = 0; k < width; k += VW) {
        V v = (F(vget)(input, k, width) - mean) * inv * F(vget)(weight, k, width);
        if (bias) v = v + F(vget)(bias, k, width);
        k + VW <= width ? F(vstore)(out + k, v) : F(vstoren)(out + k, v, width - k);
    }
}

/* One head of attention for the query at pos: store its key and value in the cache (kv, laid
   out as Model's, room positions), then softmax(q k^T / sqrt(head_dim)) v over positions
   0..pos into out's columns of that head. */
static void F(attend_head)(float *kv, int room, int n_head, int E, int layer, int head, int pos,
                           const float *qkv, float *scores, float *out) {
    const int hd = E / n_head, n = pos + 1;
    float *keys = kv + (((size_t)layer * 2 * n_head + head) * room) * hd;
    float *vals = keys + (size_t)n_head * room * hd;
    const float *q = qkv + head * hd, scale = 1.0f / sqrtf((float)hd);
    for (int d = 0; d < hd; d++) {
        keys[(size_t)pos * hd + d] = qkv[E + head * hd + d];
        vals[(size_t)pos * hd + d] = qkv[2 * E + head * hd + d];
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
    float *y = out + head * hd;
    for (int d = 0; d < hd; d += VW) {
        V acc = F(vzero)();
        for (int t = 0; t < n; t++)
            acc = F(vfma)(F(vset1)(scores[t]), F(vget)(vals + (size_t)t * hd, d, hd), acc);
        acc = acc * (1.0f / total);
        d + VW <= hd ? F(vstore)(y + d, acc) : F(vstoren)(y + d, acc, hd - d);
    }
}

/* Thread tid's part (of `threads`) of one layer's attention for `rows` one-token queries,
   each over its own slot of a slot cache (KVCache.slots: slot s's cache at kv + s *
   slot_floats, laid out as Model's): row i's slot is slots[i] (slots NULL: slot i), its
   query at position lengths[slot]; qkv (rows, 3 E), out (rows, E). */
static void F(attend_slots)(float *kv, long slot_floats, int room, int n_head, int E, int layer,
                            const int32_t *slots, const int64_t *lengths, int rows,
                            const float *qkv, float *out, float *scores, int tid, int threads) {
    for (int t = tid; t < rows * n_head; t += threads) {
        const int i = t / n_head, head = t % n_head, slot = slots ? slots[i] : i;
        F(attend_head)(kv + slot * slot_floats, room, n_head, E, layer, head, (int)lengths[slot],
                       qkv + (size_t)i * 3 * E, scores, out + (size_t)i * E);
    }
}

/* x (E floats) = the token's embedding at pos (scaled: Model.tok_scale) plus the position's. */
static void F(embed)(const Model *m, int token, int pos, float *x) {
    const int E = m->n_embd;
    for (int k = 0; k < E; k += VW) {
        const int c = E - k < VW ? E - k : VW;
        const size_t row = (size_t)token * E + k;
        const V t = c == VW ? F(widen)(m->wte, m->wte_type, row)
                            : F(widenn)(m->wte, m->wte_type, row, c);
        const V e = t * m->tok_scale + F(vget)(m->wpe + (size_t)pos * E, k, E);
        c == VW ? F(vstore)(x + k, e) : F(vstoren)(x + k, e, c);
    }
}

/* Each of the step's rows' LayerNorm (rows of E floats) from x into out. */
static void F(norm_rows)(const Step *step, const float *x, const float *w, const float *b,
                         float *out) {
    const int E = step->model->n_embd;
    for (int i = 0; i < step->rows; i++)
        F(layer_norm)(x + (size_t)i * E, w, b, step->model->eps, E, out + (size_t)i * E);
}

/* One thread's part of a decode step of step->rows rows, each at its own position of its
   own slot (thread tid of `threads`); five meetings per block, whatever the rows. */
static void F(step_task)(const Step *step, int tid, int threads) {
    const Model *m = step->model;
    const int E = m->n_embd, exact = m->gelu_exact, R = step->rows;
    const Scratch at = scratch_layout(E, m->room, threads, R, tid);
    float *x = m->work + at.x, *normed = m->work + at.normed, *qkv = m->work + at.qkv;
    float *attended = m->work + at.attended, *hidden = m->work + at.hidden;
    float *scores = m->work + at.scores;
    for (int i = tid; i < R; i += threads)
        F(embed)(m, step->tokens[i], (int)step->lengths[step->slots[i]], x + (size_t)i * E);
    meet(step->sync, threads);
    int product = 0;  /* the step's products in turn, counters of two sets by turns */
    for (int l = 0; l < m->n_layer; l++) {
        const Block *b = &m->blocks[l];
        F(norm_rows)(step, x, b->ln1_w, b->ln1_b, normed);  /* each thread its own copy */
        int *taken = counters(step, product++, tid);
        F(linear_part)(&b->attn, normed, qkv, R, tid, threads, taken, STORE, exact);
        meet(step->sync, threads);
        F(attend_slots)(m->kv, step->slot_floats, m->room, m->n_head, E, l, step->slots,
                        step->lengths, R, qkv, attended, scores, tid, threads);
        meet(step->sync, threads);
        taken = counters(step, product++, tid);
        F(linear_part)(&b->attn_proj, attended, x, R, tid, threads, taken, ADD, exact);
        meet(step->sync, threads);
        F(norm_rows)(step, x, b->ln2_w, b->ln2_b, normed);
        taken = counters(step, product++, tid);
        F(linear_part)(&b->fc, normed, hidden, R, tid, threads, taken, GELU, exact);
        meet(step->sync, threads);
        taken = counters(step, product++, tid);
        F(linear_part)(&b->fc_proj, hidden, x, R, tid, threads, taken, ADD, exact);
        meet(step->sync, threads);
    }
    F(norm_rows)(step, x, m->lnf_w, m->lnf_b, normed);
    int *taken = counters(step, product, tid);
    F(linear_part)(&m->head, normed, step->logits, R, tid, threads, taken, STORE, exact);
}

#undef V
#undef F
