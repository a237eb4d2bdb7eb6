/* Decode attention over vLLM's CPU paged KV cache: one query token per sequence.
 *
 * Built and loaded by rlhf_ray/workers/decode_attention.py (AVX-512F, OpenMP).
 *
 * The cache layout is the one vLLM's CPU attention writes (checked against vLLM's own kernel
 * when the module installs itself): a layer's cache is [blocks][kv_heads][2 * block_size][D];
 * in each (block, kv head) slab the first block_size * D elements hold K transposed (dim-major:
 * element d * block_size + t is dim d of the block's token t) and the next block_size * D hold
 * V by token (t * D + d).
 *
 * One task is one (sequence, kv head): its G = num_heads / num_kv_heads query heads share every
 * K and V row read. Scores are computed 32 tokens at a time along K's token axis, softmax in
 * fp32, then V rows are accumulated into G * D fp32 sums. While a task computes, the K and V
 * rows of the thread's next task are prefetched into L2, one cache line per step of the
 * current task's loops: at decode the layer's KV is never in cache (the whole model's KV is
 * read once per step), and issuing the loads ahead is what keeps the memory system busy
 * while the arithmetic runs. Tasks are split between threads in contiguous ranges of equal
 * work (tokens), so each thread knows its next task.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define MAXG 8

static inline __m512 load16_bf16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }

/* fp32 -> bf16, round to nearest even (NaN stays NaN) */
static inline void store16_bf16(uint16_t *p, __m512 x) {
    __m512i bits = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

static inline void store16_f32(float *p, __m512 x) { _mm512_storeu_ps(p, x); }

static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n); /* 2^f on [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

typedef struct {
    const void *cache;          /* the layer's cache */
    int64_t block_stride;       /* elements between blocks */
    int64_t head_stride;        /* elements between a block's kv heads */
    int block_size;
    const int32_t *block_table; /* [seqs][blocks per seq] */
    int64_t block_table_stride;
    const int32_t *seq_lens;
    int num_kv_heads;
} Paged;

/* The (block, kv head) slab holding token t of sequence seq. */
static inline int64_t slab(const Paged *c, int seq, int head, int t) {
    int64_t block = c->block_table[seq * c->block_table_stride + t / c->block_size];
    return block * c->block_stride + head * c->head_stride;
}

/* Softmax weights (unnormalised) in place over scores[0, n), -inf past n up to `padded`;
 * returns 1 / their sum. */
