// CPU kernels for fused Gumbel-sigmoid (concrete) dropout with a learnable drop probability.
//
// x is [B, C, P] contiguous; channel c belongs to group g = c / group_size and has the drop logit
// lambda_g = log(p_g / (1 - p_g)). A mask unit is one element (per_element) or one (example, group)
// pair, numbered u = (b C + c) P + s or u = b G + g (G = C / group_size). For unit u:
//
//   w        = Philox-4x32-10 word (u mod 4) of counter offset + u / 4 under key seed
//   L        = log((float(w) + 1/2) / (float(2^32 - 1 - w) + 1/2))      standard logistic noise
//   soft     = 1 / (1 + exp((lambda + L) / temperature))                  keep, relaxed (eq. 16)
//   hard     = 1[lambda + L < 0]                                           keep ~ Bernoulli(1 - p)
//   y        = x * k * scale,   k = soft (mode 0) or hard (modes 1, 2),   scale = 1 + r exp(lambda)
//   grad_x   = grad_y * k * scale
//   grad_lambda_g = sum over the units and channels of g of grad_y * x * scale * (k p r - t),
//              t = soft (1 - soft) / temperature in modes 0 and 1 (straight-through), 0 in mode 2
//
// with r = 1 when rescaling by 1 / (1 - p), else 0. bnas_fast/reference.py is the specification;
// the Philox words are bit-identical to it and to the Triton kernels, L agrees to a few ulp.
//
// Nothing of the noise is stored: the backward regenerates it from (seed, offset). Per element, the
// work is split over rows (b, c) and every row is walked in blocks of kBlock units aligned to
// absolute multiples of kBlock, so the Philox calls and every row sum are the same whatever the
// thread count. Per (example, group), the B G keep factors are computed first (a small pass), then
// the rows are scaled. grad_lambda is reduced from per-row sums in row order: deterministic.
#include "common.h"

#include <torch/library.h>

namespace bnas_fast {
namespace {

constexpr uint32_t kMulA = 0xD2511F53u;  // multiplies counter word 0
constexpr uint32_t kMulB = 0xCD9E8D57u;  // multiplies counter word 2
constexpr uint32_t kKeyA = 0x9E3779B9u;  // key increments per round
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr int64_t kBlock = 1024;  // units per block: 256 Philox counters of 4 words

// words[4 i + j] = word j of Philox(counter first + i) under key, for i < kBlock / 4. Each counter's
// ten rounds run in registers; the loop over counters vectorises (32x32 -> 64-bit multiplies).
inline void philox_block(uint64_t key, uint64_t first, uint32_t* __restrict words) {
  const uint32_t key0 = static_cast<uint32_t>(key), key1 = static_cast<uint32_t>(key >> 32);
  for (int64_t i = 0; i < kBlock / 4; ++i) {
    const uint64_t counter = first + static_cast<uint64_t>(i);
    uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = key0, k1 = key1;
#pragma GCC unroll 10
    for (int round = 0; round < kRounds; ++round) {
      const uint64_t product_b = static_cast<uint64_t>(kMulB) * c2;
      const uint64_t product_a = static_cast<uint64_t>(kMulA) * c0;
      c0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
      c2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(product_b);
      c3 = static_cast<uint32_t>(product_a);
      k0 += kKeyA;
      k1 += kKeyB;
    }
    words[4 * i] = c0;
    words[4 * i + 1] = c1;
    words[4 * i + 2] = c2;
    words[4 * i + 3] = c3;
  }
}

// Standard logistic noise of n words (see the top): float32 on every backend.
inline void logistic_noise(const uint32_t* __restrict words, int64_t n, float* __restrict noise) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = static_cast<float>(words[i]) + 0.5f;
    const float b = static_cast<float>(0xFFFFFFFFu - words[i]) + 0.5f;
    noise[i] = fast_log(a / b);
  }
}

// Per-channel constants, in the accumulation type, expanded from the per-group logits.
template <typename acc_t>
struct ChannelConstants {
  std::vector<acc_t> lambda, scale, p_rescale;  // lambda_g, 1 + r exp(lambda_g), p_g r
};

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
ChannelConstants<acc_t> channel_constants(const at::Tensor& drop_logit, int64_t C, int64_t group_size, bool rescale) {
  const scalar_t* logit = drop_logit.data_ptr<scalar_t>();
  ChannelConstants<acc_t> k;
  k.lambda.resize(C), k.scale.resize(C), k.p_rescale.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t lambda = static_cast<acc_t>(logit[c / group_size]);
    k.lambda[c] = lambda;
    k.scale[c] = rescale ? acc_t(1) + std::exp(lambda) : acc_t(1);
    k.p_rescale[c] = rescale ? acc_t(1) / (acc_t(1) + std::exp(-lambda)) : acc_t(0);
  }
  return k;
}

