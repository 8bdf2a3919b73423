// CPU kernels for the expected log-likelihood over a categorical depth posterior.
//
//   out[b]               = sum_i q_i * (x[i,b,y_b] - lse(x[i,b,:]))            q_i = exp(log_q[i])
//   grad_x[i,b,c]        = g_b * q_i * (1[c = y_b] - exp(x[i,b,c] - lse(x[i,b,:])))
//   grad_log_q[i]        = q_i * sum_b g_b * (x[i,b,y_b] - lse(x[i,b,:]))
//
// x is [D+1, B, C]. The forward reads each row of C logits once and never materialises a softmax;
// the backward recomputes the row's log-sum-exp and writes its gradient. Depths with q_i = 0 are
// skipped (no read). Work is split over examples in fixed chunks, and the per-chunk partial sums of
// grad_log_q are reduced in chunk order, so results do not depend on the thread count.
//
// Layout: a row of C = 10 logits is too short to vectorise along, and a per-row max, sum and log
// are scalar work that cost more than the exponentials. So each chunk of kRows rows is first
// transposed into scratch as [C][kRows]; every later step (max, exp, sum, log, gradient) is then
// a loop over the kRows rows at a fixed trip count, one row per SIMD lane. Rows wider than
// kNarrowClasses are long enough to vectorise along and are processed one at a time.
#include "common.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>

#include <torch/library.h>

namespace bnas_fast {
namespace {

constexpr int64_t kRows = 64;  // rows (examples) per chunk: four 16-lane float vectors


// Rows of at most kNarrowClasses logits take the transposed layout (see the note at the top);
// wider rows are long enough to vectorise along, and transposing them would stride through memory.
constexpr int64_t kNarrowClasses = 64;
constexpr int64_t kWideScratch = 16384;  // elements of exp(x - max) a wide chunk keeps (64 KiB in float32)

// Rows per chunk: kRows for narrow rows; for wide rows as many as fit in kWideScratch (at least one).
// It depends on C only, so the chunking, and the order of every sum, is fixed for a given shape.
inline int64_t rows_per_chunk(int64_t C) {
  return C <= kNarrowClasses ? kRows : std::min(kRows, std::max<int64_t>(1, kWideScratch / C));
}

// Per-thread scratch for one chunk of n <= rows_per_chunk(C) rows of C logits.
template <typename acc_t>
struct ChunkScratch {
  bool narrow;
  // exp(x - row max) of the chunk: [C][kRows] (narrow, one row per SIMD lane) or [rows][C] (wide).
  std::vector<acc_t> e;
  acc_t x_target[kRows], row_max[kRows], log_sum[kRows], sum[kRows];
  explicit ChunkScratch(int64_t C) : narrow(C <= kNarrowClasses), e(C * (narrow ? kRows : rows_per_chunk(C))) {}
  acc_t exp_at(int64_t r, int64_t c, int64_t C) const { return narrow ? e[c * kRows + r] : e[r * C + c]; }
};

// Narrow rows: the chunk is transposed into sc.e, rows n..kRows-1 are padded with zeros so that every
// loop runs the full kRows lanes at a fixed trip count (their results are never used).
template <typename scalar_t, typename acc_t>
inline void narrow_logsumexp(const scalar_t* __restrict x, int64_t n, int64_t C, ChunkScratch<acc_t>& sc,
                             acc_t& check) {
  acc_t* __restrict e = sc.e.data();
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < C; ++c) e[c * kRows + r] = static_cast<acc_t>(x[r * C + c]);
  }
  if (n < kRows) {
    for (int64_t c = 0; c < C; ++c) std::fill(e + c * kRows + n, e + (c + 1) * kRows, acc_t(0));
  }
  // `lane_check` is per lane: one running scalar would be a serial floating-point sum, which the
  // compiler may not reorder, and it would keep the whole loop scalar.
  acc_t m[kRows], s[kRows], lane_check[kRows];
  for (int64_t r = 0; r < kRows; ++r) {
    m[r] = -std::numeric_limits<acc_t>::infinity();
    lane_check[r] = 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* __restrict col = e + c * kRows;
    for (int64_t r = 0; r < kRows; ++r) {
      lane_check[r] += col[r] * acc_t(0);
      m[r] = col[r] > m[r] ? col[r] : m[r];
    }
  }
  for (int64_t r = 0; r < kRows; ++r) check += lane_check[r];
  for (int64_t r = 0; r < kRows; ++r) s[r] = 0;
  for (int64_t c = 0; c < C; ++c) {
    acc_t* __restrict col = e + c * kRows;
    for (int64_t r = 0; r < kRows; ++r) {
      col[r] = fast_exp(col[r] - m[r]);
      s[r] += col[r];
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    sc.row_max[r] = m[r];
    sc.sum[r] = s[r];
    sc.log_sum[r] = fast_log(s[r]);
  }
}

// One wide row of C logits into e[0..C): max and sum of exponentials in kLanes running partials
// (vectorised along the row; summed in a fixed order, so deterministic).
template <typename scalar_t, typename acc_t>
inline void wide_row_logsumexp(const scalar_t* __restrict x, int64_t C, acc_t* __restrict e, acc_t& row_max,
                               acc_t& row_sum, acc_t& check) {
  constexpr int64_t kLanes = 16;
  const int64_t full = C - C % kLanes;
  acc_t lane_max[kLanes], lane_sum[kLanes], lane_check[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    lane_max[l] = -std::numeric_limits<acc_t>::infinity();
    lane_sum[l] = 0;
    lane_check[l] = 0;
  }
  // Full blocks of kLanes at a fixed trip count (vectorised), then the tail in lanes 0..C-full-1.
  for (int64_t c0 = 0; c0 < full; c0 += kLanes) {
    const scalar_t* __restrict xb = x + c0;
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(xb[l]);
      lane_check[l] += v * acc_t(0);
      lane_max[l] = v > lane_max[l] ? v : lane_max[l];
    }
  }
  for (int64_t c = full; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(x[c]);
    lane_check[c - full] += v * acc_t(0);
    lane_max[c - full] = v > lane_max[c - full] ? v : lane_max[c - full];
  }
  acc_t m = lane_max[0];
  for (int64_t l = 0; l < kLanes; ++l) {
    m = lane_max[l] > m ? lane_max[l] : m;
    check += lane_check[l];
  }
  for (int64_t c0 = 0; c0 < full; c0 += kLanes) {
    const scalar_t* __restrict xb = x + c0;
    acc_t* __restrict eb = e + c0;
    for (int64_t l = 0; l < kLanes; ++l) {
      eb[l] = fast_exp(static_cast<acc_t>(xb[l]) - m);
      lane_sum[l] += eb[l];
    }
  }
  for (int64_t c = full; c < C; ++c) {
    e[c] = fast_exp(static_cast<acc_t>(x[c]) - m);
    lane_sum[c - full] += e[c];
  }
  acc_t s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += lane_sum[l];
  row_max = m;
  row_sum = s;
}

