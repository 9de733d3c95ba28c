// CPU kernels for decode steps, built and loaded by llama_mp/decode_kernels.py (plain C, OpenMP, no torch headers):
//   gemv:       one row times a matrix, y = W x (batch 1): W [rows, cols] row-major, x [cols];
//   attend_one: one query per row against a KV cache (every decode step): softmax(q K^T / sqrt(d)) V;
//   rms_norm:   a decode step's RMSNorm;
//   decode_layers: the transformer blocks for one token of one row (a batch-1 decode step), built of the three;
//   gemv_q8:    gemv from a Q8_0 copy of W (int8, 32 weights to a scale), for --decode_weights q8_0 (also inside
//               decode_layers);
// in bfloat16 or float32, accumulated in float32.
//
// Why gemv: at batch 1 a decode step is bound by reading the weights once, and torch's kernels for one row read them at
// about half of what the memory delivers on 2 threads (README "Benchmarks"). Here each thread reads its rows one after
// the other, the whole row with two or four independent accumulators: one sequential stream, which the hardware
// prefetcher follows best. (Four rows at a time against one load of x, session 15's kernel, kept four streams in
// flight and read 19-20 GB/s in bfloat16 on a 2-core AMD EPYC (Zen 4) where one stream reads 25-31.)
//
// Every output row is computed by one thread with one fixed sequence of operations, so the result does not depend on
// the thread count. The parallel regions run on the OpenMP runtime
// torch has loaded (libgomp.so.1, the same soname), so torch.set_num_threads governs them and no second thread pool
// competes for the cores.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void rows_fn(const void *w, const void *x, void *y, int64_t first, int64_t last, int64_t cols);

static uint16_t round_to_bf16(float f) {  // round to nearest even; a NaN stays a (quiet) NaN
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

// ---- AVX512-BF16: 32 bfloat16 products per instruction, pairs summed into 16 float32 lanes --------------------------
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

AVX512BF16 static inline __m512 dot_bf16_step(__m512 acc, const uint16_t *w, __m512i xv) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)xv);
}

AVX512BF16 static void rows_bf16_avx512(const void *wp, const void *xp, void *yp, int64_t first, int64_t last,
                                        int64_t cols) {
    const uint16_t *w = wp, *x = xp;
    uint16_t *y = yp;
    const int64_t pairs = cols / 64 * 64, full = cols / 32 * 32;
    const __mmask32 tail = (__mmask32)((1ull << (cols - full)) - 1);
    for (int64_t r = first; r < last; r++) {
        const uint16_t *wr = w + r * cols;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        int64_t c = 0;
        for (; c < pairs; c += 64) {
            a0 = dot_bf16_step(a0, wr + c, _mm512_loadu_si512(x + c));
            a1 = dot_bf16_step(a1, wr + c + 32, _mm512_loadu_si512(x + c + 32));
        }
        if (c < full) a0 = dot_bf16_step(a0, wr + c, _mm512_loadu_si512(x + c));
        if (tail)  // (masked loads: nothing read past the row)
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + full),
                                  (__m512bh)_mm512_maskz_loadu_epi16(tail, x + full));
        y[r] = round_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
    }
}

// ---- AVX512F float32: 16 products per fused multiply-add ------------------------------------------------------------
#define AVX512F __attribute__((target("avx512f")))

AVX512F static void rows_f32_avx512(const void *wp, const void *xp, void *yp, int64_t first, int64_t last,
                                    int64_t cols) {
    const float *w = wp, *x = xp;
    float *y = yp;
    const int64_t quads = cols / 64 * 64, full = cols / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (cols - full)) - 1);
    for (int64_t r = first; r < last; r++) {
        const float *wr = w + r * cols;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t c = 0;
        for (; c < quads; c += 64) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + c), _mm512_loadu_ps(x + c), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + c + 16), _mm512_loadu_ps(x + c + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + c + 32), _mm512_loadu_ps(x + c + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + c + 48), _mm512_loadu_ps(x + c + 48), a3);
        }
        for (; c < full; c += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + c), _mm512_loadu_ps(x + c), a0);
        if (tail)
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, wr + full), _mm512_maskz_loadu_ps(tail, x + full), a1);
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
}

// ---- AVX2 + FMA: 8 products per instruction; bfloat16 widened to float32 (a bfloat16 is a float32's top half) ------
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline float sum8(__m256 v) {  // a fixed order: halves, then pairs
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static inline __m256 widen_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

AVX2 static inline float bf16_value(uint16_t v) {
    union { uint32_t u; float f; } t = {(uint32_t)v << 16};
    return t.f;
}

AVX2 static void rows_bf16_avx2(const void *wp, const void *xp, void *yp, int64_t first, int64_t last, int64_t cols) {
    const uint16_t *w = wp, *x = xp;
    uint16_t *y = yp;
    const int64_t full = cols / 8 * 8;
    for (int64_t r = first; r < last; r++) {
        const uint16_t *w0 = w + r * cols;
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t c = 0; c < full; c += 8) a0 = _mm256_fmadd_ps(widen_bf16(w0 + c), widen_bf16(x + c), a0);
        float s = sum8(a0);
        for (int64_t c = full; c < cols; c++) s = __builtin_fmaf(bf16_value(w0[c]), bf16_value(x[c]), s);
        y[r] = round_to_bf16(s);
    }
}

