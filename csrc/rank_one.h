// Factors of rank one per (example, output channel): the test and split shared by unfolded_gram
// (which compresses such factors before its GEMMs) and rank_one (which hands the split to a
// transposed convolution of rank one).
//
// The K factors of example n at output channel o form a K x P matrix S[n, :, o, :]. When it has
// rank one, S[n, k, o, :] = c_k w with w its largest row. Every layer that reaches the loss only
// through elementwise operations and a global average pool (the last convolution of most
// classifiers) has such factors, and so has every Linear layer (P = 1).
//
// "Rank one" allows rounding: every row's residual off w must be at most 16 epsilon of its norm.
// The blocks' error is first order in that residual: at most about 32 epsilon |S_k|^2 |X|^2 per
// factor, normwise the same form as a GEMM's rounding bound (whose factor grows with P), but not
// entrywise. A block entry that cancels to far below that scale can come out as 0 (a review of
// 2026-12-02 built one: 9e-13 exact, 0 from the compression, against factors and inputs of order
// 1; on random factors 6 epsilon off rank one, float32 blocks were within 1.2e-6 of each block's
// largest entry, the reference within 2.5e-7). The test runs on a copy of the K x P matrix scaled
// by a power of two to a largest magnitude in [1/2, 1): squared norms of factors below about 1e-19
// (float32) would otherwise underflow to 0 and make a live channel look dead. A factor below about
// 2^-75 (float32; 2^-537 in float64) of the largest one of its (n, o) still squares to 0 after
// the scaling and passes whatever its direction; its share of the blocks, 2^-149 of the largest
// factor's or less, is below the dtype's resolution.
#pragma once

#include "common.h"

#include <atomic>
#include <limits>

namespace bnas_fast {

// sum_p a[p] b[p], vectorised (omp simd lets the compiler reorder the sum).
template <typename acc_t>
inline acc_t dot_product(const acc_t* __restrict a, const acc_t* __restrict b, int64_t P) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t p = 0; p < P; ++p) s += a[p] * b[p];
  return s;
}

// S is the logical [N, K, O, P] array at sp with strides (sn, sk, so, 1). For every (n, o) writes
// maps[(n O + o) P + p] = w[p] (the row of largest norm; 0 for an all-zero matrix) and
// coeffs[k ck + n cn + o co] = c_k. Returns false as soon as one (n, o) is not rank one or holds a
// non-finite value; the outputs are then incomplete.
template <typename acc_t>
bool split_rank_one(const acc_t* sp, int64_t N, int64_t K, int64_t O, int64_t P, int64_t sn, int64_t sk, int64_t so,
                    acc_t* coeffs, int64_t ck, int64_t cn, int64_t co, acc_t* maps) {
  const acc_t tol = acc_t(16) * std::numeric_limits<acc_t>::epsilon();
  const acc_t tol2 = tol * tol;
  std::atomic<bool> rank_one{true};
  at::parallel_for(0, N * O, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> norms(K), scaled(K * P), c(K);
    for (int64_t i = begin; i < end && rank_one.load(std::memory_order_relaxed); ++i) {
      const int64_t n = i / O, o = i % O;
      const acc_t* base = sp + n * sn + o * so;
      acc_t* map = maps + i * P;
      acc_t* coeff = coeffs + n * cn + o * co;
      acc_t largest = 0, poison = 0;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* row = base + k * sk;
        // max skips NaN, so a NaN among zeros would pass for a dead unit: poison sums v - v, which
        // is 0 for finite v and NaN for NaN and infinity.
#pragma omp simd reduction(max : largest) reduction(+ : poison)
        for (int64_t p = 0; p < P; ++p) {
          largest = std::max(largest, std::abs(row[p]));
          poison += row[p] - row[p];
        }
      }
      if (!(poison == acc_t(0)) || !std::isfinite(largest)) {  // a NaN or an infinity: not of rank one
        rank_one.store(false, std::memory_order_relaxed);
        break;
      }
      if (largest == acc_t(0)) {  // every row is zero (a dead unit)
        std::fill(map, map + P, acc_t(0));
        for (int64_t k = 0; k < K; ++k) coeff[k * ck] = 0;
        continue;
      }
      int exponent;
      std::frexp(largest, &exponent);
      // Multiplying by 2^-exponent is exact, as ldexp is, and a scalar ldexp per element made this
      // test cost twice the GEMMs it saves. The power of two is representable unless the largest
      // entry is far from 1 (|exponent| beyond about 120, subnormal factors included): ldexp then.
      const bool representable = exponent > std::numeric_limits<acc_t>::min_exponent + 4 &&
                                 exponent < std::numeric_limits<acc_t>::max_exponent - 4;
      const acc_t to_unit = std::ldexp(acc_t(1), -exponent);
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* row = base + k * sk;
        acc_t* out = scaled.data() + k * P;
        if (representable) {
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) out[p] = row[p] * to_unit;
        } else {
          for (int64_t p = 0; p < P; ++p) out[p] = std::ldexp(row[p], -exponent);
        }
      }
      int64_t best = 0;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* row = scaled.data() + k * P;
        const acc_t s = dot_product(row, row, P);
        norms[k] = s;
        if (s > norms[best]) best = k;
      }
      const acc_t* w = scaled.data() + best * P;
      const acc_t ww = norms[best];
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* row = scaled.data() + k * P;
        c[k] = dot_product(row, w, P) / ww;  // the same for the unscaled rows
        acc_t residual = 0;
#pragma omp simd reduction(+ : residual)
        for (int64_t p = 0; p < P; ++p) {
          const acc_t r = row[p] - c[k] * w[p];
          residual += r * r;
        }
        if (!(residual <= tol2 * norms[k])) {  // also false for NaN
          rank_one.store(false, std::memory_order_relaxed);
          break;
        }
      }
      if (!rank_one.load(std::memory_order_relaxed)) break;
      const acc_t* w_original = base + best * sk;
      std::copy(w_original, w_original + P, map);
      for (int64_t k = 0; k < K; ++k) coeff[k * ck] = c[k];
    }
  });
  return rank_one.load();
}

}  // namespace bnas_fast
