// CPU kernels for masked per-example operation mixing.
//
//   dense:  out[b] = sum_k w[b, k] * y_k[b]                         y_k: [B, M]
//           (or relu of that sum, with relu = true: the ReLU that follows a node's sum in NSA)
//   sparse: out[b] = sum_k w[b, k] * y_k[row_k(b)]                   y_k: [n_k, M]
//           where row_k(b) is the i with indices_k[i] = b, or none.
//
// Both forms run one kernel over a table rows[k][b] (the identity for the dense form). Work is
// split into tiles of kTile elements of one example, so that any batch size (B = 1 included) keeps
// both cores busy, and the per-tile partial dot products for grad_w are reduced in a fixed order:
// results do not depend on the thread count.
//
// Memory traffic is the whole cost of this op, so the kernels read each candidate row at most once
// per pass and never read a row whose weight is zero (unless grad_w is wanted, which needs it).
#include "common.h"

#include <torch/library.h>


namespace bnas_fast {
namespace {

// 4096 elements: a float32 output tile (16 KiB) stays in L1 while K candidate tiles stream past.
constexpr int64_t kTile = 4096;

template <typename scalar_t>
struct MixArgs {
  std::vector<const scalar_t*> ys;  // K candidate bases, each [rows_k, M]
  const int64_t* rows = nullptr;    // [K, B] row of candidate k for example b, -1 if none; null = identity
  const scalar_t* weights = nullptr;  // [B, K]
  int64_t batch = 0;
  int64_t num_candidates = 0;
  int64_t row_size = 0;  // M

