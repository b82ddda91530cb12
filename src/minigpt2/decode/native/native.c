/* minigpt2's native decoder: GPT-2's one-token step on x86-64 CPUs with AVX-512 or AVX2.

   Decoding one token reads every weight once, so it runs at the speed weights stream from
   memory; in PyTorch the ~250 small operations around the 49 matrix-vector products of a gpt2
   step cost as much as a quarter of the products themselves (BENCHMARKS.md). Here the whole
   step is one call: the products, LayerNorms, attention over the cache and GELU run in one
   OpenMP parallel region, its threads meeting at a barrier between phases.

   Threads: OpenMP's, linked by soname (libgomp.so.1), so that in a process where torch is
   loaded first they are torch's own pool. A second pool would fight torch's for the cores:
   torch's idle threads spin for milliseconds after each of its parallel operations, and a
   matrix-vector product run by another pool right after one ran at half speed (BENCHMARKS.md).

   Plain C: this file (what native.py calls through ctypes, and the choice of instruction
   set), native_kernels.h (the kernels and the step, written once over a few vector
   operations), native_simd.h (those operations in AVX-512 and in AVX2 intrinsics) and native.h
   (the structs). The kernels are compiled twice, for AVX-512 and AVX2, and the CPU picks one
   when the library is first used. No Python or torch headers. Weights
   are float32, bfloat16 or int8 with one float32 scale per output row; activations are
   float32 throughout. Built by `pip install` where a C compiler is present; where it is not,
   or the CPU has neither set, mg2_supported() says 0 and minigpt2 decodes in PyTorch. */

#include <omp.h>

#include "native.h"

/* Floats of scratch a model needs: x, per-thread LayerNorm outputs and attention scores,
   q/k/v, the attention output and the MLP's hidden layer. */
long mg2_work_floats(int n_embd, int room, int threads) {
    return (long)n_embd * (1 + threads + 3 + 1 + 4) + (long)room * threads;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")
#define VW 16
#define SUFFIX avx512
#include "native_kernels.h"
#undef VW
#undef SUFFIX
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define VW 8
#define SUFFIX avx2
#include "native_kernels.h"
#undef VW
#undef SUFFIX
#pragma GCC pop_options

static int level = -1;  /* 2: AVX-512, 1: AVX2, 0: neither; unset until first asked */

/* The instruction set the kernels run in: 2 (AVX-512: F, BW, DQ and VL, all that its kernels
   are compiled for), 1 (AVX2 and FMA) or 0 (neither: decode in PyTorch). */
int mg2_supported(void) {
    if (level < 0) {
        __builtin_cpu_init();
        const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("fma");
        const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        level = avx512 ? 2 : avx2 ? 1 : 0;
    }
    return level;
}

/* Run in a lower set than the CPU's (tests run the AVX2 kernels on AVX-512 machines), or with
   `wanted` above the CPU's in its own again; returns the set in effect. */
int mg2_use_level(int wanted) {
    level = -1;
    const int most = mg2_supported();
    level = wanted < most ? wanted : most;
    return level;
}

/* Logits (head rows) after `token` at position `pos`, whose key and value go into the cache
   at pos; positions before it must be there already. */
void mg2_step(const Model *m, int token, int pos, float *logits) {
    const Step s = {m, token, pos, logits};
    const int avx512 = mg2_supported() == 2;
#pragma omp parallel num_threads(m->threads)
    {
        const int tid = omp_get_thread_num(), n = omp_get_num_threads();
        if (avx512) step_task_avx512(&s, tid, n);
        else step_task_avx2(&s, tid, n);
    }
}

/* y (seqs, rows) = x (seqs, cols) W^T + b, on `threads` threads. */
void mg2_linear(const Linear *L, const float *x, float *y, int seqs, int threads) {
    const int avx512 = mg2_supported() == 2;
#pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num(), n = omp_get_num_threads();
        if (avx512) linear_part_avx512(L, x, y, seqs, tid, n, STORE, 0);
        else linear_part_avx2(L, x, y, seqs, tid, n, STORE, 0);
    }
}

#else /* not x86-64 with gcc or clang: no native decoder, minigpt2 decodes in PyTorch */

int mg2_supported(void) { return 0; }
int mg2_use_level(int wanted) { return 0; }
void mg2_step(const Model *m, int token, int pos, float *logits) {}
void mg2_linear(const Linear *L, const float *x, float *y, int seqs, int threads) {}

#endif