AVX2 static void rows_f32_avx2(const void *wp, const void *xp, void *yp, int64_t first, int64_t last, int64_t cols) {
    const float *w = wp, *x = xp;
    float *y = yp;
    const int64_t full = cols / 8 * 8;
    for (int64_t r = first; r < last; r++) {
        const float *w0 = w + r * cols;
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t c = 0; c < full; c += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + c), _mm256_loadu_ps(x + c), a0);
        float s = sum8(a0);
        for (int64_t c = full; c < cols; c++) s = __builtin_fmaf(w0[c], x[c], s);
        y[r] = s;
    }
}

// ---- entry points ---------------------------------------------------------------------------------------------------
// Instruction-set levels: 2 = AVX512 (with AVX512-BF16 for bfloat16), 1 = AVX2 + FMA, 0 = none (the caller keeps
// torch's kernel). Without AVX512-BF16, bfloat16 is level 1 at most. Every entry point takes a `level`: 0 for the best
// this CPU has, or a lower one (comparisons, tests); it returns -1 where the CPU lacks the level asked for.
int gemv_level(int bf16) {
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (bf16) return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") ? 2 : avx2;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") ? 2 : avx2;
}

// The level the attention and RMSNorm kernels can run: their AVX512 bfloat16 variants need AVX512BW as well.
static int wide_level(int bf16) {
    __builtin_cpu_init();
    const int bw = !bf16 || __builtin_cpu_supports("avx512bw");
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") && bw) return 2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static rows_fn *gemv_kernel(int bf16, int level) {
    return bf16 ? (level == 2 ? rows_bf16_avx512 : rows_bf16_avx2) : (level == 2 ? rows_f32_avx512 : rows_f32_avx2);
}

// Inside a parallel region: y[rows] = w[rows, cols] @ x[cols], blocks of 64 rows dealt out to its threads
static void gemv_blocks(rows_fn *fn, const void *w, const void *x, void *y, int64_t rows, int64_t cols) {
    const int64_t block = 64, blocks = (rows + block - 1) / block;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t first = b * block, last = first + block < rows ? first + block : rows;
        fn(w, x, y, first, last, cols);
    }
}

// y[rows] = w[rows, cols] @ x[cols]
int gemv(int bf16, int level, const void *w, const void *x, void *y, int64_t rows, int64_t cols) {
    const int best = gemv_level(bf16);
    if (level == 0) level = best;
    if (level < 1 || level > best) return -1;
#pragma omp parallel
    gemv_blocks(gemv_kernel(bf16, level), w, x, y, rows, cols);
    return 0;
}

