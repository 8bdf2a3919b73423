// CPU kernels for the expected log-likelihood over a categorical depth posterior.
//
//   out[b]               = sum_i q_i * (x[i,b,y_b] - lse(x[i,b,:]))            q_i = exp(log_q[i])
//   grad_x[i,b,c]        = g_b * q_i * (1[c = y_b] - exp(x[i,b,c] - lse(x[i,b,:])))
//   grad_log_q[i]        = q_i * sum_b g_b * (x[i,b,y_b] - lse(x[i,b,:]))
//
// x is [D+1, B, C]. The forward reads each row of C logits once (max and sum of exponentials in
// one online pass) and never materialises a softmax; the backward recomputes the row's
// log-sum-exp and writes its gradient. Depths with q_i = 0 are skipped (no read). Work is split
// over examples in fixed chunks, and the per-chunk partial sums of grad_log_q are reduced in chunk
// order, so results do not depend on the thread count.
#include "common.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>

#include <torch/library.h>

namespace bnas_fast {
namespace {

constexpr int64_t kExamplesPerChunk = 64;
// exp(x) for float32 in plain arithmetic, so that the compiler vectorises it (std::exp stays a
// scalar libm call without -ffast-math, and that call was 3x the cost of the whole op):
// x = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial (relative error
// <= 1.2e-7, about 1 ulp), 2^n assembled in the exponent bits.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);  // keeps 2^n a normal float; exp(-87) ~ 1.6e-38
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two for exactness
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }  // float64 keeps libm's accuracy

// Per-thread scratch for one chunk of rows (n <= kExamplesPerChunk rows of C logits, contiguous).
template <typename acc_t>
struct ChunkScratch {
  std::vector<acc_t> shift, e;  // [n * C]: the row max expanded per element, and exp(x - max)
  std::vector<acc_t> row_max, log_sum, sum;  // [n]: lse = row_max + log_sum, kept apart (see row_log_prob)
  explicit ChunkScratch(int64_t C)
      : shift(kExamplesPerChunk * C),
        e(kExamplesPerChunk * C),
        row_max(kExamplesPerChunk),
        log_sum(kExamplesPerChunk),
        sum(kExamplesPerChunk) {}
};

// Log-sum-exp of n contiguous rows of C logits. The exponentials run as one flat loop over the
// n * C elements (vectorised; a row of C = 10 is too short to vectorise along), and stay in
// sc.e for the backward, which then needs no second exponential. `check` becomes NaN when a logit
// is NaN or infinite (v * 0 is NaN exactly then).
template <typename scalar_t, typename acc_t>
inline void chunk_logsumexp(const scalar_t* __restrict x, int64_t n, int64_t C, ChunkScratch<acc_t>& sc,
                            acc_t& check) {
  acc_t* __restrict shift = sc.shift.data();
  acc_t* __restrict e = sc.e.data();
  for (int64_t r = 0; r < n; ++r) {
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(x[r * C + c]);
      check += v * acc_t(0);
      m = v > m ? v : m;
    }
    for (int64_t c = 0; c < C; ++c) shift[r * C + c] = m;
  }
  const int64_t total = n * C;
  for (int64_t j = 0; j < total; ++j) e[j] = fast_exp(static_cast<acc_t>(x[j]) - shift[j]);
  for (int64_t r = 0; r < n; ++r) {
    acc_t s = 0;
    for (int64_t c = 0; c < C; ++c) s += e[r * C + c];
    sc.sum[r] = s;
    sc.row_max[r] = shift[r * C];
    sc.log_sum[r] = std::log(s);
  }
}

// log p(y) of row r = (x_y - max) - log(sum): x_y - max is exact or nearly so, whereas rounding
// lse = max + log(sum) first would lose ulp(max) / 2 absolute (5e-4 at |logits| ~ 1e4 in float32,
// all of log(sum) when |max| dwarfs it), as torch.log_softmax does not.
template <typename acc_t>
inline acc_t row_log_prob(acc_t x_y, const ChunkScratch<acc_t>& sc, int64_t r) {
  return (x_y - sc.row_max[r]) - sc.log_sum[r];
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
    const int64_t num_chunks = (B + kExamplesPerChunk - 1) / kExamplesPerChunk;
    at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      ChunkScratch<acc_t> sc(C);
      acc_t check = 0;
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t b0 = chunk * kExamplesPerChunk;
        const int64_t n = std::min(B, b0 + kExamplesPerChunk) - b0;
        acc_t total[kExamplesPerChunk] = {};
        for (int64_t i = 0; i < c.depths; ++i) {
          const acc_t q = std::exp(static_cast<acc_t>(lq[i]));
          if (q == acc_t(0)) continue;  // a depth without mass: its logits are not read
          const scalar_t* base = x + (i * B + b0) * C;
          chunk_logsumexp(base, n, C, sc, check);
          for (int64_t r = 0; r < n; ++r) {
            total[r] += q * row_log_prob(static_cast<acc_t>(base[r * C + y[b0 + r]]), sc, r);
          }
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
    const int64_t num_chunks = (B + kExamplesPerChunk - 1) / kExamplesPerChunk;
    std::vector<acc_t> q(D1);
    for (int64_t i = 0; i < D1; ++i) q[i] = std::exp(static_cast<acc_t>(lq[i]));
    // partial[chunk][i] = sum over the chunk's examples of g_b * log p_i(y_b)
    std::vector<acc_t> partial(num_chunks * D1, acc_t(0));
    at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      ChunkScratch<acc_t> sc(C);
      std::vector<acc_t> grad_buf(kExamplesPerChunk * C);
      acc_t check = 0;  // the forward already rejected non-finite logits
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t b0 = chunk * kExamplesPerChunk;
        const int64_t n = std::min(B, b0 + kExamplesPerChunk) - b0;
        acc_t* part = partial.data() + chunk * D1;
        for (int64_t i = 0; i < D1; ++i) {
          scalar_t* gbase = gx + (i * B + b0) * C;
          if (q[i] == acc_t(0)) {
            std::fill(gbase, gbase + n * C, scalar_t(0));
            continue;
          }
          const scalar_t* base = x + (i * B + b0) * C;
          chunk_logsumexp(base, n, C, sc, check);
          // grad[r, c] = g_r q_i (1[c = y_r] - e[r, c] / sum_r): reuse sc.shift as the per-element
          // coefficient -g_r q_i / sum_r, then one flat vectorised multiply.
          acc_t* __restrict coef = sc.shift.data();
          for (int64_t r = 0; r < n; ++r) {
            const acc_t gb = static_cast<acc_t>(gp[b0 + r]);
            const acc_t v = -gb * q[i] / sc.sum[r];
            for (int64_t cc = 0; cc < C; ++cc) coef[r * C + cc] = v;
            part[i] += gb * row_log_prob(static_cast<acc_t>(base[r * C + y[b0 + r]]), sc, r);
          }
          acc_t* __restrict buf = grad_buf.data();
          const acc_t* __restrict e = sc.e.data();
          const int64_t total = n * C;
          for (int64_t j = 0; j < total; ++j) buf[j] = coef[j] * e[j];
          for (int64_t r = 0; r < n; ++r) buf[r * C + y[b0 + r]] += static_cast<acc_t>(gp[b0 + r]) * q[i];
          for (int64_t j = 0; j < total; ++j) gbase[j] = static_cast<scalar_t>(buf[j]);
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
