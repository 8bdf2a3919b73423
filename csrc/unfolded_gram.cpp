// CPU kernel for the per-filter Gauss-Newton blocks of a convolution (BayesNAS, seed 003):
//
//   G[o] = sum_n sum_k j[n,k,o] j[n,k,o]^T,   j[n,k,o][d] = sum_p S[n,k,o,p] X_n[p,d]   (+ j[D] = sum_p S)
//
// or only its diagonal, sum_n sum_k j[n,k,o]^2 (``diagonal``).
//
// x is [N, C_in, H, W], the factors S are [N, K, C_out, Ho, Wo], X_n [P, D] is the im2col unfolding of
// x[n] over the input channels of o's group (D = C_in / groups * kh * kw, ordered as W[o].flatten()),
// and the optional last coordinate is the bias. bnas_fast/reference.py (unfolded_gram) is the
// specification.
//
// GEMM-based: the unfolding of x over one group's input channels goes to a scratch [N, D', P] (what
// F.unfold would make; never one per output channel); J = S X^T is one batched GEMM over the
// examples into J [N K, C_out / groups, D']; G = J^T J is one batched GEMM over the output
// channels. No [C_out, N P, D] tensor exists. Factors of rank one per (example, output channel) are
// first compressed to one factor (rank_one_factors). All index arithmetic is int64_t; every read of x is
// bounds-checked by construction (taps outside the padded input write 0).
#include "common.h"
#include "rank_one.h"

#include <torch/library.h>

namespace bnas_fast {
namespace {

struct ConvGeometry {
  int64_t N, C_in, H, W, C_out, K, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, groups;
  bool bias;
  int64_t in_per_group() const { return C_in / groups; }
  int64_t out_per_group() const { return C_out / groups; }
  int64_t D() const { return in_per_group() * kh * kw; }
  int64_t D_full() const { return D() + (bias ? 1 : 0); }
  int64_t P() const { return Ho * Wo; }
};

// rows[d][p] = x[n, c0 + c, oy*sh - ph + u*dh, ox*sw - pw + v*dw] (0 outside), d = (c*kh + u)*kw + v;
// with the bias, row D is all ones.
template <typename scalar_t, typename acc_t>
void unfold_example(const scalar_t* __restrict xn, const ConvGeometry& g, int64_t c0, acc_t* __restrict rows) {
  const int64_t P = g.P();
  for (int64_t c = 0; c < g.in_per_group(); ++c) {
    const scalar_t* plane = xn + (c0 + c) * g.H * g.W;
    for (int64_t u = 0; u < g.kh; ++u) {
      for (int64_t v = 0; v < g.kw; ++v) {
        acc_t* row = rows + ((c * g.kh + u) * g.kw + v) * P;
        // ix = ox * sw + shift lies in [0, W) exactly for ox in [lo, hi): the taps left of lo and
        // from hi on read the zero padding. Hoisting that test out of the loop lets the compiler
        // vectorise the copy (a plain one at stride 1).
        const int64_t shift = v * g.dw - g.pw;
        const int64_t last = g.W - 1 - shift;  // ox * sw <= last
        const int64_t hi = last < 0 ? 0 : std::min(g.Wo, last / g.sw + 1);
        const int64_t lo = std::min(hi, shift >= 0 ? int64_t(0) : (-shift + g.sw - 1) / g.sw);
        for (int64_t oy = 0; oy < g.Ho; ++oy) {
          const int64_t iy = oy * g.sh - g.ph + u * g.dh;
          acc_t* out = row + oy * g.Wo;
          if (iy < 0 || iy >= g.H) {
            std::fill(out, out + g.Wo, acc_t(0));
            continue;
          }
          const scalar_t* line = plane + iy * g.W;
          std::fill(out, out + lo, acc_t(0));
          if (g.sw == 1) {
            for (int64_t ox = lo; ox < hi; ++ox) out[ox] = static_cast<acc_t>(line[ox + shift]);
          } else {
            for (int64_t ox = lo; ox < hi; ++ox) out[ox] = static_cast<acc_t>(line[ox * g.sw + shift]);
          }
          std::fill(out + hi, out + g.Wo, acc_t(0));
        }
      }
    }
  }
  if (g.bias) std::fill(rows + g.D() * P, rows + (g.D() + 1) * P, acc_t(1));
}

// Factors of rank one per (example, output channel) (rank_one.h): the K factors of (n, o),
// S[n, k, o] = c_k w, add sum_k c_k^2 w w^T to G[o], so the single factor w sqrt(sum_k c_k^2) gives
// the same block with 1/K of the GEMM work.
//
// S is the logical [N, K, C_out, P] view of the factors (either memory order; P contiguous).
// Returns the compressed factors [N, 1, C_out, P], or an undefined tensor when one (n, o) is not
// rank one.
template <typename acc_t>
at::Tensor rank_one_factors(const at::Tensor& S) {
  const int64_t N = S.size(0), K = S.size(1), O = S.size(2), P = S.size(3);
  if (P > 1 && S.stride(3) != 1) return at::Tensor();  // an unusual layout: no compression
  auto out = at::empty({N, 1, O, P}, S.options());
  std::vector<acc_t> coeffs(N * O * K);  // [N, O, K]
  acc_t* op = out.data_ptr<acc_t>();
  if (!split_rank_one<acc_t>(S.data_ptr<acc_t>(), N, K, O, P, S.stride(0), S.stride(1), S.stride(2), coeffs.data(), 1,
                             O * K, K, op)) {
    return at::Tensor();
  }
  at::parallel_for(0, N * O, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t sum_c2 = 0;
      for (int64_t k = 0; k < K; ++k) sum_c2 += coeffs[i * K + k] * coeffs[i * K + k];
      const acc_t scale = std::sqrt(sum_c2);
      for (int64_t p = 0; p < P; ++p) op[i * P + p] *= scale;
    }
  });
  return out;
}

