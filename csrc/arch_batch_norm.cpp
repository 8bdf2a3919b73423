// CPU kernels for architecture-conditional batch norm (NSA-id, seed 002) with optional ghost-batch
// statistics groups (seed 004), and the per-(example, channel) affine map of its eval mode.
//
// x is viewed as [B, C, L] (L = prod of the spatial sizes); a "row" is x[b, c, :], contiguous.
// Training forward, two passes over x:
//   1. per row: row_mean and row_m2 = sum (x - row_mean)^2 (two passes over the row while it is in cache;
//      exact, unlike sum of squares minus squared sum);
//   2. per (group k, channel c): mean = average of the group's row means (equal counts), M2 = sum of
//      row_m2 + L sum (row_mean - mean)^2 (Chan et al.), invstd = 1 / sqrt(M2 / N + eps);
//   3. per row: y = (x - mean) * scale + bias[arch[b], c] with scale = invstd w[arch[b], c].
// Backward, two passes over (grad_y, x): per-row sums A = sum g, Bs = sum g (x - mean) and
// D = sum (x - mean) (the residual of the float32 mean); per (k, c)
// the two group means of the standard batch-norm backward; then grad_x = g a + (x - mean) b + c0 per row.
// Every reduction runs in a fixed order (rows in parallel, groups and architectures serially per
// channel), so results do not depend on the thread count. Sums over a row keep kLanes partial sums
// so that the compiler vectorises them (a single running float sum may not be reordered), and add
// each block of kSumBlock values into a double: a float32 sum of ~1e6 values with a large mean would
// otherwise lose digits to rounding (the mean of 1e6 values of about 1e4 was off by 130). Sums across
// rows (per group and channel) and the parameter gradients accumulate in double for the same reason.
#include "common.h"

#include <torch/library.h>

