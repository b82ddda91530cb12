/* minigpt2's native decoder: GPT-2's one-token step on x86-64 CPUs with AVX-512 or AVX2, for
   one sequence or for several at once, each in its own slot of a server's cache.

   Decoding one token reads every weight once, so it runs at the speed weights stream from
   memory; in PyTorch the ~250 small operations around the 49 matrix-vector products of a gpt2
   step cost as much as a quarter of the products themselves (BENCHMARKS.md). Here the whole
   step is one call: the products, LayerNorms, attention over the cache and GELU run in one
   OpenMP parallel region, its threads meeting at barriers between phases.

   Threads: OpenMP's, and torch's own pool. The library needs libgomp.so.1 by soname; when
   it is loaded, torch has loaded its bundled libgomp (RUNPATH $ORIGIN of libtorch_cpu and
   libtorch_global_deps), whose SONAME is libgomp.so.1 too, and the dynamic loader hands a
   needed name to an already loaded object of that soname before searching the disk, however
   that object was opened (loading torch's copy RTLD_LOCAL first gives the same single
   mapping). A torch build whose copy had another soname would give a second pool, which
   would fight torch's for the cores (torch's idle threads spin for milliseconds after each
   of its parallel operations; a product run by another pool right after one ran at half
   speed, BENCHMARKS.md): tests/test_native.py checks that one OpenMP runtime is mapped.

   The step's threads meet at barriers of their own (meet(), below), which spin briefly and
   then sleep: a thread that spins while the one it waits for is off its core (the cores are
   shared with other work) holds a core that thread could run on.

   Plain C: this file (what native.py calls through ctypes, and the choice of instruction
   set), native_kernels.h (the kernels and the step, written once over a few vector
   operations), native_simd.h (those operations in AVX-512 and in AVX2 intrinsics) and native.h
   (the structs). The kernels are compiled three times, for AVX-512 with AVX512_BF16's dot
   products, AVX-512 and AVX2, and the CPU picks one when the library is first used. No Python
   or torch headers. Weights are float32, bfloat16 or int8 with one float32 scale per output
   row; activations are float32 throughout. Built by `pip install` where a C compiler is
   present; where it is not, or the CPU has none of the sets, mg2_supported() says 0 and
   minigpt2 decodes in PyTorch. */

#define _GNU_SOURCE /* syscall() and clock_gettime() under -std=c11 */

#include <omp.h>

#include "native.h"

/* Floats of scratch a step of `rows` rows needs (native.h: scratch_layout). */
long mg2_work_floats(int n_embd, int room, int threads, int rows) {
    return scratch_layout(n_embd, room, threads, rows, 0).floats;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#include <sched.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* How long a thread at a barrier spins before it sleeps. Between two barriers of a gpt2 step
   (about 70 us apart) the threads arrive within a few microseconds of each other when they
   have the cores; when one is off its core, spinning longer only delays it (BENCHMARKS.md,
   "The native decoder on shared cores"). */
#define SPIN_NS 50000

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void sleep_while(int *word, int value) {  /* until *word != value, or a spurious wake */
#ifdef __linux__
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
#else
    (void)word, (void)value;
    sched_yield();
#endif
}

static void wake_all(int *word) {
#ifdef __linux__
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
#else
    (void)word;
#endif
}

/* Wait until all `threads` threads of the step have called meet() on b: what each wrote
   before is then seen by all. Spin (with pause) for SPIN_NS, then sleep on b->round. The
   last to arrive starts the next round and wakes any sleepers: sequentially consistent order
   on round and sleepers means either it sees a sleeper or the sleeper sees the new round. */
static void meet(Barrier *b, int threads) {
    if (threads == 1) return;
    const int round = __atomic_load_n(&b->round, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == threads) {
        __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);  /* none re-enters before round */
        __atomic_store_n(&b->round, round + 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&b->sleepers, __ATOMIC_SEQ_CST)) wake_all(&b->round);
        return;
    }
    const long until = now_ns() + SPIN_NS;
    for (int i = 1; __atomic_load_n(&b->round, __ATOMIC_ACQUIRE) == round; i++) {
        _mm_pause();
        if (i % 64 == 0 && now_ns() > until) {
            __atomic_add_fetch(&b->sleepers, 1, __ATOMIC_SEQ_CST);
            while (__atomic_load_n(&b->round, __ATOMIC_SEQ_CST) == round)
                sleep_while(&b->round, round);
            __atomic_sub_fetch(&b->sleepers, 1, __ATOMIC_SEQ_CST);
            return;
        }
    }
}