at::Tensor unfolded_gram_cpu(const at::Tensor& x_in, const at::Tensor& factors_in, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             bool bias, bool diagonal) {
  const char* op = "unfolded_gram";
  check_cpu_floating(x_in, op, "x");
  check_cpu_floating(factors_in, op, "factors");
  TORCH_CHECK_VALUE(x_in.dim() == 4, op, ": x must be [N, C_in, H, W], got ", x_in.sizes());
  TORCH_CHECK_VALUE(factors_in.dim() == 5, op, ": factors must be [N, K, C_out, Ho, Wo], got ", factors_in.sizes());
  TORCH_CHECK_TYPE(x_in.scalar_type() == factors_in.scalar_type(), op, ": factors has dtype ",
                   factors_in.scalar_type(), " but x has dtype ", x_in.scalar_type());
  for (auto* arg : {&kernel_size, &stride, &padding, &dilation}) {
    TORCH_CHECK_VALUE(arg->size() == 2, op, ": kernel_size, stride, padding and dilation must have 2 entries");
  }
  check_geometry(kernel_size, op, "kernel_size");
  check_geometry(stride, op, "stride");
  check_geometry(padding, op, "padding");
  check_geometry(dilation, op, "dilation");
  ConvGeometry g{};
  g.N = x_in.size(0), g.C_in = x_in.size(1), g.H = x_in.size(2), g.W = x_in.size(3);
  g.K = factors_in.size(1), g.C_out = factors_in.size(2), g.Ho = factors_in.size(3), g.Wo = factors_in.size(4);
  g.kh = kernel_size[0], g.kw = kernel_size[1], g.sh = stride[0], g.sw = stride[1];
  g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.groups = groups, g.bias = bias;
  TORCH_CHECK_VALUE(g.kh >= 1 && g.kw >= 1 && g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 && g.pw >= 0,
                    op, ": kernel_size, stride and dilation must be >= 1 and padding >= 0");
  TORCH_CHECK_VALUE(groups >= 1 && g.C_in % groups == 0 && g.C_out % groups == 0, op, ": groups = ", groups,
                    " must divide C_in = ", g.C_in, " and C_out = ", g.C_out);
  TORCH_CHECK_VALUE(factors_in.size(0) == g.N, op, ": factors has N = ", factors_in.size(0), " but x has N = ", g.N);
  const int64_t Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  const int64_t Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK_VALUE(Ho >= 1 && Wo >= 1, op, ": the kernel is larger than the padded input (", g.H + 2 * g.ph, "x",
                    g.W + 2 * g.pw, "): the convolution has no output");
  TORCH_CHECK_VALUE(g.Ho == Ho && g.Wo == Wo, op, ": factors' output size ", g.Ho, "x", g.Wo,
                    " does not match the convolution's ", Ho, "x", Wo);

  const auto x = x_in.contiguous();
  const auto acc = at::toOpMathType(x.scalar_type());
  const int64_t Dp = g.D_full(), P = g.P(), Og = g.out_per_group();
  // The blocks, the unfolding and J below are megabytes each on issue 6's network, and fresh
  // memory under default glibc settings: huge pages (empty_output, common.h) save their page
  // faults, about half of this op's time on its last layer there.
  auto blocks = diagonal ? at::empty({g.C_out, Dp}, x.options().dtype(acc)) : empty_output({g.C_out, Dp, Dp}, x.options().dtype(acc));
  // The unfolded input of one group for the whole batch, [N, D', P] (what F.unfold makes; never
  // one per output channel), and J [N, K Og, D'] = [N K, Og, D'].
  auto rows = empty_output({g.N, Dp, P}, x.options().dtype(acc));
  // Factors that come K-major ([K, N, ...] in memory, viewed as [N, K, ...]: what one batched
  // backward pass over the K cotangents produces) are read in place, one GEMM batch per k,
  // instead of being copied to [N, K, ...] order first.
  bool k_major = g.K > 1 && !factors_in.is_contiguous() && factors_in.transpose(0, 1).is_contiguous();
  auto factors_acc = k_major ? factors_in.transpose(0, 1).to(acc).reshape({g.K, g.N, g.C_out, P})
                             : factors_in.to(acc).reshape({g.N, g.K, g.C_out, P});
  int64_t K = g.K;  // the number of factors the GEMMs see (1 after a rank-one compression)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "unfolded_gram", [&] {
    using acc_t = acc_type<scalar_t>;
    if (K > 1) {
      auto compressed = rank_one_factors<acc_t>(k_major ? factors_acc.transpose(0, 1) : factors_acc);
      if (compressed.defined()) factors_acc = compressed, K = 1, k_major = false;
    }
    const scalar_t* xp = x.data_ptr<scalar_t>();
    acc_t* rp = rows.data_ptr<acc_t>();
    for (int64_t group = 0; group < g.groups; ++group) {
      at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          unfold_example<scalar_t, acc_t>(xp + n * g.C_in * g.H * g.W, g, group * g.in_per_group(), rp + n * Dp * P);
        }
      });
      // J_n = S_n X_n^T for every example at once: [N, K Og, P] x [N, P, D'].
      at::Tensor J;
      if (k_major) {
        // J[k, n] = S[k, n] X_n^T: [N, Og, P] x [N, P, D'] for each k; (k, n) order is immaterial below.
        J = empty_output({K, g.N, Og, Dp}, x.options().dtype(acc));
        for (int64_t k = 0; k < K; ++k) {
          auto Jk = J.select(0, k);
          at::bmm_out(Jk, factors_acc.select(0, k).narrow(1, group * Og, Og), rows.transpose(1, 2));
        }
        J = J.view({K * g.N, Og, Dp});
      } else {
        const auto s = factors_acc.narrow(2, group * Og, Og).reshape({g.N, K * Og, P});
        J = empty_output({g.N, K * Og, Dp}, x.options().dtype(acc));
        at::bmm_out(J, s, rows.transpose(1, 2));
        J = J.view({g.N * K, Og, Dp});
      }
      auto out = blocks.narrow(0, group * Og, Og);
      if (diagonal) {
        // diag G[o] = sum over (n, k) of J[(n, k), o]^2: no Gram product
        at::sum_out(out, J.square(), {0});
        continue;
      }
      // G[o] = J[:, o]^T J[:, o] for the group's output channels: one batched GEMM.
      const auto per_channel = J.permute({1, 0, 2});  // [Og, N K, D']
      at::bmm_out(out, per_channel.transpose(1, 2), per_channel);
    }
  });
  return blocks;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnas_fast, CPU, m) {
  m.impl("unfolded_gram", &unfolded_gram_cpu);
}

}  // namespace bnas_fast