struct Config {
  uint64_t seed, offset;
  double inv_temperature;
  int64_t group_size;
  bool per_element, rescale;
  int64_t mode;  // 0 soft, 1 straight-through, 2 hard
};

// Reads and checks what the schema cannot: x [B, C, P], drop_logit [C / group_size], seed_offset
// int64 [2] with non-negative entries, temperature > 0, mode in {0, 1, 2}.
Config make_config(const at::Tensor& x, const at::Tensor& drop_logit, const at::Tensor& seed_offset,
                   double temperature, int64_t group_size, bool per_element, bool rescale, int64_t mode,
                   const char* op) {
  check_cpu_floating(x, op, "x");
  check_cpu_floating(drop_logit, op, "drop_logit");
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be [B, C, P], got ", x.sizes());
  TORCH_CHECK_VALUE(group_size >= 1 && x.size(1) % group_size == 0, op, ": group_size = ", group_size,
                    " must be >= 1 and divide C = ", x.size(1));
  TORCH_CHECK_VALUE(drop_logit.dim() == 1 && drop_logit.size(0) == x.size(1) / group_size, op,
                    ": drop_logit must be [C / group_size] = [", x.size(1) / group_size, "], got ",
                    drop_logit.sizes());
  TORCH_CHECK_TYPE(drop_logit.scalar_type() == x.scalar_type(), op, ": drop_logit has dtype ",
                   drop_logit.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK_TYPE(seed_offset.scalar_type() == at::kLong && seed_offset.numel() == 2 && seed_offset.device().is_cpu(),
                   op, ": seed_offset must be a CPU int64 tensor of 2 entries (seed, offset)");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), op, ": temperature must be > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, op, ": mode must be 0 (soft), 1 (straight-through) or 2 (hard), got ",
                    mode);
  const auto so = seed_offset.contiguous();
  const int64_t seed = so.data_ptr<int64_t>()[0], offset = so.data_ptr<int64_t>()[1];
  TORCH_CHECK_VALUE(seed >= 0 && offset >= 0, op, ": seed_offset must hold non-negative (seed, offset), got (",
                    seed, ", ", offset, ")");
  return Config{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), 1.0 / temperature, group_size,
                per_element, rescale, mode};
}

// One unit's keep factor and the slope t = soft (1 - soft) / temperature (0 in hard mode).
template <typename acc_t, int64_t kMode>
inline void unit_keep(acc_t lambda, float noise, acc_t inv_temperature, acc_t& keep, acc_t& slope) {
  const acc_t sum = lambda + static_cast<acc_t>(noise);
  const acc_t hard = sum < acc_t(0) ? acc_t(1) : acc_t(0);
  if constexpr (kMode == 2) {
    keep = hard;
    slope = acc_t(0);
  } else {
    const acc_t soft = acc_t(1) / (acc_t(1) + fast_exp(sum * inv_temperature));
    keep = kMode == 0 ? soft : hard;
    slope = soft * (acc_t(1) - soft) * inv_temperature;
  }
}

// Per element: rows [row_begin, row_end) of x, in blocks of kBlock units. Forward writes y; backward
// writes grad_x and row_sum[row] = sum_s grad_y * x * (k p r - t) (scale applied by the caller).
template <typename scalar_t, int64_t kMode, bool kBackward>
void per_element_rows(const Config& cfg, const ChannelConstants<acc_type<scalar_t>>& k, const scalar_t* __restrict in,
                      const scalar_t* __restrict x, scalar_t* __restrict out, acc_type<scalar_t>* __restrict row_sum,
                      int64_t C, int64_t P, int64_t row_begin, int64_t row_end) {
  using acc_t = acc_type<scalar_t>;
  alignas(64) uint32_t words[kBlock];
  alignas(64) float noise[kBlock];
  alignas(64) acc_t keep[kBlock];
  alignas(64) acc_t slope[kBlock];
  const acc_t inv_temperature = static_cast<acc_t>(cfg.inv_temperature);
  int64_t e = row_begin * P;
  const int64_t end = row_end * P;
  acc_t partial = 0;  // the current row's running sum (backward)
  while (e < end) {
    const int64_t block_start = (e / kBlock) * kBlock;
    const int64_t block_end = std::min(block_start + kBlock, end);
    philox_block(cfg.seed, cfg.offset + static_cast<uint64_t>(block_start / 4), words);
    const int64_t first = e - block_start, count = block_end - e;
    logistic_noise(words + first, count, noise + first);
    while (e < block_end) {
      const int64_t row = e / P;
      const int64_t segment_end = std::min((row + 1) * P, block_end);
      const int64_t c = row % C, i0 = e - block_start, n = segment_end - e;
      const acc_t lambda = k.lambda[c], scale = k.scale[c], p_rescale = k.p_rescale[c];
      for (int64_t i = 0; i < n; ++i) unit_keep<acc_t, kMode>(lambda, noise[i0 + i], inv_temperature, keep[i], slope[i]);
      if constexpr (!kBackward) {
        for (int64_t i = 0; i < n; ++i) out[e + i] = static_cast<scalar_t>(static_cast<acc_t>(in[e + i]) * keep[i] * scale);
      } else {
        acc_t s = 0;
        for (int64_t i = 0; i < n; ++i) {
          const acc_t g = static_cast<acc_t>(in[e + i]);
          out[e + i] = static_cast<scalar_t>(g * keep[i] * scale);
          s += g * static_cast<acc_t>(x[e + i]) * (keep[i] * p_rescale - slope[i]);
        }
        partial += s;
        if (segment_end == (row + 1) * P) {
          row_sum[row] = partial;
          partial = 0;
        }
      }
      e = segment_end;
    }
  }
}