// ---- attend_one: a decode step's attention -------------------------------------------------------------------------
// Why: torch runs it as two tiny batched matmuls and a softmax per layer; in bfloat16 each matmul costs ~25 us of fixed
// overhead on these CPUs (a 9-head query against ~100 cached positions is ~60 thousand multiply-adds), ~2 ms of a
// SmolLM2 decode step. Here one (row, head) is a few microseconds: scores over the positions (vectorised by the
// compiler across positions, since keys are stored transposed), a float32 softmax, the weighted sum of values
// (vectorised across head_dim). Each (row, head) is one thread's fixed sequence: no dependence on the thread count.
static inline float widen(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// exp(x) for x <= 0 in float32, written so that the compiler vectorises it (libm's expf is a call per number, ~5 ns:
// most of a batch-64 step's attention): x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, Cody-Waite), exp(r) by
// Cephes' degree-6 polynomial (relative error ~1e-7, a few units in the last place), 2^n from the exponent bits.
// Below -87 (where exp underflows float32) it returns exp(-87) ~ 2e-38, nothing beside the row's maximum's exp(0) = 1.
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = __builtin_fmaf(n, -0.693359375f, x);
    r = __builtin_fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = __builtin_fmaf(p, r, 1.3981999507e-3f);
    p = __builtin_fmaf(p, r, 8.3334519073e-3f);
    p = __builtin_fmaf(p, r, 4.1665795894e-2f);
    p = __builtin_fmaf(p, r, 1.6666665459e-1f);
    p = __builtin_fmaf(p, r, 5.0000001201e-1f);
    p = __builtin_fmaf(p * r, r, r) + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

#define LANES 16  // partial maxima and sums in a fixed order: vectorised without reordering any one sum

// one (row, head): q [dim], keys_t [dim, stride] (position-contiguous), values [stride, dim], out [dim]; len positions
#define ATTEND_ROW(NAME, TARGET, T, TO_FLOAT, FROM_FLOAT)                                                             \
    TARGET static void NAME(const T *q, const T *keys_t, const T *values, T *out, int64_t len, int64_t dim,           \
                            int64_t stride, float scale, float *s) {                                                  \
        float o[dim], top_lane[LANES], sum_lane[LANES];                                                               \
        if (len <= 0) { /* nothing to attend to (not a decode step's case): zeros */                                  \
            for (int64_t d = 0; d < dim; d++) out[d] = FROM_FLOAT(0.0f);                                              \
            return;                                                                                                   \
        }                                                                                                             \
        const int64_t padded = (len + LANES - 1) / LANES * LANES;                                                     \
        for (int64_t l = 0; l < padded; l++) s[l] = 0.0f;                                                             \
        int64_t d = 0;                                                                                                \
        for (; d + 4 <= dim; d += 4) { /* 4 key rows per pass over the scores, summed as a tree */                    \
            const float q0 = TO_FLOAT(q[d]) * scale, q1 = TO_FLOAT(q[d + 1]) * scale;                                 \
            const float q2 = TO_FLOAT(q[d + 2]) * scale, q3 = TO_FLOAT(q[d + 3]) * scale;                             \
            const T *k0 = keys_t + d * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;               \
            for (int64_t l = 0; l < len; l++)                                                                         \
                s[l] += (q0 * TO_FLOAT(k0[l]) + q1 * TO_FLOAT(k1[l])) + (q2 * TO_FLOAT(k2[l]) + q3 * TO_FLOAT(k3[l]));\
        }                                                                                                             \
        for (; d < dim; d++) {                                                                                        \
            const float qd = TO_FLOAT(q[d]) * scale;                                                                  \
            const T *k = keys_t + d * stride;                                                                         \
            for (int64_t l = 0; l < len; l++) s[l] += qd * TO_FLOAT(k[l]);                                            \
        }                                                                                                             \
        for (int64_t l = len; l < padded; l++) s[l] = -INFINITY;                                                      \
        for (int j = 0; j < LANES; j++) top_lane[j] = -INFINITY, sum_lane[j] = 0.0f;                                  \
        for (int64_t l = 0; l < padded; l += LANES)                                                                   \
            for (int j = 0; j < LANES; j++) top_lane[j] = s[l + j] > top_lane[j] ? s[l + j] : top_lane[j];            \
        float top = -INFINITY, total = 0.0f;                                                                          \
        for (int j = 0; j < LANES; j++) top = top_lane[j] > top ? top_lane[j] : top;                                  \
        for (int64_t l = 0; l < len; l++) s[l] = exp_nonpositive(s[l] - top);                                         \
        for (int64_t l = len; l < padded; l++) s[l] = 0.0f;                                                           \
        for (int64_t l = 0; l < padded; l += LANES)                                                                   \
            for (int j = 0; j < LANES; j++) sum_lane[j] += s[l + j];                                                  \
        for (int j = 0; j < LANES; j++) total += sum_lane[j];                                                         \
        const float inv = 1.0f / total;                                                                               \
        for (int64_t d = 0; d < dim; d++) o[d] = 0.0f;                                                                \
        int64_t l = 0;                                                                                                \
        for (; l + 4 <= len; l += 4) { /* 4 value rows per pass over the output, summed as a tree */                  \
            const float p0 = s[l] * inv, p1 = s[l + 1] * inv, p2 = s[l + 2] * inv, p3 = s[l + 3] * inv;               \
            const T *v0 = values + l * dim, *v1 = v0 + dim, *v2 = v1 + dim, *v3 = v2 + dim;                           \
            for (int64_t d = 0; d < dim; d++)                                                                         \
                o[d] += (p0 * TO_FLOAT(v0[d]) + p1 * TO_FLOAT(v1[d])) + (p2 * TO_FLOAT(v2[d]) + p3 * TO_FLOAT(v3[d]));\
        }                                                                                                             \
        for (; l < len; l++) {                                                                                        \
            const float p = s[l] * inv;                                                                               \
            const T *v = values + l * dim;                                                                            \
            for (int64_t d = 0; d < dim; d++) o[d] += p * TO_FLOAT(v[d]);                                             \
        }                                                                                                             \
        for (int64_t d = 0; d < dim; d++) out[d] = FROM_FLOAT(o[d]);                                                  \
    }

#define AS_IS(x) (x)
#define AVX512 __attribute__((target("avx512f,fma")))
#define AVX512BW __attribute__((target("avx512f,avx512bw,fma")))  // bfloat16: 16-bit lanes vectorise with BW
ATTEND_ROW(attend_bf16_avx512, AVX512BW, uint16_t, widen, round_to_bf16)
ATTEND_ROW(attend_bf16_avx2, AVX2, uint16_t, widen, round_to_bf16)
ATTEND_ROW(attend_f32_avx512, AVX512, float, AS_IS, AS_IS)
ATTEND_ROW(attend_f32_avx2, AVX2, float, AS_IS, AS_IS)

typedef void attend_fn(const void *, const void *, const void *, void *, int64_t, int64_t, int64_t, float, float *);

static attend_fn *attend_kernel(int bf16, int level) {
    return (attend_fn *)(bf16 ? (level == 2 ? (void *)attend_bf16_avx512 : (void *)attend_bf16_avx2)
                              : (level == 2 ? (void *)attend_f32_avx512 : (void *)attend_f32_avx2));
}

// q [batch, heads, dim]; keys_t [*, kv_heads, dim, stride] and values [*, kv_heads, stride, dim] (the cache buffers:
// row b at b * kv_heads * dim * stride); out [batch, heads, dim]; row b attends to its positions [0, lengths[b]).
// Query head h reads kv head h / (heads / kv_heads). Returns -1 also where the scores buffer cannot be had.
int attend_one(int bf16, int level, const void *q, const void *keys_t, const void *values, void *out,
               const int64_t *lengths, int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t stride,
               float scale) {
    const int best = wide_level(bf16);
    if (level == 0) level = best;
    if (level < 1 || level > best) return -1;
    attend_fn *fn = attend_kernel(bf16, level);
    const size_t size = bf16 ? 2 : 4;
    const int64_t group = heads / kv_heads, tasks = batch * heads;
    int64_t longest = 0, work = 0;
    for (int64_t b = 0; b < batch; b++) {
        longest = lengths[b] > longest ? (lengths[b] < stride ? lengths[b] : stride) : longest;
        work += lengths[b];
    }
    // threads only where there is work enough to pay for waking them (~100 thousand multiply-adds); each thread's
    // scores in its own slice of one buffer, padded to the lanes
    const int parallel = work * heads * dim > (1 << 17), threads = parallel ? omp_get_max_threads() : 1;
    const int64_t slice = longest + LANES;
    float *buffer = malloc(sizeof(float) * slice * threads);
    if (!buffer) return -1;
#pragma omp parallel if (parallel) num_threads(threads)
    {
        float *scores = buffer + slice * omp_get_thread_num();
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t b = t / heads, h = t % heads, kv = b * kv_heads + h / group;
            const int64_t len = lengths[b] < stride ? lengths[b] : stride;  // (never past the buffers)
            fn((const char *)q + t * dim * size, (const char *)keys_t + kv * dim * stride * size,
               (const char *)values + kv * stride * dim * size, (char *)out + t * dim * size, len, dim, stride, scale,
               scores);
        }
    }
    free(buffer);
    return 0;
}