/* AVX512_BF16's intrinsics came in GCC 10 and clang 9 (GCC 11 here, to be safe); older
   compilers build the other two sets. The CPU is asked through CPUID, not
   __builtin_cpu_supports, whose table of names differs from compiler to compiler. */
#if defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 11
#define BF16_SET 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma,avx512bf16")
#define VW 16
#define DPBF16 1
#define SUFFIX avx512bf16
#include "native_kernels.h"
#undef VW
#undef DPBF16
#undef SUFFIX
#pragma GCC pop_options
#else
#define BF16_SET 0
#endif

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")
#define VW 16
#define DPBF16 0
#define SUFFIX avx512
#include "native_kernels.h"
#undef VW
#undef DPBF16
#undef SUFFIX
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define VW 8
#define DPBF16 0
#define SUFFIX avx2
#include "native_kernels.h"
#undef VW
#undef DPBF16
#undef SUFFIX
#pragma GCC pop_options

/* Each set's entry points, by level: 1 AVX2, 2 AVX-512, 3 AVX-512 with AVX512_BF16. */
typedef struct {
    void (*step_task)(const Step *step, int tid, int threads);
    void (*linear_part)(const Linear *layer, const float *input, float *output, int seqs,
                        int tid, int threads, int *taken, int mode, int exact);
    void (*attend_slots)(float *kv, long slot_floats, int room, int n_head, int E, int layer,
                         const int32_t *slots, const int64_t *lengths, int rows,
                         const float *qkv, float *out, float *scores, int tid, int threads);
} Kernels;

#define KERNELS(set) {step_task_##set, linear_part_##set, attend_slots_##set}
static const Kernels sets[] = {
    {NULL, NULL, NULL}, KERNELS(avx2), KERNELS(avx512),
#if BF16_SET
    KERNELS(avx512bf16),
#endif
};

static int best = -1;  /* the most the CPU runs (levels as sets[]; 0 none); unset until asked */
static int level = -1; /* the set the kernels run in */

/* AVX-512 here means F, BW, DQ and VL, all that its kernels are compiled for. (On an AMD EPYC
   with AVX-512, 2026-12-03, the AVX2 kernels were not clearly faster: BENCHMARKS.md.) */
static void detect(void) {
    __builtin_cpu_init();
    const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("fma");
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int bf16 = 0;
#if BF16_SET
    unsigned a, b, c, d;  /* CPUID leaf 7, subleaf 1: EAX bit 5 is AVX512_BF16 (Intel's SDM) */
    bf16 = avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1);
#endif
    best = level = bf16 ? 3 : avx512 ? 2 : avx2 ? 1 : 0;
}

/* The most this CPU runs: 3 (AVX-512 with AVX512_BF16), 2 (AVX-512), 1 (AVX2 and FMA) or 0
   (none: decode in PyTorch). */
int mg2_supported(void) {
    if (best < 0) detect();
    return best;
}

/* Run in `wanted` (at most the CPU's best; tests run the AVX2 kernels on AVX-512 machines),
   or in the CPU's best when wanted < 0; returns the set in effect. */
int mg2_use_level(int wanted) {
    if (best < 0) detect();
    level = wanted < 0 || wanted > best ? best : wanted;
    return level;
}

static const Kernels *kernels(void) {
    if (best < 0) detect();
    return &sets[level];
}

static void run_step(const Model *model, int rows, const int32_t *tokens, const int32_t *slots,
                     const int64_t *lengths, long slot_floats, float *logits) {
    Barrier sync = {0, 0, 0};
    int taken[2 * model->threads * APART];  /* native.h: CHUNK, counters */
    for (int i = 0; i < 2 * model->threads * APART; i++) taken[i] = 0;
    const Step step = {model, rows, tokens, slots, lengths, slot_floats, logits, &sync, taken};
    const Kernels *set = kernels();
#pragma omp parallel num_threads(model->threads)
    {
        /* OpenMP may give fewer threads than asked: the scratch is laid out for the most */
        set->step_task(&step, omp_get_thread_num(), omp_get_num_threads());
    }
}