// Per (example, group): factor[b C + c] = k(b, g) scale_c and slope_row[b C + c] = the unit's
// (k p r - t) for every channel of the group. B G units: a serial pass over blocks of kBlock.
template <typename acc_t, int64_t kMode>
void unit_factors(const Config& cfg, const ChannelConstants<acc_t>& k, int64_t B, int64_t C, acc_t* factor,
                  acc_t* coefficient) {
  alignas(64) uint32_t words[kBlock];
  alignas(64) float noise[kBlock];
  const int64_t G = C / cfg.group_size, units = B * G;
  const acc_t inv_temperature = static_cast<acc_t>(cfg.inv_temperature);
  for (int64_t block_start = 0; block_start < units; block_start += kBlock) {
    const int64_t n = std::min(kBlock, units - block_start);
    philox_block(cfg.seed, cfg.offset + static_cast<uint64_t>(block_start / 4), words);
    logistic_noise(words, n, noise);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t u = block_start + i, b = u / G, g = u % G;
      for (int64_t c = g * cfg.group_size; c < (g + 1) * cfg.group_size; ++c) {
        acc_t keep, slope;
        unit_keep<acc_t, kMode>(k.lambda[c], noise[i], inv_temperature, keep, slope);
        factor[b * C + c] = keep * k.scale[c];
        coefficient[b * C + c] = keep * k.p_rescale[c] - slope;
      }
    }
  }
}

template <typename scalar_t, int64_t kMode>
void forward_impl(const Config& cfg, const at::Tensor& x, const at::Tensor& drop_logit, at::Tensor& y) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2);
  const auto k = channel_constants<scalar_t>(drop_logit, C, cfg.group_size, cfg.rescale);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  if (cfg.per_element) {
    at::parallel_for(0, B * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(P, 1)), [&](int64_t begin, int64_t end) {
      per_element_rows<scalar_t, kMode, false>(cfg, k, xp, xp, yp, nullptr, C, P, begin, end);
    });
    return;
  }
  std::vector<acc_t> factor(B * C), coefficient(B * C);
  unit_factors<acc_t, kMode>(cfg, k, B, C, factor.data(), coefficient.data());
  at::parallel_for(0, B * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(P, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t f = factor[row];
      const scalar_t* __restrict xr = xp + row * P;
      scalar_t* __restrict yr = yp + row * P;
      for (int64_t s = 0; s < P; ++s) yr[s] = static_cast<scalar_t>(static_cast<acc_t>(xr[s]) * f);
    }
  });
}

template <typename scalar_t, int64_t kMode>
void backward_impl(const Config& cfg, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& drop_logit,
                   at::Tensor& grad_x, at::Tensor& grad_logit) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2), G = C / cfg.group_size;
  const auto k = channel_constants<scalar_t>(drop_logit, C, cfg.group_size, cfg.rescale);
  const scalar_t* gp = grad_y.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* gxp = grad_x.data_ptr<scalar_t>();
  // row_sum[b C + c]: sum over the row of grad_y * x * (k p r - t); times scale_c it is the row's
  // share of grad_lambda.
  std::vector<acc_t> row_sum(B * C, acc_t(0));
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(P, 1));
  if (cfg.per_element) {
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      per_element_rows<scalar_t, kMode, true>(cfg, k, gp, xp, gxp, row_sum.data(), C, P, begin, end);
    });
  } else {
    std::vector<acc_t> factor(B * C), coefficient(B * C);
    unit_factors<acc_t, kMode>(cfg, k, B, C, factor.data(), coefficient.data());
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const acc_t f = factor[row];
        const scalar_t* __restrict gr = gp + row * P;
        const scalar_t* __restrict xr = xp + row * P;
        scalar_t* __restrict gxr = gxp + row * P;
        acc_t dot = 0;
        for (int64_t s = 0; s < P; ++s) {
          const acc_t g = static_cast<acc_t>(gr[s]);
          gxr[s] = static_cast<scalar_t>(g * f);
          dot += g * static_cast<acc_t>(xr[s]);
        }
        row_sum[row] = dot * coefficient[row];
      }
    });
  }
  // grad_lambda_g = sum_b sum_{c in g} scale_c row_sum[b C + c], in a fixed order.
  std::vector<acc_t> total(G, acc_t(0));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) total[c / cfg.group_size] += k.scale[c] * row_sum[b * C + c];
  }
  scalar_t* out = grad_logit.data_ptr<scalar_t>();
  for (int64_t g = 0; g < G; ++g) out[g] = static_cast<scalar_t>(total[g]);
}