// ---- rms_norm: a decode step's RMSNorm -----------------------------------------------------------------------------
// Why: torch composes it of ~9 small ops (cast, square, mean, add, rsqrt, multiply, cast, weight), ~18 us a call at
// one row, 61 calls a SmolLM2 decode step: ~1.1 ms of ~9 ms. Here a row is one pass: the sum of squares in float32
// (lane-wise, fixed order), r = 1 / sqrt(mean + eps), then as the model's RMSNorm rounds: x * r rounded to the row's
// dtype, times the weight, rounded again.
#define RMS_NORM_ROWS(NAME, TARGET, T, TO_FLOAT, FROM_FLOAT)                                                          \
    TARGET static void NAME(const T *x, const T *w, T *out, int64_t rows, int64_t dim, float eps) {                 \
        for (int64_t r = 0; r < rows; r++) {                                                                          \
            const T *xr = x + r * dim;                                                                                \
            T *yr = out + r * dim;                                                                                    \
            float lane[LANES] = {0};                                                                                  \
            int64_t d = 0;                                                                                            \
            for (; d + LANES <= dim; d += LANES)                                                                      \
                for (int j = 0; j < LANES; j++) lane[j] += TO_FLOAT(xr[d + j]) * TO_FLOAT(xr[d + j]);                 \
            for (int j = 0; d + j < dim; j++) lane[j] += TO_FLOAT(xr[d + j]) * TO_FLOAT(xr[d + j]);                   \
            float total = 0.0f;                                                                                       \
            for (int j = 0; j < LANES; j++) total += lane[j];                                                         \
            const float scale = 1.0f / sqrtf(total / (float)dim + eps);                                               \
            for (d = 0; d < dim; d++)                                                                                 \
                yr[d] = FROM_FLOAT(TO_FLOAT(FROM_FLOAT(TO_FLOAT(xr[d]) * scale)) * TO_FLOAT(w[d]));                   \
        }                                                                                                             \
    }

RMS_NORM_ROWS(rms_norm_bf16_avx512, AVX512BW, uint16_t, widen, round_to_bf16)
RMS_NORM_ROWS(rms_norm_bf16_avx2, AVX2, uint16_t, widen, round_to_bf16)
RMS_NORM_ROWS(rms_norm_f32_avx512, AVX512, float, AS_IS, AS_IS)
RMS_NORM_ROWS(rms_norm_f32_avx2, AVX2, float, AS_IS, AS_IS)

