/* mmexport CPU kernels: 4-bit block-quantized MatMul (ONNX Runtime's MatMulNBits layout) with int8
 * activations and AVX-512 VNNI dot products.
 *
 * Weights: B [N, K/bs, bs/2] uint8, two 4-bit values per byte (element 2j in the low nibble, 2j+1 in the
 * high one), symmetric around 8; scales [N, K/bs] float. Activations are quantized per block of bs (one
 * scale = max|a|/127, round to nearest even), the way ONNX Runtime's accuracy level 4 quantizes them, so
 * the two kernels agree to float rounding. Requires K % 64 == 0 and bs % 32 == 0.
 *
 * Why: at batch 1 (decode) the MatMul reads every weight once per token, so its speed is the speed at which
 * the weights stream from memory. This kernel issues software prefetches PF bytes ahead on each of the four
 * weight rows it reads at once; on a 2-core AVX-512 VNNI machine it reads 25-30 GB/s out of cache where
 * ONNX Runtime's kernel reads 13-23 (README: "Decode against the machine's limits").
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define MMX_PF 768 /* prefetch distance in bytes along each weight row (measured: 512-768 best, 0 slowest) */

/* Quantized activations of one row, in the order the unpacked weights come in: for each 64 elements
 * (a pair of 32-element halves A and B), [A even(16), B even(16), A odd(16), B odd(16)] as int8. */
typedef struct {
  int8_t *q;       /* K */
  float *scale;    /* K/bs: one per activation block */
  int32_t *sum;    /* K/bs: sum of q over the block (for the weights' offset of 8) */
  float *lane_scale; /* bs == 32 only: per pair, 16 lanes: the scale of the half each lane sums */
  int32_t *lane_corr; /* bs == 32 only: per pair, 16 lanes: -8 * sum of the half, in lanes 0 and 4 */
} mmx_act;

static void mmx_quantize_row(const float *a, int K, int bs, mmx_act *o) {
  const int nb = K / bs;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int b = 0; b < nb; b++) {
    const float *x = a + (size_t)b * bs;
    __m512 mx = _mm512_setzero_ps();
    for (int i = 0; i < bs; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    float m = _mm512_reduce_max_ps(mx);
    float inv = m > 0.f ? 127.f / m : 0.f;
    __m512 vinv = _mm512_set1_ps(inv);
    __m512i vsum = _mm512_setzero_si512();
    for (int i = 0; i < bs; i += 32) {  /* one half of a pair: 32 elements */
      __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv));      /* nearest even */
      __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i + 16), vinv));
      __m512i e = _mm512_permutex2var_epi32(q0, even, q1), od = _mm512_permutex2var_epi32(q0, odd, q1);
      vsum = _mm512_add_epi32(vsum, _mm512_add_epi32(e, od));
      int g = b * bs + i, p = g / 64, h = (g % 64) / 32;
      _mm_storeu_si128((__m128i *)(o->q + p * 64 + h * 16), _mm512_cvtepi32_epi8(e));
      _mm_storeu_si128((__m128i *)(o->q + p * 64 + 32 + h * 16), _mm512_cvtepi32_epi8(od));
    }
    o->scale[b] = m / 127.f;
    o->sum[b] = _mm512_reduce_add_epi32(vsum);
  }
  if (bs == 32) {
    for (int p = 0; p < K / 64; p++)
      for (int l = 0; l < 16; l++) {
        int h = (l / 4) & 1;
        o->lane_scale[p * 16 + l] = o->scale[2 * p + h];
        o->lane_corr[p * 16 + l] = (l == 0 || l == 4) ? -8 * o->sum[2 * p + h] : 0;
      }
  }
}

static inline __m512i mmx_unpack(const uint8_t *w) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256i b = _mm256_loadu_si256((const __m256i *)w);
  __m256i lo = _mm256_and_si256(b, mask);
  __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* Rows [n0, n0 + R) of the output for activation rows [m0, m0 + MT): y[m][n] (+ bias[n]). R <= 4, MT <= 4. */