// Log-sum-exp of n contiguous rows of C logits (n <= rows_per_chunk(C)): fills sc.e with
// exp(x - row max) and sc.row_max, sum, log_sum, and x_target[r] = x[r, y_r]. `check` becomes NaN
// when a logit is NaN or infinite (v * 0 is NaN exactly then).
template <typename scalar_t, typename acc_t>
inline void chunk_logsumexp(const scalar_t* __restrict x, const int64_t* __restrict y, int64_t n, int64_t C,
                            ChunkScratch<acc_t>& sc, acc_t& check) {
  for (int64_t r = 0; r < n; ++r) sc.x_target[r] = static_cast<acc_t>(x[r * C + y[r]]);
  if (sc.narrow) {
    narrow_logsumexp(x, n, C, sc, check);
    return;
  }
  for (int64_t r = 0; r < n; ++r) {
    wide_row_logsumexp(x + r * C, C, sc.e.data() + r * C, sc.row_max[r], sc.sum[r], check);
    sc.log_sum[r] = fast_log(sc.sum[r]);
  }
}

// log p(y) of row r = (x_y - max) - log(sum): x_y - max is exact or nearly so, whereas rounding
// lse = max + log(sum) first would lose ulp(max) / 2 absolute (5e-4 at |logits| ~ 1e4 in float32,
// all of log(sum) when |max| dwarfs it), as torch.log_softmax does not.
template <typename acc_t>
inline acc_t row_log_prob(const ChunkScratch<acc_t>& sc, int64_t r) {
  return (sc.x_target[r] - sc.row_max[r]) - sc.log_sum[r];
}