typedef void norm_fn(const void *, const void *, void *, int64_t, int64_t, float);

static norm_fn *norm_kernel(int bf16, int level) {
    return (norm_fn *)(bf16 ? (level == 2 ? (void *)rms_norm_bf16_avx512 : (void *)rms_norm_bf16_avx2)
                            : (level == 2 ? (void *)rms_norm_f32_avx512 : (void *)rms_norm_f32_avx2));
}

// out[rows, dim] = RMSNorm(x[rows, dim]) * w[dim]
int rms_norm(int bf16, int level, const void *x, const void *w, void *out, int64_t rows, int64_t dim, float eps) {
    const int best = wide_level(bf16);
    if (level == 0) level = best;
    if (level < 1 || level > best) return -1;
    norm_kernel(bf16, level)(x, w, out, rows, dim, eps);
    return 0;
}

// ---- Q8_0 weights: gemv reading int8 copies of the matrices ---------------------------------------------------------
// Why: a batch-1 step reads every weight once, so its time is the weights' bytes over the memory's bandwidth. Q8_0
// (llama.cpp's name) holds each block of 32 consecutive weights of a row as 32 int8 numbers q and one float32 scale s
// (w ~ s q, s = max |w| / 127 over the block): 1.125 bytes a weight against bfloat16's 2. Its rounding error, at most
// s / 2 = max |w| / 254 per weight, is of bfloat16's size (2^-9 of each weight).
// Widening each int8 weight to a float32 product costs ~7 vector instructions per 32 weights, which on 2 Zen 4 cores
// read ~29 weights a nanosecond (int16 inputs and vpmaddwd: ~31): compute-bound below the memory's ~40. So the input
// is quantized as the weights are, Q8_0 per block of 32 (xq = rint(x / t), t = max |x| / 127: each input off by at most
// 1/254 of its block's largest), as llama.cpp does, and a block's 32 products are integer dot products, exact in int32
// (the signs moved onto the weights, as the unsigned-by-signed instructions need: |xq| (sign(xq) q)):
//   y[r] = sum over blocks b of (s[r, b] t[b]) * (sum over the block's i of q[r, i] xq[i])   in float32, blocks in order
// Each thread quantizes its own copy of x (a few thousand numbers). A last block shorter than 32 (cols not a multiple
// of 32) is summed in scalar code after the full ones.
typedef void q8_rows_fn(const int8_t *q, const float *scales, const int8_t *xq, const float *xt, void *y,
                        int64_t first, int64_t last, int64_t cols, int bf16);

#define Q8_BLOCK 32

// element i of a bfloat16 or float32 array, as float32; and a float32 stored rounded to the array's dtype
static inline float load_as_float(const void *p, int64_t i, int bf16) {
    return bf16 ? widen(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_rounded(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = round_to_bf16(v);
    else ((float *)p)[i] = v;
}

static inline float q8_tail(const int8_t *q, const int8_t *xq, int64_t from, int64_t cols, float scale) {
    int32_t t = 0;
    for (int64_t c = from; c < cols; c++) t += (int32_t)q[c] * xq[c];
    return scale * (float)t;
}

// x[cols] (bfloat16 or float32) -> xq[cols] int8 and t[ceil(cols / 32)] float32, per block xq = rint(x / t) with
// t = max |x| / 127 (t = 0 and xq = 0 for a block of zeros)
static void quantize_input(const void *x, int8_t *xq, float *t, int64_t cols, int bf16) {
    for (int64_t from = 0; from < cols; from += Q8_BLOCK) {
        const int64_t n = cols - from < Q8_BLOCK ? cols - from : Q8_BLOCK;
        float v[Q8_BLOCK], top = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            v[i] = load_as_float(x, from + i, bf16);
            top = fabsf(v[i]) > top ? fabsf(v[i]) : top;
        }
        const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const float r = __builtin_rintf(v[i] * inverse);
            xq[from + i] = (int8_t)(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
        }
        t[from / Q8_BLOCK] = top / 127.0f;
    }
}

// one block's 32 products q . xq in 8 int32 lanes: AVX512-VNNI's dot product on 256 bits, or AVX2's two steps
#define AVX512VNNI __attribute__((target("avx512f,avx512vl,avx512vnni,avx2,fma")))

AVX512VNNI static inline __m256i block_dot_vnni(const int8_t *q, const int8_t *xq) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(x, x),
                               _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)q), x));
}

AVX2 static inline __m256i block_dot_avx2(const int8_t *q, const int8_t *xq) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x),  // |x| <= 127: a pair's sum fits int16
                                               _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)q), x));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

