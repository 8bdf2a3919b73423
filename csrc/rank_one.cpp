// CPU kernels for back-propagating factors of rank one through a convolution (issue 6):
//
//   rank_one_split(S [K, N, C_out, Ho, Wo]) -> (coeffs [K, N, C_out], maps [N, C_out, Ho, Wo], ok)
//       S[k, n, o] = coeffs[k, n, o] maps[n, o] for every (k, n, o) when ok (rank_one.h);
//   rank_one_conv_input_grad(coeffs, maps, W, (H, W), stride, padding, dilation, groups) -> E [K, N, C_in, H, W]
//       E[k, n] = the input gradient of the convolution with weight W for the output gradient
//                 S[k, n, o] = coeffs[k, n, o] maps[n, o] (a transposed convolution of it)
//               = sum_o coeffs[k, n, o] (maps[n, o] transposed-convolved with W[o]),
//
// the factor-major layout [K, N, ...] being what one batched backward pass over K cotangents
// (torch.autograd.grad with is_grads_batched) takes and gives. bnas_fast/reference.py
// (rank_one_split, rank_one_conv_input_grad) is the specification.
//
// Why: K factors of rank one per (example, channel) are K scalings of one map, and the transposed
// convolution is linear. Convolving each map once with each tap, then mixing the K scalings in,
// costs O C taps + K O C multiply-adds per input pixel and example instead of K O C taps. The
// kernel keeps a block of up to 12 factors' outputs for 2 x 16 (float32) pixels in vector
// registers: for each output channel o it forms t = sum_taps W[o, c, tap] m[o, pixel + offset(tap)]
// once and adds coeffs[k, n, o] t to each factor's accumulator. The maps sit in zero-padded
// planes, so that every tap of every pixel is one unmasked load at a fixed offset (the padding
// stands for the zeros outside the map). Stride 1 only; other strides go through ATen's
// transposed convolution of the expanded factors (correct, not faster). All index arithmetic is
// int64_t; every read of a padded plane lies inside it by construction, which a check before the
// loops confirms.
#include "common.h"
#include "rank_one.h"

#include <torch/library.h>

#include <tuple>