  int64_t row_of(int64_t k, int64_t b) const { return rows ? rows[k * batch + b] : b; }
};

// Inner loops work on blocks of kBlock elements and walk all K candidates per block, so the K rows
// stream through memory side by side (the hardware prefetchers follow each stream) and the
// accumulator stays in registers. A first version that made one pass per candidate over a tile ran
// at 0.6x the speed of torch.compile's fused loop: short per-candidate streams defeat prefetching.
constexpr int64_t kBlock = 64;

// Outputs of kStreamingBytes and more are written with streaming stores (common.h). The backward
// pass writes K gradient rows, so this removes about a third of its traffic. Measured at B=64, K=4,
// 64x32x32 with half the weights zero (a 16 MiB output): forward 1.34x -> 1.60x torch.compile with a
// 4 MiB threshold against 32 MiB. The cost: an output that a following op could have found in L3,
// hence the threshold of 16 MiB now (common.h).

template <typename scalar_t>
struct Active {
  const scalar_t* row;  // start of this tile in the candidate's row
  at::opmath_type<scalar_t> weight;
};

// One block of kBlock elements of out = sum_a w_a * y_a, for float/double inputs, in explicit
// vectors (GCC/Clang vector extensions; 512 bits: zmm registers under AVX-512, split into narrower
// ones elsewhere). Written as plain loops, GCC 12 vectorised this over the candidates instead,
// gathering one element from each row per instruction: the dense forward then ran at 0.5x to 0.65x
// the speed of torch.compile's loop.
template <typename acc_t>
inline void weighted_sum_block(const c10::SmallVector<Active<acc_t>, 16>& active, int64_t j, acc_t* __restrict sums) {
  typedef acc_t vec_t __attribute__((vector_size(64)));
  constexpr int64_t kWidth = 64 / sizeof(acc_t);
  constexpr int64_t kVectors = kBlock / kWidth;
  static_assert(kBlock % kWidth == 0, "weighted_sum_block: kBlock must be a whole number of vectors");
  vec_t acc[kVectors];
  for (int64_t r = 0; r < kVectors; ++r) {
    vec_t y;
    std::memcpy(&y, active[0].row + j + r * kWidth, sizeof(vec_t));
    acc[r] = y * active[0].weight;
  }
  const int64_t na = static_cast<int64_t>(active.size());
  for (int64_t a = 1; a < na; ++a) {
    const acc_t* row = active[a].row + j;
    const acc_t w = active[a].weight;
    for (int64_t r = 0; r < kVectors; ++r) {
      vec_t y;
      std::memcpy(&y, row + r * kWidth, sizeof(vec_t));
      acc[r] += y * w;
    }
  }
  std::memcpy(sums, acc, sizeof(acc));
}

// out[0:n] = sum_a w_a * y_a[0:n] (then max(., 0) with relu), accumulated in acc_t, one write of out.
template <typename scalar_t>
inline void weighted_sum_tile(const c10::SmallVector<Active<scalar_t>, 16>& active, scalar_t* __restrict out,
                              int64_t n, bool streaming, bool relu) {
  using acc_t = acc_type<scalar_t>;
  const int64_t na = static_cast<int64_t>(active.size());
  int64_t j = 0;
  for (; j + kBlock <= n; j += kBlock) {
    alignas(64) acc_t acc[kBlock];
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      weighted_sum_block<acc_t>(active, j, acc);
    } else {  // bfloat16/float16 rows, widened element by element
      {
        const scalar_t* __restrict y = active[0].row + j;
        const acc_t w = active[0].weight;
        for (int64_t u = 0; u < kBlock; ++u) acc[u] = w * static_cast<acc_t>(y[u]);
      }
      for (int64_t a = 1; a < na; ++a) {
        const scalar_t* __restrict y = active[a].row + j;
        const acc_t w = active[a].weight;
        for (int64_t u = 0; u < kBlock; ++u) acc[u] += w * static_cast<acc_t>(y[u]);
      }
    }
    if (relu) {
      // "below 0 becomes 0", not "not above 0": a NaN sum stays NaN, as torch.relu keeps it
      for (int64_t u = 0; u < kBlock; ++u) acc[u] = acc[u] < acc_t(0) ? acc_t(0) : acc[u];
    }
    store_block<kBlock>(out + j, acc, streaming);
  }
  for (; j < n; ++j) {
    acc_t acc = 0;
    for (int64_t a = 0; a < na; ++a) acc += active[a].weight * static_cast<acc_t>(active[a].row[j]);
    if (relu && acc < acc_t(0)) acc = 0;
    out[j] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
void mix_forward_kernel(const MixArgs<scalar_t>& a, scalar_t* out, bool relu) {
  using acc_t = acc_type<scalar_t>;
  const int64_t M = a.row_size;
  const int64_t tiles_per_row = (M + kTile - 1) / kTile;
  const bool streaming = a.batch * M * int64_t(sizeof(scalar_t)) >= kStreamingBytes;
  at::parallel_for(0, a.batch * tiles_per_row, 1, [&](int64_t begin, int64_t end) {
    c10::SmallVector<Active<scalar_t>, 16> active;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / tiles_per_row;
      const int64_t start = (tile % tiles_per_row) * kTile;
      const int64_t n = std::min(kTile, M - start);
      active.clear();
      for (int64_t k = 0; k < a.num_candidates; ++k) {
        const acc_t w = static_cast<acc_t>(a.weights[b * a.num_candidates + k]);
        const int64_t row = a.row_of(k, b);
        if (w == acc_t(0) || row < 0) continue;  // the skipped read
        active.push_back({a.ys[k] + row * M + start, w});
      }
      scalar_t* out_tile = out + b * M + start;
      if (active.empty()) {
        std::fill(out_tile, out_tile + n, scalar_t(0));
      } else {
        weighted_sum_tile(active, out_tile, n, streaming, relu);
      }
    }
    if (streaming) streaming_fence();
  });
}

// Independent partial sums per dot product of the backward (summed in a fixed order at the end).
constexpr int64_t kLanes = 16;

// One candidate of the backward at one tile: its weight, rows and place.
template <typename scalar_t>
struct BackwardTarget {
  int64_t k;
  const scalar_t* y;  // null when no dot product is needed
  scalar_t* gy;
  acc_type<scalar_t> w;
};

// One block of kBlock elements of the backward for float/double, in explicit vectors (as
// weighted_sum_block, and for the same reason): gy_t = w_t g for every target t, and the kLanes
// partial sums of <g, y_t> in dots[t kLanes ...] (lane l sums the elements l mod kLanes: the
// order of the scalar loop this replaces). g is masked by relu_out > 0 when mask is given.
template <typename acc_t>
inline void backward_block(const acc_t* g, const acc_t* mask, const c10::SmallVector<BackwardTarget<acc_t>, 16>& targets,
                           int64_t j, acc_t* dots, bool streaming) {
  typedef acc_t vec_t __attribute__((vector_size(64)));
  constexpr int64_t kWidth = 64 / sizeof(acc_t);
  constexpr int64_t kVectors = kBlock / kWidth;
  constexpr int64_t kPartial = kLanes / kWidth;  // vectors of partial sums per target
  static_assert(kBlock % kLanes == 0 && kLanes % kWidth == 0, "backward_block: block, lanes and vectors must nest");
  vec_t gv[kVectors];
  for (int64_t r = 0; r < kVectors; ++r) {
    std::memcpy(&gv[r], g + r * kWidth, sizeof(vec_t));
    if (mask) {
      vec_t m;
      std::memcpy(&m, mask + r * kWidth, sizeof(vec_t));
      gv[r] = m > acc_t(0) ? gv[r] : vec_t{};
    }
  }
  const int64_t nt = static_cast<int64_t>(targets.size());
  for (int64_t t = 0; t < nt; ++t) {
    const BackwardTarget<acc_t>& tg = targets[t];
    vec_t gy[kVectors];
    for (int64_t r = 0; r < kVectors; ++r) gy[r] = gv[r] * tg.w;
    store_block<kBlock>(tg.gy + j, reinterpret_cast<const acc_t*>(gy), streaming);
    if (tg.y) {
      vec_t part[kPartial] = {};
      for (int64_t r = 0; r < kVectors; ++r) {
        vec_t y;
        std::memcpy(&y, tg.y + j + r * kWidth, sizeof(vec_t));
        part[r % kPartial] += gv[r] * y;
      }
      for (int64_t p = 0; p < kPartial; ++p) {
        vec_t d;
        std::memcpy(&d, dots + t * kLanes + p * kWidth, sizeof(vec_t));
        d += part[p];
        std::memcpy(dots + t * kLanes + p * kWidth, &d, sizeof(vec_t));
      }
    }
  }
}

// grad_ys[k][row_k(b)] = w[b, k] * g[b];  grad_w[b, k] = <g[b], y_k[row_k(b)]> if wanted.
// With relu_out (the output of a relu = true forward), g is grad_out masked by relu_out > 0.
// One pass over g per tile: each block of g is loaded once and used for all K candidates.
template <typename scalar_t>
void mix_backward_kernel(const MixArgs<scalar_t>& a, const scalar_t* grad_out, const scalar_t* relu_out,
                         const std::vector<scalar_t*>& grad_ys, scalar_t* grad_w,
                         bool weights_requires_grad) {
  using acc_t = acc_type<scalar_t>;
  const int64_t M = a.row_size;
  const int64_t K = a.num_candidates;
  const int64_t tiles_per_row = (M + kTile - 1) / kTile;
  const int64_t num_tiles = a.batch * tiles_per_row;
  // Partial dot products per tile, reduced below in tile order (deterministic).
  std::vector<acc_t> partial(weights_requires_grad ? num_tiles * K : 0, acc_t(0));
  int64_t written_rows = 0;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t b = 0; b < a.batch; ++b) written_rows += a.row_of(k, b) >= 0;
  }
  const bool streaming = written_rows * M * int64_t(sizeof(scalar_t)) >= kStreamingBytes;
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    using Target = BackwardTarget<scalar_t>;
    c10::SmallVector<Target, 16> targets;
    c10::SmallVector<acc_t, 16 * kLanes> dots;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / tiles_per_row;
      const int64_t start = (tile % tiles_per_row) * kTile;
      const int64_t n = std::min(kTile, M - start);
      const scalar_t* __restrict g = grad_out + b * M + start;
      const scalar_t* __restrict mask = relu_out ? relu_out + b * M + start : nullptr;
      targets.clear();
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = a.row_of(k, b);
        if (row < 0) continue;
        targets.push_back({k, weights_requires_grad ? a.ys[k] + row * M + start : nullptr,
                           grad_ys[k] + row * M + start, static_cast<acc_t>(a.weights[b * K + k])});
      }
      const int64_t nt = static_cast<int64_t>(targets.size());
      dots.assign(nt * kLanes, acc_t(0));
      int64_t j = 0;
      for (; j + kBlock <= n; j += kBlock) {
        if constexpr (std::is_same<scalar_t, acc_t>::value) {
          backward_block<acc_t>(g + j, mask ? mask + j : nullptr, targets, j, dots.data(), streaming);
          continue;
        }
        acc_t gb[kBlock];
        if (mask) {
          for (int64_t u = 0; u < kBlock; ++u)
            gb[u] = static_cast<acc_t>(mask[j + u]) > acc_t(0) ? static_cast<acc_t>(g[j + u]) : acc_t(0);
        } else {
          for (int64_t u = 0; u < kBlock; ++u) gb[u] = static_cast<acc_t>(g[j + u]);
        }
        for (int64_t t = 0; t < nt; ++t) {
          const Target& tg = targets[t];
          acc_t gyb[kBlock];
          for (int64_t u = 0; u < kBlock; ++u) gyb[u] = tg.w * gb[u];
          store_block<kBlock>(tg.gy + j, gyb, streaming);
          if (tg.y) {
            // Sum the block in registers first and touch the running sums in memory once per
            // block: updating them per element chained every FMA through a store-load round
            // trip and made the backward 1.5x slower.
            const scalar_t* __restrict y = tg.y + j;
            acc_t part[kLanes];
            for (int64_t l = 0; l < kLanes; ++l) part[l] = gb[l] * static_cast<acc_t>(y[l]);
            for (int64_t u = kLanes; u < kBlock; u += kLanes)
              for (int64_t l = 0; l < kLanes; ++l) part[l] += gb[u + l] * static_cast<acc_t>(y[u + l]);
            acc_t* __restrict d = dots.data() + t * kLanes;
            for (int64_t l = 0; l < kLanes; ++l) d[l] += part[l];
          }
        }
      }
      for (int64_t t = 0; t < nt; ++t) {
        const Target& tg = targets[t];
        acc_t* d = dots.data() + t * kLanes;
        acc_t tail = 0;
        for (int64_t jj = j; jj < n; ++jj) {
          const acc_t gv = (mask && !(static_cast<acc_t>(mask[jj]) > acc_t(0))) ? acc_t(0) : static_cast<acc_t>(g[jj]);
          tg.gy[jj] = static_cast<scalar_t>(tg.w * gv);
          if (tg.y) tail += gv * static_cast<acc_t>(tg.y[jj]);
        }
        if (tg.y) {
          acc_t sum = tail;
          for (int64_t l = 0; l < kLanes; ++l) sum += d[l];
          partial[tile * K + tg.k] = sum;
        }
      }
    }
    if (streaming) streaming_fence();
  });
  if (weights_requires_grad) {
    for (int64_t b = 0; b < a.batch; ++b) {
      for (int64_t k = 0; k < K; ++k) {
        acc_t sum = 0;
        for (int64_t t = 0; t < tiles_per_row; ++t) sum += partial[(b * tiles_per_row + t) * K + k];
        grad_w[b * K + k] = static_cast<scalar_t>(sum);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks shared by the four entry points.
// ---------------------------------------------------------------------------------------------

struct Checked {
  std::vector<at::Tensor> ys;  // contiguous
  at::Tensor weights;          // contiguous [B, K]
  int64_t batch, num_candidates, row_size;
  std::vector<int64_t> rest_shape;
};

// dense: every y_k is [B, *rest]; sparse: y_k is [n_k, *rest] with the same rest.
Checked check_mix_args(const char* op, at::TensorList ys, const at::Tensor& weights, bool sparse) {
  TORCH_CHECK_VALUE(!ys.empty(), op, ": ys must hold at least one candidate tensor");
  check_cpu_floating(weights, op, "weights");
  TORCH_CHECK_VALUE(weights.dim() == 2, op, ": weights must be [B, K], got shape ", weights.sizes());
  const int64_t B = weights.size(0);
  const int64_t K = weights.size(1);
  TORCH_CHECK_VALUE(static_cast<int64_t>(ys.size()) == K, op, ": weights has K = ", K,
                    " columns but ys holds ", ys.size(), " candidates");
  const auto& y0 = ys[0];
  TORCH_CHECK_VALUE(y0.dim() >= 1, op, ": ys[0] must have a batch dimension");
  std::vector<int64_t> rest(y0.sizes().begin() + 1, y0.sizes().end());
  Checked c;
  c.batch = B;
  c.num_candidates = K;
  c.rest_shape = rest;
  c.row_size = 1;
  for (auto s : rest) c.row_size *= s;
  for (int64_t k = 0; k < K; ++k) {
    const auto& y = ys[k];
    check_cpu_floating(y, op, ("ys[" + std::to_string(k) + "]").c_str());
    TORCH_CHECK_VALUE(y.scalar_type() == weights.scalar_type(), op, ": ys[", k, "] has dtype ",
                      y.scalar_type(), " but weights has dtype ", weights.scalar_type());
    TORCH_CHECK_VALUE(y.dim() == y0.dim() && std::equal(rest.begin(), rest.end(), y.sizes().begin() + 1),
                      op, ": ys[", k, "] has shape ", y.sizes(), ", which disagrees with ys[0] ",
                      y0.sizes(), " beyond the batch dimension");
    if (!sparse) {
      TORCH_CHECK_VALUE(y.size(0) == B, op, ": ys[", k, "] has batch ", y.size(0),
                        " but weights has B = ", B);
    }
    c.ys.push_back(y.contiguous());
  }
  c.weights = weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.weights.scalar_type(), "check_finite", [&] {
    check_finite(c.weights.data_ptr<scalar_t>(), c.weights.numel(), op, "weights");
  });
  return c;
}

// rows[k][b] = i where indices[k][i] = b, else -1. Every index is range-checked and each example
// may appear at most once per candidate (the sparse form scatters, it does not accumulate).
at::Tensor inverse_rows(const char* op, at::TensorList indices, const Checked& c) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(indices.size()) == c.num_candidates, op, ": indices holds ",
                    indices.size(), " tensors but there are K = ", c.num_candidates, " candidates");
  auto rows = at::full({c.num_candidates, c.batch}, -1, at::TensorOptions().dtype(at::kLong));
  int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t k = 0; k < c.num_candidates; ++k) {
    const auto& idx = indices[k];
    TORCH_CHECK_VALUE(idx.device().is_cpu() && idx.scalar_type() == at::kLong && idx.dim() == 1, op,
                      ": indices[", k, "] must be a 1-D int64 CPU tensor, got ", idx.scalar_type(), " ",
                      idx.sizes(), " on ", idx.device());
    TORCH_CHECK_VALUE(idx.size(0) == c.ys[k].size(0), op, ": indices[", k, "] has ", idx.size(0),
                      " entries but ys[", k, "] has ", c.ys[k].size(0), " rows");
    const auto idx_c = idx.contiguous();
    const int64_t* p = idx_c.data_ptr<int64_t>();
    for (int64_t i = 0; i < idx_c.size(0); ++i) {
      const int64_t b = p[i];
      TORCH_CHECK_INDEX(b >= 0 && b < c.batch, op, ": indices[", k, "][", i, "] = ", b,
                        " is out of range for a batch of B = ", c.batch);
      TORCH_CHECK_VALUE(r[k * c.batch + b] < 0, op, ": indices[", k, "] lists example ", b,
                        " twice (at positions ", r[k * c.batch + b], " and ", i, ")");
      r[k * c.batch + b] = i;
    }
  }
  return rows;
}