#define Q8_ROWS(NAME, TARGET, BLOCK_DOT)                                                                              \
    TARGET static void NAME(const int8_t *q, const float *scales, const int8_t *xq, const float *xt, void *y,         \
                            int64_t first, int64_t last, int64_t cols, int bf16) {                                    \
        const int64_t full = cols / Q8_BLOCK, blocks = (cols + Q8_BLOCK - 1) / Q8_BLOCK;                              \
        for (int64_t r = first; r < last; r++) {                                                                      \
            const int8_t *qr = q + r * cols;                                                                          \
            const float *sr = scales + r * blocks;                                                                    \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;                                                                 \
            int64_t b = 0;                                                                                            \
            for (; b + 2 <= full; b += 2) { /* two blocks a pass: two independent accumulators */                     \
                const __m256i d0 = BLOCK_DOT(qr + b * Q8_BLOCK, xq + b * Q8_BLOCK);                                   \
                const __m256i d1 = BLOCK_DOT(qr + (b + 1) * Q8_BLOCK, xq + (b + 1) * Q8_BLOCK);                       \
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(sr[b] * xt[b]), a0);                      \
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(sr[b + 1] * xt[b + 1]), a1);              \
            }                                                                                                         \
            if (b < full)                                                                                             \
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(BLOCK_DOT(qr + b * Q8_BLOCK, xq + b * Q8_BLOCK)),             \
                                     _mm256_set1_ps(sr[b] * xt[b]), a0);                                              \
            float sum = sum8(_mm256_add_ps(a0, a1));                                                                  \
            if (full < blocks) sum += q8_tail(qr, xq, full * Q8_BLOCK, cols, sr[full] * xt[full]);                    \
            store_rounded(y, r, sum, bf16);                                                                           \
        }                                                                                                             \
    }

Q8_ROWS(rows_q8_vnni, AVX512VNNI, block_dot_vnni)
Q8_ROWS(rows_q8_avx2, AVX2, block_dot_avx2)

static q8_rows_fn *q8_kernel(int level) { return level == 2 ? rows_q8_vnni : rows_q8_avx2; }

// a thread's room for a quantized input of up to `cols` numbers: its float32 scales, then its int8 numbers
static int64_t q8_input_bytes(int64_t cols) {
    return (int64_t)((cols + 31) / 32 * 32) + (int64_t)sizeof(float) * ((cols + 31) / 32);
}

// Inside a parallel region: y[rows] (x's dtype) = (q, scales) @ x[cols]; room: this thread's q8_input_bytes(cols)
static void q8_blocks(q8_rows_fn *fn, const int8_t *q, const float *scales, const void *x, void *room, void *y,
                      int64_t rows, int64_t cols, int bf16) {
    float *xt = room;
    int8_t *xq = (int8_t *)(xt + (cols + 31) / 32);
    quantize_input(x, xq, xt, cols, bf16);
    const int64_t block = 64, blocks = (rows + block - 1) / block;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t first = b * block, last = first + block < rows ? first + block : rows;
        fn(q, scales, xq, xt, y, first, last, cols, bf16);
    }
}

// The level the Q8_0 kernels can run: 2 with AVX512-VNNI (on 256 bits), 1 with AVX2 + FMA.
int q8_level(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2")
        && __builtin_cpu_supports("fma"))
        return 2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// y[rows] = (q [rows, cols] int8, scales [rows, ceil(cols / 32)] float32) @ x[cols]; x and y bfloat16 or float32
int gemv_q8(int bf16, int level, const int8_t *q, const float *scales, const void *x, void *y, int64_t rows,
            int64_t cols) {
    const int best = q8_level();
    if (level == 0) level = best;
    if (level < 1 || level > best) return -1;
    const int threads = omp_get_max_threads();
    const int64_t room = q8_input_bytes(cols);
    char *buffer = malloc(room * threads);
    if (!buffer) return -1;
#pragma omp parallel num_threads(threads)
    q8_blocks(q8_kernel(level), q, scales, x, buffer + room * omp_get_thread_num(), y, rows, cols, bf16);
    free(buffer);
    return 0;
}