static float softmax_weights(float *s, int n, int padded) {
    for (int t = n; t < padded; t++) s[t] = -INFINITY;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int t = 0; t < padded; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + t));
    __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m)), sum = _mm512_setzero_ps();
    for (int t = 0; t < padded; t += 16) {
        __m512 x = _mm512_loadu_ps(s + t);
        __m512 e = exp16(_mm512_sub_ps(x, mx));
        e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), e);
        sum = _mm512_add_ps(sum, e);
        _mm512_storeu_ps(s + t, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

/* One task of element type T and head size D: q [G][D] fp32, pre-scaled; out [G][D] fp32.
 * (seq2, head2, n2): the thread's next task, prefetched (n2 = 0: none). */
#define DEFINE_TASK(NAME, T, D, LOAD16)                                                              \
    static void NAME(const Paged *c, int seq, int head, int G, const float *q, float *out,              \
                     float *scores, int seq2, int head2, int n2) {                                      \
        const T *cache = (const T *)c->cache;                                                           \
        const int n = c->seq_lens[seq], bs = c->block_size, padded = (n + 31) & ~31;                    \
        for (int t0 = 0; t0 < n; t0 += 32) { /* scores: 32 tokens of K^T rows at a time */            \
            const T *k = cache + slab(c, seq, head, t0) + t0 % bs;                                      \
            const T *k2 = t0 < n2 ? cache + slab(c, seq2, head2, t0) + t0 % bs : NULL;                  \
            __m512 acc[MAXG][2];                                                                        \
            for (int g = 0; g < G; g++) acc[g][0] = acc[g][1] = _mm512_setzero_ps();                    \
            for (int d = 0; d < D; d++) {                                                               \
                if (k2) { /* 32 tokens of the next task's row d: 64 bytes in bf16, 128 in fp32 */      \
                    _mm_prefetch((const char *)(k2 + (int64_t)d * bs), _MM_HINT_T1);                   \
                    if (sizeof(T) == 4) _mm_prefetch((const char *)(k2 + (int64_t)d * bs + 16), _MM_HINT_T1); \
                }                                                                                       \
                __m512 k0 = LOAD16(k + (int64_t)d * bs), k1 = LOAD16(k + (int64_t)d * bs + 16);         \
                for (int g = 0; g < G; g++) {                                                           \
                    __m512 qd = _mm512_set1_ps(q[g * D + d]);                                           \
                    acc[g][0] = _mm512_fmadd_ps(qd, k0, acc[g][0]);                                     \
                    acc[g][1] = _mm512_fmadd_ps(qd, k1, acc[g][1]);                                     \
                }                                                                                       \
            }                                                                                           \
            for (int g = 0; g < G; g++) {                                                               \
                _mm512_storeu_ps(scores + g * padded + t0, acc[g][0]);                                  \
                _mm512_storeu_ps(scores + g * padded + t0 + 16, acc[g][1]);                             \
            }                                                                                           \
        }                                                                                               \
        float inv[MAXG];                                                                                \
        for (int g = 0; g < G; g++) inv[g] = softmax_weights(scores + g * padded, n, padded);           \
        __m512 o[MAXG][D / 16];                                                                         \
        for (int g = 0; g < G; g++)                                                                     \
            for (int j = 0; j < D / 16; j++) o[g][j] = _mm512_setzero_ps();                             \
        for (int t = 0; t < n; t++) { /* V rows, weighted */                                            \
            const T *v = cache + slab(c, seq, head, t) + (int64_t)(bs + t % bs) * D;                    \
            if (t < n2) {                                                                               \
                const char *v2 = (const char *)(cache + slab(c, seq2, head2, t) + (int64_t)(bs + t % bs) * D); \
                for (int b = 0; b < D * (int)sizeof(T); b += 64) _mm_prefetch(v2 + b, _MM_HINT_T1);     \
            }                                                                                           \
            __m512 vj[D / 16];                                                                          \
            for (int j = 0; j < D / 16; j++) vj[j] = LOAD16(v + 16 * j);                                \
            for (int g = 0; g < G; g++) {                                                               \
                __m512 p = _mm512_set1_ps(scores[g * padded + t]);                                      \
                for (int j = 0; j < D / 16; j++) o[g][j] = _mm512_fmadd_ps(p, vj[j], o[g][j]);          \
            }                                                                                           \
        }                                                                                               \
        for (int g = 0; g < G; g++)                                                                     \
            for (int j = 0; j < D / 16; j++)                                                            \
                _mm512_storeu_ps(out + g * D + 16 * j, _mm512_mul_ps(o[g][j], _mm512_set1_ps(inv[g]))); \
    }

DEFINE_TASK(task_bf16_32, uint16_t, 32, load16_bf16)
DEFINE_TASK(task_bf16_64, uint16_t, 64, load16_bf16)
DEFINE_TASK(task_bf16_128, uint16_t, 128, load16_bf16)
DEFINE_TASK(task_f32_32, float, 32, load16_f32)
DEFINE_TASK(task_f32_64, float, 64, load16_f32)
DEFINE_TASK(task_f32_128, float, 128, load16_f32)

typedef void (*task_fn)(const Paged *, int, int, int, const float *, float *, float *, int, int, int);

/* query [seqs][num_heads][D], output the same, rows `query_stride` / `output_stride` elements
 * apart; element type bf16 (is_bf16) or fp32, like the cache. Returns 0, or -1 for a shape
 * this kernel does not take (the caller falls back to vLLM's). */
int rlhf_decode_attention(const void *query, int64_t query_stride, void *output, int64_t output_stride,
                          const void *cache, int64_t block_stride, int64_t head_stride, int block_size,
                          const int32_t *block_table, int64_t block_table_stride, const int32_t *seq_lens,
                          int num_seqs, int num_heads, int num_kv_heads, int head_size, float scale,
                          int is_bf16) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads || num_heads / num_kv_heads > MAXG) return -1;
    if (block_size % 32) return -1;
    task_fn task = NULL;
    switch (head_size) {
        case 32: task = is_bf16 ? task_bf16_32 : task_f32_32; break;
        case 64: task = is_bf16 ? task_bf16_64 : task_f32_64; break;
        case 128: task = is_bf16 ? task_bf16_128 : task_f32_128; break;
        default: return -1;
    }
    const int G = num_heads / num_kv_heads, D = head_size, num_tasks = num_seqs * num_kv_heads;
    Paged c = {cache, block_stride, head_stride, block_size, block_table, block_table_stride, seq_lens,
               num_kv_heads};
    int max_len = 0;
    int64_t total = 0;
    for (int s = 0; s < num_seqs; s++) {
        total += seq_lens[s];
        if (seq_lens[s] > max_len) max_len = seq_lens[s];
    }
    total *= num_kv_heads;
    int failed = 0;
