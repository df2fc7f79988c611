/* Kernels of funcpatch's own forward when nothing records it (see __init__.py), over the
   MKL sgemm that torch links. Each parallel loop runs MKL single-threaded inside it (MKL's
   default within OpenMP) and computes each tile the same way whatever thread takes it,
   so results do not depend on the number of threads. Both return 0, or -1 when their
   per-thread buffers cannot be allocated (nothing is written then). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

void sgemm_(const char *transa, const char *transb, const int *m, const int *n, const int *k, const float *alpha,
            const float *a, const int *lda, const float *b, const int *ldb, const float *beta, float *c,
            const int *ldc);

static int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

/* Room for n_threads buffers of per_thread floats (a multiple of 16: each 64-byte aligned). */
static float *thread_buffers(int64_t per_thread, int n_threads) {
    return aligned_alloc(64, (size_t)round_up(per_thread * n_threads * (int64_t)sizeof(float), 64));
}

static int this_thread(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* A layer's Q/K/V slots from their patched inputs, in one pass over tiles of tokens.

   For every slot s and token t, with x = sum_r mix[s, r] * rows[r, t, :] (the slot's
   patched input, d values):

       out[s, t, :] = x @ weight[s] / sqrt(mean(x * x) + eps)        (d_head values)

   that is, an RMS norm (its scale already folded into weight) and the slot's projection.
   Unfused, the inputs of all slots make a [slots, tokens, d] tensor that is written once
   and read twice (norm, projection); here each thread mixes a tile of tokens into a
   buffer of its own that stays in its cache, then norms and projects it. */
int funcpatch_slot_projection(const float *rows, int64_t row_stride, int n_rows, const float *mix, int n_slots,
                              const float *weight, int d, int d_head, int64_t n_tokens, float eps, int tile,
                              int n_threads, float *out) {
    const int64_t n_tiles = (n_tokens + tile - 1) / tile;
    const int64_t per_thread = round_up((int64_t)n_slots * tile * d + tile, 16); /* inputs, then 1 / rms */
    if (n_threads < 1) n_threads = 1;
    float *buffers = thread_buffers(per_thread, n_threads);
    if (buffers == NULL) return -1;
#pragma omp parallel num_threads(n_threads)
    {
        float *x = buffers + per_thread * this_thread();
        float *rstd = x + (int64_t)n_slots * tile * d;
        const float one = 1.0f, zero = 0.0f;
#pragma omp for schedule(static)
        for (int64_t ti = 0; ti < n_tiles; ++ti) {
            const int64_t t0 = ti * tile;
            const int tt = (int)(n_tokens - t0 < tile ? n_tokens - t0 : tile);
            /* row-major x[slots, tt * d] = mix[slots, n_rows] @ rows[:, t0 * d : (t0 + tt) * d],
               as column-major x^T = rows^T mix^T */
            const int cols = tt * d, ld_rows = (int)row_stride, ld_x = tile * d;
            sgemm_("N", "N", &cols, &n_slots, &n_rows, &one, rows + t0 * d, &ld_rows, mix, &n_rows, &zero, x, &ld_x);
            for (int s = 0; s < n_slots; ++s) {
                const float *xs = x + (int64_t)s * tile * d;
                for (int t = 0; t < tt; ++t) {
                    const float *v = xs + (int64_t)t * d;
                    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
                    for (int j = 0; j < d; ++j) squares += v[j] * v[j];
                    rstd[t] = 1.0f / sqrtf(squares / (float)d + eps);
                }
                /* row-major out[s, t0:t0+tt, :] = xs[tt, d] @ weight[s][d, d_head] */
                float *ys = out + ((int64_t)s * n_tokens + t0) * d_head;
                sgemm_("N", "N", &d_head, &tt, &d, &one, weight + (int64_t)s * d * d_head, &d_head, xs, &d, &zero, ys,
                       &d_head);
                for (int t = 0; t < tt; ++t) {
                    const float r = rstd[t];
                    float *y = ys + (int64_t)t * d_head;
                    for (int j = 0; j < d_head; ++j) y[j] *= r;
                }
            }
        }
    }
    free(buffers);
    return 0;
}

/* The heads' differences and their sum, for rows in tiles (one thread per tile):

       diff[h, r, :] = patch[h, r, :] - z[h, r, :] @ w[h]      sum[r, :] = sum_h z[h, r, :] @ w[h]

   w[h] is [d_head, d] with strides (w_k, w_j): w_k 1 and w_j >= d_head, or w_j 1 and
   w_k >= d. Unfused, the differences take a copy of the patch values and a product over
   it, and the sum (the attention output) a second product over the heads' z; here each
   head's product is formed once, in the thread's cache, and read for both. */
int funcpatch_head_outputs(const float *patch, const float *z, const float *w, int64_t w_h, int64_t w_k, int64_t w_j,
                           int n_heads, int64_t n_rows, int d_head, int d, int tile, int n_threads, float *diff,
                           float *sum) {
    const int64_t n_tiles = (n_rows + tile - 1) / tile;
    const char *trans = w_k == 1 ? "T" : "N";
    const int ld = (int)(w_k == 1 ? w_j : w_k);
    const int64_t per_thread = round_up((int64_t)tile * d, 16); /* one head's product */
    if (n_threads < 1) n_threads = 1;
    float *buffers = thread_buffers(per_thread, n_threads);
    if (buffers == NULL) return -1;
#pragma omp parallel num_threads(n_threads)
    {
        float *product = buffers + per_thread * this_thread();
        const float one = 1.0f, zero = 0.0f;
#pragma omp for schedule(static)
        for (int64_t ti = 0; ti < n_tiles; ++ti) {
            const int64_t r0 = ti * tile;
            const int tt = (int)(n_rows - r0 < tile ? n_rows - r0 : tile);
            const int64_t n = (int64_t)tt * d;
            float *s = sum + r0 * d;
            for (int h = 0; h < n_heads; ++h) {
                /* row-major product[tt, d] = z[h, r0:r0+tt, :] @ w[h] */
                sgemm_(trans, "N", &d, &tt, &d_head, &one, w + h * w_h, &ld, z + ((int64_t)h * n_rows + r0) * d_head,
                       &d_head, &zero, product, &d);
                const float *p = patch + ((int64_t)h * n_rows + r0) * d;
                float *o = diff + ((int64_t)h * n_rows + r0) * d;
                if (h == 0) {
                    for (int64_t j = 0; j < n; ++j) {
                        o[j] = p[j] - product[j];
                        s[j] = product[j];
                    }
                } else {
                    for (int64_t j = 0; j < n; ++j) {
                        o[j] = p[j] - product[j];
                        s[j] += product[j];
                    }
                }
            }
        }
    }
    free(buffers);
    return 0;
}