// ---- decode_layers: the transformer blocks for one token of one row ------------------------------------------------
// Why: at batch 1 the blocks' weight products are ~60% of a SmolLM2 decode step and the rest was ~40 small torch ops a
// block (rotary embedding, cache writes, residual adds, SwiGLU, their casts and views) at a few microseconds each plus
// Python between them: ~8 ms of a 22 ms step on a 2-core AMD EPYC (Zen 4). Here every block of the step is one call and
// one parallel region:
//   h   = x + wo @ attention(rope(q), rope(k) and v written to the cache at `pos`)   with q|k|v = wqkv @ norm(x)
//   out = h + w2 @ (silu(g) * u)                                                    with g|u = w13 @ norm(h)
// with the kernels above (gemv's rows, attend_one's row, rms_norm's rows) and the roundings of the model's own ops:
// each op's result is rounded to the dtype as torch rounds it (the rotary product as ATen's complex multiply: two
// rounded products, then their sum). Only the sigmoid's exp differs from torch's (Cody-Waite + Cephes, ~1e-7 relative).
__attribute__((optimize("fp-contract=off")))  // two rounded products, then one rounded sum, as ATen's complex multiply
static void rotate_pairs(void *x, const float *cos_sin, int64_t heads, int64_t dim, int bf16) {
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < dim / 2; i++) {
            const int64_t at = h * dim + 2 * i;
            const float a = load_as_float(x, at, bf16), b = load_as_float(x, at + 1, bf16);
            const float c = cos_sin[2 * i], s = cos_sin[2 * i + 1];
            const float ac = a * c, bs = b * s, as = a * s, bc = b * c;
            store_rounded(x, at, ac - bs, bf16);
            store_rounded(x, at + 1, as + bc, bf16);
        }
}

// the block's elementwise ops, typed so that the compiler vectorises them: out = a + b; act = silu(g) * u with
// silu(g) = g * sigmoid(g), the sigmoid from e = exp(-|g|) <= 1 (no overflow): 1 / (1 + e) for g >= 0, e / (1 + e)
#define ELEMENTWISE(ADD, SWIGLU, TARGET, T, TO_FLOAT, FROM_FLOAT)                                                     \
    TARGET static void ADD(const T *a, const T *b, T *out, int64_t n) {                                               \
        for (int64_t i = 0; i < n; i++) out[i] = FROM_FLOAT(TO_FLOAT(a[i]) + TO_FLOAT(b[i]));                         \
    }                                                                                                                 \
    TARGET static void SWIGLU(const T *gu, T *act, int64_t hidden) {                                                  \
        for (int64_t j = 0; j < hidden; j++) {                                                                        \
            const float g = TO_FLOAT(gu[j]), e = exp_nonpositive(-fabsf(g));                                          \
            const float silu = g * ((g >= 0.0f ? 1.0f : e) / (1.0f + e));                                             \
            act[j] = FROM_FLOAT(TO_FLOAT(FROM_FLOAT(silu)) * TO_FLOAT(gu[hidden + j]));                              \
        }                                                                                                             \
    }

ELEMENTWISE(add_bf16_avx512, swiglu_bf16_avx512, AVX512BW, uint16_t, widen, round_to_bf16)
ELEMENTWISE(add_bf16_avx2, swiglu_bf16_avx2, AVX2, uint16_t, widen, round_to_bf16)
ELEMENTWISE(add_f32_avx512, swiglu_f32_avx512, AVX512, float, AS_IS, AS_IS)
ELEMENTWISE(add_f32_avx2, swiglu_f32_avx2, AVX2, float, AS_IS, AS_IS)

#define LAYER_POINTERS 8  // per layer: attention_norm, ffn_norm, wqkv, wo, w13, w2, keys_t, values
#define Q8_LAYER_POINTERS 12  // with Q8_0 matrices: the four matrices' int8 numbers, then (after values) their scales

// one of a block's four products (k: 0 wqkv, 1 wo, 2 w13, 3 w2), from its weights or their Q8_0 copy
static inline void product(const void *const *w, int k, int q8, rows_fn *gemv_rows, q8_rows_fn *q8_rows,
                           const void *x, void *room, void *y, int64_t rows, int64_t cols, int bf16) {
    if (q8) q8_blocks(q8_rows, w[2 + k], w[8 + k], x, room, y, rows, cols, bf16);
    else gemv_blocks(gemv_rows, w[2 + k], x, y, rows, cols);
}