at::Tensor run_forward(const Checked& c, const int64_t* rows, bool relu) {
  std::vector<int64_t> out_shape{c.batch};
  out_shape.insert(out_shape.end(), c.rest_shape.begin(), c.rest_shape.end());
  auto out = empty_output(out_shape, c.weights.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "mix_forward", [&] {
    MixArgs<scalar_t> a;
    for (const auto& y : c.ys) a.ys.push_back(y.data_ptr<scalar_t>());
    a.rows = rows;
    a.weights = c.weights.data_ptr<scalar_t>();
    a.batch = c.batch;
    a.num_candidates = c.num_candidates;
    a.row_size = c.row_size;
    mix_forward_kernel(a, out.data_ptr<scalar_t>(), relu);
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> run_backward(const char* op, const at::Tensor& grad_out,
                                                             const Checked& c, const int64_t* rows,
                                                             bool weights_requires_grad,
                                                             const std::optional<at::Tensor>& relu_out) {
  check_cpu_floating(grad_out, op, "grad_out");
  TORCH_CHECK_VALUE(grad_out.scalar_type() == c.weights.scalar_type(), op, ": grad_out has dtype ",
                    grad_out.scalar_type(), " but weights has ", c.weights.scalar_type());
  TORCH_CHECK_VALUE(grad_out.dim() == 1 + static_cast<int64_t>(c.rest_shape.size()) &&
                        grad_out.size(0) == c.batch &&
                        std::equal(c.rest_shape.begin(), c.rest_shape.end(), grad_out.sizes().begin() + 1),
                    op, ": grad_out has shape ", grad_out.sizes(), ", expected the output shape");
  const auto g = grad_out.contiguous();
  at::Tensor mask;
  if (relu_out.has_value()) {
    check_cpu_floating(*relu_out, op, "relu_out");
    TORCH_CHECK_VALUE(relu_out->scalar_type() == grad_out.scalar_type() && relu_out->sizes() == grad_out.sizes(), op,
                      ": relu_out must have grad_out's shape ", grad_out.sizes(), " and dtype ", grad_out.scalar_type(),
                      ", got ", relu_out->sizes(), " ", relu_out->scalar_type());
    mask = relu_out->contiguous();
  }
  std::vector<at::Tensor> grad_ys;
  for (const auto& y : c.ys) grad_ys.push_back(empty_output(y.sizes(), y.options()));
  auto grad_w = weights_requires_grad ? at::empty_like(c.weights) : at::zeros_like(c.weights);
  if (c.row_size == 0 || c.batch == 0) {
    for (auto& t : grad_ys) t.zero_();
    if (weights_requires_grad) grad_w.zero_();
    return {grad_ys, grad_w};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "mix_backward", [&] {
    MixArgs<scalar_t> a;
    for (const auto& y : c.ys) a.ys.push_back(y.data_ptr<scalar_t>());
    a.rows = rows;
    a.weights = c.weights.data_ptr<scalar_t>();
    a.batch = c.batch;
    a.num_candidates = c.num_candidates;
    a.row_size = c.row_size;
    std::vector<scalar_t*> gys;
    for (auto& t : grad_ys) gys.push_back(t.data_ptr<scalar_t>());
    mix_backward_kernel(a, g.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, gys,
                        grad_w.data_ptr<scalar_t>(), weights_requires_grad);
  });
  return {grad_ys, grad_w};
}

// ---------------------------------------------------------------------------------------------
// Entry points (schemas are defined once, in bnas_fast/ops/mix.py).
// ---------------------------------------------------------------------------------------------

at::Tensor mix_cpu(at::TensorList ys, const at::Tensor& weights) {
  const auto c = check_mix_args("mix", ys, weights, /*sparse=*/false);
  return run_forward(c, nullptr, /*relu=*/false);
}

at::Tensor mix_relu_cpu(at::TensorList ys, const at::Tensor& weights) {
  const auto c = check_mix_args("mix_relu", ys, weights, /*sparse=*/false);
  return run_forward(c, nullptr, /*relu=*/true);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mix_backward_cpu(const at::Tensor& grad_out,
                                                                 at::TensorList ys,
                                                                 const at::Tensor& weights,
                                                                 bool weights_requires_grad,
                                                                 const std::optional<at::Tensor>& relu_out) {
  const auto c = check_mix_args("mix_backward", ys, weights, /*sparse=*/false);
  return run_backward("mix_backward", grad_out, c, nullptr, weights_requires_grad, relu_out);
}

at::Tensor mix_sparse_cpu(at::TensorList ys, at::TensorList indices, const at::Tensor& weights) {
  const auto c = check_mix_args("mix_sparse", ys, weights, /*sparse=*/true);
  const auto rows = inverse_rows("mix_sparse", indices, c);
  return run_forward(c, rows.data_ptr<int64_t>(), /*relu=*/false);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mix_sparse_backward_cpu(const at::Tensor& grad_out,
                                                                        at::TensorList ys,
                                                                        at::TensorList indices,
                                                                        const at::Tensor& weights,
                                                                        bool weights_requires_grad) {
  const auto c = check_mix_args("mix_sparse_backward", ys, weights, /*sparse=*/true);
  const auto rows = inverse_rows("mix_sparse_backward", indices, c);
  return run_backward("mix_sparse_backward", grad_out, c, rows.data_ptr<int64_t>(),
                      weights_requires_grad, std::nullopt);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnas_fast, CPU, m) {
  m.impl("mix", &mix_cpu);
  m.impl("mix_relu", &mix_relu_cpu);
  m.impl("mix_backward", &mix_backward_cpu);
  m.impl("mix_sparse", &mix_sparse_cpu);
  m.impl("mix_sparse_backward", &mix_sparse_backward_cpu);
}

}  // namespace bnas_fast