namespace bnas_fast {
namespace {

void check_float_or_double(const at::Tensor& t, const char* op, const char* name) {
  check_cpu_floating(t, op, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
                   " must be float32 or float64, got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rank_one_split_cpu(const at::Tensor& factors_in) {
  const char* op = "rank_one_split";
  check_float_or_double(factors_in, op, "factors");
  TORCH_CHECK_VALUE(factors_in.dim() == 5, op, ": factors must be [K, N, C_out, Ho, Wo], got ", factors_in.sizes());
  const int64_t K = factors_in.size(0), N = factors_in.size(1), O = factors_in.size(2);
  const int64_t Ho = factors_in.size(3), Wo = factors_in.size(4), P = Ho * Wo;
  // Read in place when each (k, n, o)'s Ho x Wo map is contiguous (autograd's gradients are).
  const bool maps_contiguous = P <= 1 || (factors_in.stride(4) == 1 && (Ho == 1 || factors_in.stride(3) == Wo));
  const auto S = maps_contiguous ? factors_in : factors_in.contiguous();
  auto coeffs = at::zeros({K, N, O}, S.options());
  auto maps = at::zeros({N, O, Ho, Wo}, S.options());
  bool ok = true;
  if (S.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "rank_one_split", [&] {
      ok = split_rank_one<scalar_t>(S.data_ptr<scalar_t>(), N, K, O, P, S.stride(1), S.stride(0), S.stride(2),
                                    coeffs.data_ptr<scalar_t>(), N * O, O, 1, maps.data_ptr<scalar_t>());
    });
  }
  if (!ok) {  // the same outputs whatever the thread count reached before it stopped
    coeffs.zero_();
    maps.zero_();
  }
  return {coeffs, maps, at::scalar_tensor(ok, S.options().dtype(at::kBool))};
}

// Accumulates KB factors' input gradients for one (example n, input channel c) over all L pixels
// of the padded-width grid: out[k][i] = sum_o a[o][k] sum_tap w[o][tap] plane_o[i + offsets[tap]].
// a is [Og][KB] (this block's coefficients), planes the Og padded maps (plane numbers apart),
// w W[o, c, :] at w + o * w_stride.
template <typename scalar_t, int KB>
void rank_one_block(const scalar_t* __restrict a, int64_t Og, const scalar_t* __restrict planes, int64_t plane,
                    const scalar_t* __restrict w, int64_t w_stride, int64_t taps, const int64_t* __restrict offsets,
                    scalar_t* __restrict out, int64_t L) {
  // 64 bytes: one AVX-512 register (two or four narrower ones without AVX-512). GCC's vector
  // extension keeps the 2 x KB accumulators in registers across the loop over o. Two
  // vectors of pixels per step: two independent chains of tap sums, which hides the latency of
  // the multiply-adds in each.
  typedef scalar_t vec __attribute__((vector_size(64)));
  constexpr int64_t lanes = 64 / sizeof(scalar_t);
  for (int64_t i0 = 0; i0 < L; i0 += 2 * lanes) {
    vec acc0[KB], acc1[KB];
    for (int k = 0; k < KB; ++k) acc0[k] = vec{}, acc1[k] = vec{};
    for (int64_t o = 0; o < Og; ++o) {
      vec t0 = vec{}, t1 = vec{};
      const scalar_t* m = planes + o * plane + i0;
      const scalar_t* wo = w + o * w_stride;
      for (int64_t tap = 0; tap < taps; ++tap) {
        vec s0, s1;
        std::memcpy(&s0, m + offsets[tap], sizeof(vec));  // unaligned loads
        std::memcpy(&s1, m + offsets[tap] + lanes, sizeof(vec));
        t0 += wo[tap] * s0;
        t1 += wo[tap] * s1;
      }
      const scalar_t* ao = a + o * KB;
      for (int k = 0; k < KB; ++k) {
        acc0[k] += ao[k] * t0;
        acc1[k] += ao[k] * t1;
      }
    }
    for (int k = 0; k < KB; ++k) {
      std::memcpy(out + k * L + i0, &acc0[k], sizeof(vec));
      std::memcpy(out + k * L + i0 + lanes, &acc1[k], sizeof(vec));
    }
  }
}

// Factors per register block: 2 x 12 accumulators, 2 tap sums and 2 loads fit AVX-512's 32 vector
// registers (without AVX-512 each 64-byte vector takes two or four registers, and some spill).
constexpr int kMaxBlock = 12;

template <typename scalar_t, int KB = kMaxBlock>
void rank_one_block_dispatch(int kb, const scalar_t* a, int64_t Og, const scalar_t* planes, int64_t plane,
                             const scalar_t* w, int64_t w_stride, int64_t taps, const int64_t* offsets, scalar_t* out,
                             int64_t L) {
  if constexpr (KB >= 1) {
    if (kb == KB) return rank_one_block<scalar_t, KB>(a, Og, planes, plane, w, w_stride, taps, offsets, out, L);
    return rank_one_block_dispatch<scalar_t, KB - 1>(kb, a, Og, planes, plane, w, w_stride, taps, offsets, out, L);
  }
}

template <typename scalar_t>
void rank_one_input_grad_stride1(const at::Tensor& coeffs, const at::Tensor& maps, const at::Tensor& weight, int64_t H,
                                 int64_t W, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t groups,
                                 at::Tensor& E) {
  const int64_t K = coeffs.size(0), N = coeffs.size(1), O = coeffs.size(2);
  const int64_t Ho = maps.size(2), Wo = maps.size(3);
  const int64_t Cg = weight.size(1), kh = weight.size(2), kw = weight.size(3), taps = kh * kw;
  const int64_t C = Cg * groups, Og = O / groups;
  constexpr int64_t lanes = 64 / sizeof(scalar_t);
  // Input pixel (iy, ix) reads map pixel (iy + ph - u dh, ix + pw - v dw) for tap (u, v). The map
  // sits at (top, left) in a zero plane of Hp x Wp, wide and high enough that every such read
  // lands in the plane and reads 0 outside the map; pixel i = iy Wp + ix of the padded-width grid
  // reads plane element i + offsets[tap]. The grid's L >= H Wp positions are computed (columns
  // ix >= W and the rounding to whole vectors are discarded), so Hp also covers the last vector.
  const int64_t top = std::max<int64_t>(0, (kh - 1) * dh - ph), left = std::max<int64_t>(0, (kw - 1) * dw - pw);
  const int64_t Wp = left + std::max(Wo, W + pw);
  const int64_t L = (H * Wp + 2 * lanes - 1) / (2 * lanes) * (2 * lanes);  // whole steps of rank_one_block
  const int64_t max_offset = (ph + top) * Wp + pw + left;  // tap (0, 0)
  const int64_t min_offset = (ph - (kh - 1) * dh + top) * Wp + pw - (kw - 1) * dw + left;
  const int64_t Hp = std::max(top + std::max(Ho, H + ph), (L + max_offset + Wp - 1) / Wp);
  TORCH_CHECK(min_offset >= 0 && L - 1 + max_offset < Hp * Wp, "rank_one_conv_input_grad: internal error: a tap would "
              "read outside its padded plane");
  const int64_t plane = Hp * Wp;
  auto padded = at::zeros({N, O, Hp, Wp}, maps.options());
  padded.narrow(2, top, Ho).narrow(3, left, Wo).copy_(maps);
  std::vector<int64_t> offsets(taps);
  for (int64_t u = 0; u < kh; ++u) {
    for (int64_t v = 0; v < kw; ++v) offsets[u * kw + v] = (ph - u * dh + top) * Wp + (pw - v * dw + left);
  }
  const scalar_t* ap = coeffs.data_ptr<scalar_t>();
  const scalar_t* mp = padded.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  scalar_t* ep = E.data_ptr<scalar_t>();
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> buffer(kMaxBlock * L), a(Og * kMaxBlock);
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C, c = nc % C, group = c / Cg, c_local = c % Cg;
      const int64_t o0 = group * Og;
      const scalar_t* planes = mp + (n * O + o0) * plane;
      const scalar_t* w = wp + (o0 * Cg + c_local) * taps;
      for (int64_t k0 = 0; k0 < K; k0 += kMaxBlock) {
        const int64_t kb = std::min<int64_t>(kMaxBlock, K - k0);
        for (int64_t o = 0; o < Og; ++o) {
          for (int64_t k = 0; k < kb; ++k) a[o * kb + k] = ap[((k0 + k) * N + n) * O + o0 + o];
        }
        rank_one_block_dispatch<scalar_t>(static_cast<int>(kb), a.data(), Og, planes, plane, w, Cg * taps, taps,
                                          offsets.data(), buffer.data(), L);
        for (int64_t k = 0; k < kb; ++k) {
          scalar_t* dst = ep + (((k0 + k) * N + n) * C + c) * H * W;
          for (int64_t iy = 0; iy < H; ++iy) {
            const scalar_t* src = buffer.data() + k * L + iy * Wp;
            std::copy(src, src + W, dst + iy * W);
          }
        }
      }
    }
  });
}

