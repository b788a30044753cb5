/* The fused CPU merge of 16-bit weights (bf16 or float16): out = W + Σₜ sₜ·(Bₜ·Aₜ) for a block of
 * rows, in W's format, with the rounding of kernels/merge_reference.py (the torch reference, and
 * PEFT's merge_and_unload on CPU):
 *
 *   each adapter's product Bₜ·Aₜ is a float32 FMA chain over its rank in k order, started by a plain
 *   product (what MKL's sgemm computes, bit for bit: checked at load time by kernels/merge_cpu.py);
 *   then × sₜ where sₜ ≠ 1 (power-of-two scales are folded into A by the caller); then added to the
 *   float32 W, adapter after adapter; then rounded once to W's format (nearest even; a NaN becomes
 *   what torch's vectorised conversion writes: 0xFFFF in bf16, the quieted NaN in float16).
 *
 * Why: the torch reference makes three passes over a float32 block (upcast, addmm_, round), about
 * 0.8 ns per weight on one core; this reads W once, keeps a tile's products in vector registers
 * (8 rows × 32 columns with AVX-512, 4 × 16 with AVX2: each A load serves every row of the tile) and
 * writes W's format once: about 0.33 ns per weight (AVX-512, r = 16).
 *
 * One source, two builds (kernels/merge_cpu.py picks the one the CPU runs): with -mavx512f
 * -mavx512bw -mfma -mf16c the vectors are 16 floats, with -mavx2 -mfma -mf16c 8 (hosts without
 * AVX-512: AMD before Zen 4, Intel before Skylake-SP). The arithmetic, and so every bit, is the
 * same; only the width of a tile differs. Both are built with -ffp-contract=off: no contraction
 * beyond the FMAs written here.
 *
 * B: rows × R float32 (row-major, the block's rows); A: R × cols float32; ranks concatenated, adapter
 * t owning columns bounds[t] … bounds[t+1] of B and rows of A. W, out: rows × cols 16-bit weights.
 */
#include <errno.h>
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__FMA__)
#define LANES 16
#define TILE_ROWS 8 /* 16 product registers of 32: fastest of 4, 6, 8, 10 and 12 rows (and of 8-16 rows × 16 columns) */
typedef __m512 vec;
#define vec_load _mm512_loadu_ps
#define vec_set1 _mm512_set1_ps
#define vec_mul _mm512_mul_ps
#define vec_add _mm512_add_ps
#define vec_fma _mm512_fmadd_ps

static inline vec load_bf16(const uint16_t *p) {
    __m256i half = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

static inline void store_bf16(uint16_t *p, vec v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0xFFFF));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(rounded));
}

static inline vec load_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

static inline void store_f16(uint16_t *p, vec v) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LANES 8
#define TILE_ROWS 4 /* 8 product registers of 16: fastest of 2, 3 and 4 rows (and of 4 rows × 8 columns) */
typedef __m256 vec;
#define vec_load _mm256_loadu_ps
#define vec_set1 _mm256_set1_ps
#define vec_mul _mm256_mul_ps
#define vec_add _mm256_add_ps
#define vec_fma _mm256_fmadd_ps

static inline vec load_bf16(const uint16_t *p) {
    __m128i half = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

static inline void store_bf16(uint16_t *p, vec v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0xFFFF), nan);
    /* 8 values ≤ 0xFFFF to 16 bits: packus works per 128-bit lane, the permute joins the halves. */
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

static inline vec load_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

static inline void store_f16(uint16_t *p, vec v) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
#error "merge_cpu.c is built with -mavx512f -mavx512bw -mfma -mf16c or with -mavx2 -mfma -mf16c"
#endif

/* The weight formats (the `format` argument): both are 16 bits; float16 converts with F16C's
 * instructions (exact up, nearest even down: what torch's vectorised conversions use). Every
 * function below takes the format as a constant, so each format gets its own inlined copy. */
#define FORMAT_BF16 0
#define FORMAT_F16 1

static inline vec load_weights(const uint16_t *p, const int format) {
    return format == FORMAT_F16 ? load_f16(p) : load_bf16(p);
}