namespace bnas_fast {
namespace {

constexpr int64_t kLanes = 16;

// Values per block of a row sum: its kLanes partial sums run in acc_t, then go into a double total.
constexpr int64_t kSumBlock = 1024;
static_assert(kSumBlock % kLanes == 0, "a block holds whole groups of lanes");

// sum over a block of n <= kSumBlock values of f(x[l]) (or f(g[l], x[l])), in kLanes partial sums.
template <typename acc_t, typename Load>
inline acc_t block_reduce(int64_t n, Load load) {
  acc_t lanes[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t l0 = 0; l0 < full; l0 += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += load(l0 + j);
  }
  for (int64_t l = full; l < n; ++l) lanes[l - full] += load(l);
  acc_t total = 0;
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// sum of f(v) over a row of L values: blocks of kSumBlock in acc_t, the blocks added in double.
template <typename scalar_t, typename acc_t, typename F>
inline double row_reduce(const scalar_t* __restrict x, int64_t L, F f) {
  double total = 0;
  for (int64_t l0 = 0; l0 < L; l0 += kSumBlock) {
    const scalar_t* __restrict xb = x + l0;
    total += block_reduce<acc_t>(std::min(kSumBlock, L - l0),
                                 [&](int64_t l) { return f(static_cast<acc_t>(xb[l])); });
  }
  return total;
}

// sum over a row of f(g, x), same scheme.
template <typename scalar_t, typename acc_t, typename F>
inline double row_reduce2(const scalar_t* __restrict g, const scalar_t* __restrict x, int64_t L, F f) {
  double total = 0;
  for (int64_t l0 = 0; l0 < L; l0 += kSumBlock) {
    const scalar_t* __restrict gb = g + l0;
    const scalar_t* __restrict xb = x + l0;
    total += block_reduce<acc_t>(std::min(kSumBlock, L - l0), [&](int64_t l) {
      return f(static_cast<acc_t>(gb[l]), static_cast<acc_t>(xb[l]));
    });
  }
  return total;
}

// out[l] = f(l) for l in [0, L), in blocks of 64 (vectorised) through store_block, which streams them
// past the caches when `streaming` (outputs of kStreamingBytes and more; see common.h).
template <typename scalar_t, typename acc_t, typename F>
inline void write_row(scalar_t* __restrict out, int64_t L, bool streaming, F f) {
  constexpr int64_t kBlock = 64;
  int64_t l = 0;
  for (; l + kBlock <= L; l += kBlock) {
    acc_t buf[kBlock];
    for (int64_t u = 0; u < kBlock; ++u) buf[u] = f(l + u);
    store_block<kBlock>(out + l, buf, streaming);
  }
  for (; l < L; ++l) out[l] = static_cast<scalar_t>(f(l));
}

inline bool stream_output(const at::Tensor& t) { return static_cast<int64_t>(t.nbytes()) >= kStreamingBytes; }

// Rows per parallel task: enough work (>= 32k elements) to amortise the scheduling.
inline int64_t row_grain(int64_t L) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(L, 1)); }

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

struct Dims {
  int64_t B, C, L, G, group_size, S;
};

// Checks shared by the training forward and backward; returns the dimensions.
Dims check_common(const char* op, const at::Tensor& x, const at::Tensor& arch, const at::Tensor& weight,
                  int64_t group_size) {
  check_cpu_floating(x, op, "x");
  check_cpu_floating(weight, op, "weight");
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be [B, C, *], got ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(arch.device().is_cpu() && arch.scalar_type() == at::kLong && arch.dim() == 1 &&
                        arch.size(0) == B,
                    op, ": arch must be a [B] = [", B, "] int64 CPU tensor, got ", arch.scalar_type(), " ",
                    arch.sizes(), " on ", arch.device());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == C && weight.size(0) >= 1, op,
                    ": weight must be [S, C] with C = ", C, ", got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
                    " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(group_size >= 1 && B % group_size == 0, op, ": group_size = ", group_size,
                    " must be >= 1 and divide the batch size B = ", B);
  const int64_t L = B * C == 0 ? 0 : x.numel() / (B * C);
  const int64_t S = weight.size(0);
  const auto a = arch.contiguous();
  const int64_t* ap = a.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_INDEX(ap[b] >= 0 && ap[b] < S, op, ": arch[", b, "] = ", ap[b],
                      " is out of range for S = ", S, " architectures (rows of weight)");
  }
  return {B, C, L, B / group_size, group_size, S};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> arch_batch_norm_cpu(
    const at::Tensor& x_in, const at::Tensor& arch_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
    int64_t group_size, double eps) {
  const char* op = "arch_batch_norm";
  const Dims d = check_common(op, x_in, arch_in, weight_in, group_size);
  check_cpu_floating(bias_in, op, "bias");
  TORCH_CHECK_VALUE(bias_in.sizes() == weight_in.sizes(), op, ": bias must be [S, C] = ", weight_in.sizes(),
                    " like weight, got ", bias_in.sizes());
  TORCH_CHECK_VALUE(bias_in.scalar_type() == x_in.scalar_type(), op, ": bias has dtype ", bias_in.scalar_type(),
                    " but x has ", x_in.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(d.group_size * d.L >= 2, op, ": each statistics group has ", d.group_size * d.L,
                    " value per channel (group_size = ", d.group_size, ", L = ", d.L,
                    "); the batch variance needs at least 2");
  const auto x = x_in.contiguous();
  const auto arch = arch_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto bias = bias_in.contiguous();
  const auto acc_options = x.options().dtype(acc_scalar_type(x.scalar_type()));
  auto y = empty_output(x.sizes(), x.options());
  auto mean = at::empty({d.G, d.C}, acc_options);
  auto invstd = at::empty({d.G, d.C}, acc_options);
  auto row_mean = at::empty({d.B, d.C}, acc_options);
  auto row_m2 = at::empty({d.B, d.C}, acc_options);
  const int64_t B = d.B, C = d.C, L = d.L, g = d.group_size;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "arch_batch_norm", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* ap = arch.data_ptr<int64_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* rm = row_mean.data_ptr<acc_t>();
    acc_t* rm2 = row_m2.data_ptr<acc_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    // 1. per-row mean and M2
    at::parallel_for(0, B * C, row_grain(L), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * L;
        const acc_t m = static_cast<acc_t>(row_reduce<scalar_t, acc_t>(row, L, [](acc_t v) { return v; }) /
                                           static_cast<double>(L));
        rm[r] = m;
        rm2[r] = static_cast<acc_t>(row_reduce<scalar_t, acc_t>(row, L, [m](acc_t v) { return (v - m) * (v - m); }));
      }
    });
    // 2. per (group, channel): Chan's combination of the group's rows (all of them have L values)
    at::parallel_for(0, d.G * C, 64, [&](int64_t begin, int64_t end) {
      for (int64_t kc = begin; kc < end; ++kc) {
        const int64_t k = kc / C, c = kc % C;
        double sum_means = 0;
        for (int64_t b = k * g; b < (k + 1) * g; ++b) sum_means += rm[b * C + c];
        const double m = sum_means / static_cast<double>(g);
        double m2 = 0;
        for (int64_t b = k * g; b < (k + 1) * g; ++b) {
          const double delta = rm[b * C + c] - m;
          m2 += rm2[b * C + c] + static_cast<double>(L) * delta * delta;
        }
        const double var = m2 / static_cast<double>(g * L);
        mp[kc] = static_cast<acc_t>(m);
        ip[kc] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
      }
    });
    // 3. y = x * scale + shift per row
    const bool streaming = stream_output(y);
    at::parallel_for(0, B * C, row_grain(L), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / C, c = r % C, kc = (b / g) * C + c, sc = ap[b] * C + c;
        // (x - mean) scale + bias, not x scale + (bias - mean scale): with a mean large against the
        // spread, x scale and mean scale are large and cancel
        const acc_t scale = ip[kc] * static_cast<acc_t>(wp[sc]);
        const acc_t mean = mp[kc], shift = static_cast<acc_t>(bp[sc]);
        const scalar_t* __restrict row = xp + r * L;
        write_row<scalar_t, acc_t>(yp + r * L, L, streaming,
                                   [=](int64_t l) { return (static_cast<acc_t>(row[l]) - mean) * scale + shift; });
      }
      if (streaming) streaming_fence();
    });
  });
  return {y, mean, invstd, row_mean, row_m2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> arch_batch_norm_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& arch_in, const at::Tensor& weight_in,
    const at::Tensor& mean_in, const at::Tensor& invstd_in, int64_t group_size) {
  const char* op = "arch_batch_norm_backward";
  const Dims d = check_common(op, x_in, arch_in, weight_in, group_size);
  check_cpu_floating(grad_y_in, op, "grad_y");
  TORCH_CHECK_VALUE(grad_y_in.sizes() == x_in.sizes() && grad_y_in.scalar_type() == x_in.scalar_type(), op,
                    ": grad_y must match x (", x_in.sizes(), " ", x_in.scalar_type(), "), got ", grad_y_in.sizes(),
                    " ", grad_y_in.scalar_type());
  const auto acc = acc_scalar_type(x_in.scalar_type());
  auto check_stat = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == acc && t.dim() == 2 && t.size(0) == d.G &&
                          t.size(1) == d.C,
                      op, ": ", name, " must be [G, C] = [", d.G, ", ", d.C, "] of dtype ", acc, ", got ",
                      t.scalar_type(), " ", t.sizes());
  };
  check_stat("mean", mean_in);
  check_stat("invstd", invstd_in);
  const auto x = x_in.contiguous();
  const auto gy = grad_y_in.contiguous();
  const auto arch = arch_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto mean = mean_in.contiguous();
  const auto invstd = invstd_in.contiguous();
  const int64_t B = d.B, C = d.C, L = d.L, g = d.group_size, S = d.S;
  const auto acc_options = x.options().dtype(acc);
  auto grad_x = empty_output(x.sizes(), x.options());
  const auto row_options = acc_options.dtype(at::kDouble);
  auto sum_g = at::empty({B, C}, row_options);       // A[b, c]  = sum_l g
  auto sum_g_dx = at::empty({B, C}, row_options);    // Bs[b, c] = sum_l g (x - mean)
  auto sum_dx = at::empty({B, C}, row_options);      // D[b, c]  = sum_l (x - mean)
  auto coef = at::empty({d.G, C, 3}, acc_options);   // per (k, c): mean(dxhat), mean(dxhat xhat), delta
  auto grad_weight_acc = at::zeros({S, C}, acc_options.dtype(at::kDouble));
  auto grad_bias_acc = at::zeros({S, C}, acc_options.dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "arch_batch_norm_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gy.data_ptr<scalar_t>();
    const int64_t* ap = arch.data_ptr<int64_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const acc_t* mp = mean.data_ptr<acc_t>();
    const acc_t* ip = invstd.data_ptr<acc_t>();
    double* A = sum_g.data_ptr<double>();
    double* Bs = sum_g_dx.data_ptr<double>();
    double* D = sum_dx.data_ptr<double>();
    acc_t* cp = coef.data_ptr<acc_t>();
    double* gw = grad_weight_acc.data_ptr<double>();
    double* gb = grad_bias_acc.data_ptr<double>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    // 1. per-row sums of g, g (x - mean) and x - mean. The last two run in double: x - mean rounded
    //    to float32 has the same error for every x of a binade (x is on the float grid, the mean is
    //    fixed), a bias that a large mean of g sums up over the batch. And mean is itself rounded
    //    (to 1e-3 at 1e4): D gives its residual delta = mean(x) - mean, which step 2 takes out.
    at::parallel_for(0, B * C, row_grain(L), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / C, c = r % C;
        const double m = mp[(b / g) * C + c];
        A[r] = row_reduce<scalar_t, acc_t>(gp + r * L, L, [](acc_t v) { return v; });
        Bs[r] = row_reduce2<scalar_t, double>(gp + r * L, xp + r * L, L,
                                              [m](double gv, double xv) { return gv * (xv - m); });
        D[r] = row_reduce<scalar_t, double>(xp + r * L, L, [m](double xv) { return xv - m; });
      }
    });
    // 2. per channel: the group means of dxhat = g w and of dxhat xhat, and the parameter gradients
    //    (each channel owns its column of grad_weight / grad_bias; examples are added in order), with
    //    x - mean(x) = (x - mean) - delta, so sum g (x - mean(x)) = Bs - delta A.
    const double inv_N = 1.0 / static_cast<double>(g * L);
    at::parallel_for(0, C, 8, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t k = 0; k < d.G; ++k) {
          const double r = ip[k * C + c];
          double sum_d = 0;
          for (int64_t b = k * g; b < (k + 1) * g; ++b) sum_d += D[b * C + c];
          const double delta = sum_d * inv_N;
          double sa = 0, sb = 0;
          for (int64_t b = k * g; b < (k + 1) * g; ++b) {
            const int64_t s = ap[b];
            const double w = static_cast<acc_t>(wp[s * C + c]);
            const double centred = Bs[b * C + c] - delta * A[b * C + c];
            sa += w * A[b * C + c];
            sb += w * centred;
            gw[s * C + c] += r * centred;
            gb[s * C + c] += A[b * C + c];
          }
          cp[(k * C + c) * 3] = static_cast<acc_t>(sa * inv_N);
          cp[(k * C + c) * 3 + 1] = static_cast<acc_t>(r * sb * inv_N);
          cp[(k * C + c) * 3 + 2] = static_cast<acc_t>(delta);
        }
      }
    });
    // 3. grad_x = r (g w - m1 - xhat m2) = g (r w) + (x - mean) (-r^2 m2) - r m1 + delta r^2 m2
    //    (x - mean, for the reason of the forward's step 3)
    const bool streaming = stream_output(grad_x);
    at::parallel_for(0, B * C, row_grain(L), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / C, c = r % C, kc = (b / g) * C + c;
        const acc_t rs = ip[kc], m = mp[kc], m1 = cp[kc * 3], m2 = cp[kc * 3 + 1], delta = cp[kc * 3 + 2];
        const acc_t a = rs * static_cast<acc_t>(wp[ap[b] * C + c]);
        const acc_t bx = -rs * rs * m2;
        const acc_t c0 = -rs * m1 - delta * bx;
        const scalar_t* __restrict grow = gp + r * L;
        const scalar_t* __restrict xrow = xp + r * L;
        write_row<scalar_t, acc_t>(gxp + r * L, L, streaming, [=](int64_t l) {
          return static_cast<acc_t>(grow[l]) * a + (static_cast<acc_t>(xrow[l]) - m) * bx + c0;
        });
      }
      if (streaming) streaming_fence();
    });
  });
  return {grad_x, grad_weight_acc.to(weight.scalar_type()), grad_bias_acc.to(weight.scalar_type())};
}