// x, out [dim] (the residual into the first block and out of the last; may not alias); weights: n_layers x
// LAYER_POINTERS pointers, per layer attention_norm and ffn_norm [dim], wqkv [(heads + 2 kv_heads) head_dim, dim] (q's
// heads, then k's, then v's), wo [dim, heads head_dim], w13 [2 hidden, dim] (w1's rows, then w3's), w2 [dim, hidden],
// keys_t [kv_heads, head_dim, stride] and values [kv_heads, stride, head_dim] (the row's cache: the token's key and
// value go to position `pos`, and its query attends to positions [0, pos] with its scores scaled by `scale`);
// cos_sin [head_dim / 2, 2] float32, the position's rotation. q8: the matrices are Q8_0 copies, Q8_LAYER_POINTERS a
// layer (int8 numbers in the matrices' places, their scales [rows, ceil(cols / 32)] after values).
int decode_layers(int bf16, int level, int q8, const void *x, void *out, int64_t n_layers, const void *const *weights,
                  const float *cos_sin, int64_t pos, int64_t stride, int64_t dim, int64_t heads, int64_t kv_heads,
                  int64_t head_dim, int64_t hidden, float scale, float eps) {
    int best = gemv_level(bf16) < wide_level(bf16) ? gemv_level(bf16) : wide_level(bf16);
    if (q8 && q8_level() < best) best = q8_level();
    if (level == 0) level = best;
    if (level < 1 || level > best || pos < 0 || pos >= stride || n_layers < 1 || heads % kv_heads) return -1;
    const int wide = level == 2;
    rows_fn *gemv_rows = gemv_kernel(bf16, level);
    q8_rows_fn *q8_rows = q8_kernel(level);
    attend_fn *attend = attend_kernel(bf16, level);
    norm_fn *norm = norm_kernel(bf16, level);
    typedef void add_fn(const void *, const void *, void *, int64_t);
    typedef void swiglu_fn(const void *, void *, int64_t);
    add_fn *add = (add_fn *)(bf16 ? (wide ? (void *)add_bf16_avx512 : (void *)add_bf16_avx2)
                                  : (wide ? (void *)add_f32_avx512 : (void *)add_f32_avx2));
    swiglu_fn *swiglu = (swiglu_fn *)(bf16 ? (wide ? (void *)swiglu_bf16_avx512 : (void *)swiglu_bf16_avx2)
                                           : (wide ? (void *)swiglu_f32_avx512 : (void *)swiglu_f32_avx2));
    const size_t size = bf16 ? 2 : 4;
    const int64_t qkv_rows = (heads + 2 * kv_heads) * head_dim, len = pos + 1, group = heads / kv_heads;
    const int threads = omp_get_max_threads();
    const int64_t slice = len + LANES, per_layer = q8 ? Q8_LAYER_POINTERS : LAYER_POINTERS;
    int64_t widest = dim > hidden ? dim : hidden;
    widest = widest > heads * head_dim ? widest : heads * head_dim;
    // scratch: two residuals (between blocks), the normed input, q|k|v, the attention's output, h, g|u, silu(g) * u;
    // each thread's attention scores and its quantized copy of a product's input (Q8_0)
    char *scratch = malloc(size * (4 * dim + qkv_rows + heads * head_dim + 3 * hidden));
    const int64_t per_thread = sizeof(float) * slice + q8_input_bytes(widest);
    char *scores = malloc(per_thread * threads);
    if (!scratch || !scores) {
        free(scratch);
        free(scores);
        return -1;
    }
    char *residual[2] = {scratch, scratch + size * dim}, *normed = residual[1] + size * dim;
    char *qkv = normed + size * dim, *attended = qkv + size * qkv_rows, *h = attended + size * heads * head_dim;
    char *gu = h + size * dim, *act = gu + size * 2 * hidden;
#pragma omp parallel num_threads(threads)
    {
        float *own_scores = (float *)(scores + per_thread * omp_get_thread_num());
        void *xf = own_scores + slice;
        for (int64_t layer = 0; layer < n_layers; layer++) {
            const void *const *w = weights + layer * per_layer;
            char *keys_t = (char *)w[6], *values = (char *)w[7];
            const void *in = layer == 0 ? x : residual[(layer - 1) % 2];
            void *next = layer == n_layers - 1 ? out : residual[layer % 2];
#pragma omp single
            norm(in, w[0], normed, 1, dim, eps);
            product(w, 0, q8, gemv_rows, q8_rows, normed, xf, qkv, qkv_rows, dim, bf16);
#pragma omp single
            {
                rotate_pairs(qkv, cos_sin, heads + kv_heads, head_dim, bf16);  // q's heads, then k's
                for (int64_t kv = 0; kv < kv_heads; kv++)
                    for (int64_t d = 0; d < head_dim; d++) {
                        const int64_t k_at = (heads + kv) * head_dim + d, v_at = k_at + kv_heads * head_dim;
                        memcpy(keys_t + size * ((kv * head_dim + d) * stride + pos), qkv + size * k_at, size);
                        memcpy(values + size * ((kv * stride + pos) * head_dim + d), qkv + size * v_at, size);
                    }
            }
#pragma omp for schedule(static)
            for (int64_t t = 0; t < heads; t++) {
                const int64_t kv = t / group;
                attend(qkv + size * t * head_dim, keys_t + size * kv * head_dim * stride,
                       values + size * kv * stride * head_dim, attended + size * t * head_dim, len, head_dim, stride,
                       scale, own_scores);
            }
            // wo @ attended, then h = in + it
            product(w, 1, q8, gemv_rows, q8_rows, attended, xf, next, dim, heads * head_dim, bf16);
#pragma omp single
            {
                add(in, next, h, dim);
                norm(h, w[1], normed, 1, dim, eps);
            }
            product(w, 2, q8, gemv_rows, q8_rows, normed, xf, gu, 2 * hidden, dim, bf16);
#pragma omp single
            swiglu(gu, act, hidden);
            product(w, 3, q8, gemv_rows, q8_rows, act, xf, next, dim, hidden, bf16);
#pragma omp single
            add(h, next, next, dim);
        }
    }
    free(scratch);
    free(scores);
    return 0;
}