at::Tensor rank_one_conv_input_grad_cpu(const at::Tensor& coeffs_in, const at::Tensor& maps_in,
                                        const at::Tensor& weight_in, at::IntArrayRef input_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups) {
  const char* op = "rank_one_conv_input_grad";
  check_float_or_double(coeffs_in, op, "coeffs");
  check_float_or_double(maps_in, op, "maps");
  check_float_or_double(weight_in, op, "weight");
  TORCH_CHECK_TYPE(maps_in.scalar_type() == coeffs_in.scalar_type() && weight_in.scalar_type() == coeffs_in.scalar_type(),
                   op, ": coeffs, maps and weight must share a dtype, got ", coeffs_in.scalar_type(), ", ",
                   maps_in.scalar_type(), " and ", weight_in.scalar_type());
  TORCH_CHECK_VALUE(coeffs_in.dim() == 3, op, ": coeffs must be [K, N, C_out], got ", coeffs_in.sizes());
  TORCH_CHECK_VALUE(maps_in.dim() == 4, op, ": maps must be [N, C_out, Ho, Wo], got ", maps_in.sizes());
  TORCH_CHECK_VALUE(weight_in.dim() == 4, op, ": weight must be [C_out, C_in / groups, kh, kw], got ", weight_in.sizes());
  for (auto* arg : {&input_size, &stride, &padding, &dilation}) {
    TORCH_CHECK_VALUE(arg->size() == 2, op, ": input_size, stride, padding and dilation must have 2 entries");
  }
  check_geometry(input_size, op, "input_size");
  check_geometry(stride, op, "stride");
  check_geometry(padding, op, "padding");
  check_geometry(dilation, op, "dilation");
  check_geometry(weight_in.sizes().slice(2), op, "the kernel size (weight's last two dimensions)");
  const int64_t K = coeffs_in.size(0), N = coeffs_in.size(1), O = coeffs_in.size(2);
  TORCH_CHECK_VALUE(maps_in.size(0) == N && maps_in.size(1) == O, op, ": maps ", maps_in.sizes(),
                    " does not match coeffs ", coeffs_in.sizes(), " (N and C_out)");
  TORCH_CHECK_VALUE(weight_in.size(0) == O, op, ": weight has C_out = ", weight_in.size(0), " but coeffs has ", O);
  TORCH_CHECK_VALUE(groups >= 1 && O % groups == 0, op, ": groups = ", groups, " must divide C_out = ", O);
  const int64_t H = input_size[0], W = input_size[1], kh = weight_in.size(2), kw = weight_in.size(3);
  TORCH_CHECK_VALUE(H >= 1 && W >= 1, op, ": input_size must be positive, got ", input_size);
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                        padding[1] >= 0 && kh >= 1 && kw >= 1,
                    op, ": stride and dilation must be >= 1, padding >= 0 and the kernel non-empty");
  const int64_t Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(H + 2 * padding[0] >= dilation[0] * (kh - 1) + 1 && W + 2 * padding[1] >= dilation[1] * (kw - 1) + 1 &&
                        maps_in.size(2) == Ho && maps_in.size(3) == Wo,
                    op, ": maps' size ", maps_in.size(2), "x", maps_in.size(3),
                    " is not the convolution's output size for input_size ", input_size);
  const int64_t C = weight_in.size(1) * groups;
  auto E = empty_output({K, N, C, H, W}, coeffs_in.options());  // large: huge pages (common.h)
  if (E.numel() == 0) return E;
  if (O == 0) return E.zero_();  // no output channels to sum over
  const auto coeffs = coeffs_in.contiguous(), maps = maps_in.contiguous(), weight = weight_in.contiguous();
  // The stride-1 kernel multiplies every weight with the zero padding of its planes, and a NaN or
  // infinite weight there (0 * inf = NaN) would spread to pixels it never touches; the transposed
  // convolution below skips the padding, as the reference does. (The weight is small: one pass.)
  bool weight_finite = true;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "rank_one_conv_input_grad_finite", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    for (int64_t i = 0; i < weight.numel() && weight_finite; ++i) weight_finite = std::isfinite(w[i]);
  });
  if (stride[0] != 1 || stride[1] != 1 || !weight_finite) {
    // Expanded to K N full factors and transposed-convolved by ATen. output_padding recovers the
    // input rows and columns that the forward convolution's rounding-down skipped.
    const auto full = (coeffs.unsqueeze(-1).unsqueeze(-1) * maps.unsqueeze(0)).reshape({K * N, O, Ho, Wo});
    const int64_t extra_h = H - ((Ho - 1) * stride[0] - 2 * padding[0] + dilation[0] * (kh - 1) + 1);
    const int64_t extra_w = W - ((Wo - 1) * stride[1] - 2 * padding[1] + dilation[1] * (kw - 1) + 1);
    E.view({K * N, C, H, W}).copy_(at::conv_transpose2d(full, weight, {}, stride, padding, {extra_h, extra_w}, groups,
                                                        dilation));
    return E;
  }
  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "rank_one_conv_input_grad", [&] {
    rank_one_input_grad_stride1<scalar_t>(coeffs, maps, weight, H, W, padding[0], padding[1], dilation[0],
                                          dilation[1], groups, E);
  });
  return E;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnas_fast, CPU, m) {
  m.impl("rank_one_split", &rank_one_split_cpu);
  m.impl("rank_one_conv_input_grad", &rank_one_conv_input_grad_cpu);
}

}  // namespace bnas_fast
