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

#include <atomic>
#include <limits>

#include <torch/library.h>

namespace bnas_fast {
namespace {

constexpr int64_t kExamplesPerChunk = 64;

// Online log-sum-exp of one row: a single pass keeps the running max and the rescaled sum.
template <typename scalar_t, typename acc_t>
inline acc_t row_logsumexp(const scalar_t* __restrict row, int64_t C) {
  acc_t m = static_cast<acc_t>(row[0]);
  acc_t s = 1;
  for (int64_t c = 1; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(row[c]);
    if (v > m) {
      s = s * std::exp(m - v) + 1;
      m = v;
    } else {
      s += std::exp(v - m);
    }
  }
  return m + std::log(s);
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
    at::parallel_for(0, B, kExamplesPerChunk, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        acc_t total = 0;
        for (int64_t i = 0; i < c.depths; ++i) {
          const acc_t q = std::exp(static_cast<acc_t>(lq[i]));
          if (q == acc_t(0)) continue;  // a depth without mass: its logits are not read
          const scalar_t* row = x + (i * B + b) * C;
          const acc_t lse = row_logsumexp<scalar_t, acc_t>(row, C);
          if (!std::isfinite(lse)) non_finite = true;
          total += q * (static_cast<acc_t>(row[y[b]]) - lse);
        }
        o[b] = static_cast<scalar_t>(total);
      }
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
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t b_end = std::min(B, (chunk + 1) * kExamplesPerChunk);
        for (int64_t b = chunk * kExamplesPerChunk; b < b_end; ++b) {
          const acc_t gb = static_cast<acc_t>(gp[b]);
          for (int64_t i = 0; i < D1; ++i) {
            const scalar_t* row = x + (i * B + b) * C;
            scalar_t* grow = gx + (i * B + b) * C;
            if (q[i] == acc_t(0)) {
              std::fill(grow, grow + C, scalar_t(0));
              continue;
            }
            const acc_t lse = row_logsumexp<scalar_t, acc_t>(row, C);
            const acc_t scale = gb * q[i];
            const int64_t target = y[b];
            for (int64_t cc = 0; cc < C; ++cc) {
              // (1[c = y] - p_c) * scale, rounded once
              const acc_t indicator = cc == target ? acc_t(1) : acc_t(0);
              grow[cc] = static_cast<scalar_t>(scale * (indicator - std::exp(static_cast<acc_t>(row[cc]) - lse)));
            }
            partial[chunk * D1 + i] += gb * (static_cast<acc_t>(row[y[b]]) - lse);
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
