/* What native.py describes through ctypes (the weights of a model and its cache), and what
   the kernels of native_kernels.h share. See native.c. */

#ifndef MINIGPT2_NATIVE_H
#define MINIGPT2_NATIVE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

enum { F32 = 0, BF16 = 1, INT8 = 2 };

static inline size_t weight_bytes(int type) { return type == F32 ? 4 : type == BF16 ? 2 : 1; }

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

/* A model as native.py describes it. The cache is a slot cache (KVCache.slots), slot_count
   slots of slot_floats floats from kv, each (n_layer, 2, n_head, room, head_dim) float32; a
   one-sequence cache is one slot. */
typedef struct {
    const Block *blocks;
    const void *wte;         /* token table (vocab, n_embd), float32 or bfloat16 */
    const float *wpe;        /* position table (block_size, n_embd) float32 */
    const float *lnf_w, *lnf_b;
    Linear head;             /* (vocab, n_embd) */
    float *kv;
    float *work;             /* work_floats floats of scratch (mg2_work_floats) */
    int32_t n_layer, n_head, n_embd, room, threads, wte_type, gelu_exact;
    float eps, tok_scale;
    int64_t work_floats;
} Model;

enum { STORE = 0, ADD = 1, GELU = 2 };  /* what a product does with its rows: y =, y +=, GELU */

/* Where the step's threads meet between phases: see meet() in native.c. */
typedef struct {
    int arrived;   /* threads at the barrier this round */
    int round;     /* bumped by the last to arrive; the word sleepers wait on */
    int sleepers;  /* threads asleep on round: the last to arrive wakes them */
} Barrier;

typedef struct { /* one decode step's arguments, read by every thread */
    const Model *model;
    int rows;                  /* sequences stepped together, one token each */
    const int32_t *tokens;     /* each row's token */
    const int32_t *slots;      /* each row's slot of the cache */
    const int64_t *lengths;    /* each slot's length: where its row's token sits */
    long slot_floats;          /* floats from one slot to the next */
    float *logits;             /* (rows, vocab) */
    Barrier *sync;
    int *taken;  /* two sets of counters (native_kernels.h: counters), threads * APART each */
} Step;

/* The scratch of a step of `rows` rows (Model.work), laid out once here for mg2_work_floats
   and the step, as offsets in floats: the residual stream x, one LayerNorm output per thread,
   q/k/v, the attention output, the MLP's hidden layer (each rows deep), and one row of
   attention scores (a cache's room) per thread. */
typedef struct {
    long x, normed, qkv, attended, hidden, scores;  /* thread tid's normed and scores */
    long floats;                                     /* the whole layout's size */
} Scratch;

static inline Scratch scratch_layout(int n_embd, int room, int threads, int rows, int tid) {
    const long E = (long)n_embd * rows;  /* floats of one activation across the rows */
    Scratch s;
    s.x = 0;
    s.normed = E * (1 + tid);
    s.qkv = E * (1 + threads);
    s.attended = s.qkv + 3 * E;
    s.hidden = s.attended + E;
    s.scores = s.hidden + 4 * E + (long)room * tid;
    s.floats = s.hidden + 4 * E + (long)room * threads;
    return s;
}

/* Thread tid's share (of `threads`) of a layer's rows, [*begin, *end): blocks of 16 rows split
   evenly, the rest to the last. */
static inline void share(int rows, int tid, int threads, int *begin, int *end) {
    const int blocks = rows / 16;
    *begin = blocks * tid / threads * 16;
    *end = tid == threads - 1 ? rows : blocks * (tid + 1) / threads * 16;
}

/* A thread works through its share of a product CHUNK rows at a time, taken from a counter of
   its share's, then takes what is left of the others' shares from their counters: one whose
   partner lost its core (the cores are shared with a server's HTTP side, or other work) does
   the rest of its partner's rows rather than wait for them at the next barrier, and each
   share is still read front to back, one stream. 64 rows: a 16-row block's multiple, 48-192
   KB of gpt2's weights a take (BENCHMARKS.md, "The native decoder's kernels"). */
#define CHUNK 64
/* Counters a cache line apart (16 ints): threads adding to their own do not pass the line to
   and fro. */
#define APART 16

/* A row's dot product is summed in UNROLL accumulators, one row at a time: one sequential
   stream from memory per thread, which read faster than several rows side by side, and enough
   independent sums to hide the FMA's latency (BENCHMARKS.md, "What the native decoder is"). */
#define UNROLL 4
/* With each line of bfloat16 or int8 weights read, the line AHEAD bytes on is prefetched: the
   hardware's stream prefetchers stop at every 4 KiB page, so a page ahead keeps the stream
   going across page ends (the distance tried from 1 to 8 KiB: BENCHMARKS.md). Not float32
   one row at a time: there the prefetches cost more than they gave (a gpt2 step 1.04-1.20x
   faster without them, `bench_native_builds.py --rows 1 --dtypes float32`, four runs); tiles
   of several inputs prefetch every type. */
#define AHEAD 4096

/* The widest input split3 splits (native_simd.h): its parts take 6 bytes a column of a
   thread's stack, 96 KiB here; wider products of bfloat16 weights take bf16_pair's path.
   GPT-2's widest is 6400 (gpt2-xl's MLP). */
#define SPLIT_COLS 16384

/* The counters of a step's product (a meeting between each and the next): two sets by turns,
   thread 0 zeroing the other set while the product runs. All threads are past the product
   before last (a meeting since) and none starts the next before the meeting after this one,
   which thread 0 reaches after the zeroing. */
static inline int *counters(const Step *step, int product, int tid) {
    const int each = step->model->threads * APART;
    if (tid == 0)
        for (int i = 0; i < each; i++) step->taken[(product + 1) % 2 * each + i] = 0;
    return step->taken + product % 2 * each;
}

#endif