/* Logits (head rows) after `token` at position `pos`, whose key and value go into the cache
   (one slot) at pos; positions before it must be there already. native.py checks the
   arguments. */
void mg2_step(const Model *model, int token, int pos, float *logits) {
    const int32_t t = token, slot = 0;
    const int64_t length = pos;
    run_step(model, 1, &t, &slot, &length, 0, logits);
}

/* Logits (rows, head rows) for `rows` sequences of a slot cache of slot_count slots
   (lengths: each slot's), one new token each: row i's token goes to position lengths[s] of
   slot s = slots[i], whose length then moves on by one. -1, doing nothing, where a token,
   slot or position is out of range (the cache's room, the model's block positions), two
   rows share a slot, or Model.work is too small for the rows; 0 otherwise. */
int mg2_step_rows(const Model *model, int rows, const int32_t *tokens, const int32_t *slots,
                  int64_t *lengths, int slot_count, long slot_floats, int block, float *logits) {
    const Scratch need = scratch_layout(model->n_embd, model->room, model->threads, rows, 0);
    if (rows < 1 || need.floats > model->work_floats) return -1;
    for (int i = 0; i < rows; i++) {
        if (tokens[i] < 0 || tokens[i] >= model->head.rows) return -1;
        if (slots[i] < 0 || slots[i] >= slot_count) return -1;
        const int64_t pos = lengths[slots[i]];
        if (pos < 0 || pos >= model->room || pos >= block) return -1;
        for (int j = 0; j < i; j++)
            if (slots[j] == slots[i]) return -1;
    }
    run_step(model, rows, tokens, slots, lengths, slot_floats, logits);
    for (int i = 0; i < rows; i++) lengths[slots[i]] += 1;
    return 0;
}

/* y (seqs, rows) = x (seqs, cols) W^T + b, on `threads` threads. */
void mg2_linear(const Linear *layer, const float *input, float *output, int seqs, int threads) {
    const Kernels *set = kernels();
    int taken[threads * APART];
    for (int i = 0; i < threads * APART; i++) taken[i] = 0;
#pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        set->linear_part(layer, input, output, seqs, tid, team, taken, STORE, 0);
    }
}

/* One layer's attention for `rows` sequences of a slot cache, one new token each
   (native_kernels.h: attend_slots), on `threads` threads; scratch holds threads * room floats
   (a row of scores each). -1, doing nothing, where a position is outside [0, room). */
int mg2_attend_slots(float *kv, long slot_floats, int room, int n_head, int n_embd, int layer,
                     const int64_t *lengths, int rows, const float *qkv, float *out,
                     float *scratch, int threads) {
    for (int i = 0; i < rows; i++)
        if (lengths[i] < 0 || lengths[i] >= room) return -1;
    const Kernels *set = kernels();
#pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        set->attend_slots(kv, slot_floats, room, n_head, n_embd, layer, NULL, lengths, rows,
                          qkv, out, scratch + (size_t)tid * room, tid, team);
    }
    return 0;
}

#else /* not x86-64 with gcc or clang: no native decoder, minigpt2 decodes in PyTorch */

int mg2_supported(void) { return 0; }
int mg2_use_level(int wanted) { return 0; }
void mg2_step(const Model *model, int token, int pos, float *logits) {}
int mg2_step_rows(const Model *model, int rows, const int32_t *tokens, const int32_t *slots,
                  int64_t *lengths, int slot_count, long slot_floats, int block,
                  float *logits) { return -1; }
void mg2_linear(const Linear *layer, const float *input, float *output, int seqs, int threads) {}
int mg2_attend_slots(float *kv, long slot_floats, int room, int n_head, int n_embd, int layer,
                     const int64_t *lengths, int rows, const float *qkv, float *out,
                     float *scratch, int threads) { return -1; }

#endif