// Eval mode: y[b, c, :] = x[b, c, :] * scale[b, c] + shift[b, c] (scale and shift are made from the
// running statistics and the gathered affine parameters, [B, C] each, in Python).
void check_affine(const char* op, const at::Tensor& x, const at::Tensor& scale) {
  check_cpu_floating(x, op, "x");
  check_cpu_floating(scale, op, "scale");
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be [B, C, *], got ", x.sizes());
  TORCH_CHECK_VALUE(scale.dim() == 2 && scale.size(0) == x.size(0) && scale.size(1) == x.size(1), op,
                    ": scale must be [B, C] = [", x.size(0), ", ", x.size(1), "], got ", scale.sizes());
  TORCH_CHECK_VALUE(scale.scalar_type() == acc_scalar_type(x.scalar_type()), op, ": scale must have dtype ",
                    acc_scalar_type(x.scalar_type()), " for x of dtype ", x.scalar_type(), ", got ",
                    scale.scalar_type());
}

at::Tensor channel_affine_cpu(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& shift_in) {
  const char* op = "channel_affine";
  check_affine(op, x_in, scale_in);
  TORCH_CHECK_VALUE(shift_in.sizes() == scale_in.sizes() && shift_in.scalar_type() == scale_in.scalar_type() &&
                        shift_in.device().is_cpu(),
                    op, ": shift must match scale (", scale_in.sizes(), " ", scale_in.scalar_type(), "), got ",
                    shift_in.sizes(), " ", shift_in.scalar_type());
  const auto x = x_in.contiguous();
  const auto scale = scale_in.contiguous();
  const auto shift = shift_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), L = B * C == 0 ? 0 : x.numel() / (B * C);
  auto y = empty_output(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "channel_affine", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* sp = scale.data_ptr<acc_t>();
    const acc_t* hp = shift.data_ptr<acc_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const bool streaming = stream_output(y);
    at::parallel_for(0, B * C, row_grain(L), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t a = sp[r], h = hp[r];
        const scalar_t* __restrict row = xp + r * L;
        write_row<scalar_t, acc_t>(yp + r * L, L, streaming,
                                   [=](int64_t l) { return static_cast<acc_t>(row[l]) * a + h; });
      }
      if (streaming) streaming_fence();
    });
  });
  return y;
}