#pragma omp parallel
    {
        const int threads = omp_get_num_threads(), me = omp_get_thread_num();
        /* this thread's tasks: those whose work starts in [total * me / threads, ... (me + 1)) */
        const int64_t lo_work = total * me / threads, hi_work = total * (me + 1) / threads;
        int lo = num_tasks, hi = num_tasks;
        int64_t work = 0;
        for (int i = 0; i < num_tasks; i++) {
            if (work >= lo_work && lo == num_tasks) lo = i;
            if (work >= hi_work) { hi = i; break; }
            work += seq_lens[i / num_kv_heads];
        }
        if (lo > hi) lo = hi;
        const int padded = (max_len + 31) & ~31;
        float *scores = aligned_alloc(64, sizeof(float) * (size_t)(G * padded + 16));
        float *q = aligned_alloc(64, sizeof(float) * MAXG * 128);
        float *out = aligned_alloc(64, sizeof(float) * MAXG * 128);
        if (!scores || !q || !out) {
#pragma omp atomic write
            failed = 1;
        } else {
            const __m512 sc = _mm512_set1_ps(scale);
            for (int i = lo; i < hi; i++) {
                const int seq = i / num_kv_heads, head = i % num_kv_heads;
                const int64_t at = seq * query_stride + (int64_t)head * G * D;
                for (int e = 0; e < G * D; e += 16)
                    _mm512_storeu_ps(q + e, _mm512_mul_ps(is_bf16 ? load16_bf16((const uint16_t *)query + at + e)
                                                                  : load16_f32((const float *)query + at + e), sc));
                const int next = i + 1 < hi ? i + 1 : -1;
                const int seq2 = next < 0 ? 0 : next / num_kv_heads, head2 = next < 0 ? 0 : next % num_kv_heads;
                task(&c, seq, head, G, q, out, scores, seq2, head2, next < 0 ? 0 : seq_lens[seq2]);
                const int64_t to = seq * output_stride + (int64_t)head * G * D;
                for (int e = 0; e < G * D; e += 16) {
                    if (is_bf16) store16_bf16((uint16_t *)output + to + e, _mm512_loadu_ps(out + e));
                    else store16_f32((float *)output + to + e, _mm512_loadu_ps(out + e));
                }
            }
        }
        free(scores);
        free(q);
        free(out);
    }
    return failed ? -2 : 0;
}