struct Checked {
  at::Tensor logits, targets, log_q;  // contiguous
  int64_t depths, batch, classes;
};

Checked check_args(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                   const at::Tensor& log_q) {
  check_cpu_floating(logits, op, "logits");
  check_cpu_floating(log_q, op, "log_q");
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must be [D+1, B, C], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(2) >= 1, op, ": logits must have at least one class");
  TORCH_CHECK_VALUE(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.dim() == 1,
                    op, ": targets must be a 1-D int64 CPU tensor, got ", targets.scalar_type(), " ",
                    targets.sizes(), " on ", targets.device());
  TORCH_CHECK_VALUE(targets.size(0) == logits.size(1), op, ": targets has ", targets.size(0),
                    " entries but logits has B = ", logits.size(1));
  TORCH_CHECK_VALUE(log_q.dim() == 1 && log_q.size(0) == logits.size(0), op,
                    ": log_q must be [D+1] = [", logits.size(0), "], got ", log_q.sizes());
  TORCH_CHECK_VALUE(log_q.scalar_type() == logits.scalar_type(), op, ": log_q has dtype ",
                    log_q.scalar_type(), " but logits has ", logits.scalar_type());
  Checked c{logits.contiguous(), targets.contiguous(), log_q.contiguous(), logits.size(0), logits.size(1),
            logits.size(2)};
  const int64_t* y = c.targets.data_ptr<int64_t>();
  for (int64_t b = 0; b < c.batch; ++b) {
    TORCH_CHECK_INDEX(y[b] >= 0 && y[b] < c.classes, op, ": targets[", b, "] = ", y[b],
                      " is out of range for C = ", c.classes, " classes");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.log_q.scalar_type(), "check_log_q", [&] {
    const scalar_t* lq = c.log_q.data_ptr<scalar_t>();
    for (int64_t i = 0; i < c.depths; ++i) {
      const double v = static_cast<double>(lq[i]);
      TORCH_CHECK_VALUE(!std::isnan(v) && v != std::numeric_limits<double>::infinity(), op,
                        ": log_q[", i, "] = ", v, " (must be a log-probability: finite or -inf)");
    }
  });
  return c;
}

at::Tensor depth_loglik_cpu(const at::Tensor& logits_in, const at::Tensor& targets_in,
                            const at::Tensor& log_q_in) {
  const auto c = check_args("depth_loglik", logits_in, targets_in, log_q_in);
  auto out = at::empty({c.batch}, c.logits.options());
  std::atomic<bool> non_finite{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.logits.scalar_type(), "depth_loglik", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x = c.logits.data_ptr<scalar_t>();
    const scalar_t* lq = c.log_q.data_ptr<scalar_t>();
    const int64_t* y = c.targets.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t B = c.batch, C = c.classes;
    const int64_t rows = rows_per_chunk(C);
    const int64_t num_chunks = (B + rows - 1) / rows;
    at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      ChunkScratch<acc_t> sc(C);
      acc_t check = 0;
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t b0 = chunk * rows;
        const int64_t n = std::min(B, b0 + rows) - b0;
        acc_t total[kRows] = {};
        for (int64_t i = 0; i < c.depths; ++i) {
          const acc_t q = std::exp(static_cast<acc_t>(lq[i]));
          if (q == acc_t(0)) continue;  // a depth without mass: its logits are not read
          chunk_logsumexp(x + (i * B + b0) * C, y + b0, n, C, sc, check);
          for (int64_t r = 0; r < n; ++r) total[r] += q * row_log_prob(sc, r);
        }
        for (int64_t r = 0; r < n; ++r) o[b0 + r] = static_cast<scalar_t>(total[r]);
      }
      if (std::isnan(check)) non_finite = true;
    });
  });
  TORCH_CHECK_VALUE(!non_finite, "depth_loglik: logits contains NaN or infinity");
  return out;
}