static inline void store_weights(uint16_t *p, vec v, const int format) {
    if (format == FORMAT_F16)
        store_f16(p, v);
    else
        store_bf16(p, v);
}

static inline float weight_to_float(uint16_t w, const int format) {
    if (format == FORMAT_F16)
        return _cvtsh_ss(w);
    uint32_t bits = (uint32_t)w << 16;
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

static inline uint16_t float_to_weight(float value, const int format) {
    if (format == FORMAT_F16)
        return (uint16_t)_cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (value != value)
        return 0xFFFF;
    uint32_t bits;
    memcpy(&bits, &value, 4);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

#define VPR 2 /* vectors of float32 per tile row */
#define TILE_COLS (VPR * LANES)

/* One element in the same order (the tails of a block: last columns). */
static inline uint16_t merge_element(const uint16_t *w_row, const float *b_row, const float *A,
                                     const int64_t *bounds, const float *scales, int64_t adapters, int64_t cols,
                                     int64_t j, const int format) {
    float acc = weight_to_float(w_row[j], format);
    for (int64_t t = 0; t < adapters; t++) {
        int64_t k0 = bounds[t], k1 = bounds[t + 1];
        if (k1 == k0)
            continue;
        float d = b_row[k0] * A[k0 * cols + j];
        for (int64_t k = k0 + 1; k < k1; k++)
            d = __builtin_fmaf(b_row[k], A[k * cols + j], d);
        if (scales[t] != 1.0f)
            d = d * scales[t];
        acc = acc + d;
    }
    return float_to_weight(acc, format);
}

/* Rows i … i + tile_rows − 1 in tiles of tile_rows × TILE_COLS, their products held in vector
 * registers (each load of A serves tile_rows rows), then the columns past the last whole tile one
 * element at a time. Always inlined with a constant tile_rows, so the loops over r unroll. */
static inline __attribute__((always_inline)) void merge_row_tile(
        const uint16_t *W, const float *B, const float *A, const int64_t *bounds, const float *scales,
        int64_t adapters, int64_t rows, int64_t cols, int64_t R, uint16_t *out, int64_t i, const int tile_rows,
        const int format) {
    int64_t j0 = 0;
    for (; j0 + TILE_COLS <= cols; j0 += TILE_COLS) {
        vec acc[TILE_ROWS][VPR]; /* tile_rows ≤ TILE_ROWS of them used */
        /* The next tile's lines at this column, one tile ahead: a row is often one page (2048 bf16),
         * where the hardware prefetcher starts cold, and W comes from a fresh mapping of the page
         * cache (3-4 % less merge time in benchmarks/merge.py). */
        if (i + 2 * tile_rows <= rows)
            for (int r = 0; r < tile_rows; r++)
                _mm_prefetch((const char *)(W + (i + tile_rows + r) * cols + j0), _MM_HINT_T1);
        for (int r = 0; r < tile_rows; r++)
            for (int c = 0; c < VPR; c++)
                acc[r][c] = load_weights(W + (i + r) * cols + j0 + c * LANES, format);
        for (int64_t t = 0; t < adapters; t++) {
            int64_t k0 = bounds[t], k1 = bounds[t + 1];
            if (k1 == k0)
                continue;
            vec d[TILE_ROWS][VPR], a[VPR];
            for (int c = 0; c < VPR; c++)
                a[c] = vec_load(A + k0 * cols + j0 + c * LANES);
            for (int r = 0; r < tile_rows; r++) {
                vec b = vec_set1(B[(i + r) * R + k0]);
                for (int c = 0; c < VPR; c++)
                    d[r][c] = vec_mul(b, a[c]);
            }
            for (int64_t k = k0 + 1; k < k1; k++) {
                for (int c = 0; c < VPR; c++)
                    a[c] = vec_load(A + k * cols + j0 + c * LANES);
                for (int r = 0; r < tile_rows; r++) {
                    vec b = vec_set1(B[(i + r) * R + k]);
                    for (int c = 0; c < VPR; c++)
                        d[r][c] = vec_fma(b, a[c], d[r][c]);
                }
            }
            if (scales[t] != 1.0f) {
                vec s = vec_set1(scales[t]);
                for (int r = 0; r < tile_rows; r++)
                    for (int c = 0; c < VPR; c++)
                        d[r][c] = vec_mul(d[r][c], s);
            }
            for (int r = 0; r < tile_rows; r++)
                for (int c = 0; c < VPR; c++)
                    acc[r][c] = vec_add(acc[r][c], d[r][c]);
        }
        for (int r = 0; r < tile_rows; r++)
            for (int c = 0; c < VPR; c++)
                store_weights(out + (i + r) * cols + j0 + c * LANES, acc[r][c], format);
    }
    for (int r = 0; r < tile_rows; r++)
        for (int64_t j = j0; j < cols; j++)
            out[(i + r) * cols + j] = merge_element(W + (i + r) * cols, B + (i + r) * R, A, bounds, scales,
                                                    adapters, cols, j, format);
}

static inline __attribute__((always_inline)) void merge_rows(
        const uint16_t *W, const float *B, const float *A, const int64_t *bounds, const float *scales,
        int64_t adapters, int64_t rows, int64_t cols, int64_t R, uint16_t *out, const int format) {
    int64_t i = 0;
    for (; i + TILE_ROWS <= rows; i += TILE_ROWS)
        merge_row_tile(W, B, A, bounds, scales, adapters, rows, cols, R, out, i, TILE_ROWS, format);
#if TILE_ROWS > 4
    for (; i + 4 <= rows; i += 4) /* a remainder of 4 or more rows still goes 4 at a time */
        merge_row_tile(W, B, A, bounds, scales, adapters, rows, cols, R, out, i, 4, format);
#endif
    for (; i < rows; i++)
        merge_row_tile(W, B, A, bounds, scales, adapters, rows, cols, R, out, i, 1, format);
}

/* W, out: rows × cols of `format` (FORMAT_BF16 or FORMAT_F16). */
void quiver_merge_rows(const uint16_t *W, const float *B, const float *A, const int64_t *bounds,
                       const float *scales, int64_t adapters, int64_t rows, int64_t cols, int64_t R,
                       int64_t format, uint16_t *out) {
    if (format == FORMAT_F16)
        merge_rows(W, B, A, bounds, scales, adapters, rows, cols, R, out, FORMAT_F16);
    else
        merge_rows(W, B, A, bounds, scales, adapters, rows, cols, R, out, FORMAT_BF16);
}

/* The same merge of `rows` rows, written to file `fd` at byte `offset`: block by block (`row_block`
 * rows) through `buffer` (row_block × cols of `format`), each block written with pwrite (retried on EINTR
 * and short writes). Returns 0, or −errno of the write that failed.
 *
 * Why the write is here: the streaming merge hands a worker thread a piece of a tensor, and one
 * call merges and writes all of it with Python's GIL released. One call per block took about 50 µs
 * of Python per block (slicing, checks, a pool hand-off), and the threads queued on the GIL in
 * between: the 1.14 GB merge of benchmarks/merge.py ran 0.44–0.49 s this way against 0.58–0.65 s. */
int64_t quiver_merge_rows_pwrite(const uint16_t *W, const float *B, const float *A, const int64_t *bounds,
                                 const float *scales, int64_t adapters, int64_t rows, int64_t cols, int64_t R,
                                 int64_t format, int64_t row_block, uint16_t *buffer, int64_t fd, int64_t offset) {
    for (int64_t start = 0; start < rows; start += row_block) {
        int64_t count = rows - start < row_block ? rows - start : row_block;
        quiver_merge_rows(W + start * cols, B + start * R, A, bounds, scales, adapters, count, cols, R, format,
                          buffer);
        const char *data = (const char *)buffer;
        int64_t left = count * cols * (int64_t)sizeof(uint16_t), at = offset + start * cols * (int64_t)sizeof(uint16_t);
        while (left > 0) {
            ssize_t written = pwrite((int)fd, data, (size_t)left, (off_t)at);
            if (written < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            data += written;
            left -= written;
            at += written;
        }
    }
    return 0;
}