template <typename F>
void dispatch_mode(int64_t mode, F&& f) {
  if (mode == 0) {
    f(std::integral_constant<int64_t, 0>{});
  } else if (mode == 1) {
    f(std::integral_constant<int64_t, 1>{});
  } else {
    f(std::integral_constant<int64_t, 2>{});
  }
}

at::Tensor gumbel_sigmoid_dropout_cpu(const at::Tensor& x_in, const at::Tensor& drop_logit_in,
                                      const at::Tensor& seed_offset, double temperature, int64_t group_size,
                                      bool per_element, bool rescale, int64_t mode) {
  const char* op = "gumbel_sigmoid_dropout";
  const Config cfg = make_config(x_in, drop_logit_in, seed_offset, temperature, group_size, per_element, rescale,
                                 mode, op);
  const auto x = x_in.contiguous();
  const auto drop_logit = drop_logit_in.contiguous();
  auto y = empty_output(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gumbel_sigmoid_dropout", [&] {
    dispatch_mode(mode, [&](auto m) { forward_impl<scalar_t, decltype(m)::value>(cfg, x, drop_logit, y); });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> gumbel_sigmoid_dropout_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& drop_logit_in,
    const at::Tensor& seed_offset, double temperature, int64_t group_size, bool per_element, bool rescale,
    int64_t mode) {
  const char* op = "gumbel_sigmoid_dropout_backward";
  const Config cfg = make_config(x_in, drop_logit_in, seed_offset, temperature, group_size, per_element, rescale,
                                 mode, op);
  TORCH_CHECK_VALUE(grad_y_in.sizes() == x_in.sizes(), op, ": grad_y must have x's shape ", x_in.sizes(), ", got ",
                    grad_y_in.sizes());
  TORCH_CHECK_TYPE(grad_y_in.scalar_type() == x_in.scalar_type(), op, ": grad_y has dtype ",
                   grad_y_in.scalar_type(), " but x has dtype ", x_in.scalar_type());
  const auto grad_y = grad_y_in.contiguous();
  const auto x = x_in.contiguous();
  const auto drop_logit = drop_logit_in.contiguous();
  auto grad_x = empty_output(x.sizes(), x.options());
  auto grad_logit = at::empty(drop_logit.sizes(), drop_logit.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gumbel_sigmoid_dropout", [&] {
    dispatch_mode(mode, [&](auto m) {
      backward_impl<scalar_t, decltype(m)::value>(cfg, grad_y, x, drop_logit, grad_x, grad_logit);
    });
  });
  return {grad_x, grad_logit};
}

// The kernels' noise for given 32-bit words (int64 values in [0, 2^32)), for tests: the ends of
// the word range cannot be reached through a seed.
at::Tensor logistic_noise_of_words_cpu(const at::Tensor& words_in) {
  TORCH_CHECK_TYPE(words_in.scalar_type() == at::kLong && words_in.device().is_cpu(), "logistic_noise_of_words: ",
                   "words must be a CPU int64 tensor");
  const auto words = words_in.contiguous();
  const int64_t n = words.numel();
  const int64_t* w = words.data_ptr<int64_t>();
  std::vector<uint32_t> bits(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(w[i] >= 0 && w[i] <= int64_t(0xFFFFFFFF), "logistic_noise_of_words: words[", i, "] = ", w[i],
                      " is not a 32-bit word");
    bits[i] = static_cast<uint32_t>(w[i]);
  }
  auto out = at::empty({n}, words.options().dtype(at::kFloat));
  logistic_noise(bits.data(), n, out.data_ptr<float>());
  return out.view(words.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(bnas_fast, CPU, m) {
  m.impl("gumbel_sigmoid_dropout", &gumbel_sigmoid_dropout_cpu);
  m.impl("gumbel_sigmoid_dropout_backward", &gumbel_sigmoid_dropout_backward_cpu);
  m.impl("logistic_noise_of_words", &logistic_noise_of_words_cpu);
}

}  // namespace bnas_fast
