/* The vector operations native_kernels.h is written in, for one instruction set: AVX-512
   when VW (floats a vector) is 16 (with AVX512_BF16's dot products where DPBF16 is 1), AVX2
   when it is 8. Included by native_kernels.h with SUFFIX set; the target is set around it by
   native.c. */

#if VW == 16
#define V __m512

static inline V F(vzero)(void) { return _mm512_setzero_ps(); }
static inline V F(vset1)(float a) { return _mm512_set1_ps(a); }
static inline V F(vload)(const float *p) { return _mm512_loadu_ps(p); }
static inline void F(vstore)(float *p, V v) { _mm512_storeu_ps(p, v); }
static inline V F(vfma)(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline float F(vhsum)(V v) { return _mm512_reduce_add_ps(v); }
static inline __mmask16 F(first)(int n) { return (__mmask16)((1u << n) - 1u); }

/* The first n < VW floats at p, zeros after (a masked load reads nothing past them; masked
   loads are slower on AMD's cores, so whole vectors use vload). */
static inline V F(vloadn)(const float *p, int n) { return _mm512_maskz_loadu_ps(F(first)(n), p); }
static inline void F(vstoren)(float *p, V v, int n) { _mm512_mask_storeu_ps(p, F(first)(n), v); }

/* VW weights of a row from column k (n of them, n < VW, zeros after), as float32 exactly. */
static inline V F(widen)(const void *w, int type, size_t k) {
    if (type == F32) return _mm512_loadu_ps((const float *)w + k);
    if (type == BF16) {  /* a bfloat16 is the top half of its float32 */
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    __m128i q = _mm_loadu_si128((const __m128i *)((const int8_t *)w + k));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
}

static inline V F(widenn)(const void *w, int type, size_t k, int n) {
    const __mmask16 m = F(first)(n);
    if (type == F32) return _mm512_maskz_loadu_ps(m, (const float *)w + k);
    if (type == BF16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + k);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    __m128i q = _mm_maskz_loadu_epi8(m, (const int8_t *)w + k);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
}

/* 2VW bfloat16 weights times x (in order) into two sums, exactly: a load of 32 weights holds
   the even ones in its low halves (shifted up, float32) and the odd ones in its high halves
   (masked), which meet x's even and odd elements. */
static inline void F(bf16_pair)(const uint16_t *w, const float *x, V *acc) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4,
                                          2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i v = _mm512_loadu_si512(w);
    const V x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const V lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const V hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
    acc[0] = _mm512_fmadd_ps(lo, _mm512_permutex2var_ps(x0, even, x1), acc[0]);
    acc[1] = _mm512_fmadd_ps(hi, _mm512_permutex2var_ps(x0, odd, x1), acc[1]);
}

#if DPBF16
/* AVX512_BF16's vdpbf16ps multiplies 32 bfloat16 pairs exactly and adds each lane's two
   products into float32 sums: one instruction where bf16_pair takes eight. Activations stay
   float32 by going in as three bfloat16 parts whose sum is each float exactly (split3). A
   gpt2 step 1.01-1.13x faster: more where memory streams faster than bf16_pair can multiply
   (BENCHMARKS.md, "The native decoder's kernels"). */
typedef __m512bh P;  /* 32 bfloat16 */

/* bfloat16 of two float vectors, widened back to float32 */
static inline V F(bf16_low)(P h) {
    const __m256i half = _mm512_castsi512_si256((__m512i)h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
static inline V F(bf16_high)(P h) {
    const __m256i half = _mm512_extracti64x4_epi64((__m512i)h, 1);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* cols floats of input as parts[3g + p], p = 0..2, for each 32 columns g (zeros past cols):
   part 0 is each float rounded to bfloat16, part 1 what is left rounded, part 2 the rest.
   Each remainder is exact in float32, the first has at most 16 significant bits and the
   second at most 8, which a bfloat16 holds: the three sum to the float. (Values under 2^-110
   lose their last part: vdpbf16ps reads subnormals as zero.) */
static inline void F(split3)(const float *input, int cols, P *parts) {
    for (int k = 0, g = 0; k < cols; k += 32, g++) {
        V a = k + 16 <= cols ? F(vload)(input + k) : F(vloadn)(input + k, cols - k);
        V b = k + 32 <= cols ? F(vload)(input + k + 16)
            : k + 16 < cols  ? F(vloadn)(input + k + 16, cols - k - 16)
                             : F(vzero)();
        for (int p = 0; p < 3; p++) {
            const P h = _mm512_cvtne2ps_pbh(b, a);  /* a in the low half */
            parts[3 * g + p] = h;
            a = a - F(bf16_low)(h);
            b = b - F(bf16_high)(h);
        }
    }
}

/* A bfloat16 row (cols weights) times the input split3 made, in 2 UNROLL sums; each line of
   weights read prefetches the line AHEAD bytes on, as dot_row does. */
__attribute__((always_inline)) static inline float F(dot_parts)(const uint16_t *row,
                                                              const P *parts, int cols) {
    V acc[2 * UNROLL];
#pragma GCC unroll 8
    for (int u = 0; u < 2 * UNROLL; u++) acc[u] = F(vzero)();
    int k = 0;
    for (; k + 32 * UNROLL <= cols; k += 32 * UNROLL)
#pragma GCC unroll 8
        for (int u = 0; u < UNROLL; u++) {
            const uint16_t *w = row + k + 32 * u;
            const P *x = parts + 3 * (k / 32 + u);
            __builtin_prefetch((const char *)w + AHEAD);
            const P wv = (P)_mm512_loadu_si512(w);
            acc[2 * u] = _mm512_dpbf16_ps(acc[2 * u], wv, x[0]);
            acc[2 * u + 1] = _mm512_dpbf16_ps(acc[2 * u + 1], wv, x[1]);
            acc[2 * u + 1] = _mm512_dpbf16_ps(acc[2 * u + 1], wv, x[2]);
        }
    for (; k < cols; k += 32) {
        const P *x = parts + 3 * (k / 32);
        const P wv = k + 32 <= cols ? (P)_mm512_loadu_si512(row + k)
            : (P)_mm512_maskz_loadu_epi16((__mmask32)((1ull << (cols - k)) - 1), row + k);
        acc[0] = _mm512_dpbf16_ps(acc[0], wv, x[0]);
        acc[1] = _mm512_dpbf16_ps(acc[1], wv, x[1]);
        acc[1] = _mm512_dpbf16_ps(acc[1], wv, x[2]);
    }
#pragma GCC unroll 8
    for (int u = 1; u < 2 * UNROLL; u++) acc[0] = acc[0] + acc[u];
    return F(vhsum)(acc[0]);
}
#endif

/* 2^n for whole n in a float vector (|n| < 127) */
static inline V F(pow2)(V n, V p) { return _mm512_scalef_ps(p, n); }
static inline V F(vround)(V x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline V F(vclamp)(V x, float lo, float hi) {
    return _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(hi)), _mm512_set1_ps(lo));
}

#else /* VW == 8: AVX2 */
#define V __m256

static inline V F(vzero)(void) { return _mm256_setzero_ps(); }
static inline V F(vset1)(float a) { return _mm256_set1_ps(a); }
static inline V F(vload)(const float *p) { return _mm256_loadu_ps(p); }
static inline void F(vstore)(float *p, V v) { _mm256_storeu_ps(p, v); }
static inline V F(vfma)(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline float F(vhsum)(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline __m256i F(first)(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline V F(vloadn)(const float *p, int n) { return _mm256_maskload_ps(p, F(first)(n)); }
static inline void F(vstoren)(float *p, V v, int n) { _mm256_maskstore_ps(p, F(first)(n), v); }

static inline V F(widen)(const void *w, int type, size_t k) {
    if (type == F32) return _mm256_loadu_ps((const float *)w + k);
    if (type == BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    __m128i q = _mm_loadl_epi64((const __m128i *)((const int8_t *)w + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
}

static inline V F(widenn)(const void *w, int type, size_t k, int n) {
    const size_t bytes = weight_bytes(type);
    char part[32] = {0};  /* no masked loads of 8- or 16-bit elements in AVX2 */
    __builtin_memcpy(part, (const char *)w + k * bytes, (size_t)n * bytes);
    return F(widen)(part, type, 0);
}

static inline void F(bf16_pair)(const uint16_t *w, const float *x, V *acc) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)w);
    const V x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
    /* even and odd elements of x0:x1, in order: within each 128-bit lane, then across lanes */
    const V e = _mm256_shuffle_ps(x0, x1, _MM_SHUFFLE(2, 0, 2, 0));
    const V o = _mm256_shuffle_ps(x0, x1, _MM_SHUFFLE(3, 1, 3, 1));
    const V xe = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8));
    const V xo = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8));
    const V lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const V hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
    acc[0] = _mm256_fmadd_ps(lo, xe, acc[0]);
    acc[1] = _mm256_fmadd_ps(hi, xo, acc[1]);
}

static inline V F(pow2)(V n, V p) {
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    const __m256i e = _mm256_slli_epi32(biased, 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline V F(vround)(V x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline V F(vclamp)(V x, float lo, float hi) {
    return _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(hi)), _mm256_set1_ps(lo));
}

#endif
