/* What native.py describes through ctypes (the weights of a model and its cache), and what
   the kernels of native_kernels.h share. See native.c. */

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

typedef struct { /* one decode step's arguments, read by every thread */
    const Model *m;
    int token, pos;
    float *logits;
} Step;

/* This thread's share of the rows: blocks of 16 rows split evenly, the rest to the last. */
static inline void share(int rows, int tid, int n, int *r0, int *r1) {
    int blocks = rows / 16;
    *r0 = blocks * tid / n * 16;
    *r1 = tid == n - 1 ? rows : blocks * (tid + 1) / n * 16;
}

/* A row's dot product is summed in UNROLL accumulators, one row at a time: one sequential
   stream per thread. On gpt2's 49 matrices (2 threads, one sitting): bfloat16 46 GB/s a row
   at a time against 39-44 with 4 rows side by side; int8 54 GB/s with 4 sums against 45
   with 1 (BENCHMARKS.md). */
#define UNROLL 4
/* With each line of weights read, the line AHEAD bytes on is prefetched: the hardware's
   stream prefetchers stop at every 4 KiB page. gpt2, one sitting, against none: bfloat16 228
   against 216 tok/s, int8 344 against 316 (2048: 215 and 345; 8192: 235 and 333). */
#define AHEAD 4096

#endif