#define MMX_TILE(NAME, R, MT, PREFETCH)                                                                          \
  static void NAME(const uint8_t *B, const float *S, const mmx_act *act, const float *bias, float *y,          \
                   int K, int N, int bs, int n0, int m0) {                                                      \
    const int nb = K / bs, rowbytes = K / 2;                                                                    \
    __m512 acc[R][MT];                                                                                          \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                                                                 \
      _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) acc[r][m] = _mm512_setzero_ps();                                             \
    const uint8_t *w[R];                                                                                        \
    const float *s[R];                                                                                          \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) { w[r] = B + (size_t)(n0 + r) * rowbytes; s[r] = S + (size_t)(n0 + r) * nb; }  \
    if (bs == 32) {                                                                                             \
      const __m512i perm = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);                   \
      for (int p = 0; p < K / 64; p++) {                                                                        \
        __m512i wv[R];                                                                                          \
        __m512 sw[R];                                                                                           \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                                                                           \
          if (PREFETCH && (p & 1) == 0) _mm_prefetch((const char *)(w[r] + p * 32 + MMX_PF), _MM_HINT_T0);     \
          wv[r] = mmx_unpack(w[r] + p * 32);                                                                    \
          sw[r] = _mm512_permutexvar_ps(perm, _mm512_castps128_ps512(                                           \
                      _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(s[r] + 2 * p)))));                     \
        }                                                                                                       \
        _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                                                          \
          const mmx_act *a = act + m0 + m;                                                                      \
          __m512i av = _mm512_loadu_si512(a->q + p * 64);                                                       \
          __m512i corr = _mm512_loadu_si512(a->lane_corr + p * 16);                                            \
          __m512 as = _mm512_loadu_ps(a->lane_scale + p * 16);                                                  \
          _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                                                           \
            acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, wv[r], av)),              \
                                        _mm512_mul_ps(sw[r], as), acc[r][m]);                                   \
        }                                                                                                       \
      }                                                                                                         \
    } else {                                                                                                    \
      const int pairs = bs / 64;                                                                                \
      for (int b = 0; b < nb; b++) {                                                                            \
        __m512i is[R][MT];                                                                                      \
        _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                                                          \
          __m512i c = _mm512_castsi128_si512(_mm_cvtsi32_si128(-8 * act[m0 + m].sum[b]));                      \
          c = _mm512_maskz_mov_epi32(1, c);                                                                     \
          _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) is[r][m] = c;                                                             \
        }                                                                                                       \
        for (int q = 0; q < pairs; q++) {                                                                       \
          int p = b * pairs + q;                                                                                \
          __m512i wv[R];                                                                                        \
          _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                                                                         \
            if (PREFETCH && (p & 1) == 0) _mm_prefetch((const char *)(w[r] + p * 32 + MMX_PF), _MM_HINT_T0);   \
            wv[r] = mmx_unpack(w[r] + p * 32);                                                                  \
          }                                                                                                     \
          _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                                                        \
            __m512i av = _mm512_loadu_si512(act[m0 + m].q + p * 64);                                            \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) is[r][m] = _mm512_dpbusd_epi32(is[r][m], wv[r], av);                    \
          }                                                                                                     \
        }                                                                                                       \
        _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                                                          \
          float as = act[m0 + m].scale[b];                                                                      \
          _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                                                           \
            acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[r][m]), _mm512_set1_ps(s[r][b] * as), acc[r][m]); \
        }                                                                                                       \
      }                                                                                                         \
    }                                                                                                           \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                                                                 \
      _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++)                                                                              \
        y[(size_t)(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]) + (bias ? bias[n0 + r] : 0.f);      \
  }

MMX_TILE(mmx_tile_4x1, 4, 1, 1)
MMX_TILE(mmx_tile_1x1, 1, 1, 1)
MMX_TILE(mmx_tile_4x4, 4, 4, 0)
MMX_TILE(mmx_tile_1x4, 1, 4, 0)

/* Output rows [n_begin, n_end) for all M activation rows. The caller gives blocks of MMX_NBLOCK rows: their
 * weights stay in cache while every group of 4 activation rows passes over them. */
#define MMX_NBLOCK 32
static void mmx_rows(const uint8_t *B, const float *S, const mmx_act *act, const float *bias, float *y,
                     int M, int K, int N, int bs, int n_begin, int n_end) {
  int m = 0;
  for (; m + 4 <= M; m += 4) {
    int n = n_begin;
    for (; n + 4 <= n_end; n += 4) mmx_tile_4x4(B, S, act, bias, y, K, N, bs, n, m);
    for (; n < n_end; n++) mmx_tile_1x4(B, S, act, bias, y, K, N, bs, n, m);
  }
  for (; m < M; m++) {
    int n = n_begin;
    for (; n + 4 <= n_end; n += 4) mmx_tile_4x1(B, S, act, bias, y, K, N, bs, n, m);
    for (; n < n_end; n++) mmx_tile_1x1(B, S, act, bias, y, K, N, bs, n, m);
  }
}