// grad_x = g scale; grad_scale[b, c] = sum_l g x; grad_shift[b, c] = sum_l g.
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_affine_backward_cpu(const at::Tensor& grad_y_in,
                                                                           const at::Tensor& x_in,
                                                                           const at::Tensor& scale_in) {
  const char* op = "channel_affine_backward";
  check_affine(op, x_in, scale_in);
  check_cpu_floating(grad_y_in, op, "grad_y");
  TORCH_CHECK_VALUE(grad_y_in.sizes() == x_in.sizes() && grad_y_in.scalar_type() == x_in.scalar_type(), op,
                    ": grad_y must match x (", x_in.sizes(), " ", x_in.scalar_type(), "), got ", grad_y_in.sizes(),
                    " ", grad_y_in.scalar_type());
  const auto x = x_in.contiguous();
  const auto gy = grad_y_in.contiguous();
  const auto scale = scale_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), L = B * C == 0 ? 0 : x.numel() / (B * C);
  auto grad_x = empty_output(x.sizes(), x.options());
  auto grad_scale = at::empty({B, C}, scale.options());
  auto grad_shift = at::empty({B, C}, scale.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "channel_affine_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gy.data_ptr<scalar_t>();
    const acc_t* sp = scale.data_ptr<acc_t>();
    acc_t* gsp = grad_scale.data_ptr<acc_t>();
    acc_t* ghp = grad_shift.data_ptr<acc_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    const bool streaming = stream_output(grad_x);
    at::parallel_for(0, B * C, row_grain(L), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* grow = gp + r * L;
        gsp[r] = static_cast<acc_t>(
            row_reduce2<scalar_t, acc_t>(grow, xp + r * L, L, [](acc_t gv, acc_t xv) { return gv * xv; }));
        ghp[r] = static_cast<acc_t>(row_reduce<scalar_t, acc_t>(grow, L, [](acc_t v) { return v; }));
        const acc_t a = sp[r];
        write_row<scalar_t, acc_t>(gxp + r * L, L, streaming, [=](int64_t l) { return static_cast<acc_t>(grow[l]) * a; });
      }
      if (streaming) streaming_fence();
    });
  });
  return {grad_x, grad_scale, grad_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnas_fast, CPU, m) {
  m.impl("arch_batch_norm", &arch_batch_norm_cpu);
  m.impl("arch_batch_norm_backward", &arch_batch_norm_backward_cpu);
  m.impl("channel_affine", &channel_affine_cpu);
  m.impl("channel_affine_backward", &channel_affine_backward_cpu);
}

}  // namespace bnas_fast