std::tuple<at::Tensor, at::Tensor> depth_loglik_backward_cpu(const at::Tensor& grad_out_in,
                                                             const at::Tensor& logits_in,
                                                             const at::Tensor& targets_in,
                                                             const at::Tensor& log_q_in) {
  const char* op = "depth_loglik_backward";
  const auto c = check_args(op, logits_in, targets_in, log_q_in);
  check_cpu_floating(grad_out_in, op, "grad_out");
  TORCH_CHECK_VALUE(grad_out_in.dim() == 1 && grad_out_in.size(0) == c.batch, op,
                    ": grad_out must be [B] = [", c.batch, "], got ", grad_out_in.sizes());
  TORCH_CHECK_VALUE(grad_out_in.scalar_type() == c.logits.scalar_type(), op, ": grad_out has dtype ",
                    grad_out_in.scalar_type(), " but logits has ", c.logits.scalar_type());
  const auto g = grad_out_in.contiguous();
  auto grad_logits = empty_output(c.logits.sizes(), c.logits.options());
  auto grad_log_q = at::empty({c.depths}, c.log_q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.logits.scalar_type(), "depth_loglik_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x = c.logits.data_ptr<scalar_t>();
    const scalar_t* lq = c.log_q.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const int64_t* y = c.targets.data_ptr<int64_t>();
    scalar_t* gx = grad_logits.data_ptr<scalar_t>();
    const int64_t B = c.batch, C = c.classes, D1 = c.depths;
    const int64_t rows = rows_per_chunk(C);
    const int64_t num_chunks = (B + rows - 1) / rows;
    std::vector<acc_t> q(D1);
    for (int64_t i = 0; i < D1; ++i) q[i] = std::exp(static_cast<acc_t>(lq[i]));
    // partial[chunk][i] = sum over the chunk's examples of g_b * log p_i(y_b)
    std::vector<acc_t> partial(num_chunks * D1, acc_t(0));
    at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      ChunkScratch<acc_t> sc(C);
      acc_t check = 0;  // the forward already rejected non-finite logits
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t b0 = chunk * rows;
        const int64_t n = std::min(B, b0 + rows) - b0;
        acc_t* part = partial.data() + chunk * D1;
        for (int64_t i = 0; i < D1; ++i) {
          scalar_t* __restrict gbase = gx + (i * B + b0) * C;
          if (q[i] == acc_t(0)) {
            std::fill(gbase, gbase + n * C, scalar_t(0));
            continue;
          }
          chunk_logsumexp(x + (i * B + b0) * C, y + b0, n, C, sc, check);
          // grad[r, c] = g_r q_i (1[c = y_r] - e[c][r] / sum_r) = coef_r e[c][r] (+ g_r q_i at c = y_r)
          acc_t coef[kRows];
          for (int64_t r = 0; r < n; ++r) {
            const acc_t gb = static_cast<acc_t>(gp[b0 + r]);
            coef[r] = -gb * q[i] / sc.sum[r];
            part[i] += gb * row_log_prob(sc, r);
          }
          const acc_t* __restrict e = sc.e.data();
          for (int64_t r = 0; r < n; ++r) {
            scalar_t* __restrict grow = gbase + r * C;
            if (sc.narrow) {
              for (int64_t cc = 0; cc < C; ++cc) grow[cc] = static_cast<scalar_t>(coef[r] * e[cc * kRows + r]);
            } else {
              for (int64_t cc = 0; cc < C; ++cc) grow[cc] = static_cast<scalar_t>(coef[r] * e[r * C + cc]);
            }
            const int64_t t = y[b0 + r];
            grow[t] = static_cast<scalar_t>(coef[r] * sc.exp_at(r, t, C) + static_cast<acc_t>(gp[b0 + r]) * q[i]);
          }
        }
      }
    });
    scalar_t* glq = grad_log_q.data_ptr<scalar_t>();
    for (int64_t i = 0; i < D1; ++i) {
      acc_t sum = 0;
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) sum += partial[chunk * D1 + i];
      glq[i] = static_cast<scalar_t>(q[i] * sum);
    }
  });
  return {grad_logits, grad_log_q};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnas_fast, CPU, m) {
  m.impl("depth_loglik", &depth_loglik_cpu);
  m.impl("depth_loglik_backward", &depth_loglik_backward_cpu);
}

}  // namespace bnas_fast
