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
//
// Channels-last inputs (4-D x with x.is_contiguous(channels_last) and not x.is_contiguous(), so not
// the ambiguous C = 1 or H = W = 1) run natively, without a copy: example b is then an [HW, C]
// row-major matrix, and the per-(b, c) sums above are column sums (see "Channels-last layout"
// below); y and grad_x come out channels-last too. The per-(b, c) numbers, stage 2 and the
// elementwise formulas are the same as on the row path.
#include "common.h"

#include <torch/library.h>

#include <numeric>

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

// ---------------------------------------------------------------------------------------------
// Channels-last layout
// ---------------------------------------------------------------------------------------------
// x [B, C, H, W] with strides (HWC, 1, WC, C): example b is an [HW, C] row-major matrix at
// x + b HW C, and a row of the row path, x[b, c, :], is a column of it. An example's values are
// walked in
//  * pieces of P = k C values (k whole hw rows; k makes P a multiple of 64 when C < 64): position j
//    of a piece is channel j mod C, and the inner loops run over j with the per-channel numbers
//    replicated k times (vectorised, also for C = 8);
//  * blocks of kMinBlockPieces to kBlockPieces whole pieces, about kBlockValues values when the
//    pieces are small (so that the forward's second pass over a block, and channel_affine_backward's
//    over a block of x and one of grad_y, read them from L1): a column sum keeps one acc_t lane per
//    piece position over a block, so that a lane adds at most kSumBlock / kLanes = 64 values, as a
//    lane of row_reduce, and then each lane goes into its channel's double total;
//  * tasks of a fixed number of blocks (about kTaskValues values), run in parallel: over examples,
//    and over parts of an example when HW C is large (a small B then still fills the threads).
// The split depends on the shape only, never on the thread count, and so does the order of every
// sum: the results do not change with the number of threads.
// The forward's row M2 is taken per block, in two passes over the block while it is in L1 (its sum,
// then the squares around its own rounded mean, as row_m2 around the rounded row mean), and the
// blocks are combined with Chan's formula in double: exactly the two-pass row M2 for one block.
// A task's totals go straight into the outputs when the task is the whole example (HW C <=
// kTaskValues, as in the smaller benchmark shape), else into per-task partials added in order after.

constexpr int64_t kBlockPieces = kSumBlock / kLanes;  // 64
constexpr int64_t kBlockValues = 2048;                 // 8 KiB of float32
constexpr int64_t kMinBlockPieces = 16;                // the lanes' fold is amortised over 16 pieces
constexpr int64_t kTaskValues = 32768;
constexpr int64_t kStrip = 64;  // lanes of a column sum, held in registers

// Whether x takes the channels-last path (the layout contract of the op: see the Python module).
inline bool channels_last_path(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// An uninitialised tensor of x's sizes and dtype: channels-last-contiguous when `channels_last`
// (an [B, H, W, C] tensor permuted to [B, C, H, W]: the strides of at::empty's channels_last
// format), else contiguous.
at::Tensor empty_output_like(const at::Tensor& x, bool channels_last) {
  if (!channels_last) return empty_output(x.sizes(), x.options());
  return empty_output({x.size(0), x.size(2), x.size(3), x.size(1)}, x.options()).permute({0, 3, 1, 2});
}

struct ClPlan {
  int64_t B, C, HW;
  int64_t P;          // values per piece: k whole hw rows
  int64_t block;      // values per block: whole pieces
  int64_t task_rows;  // hw rows per task: whole blocks
  int64_t parts;      // tasks per example
  int64_t grain;      // tasks per parallel grain (about kTaskValues values or more)
  int64_t tasks() const { return B * parts; }
};

// The split of a channels-last x [B, C, H, W]: from its shape only.
ClPlan make_cl_plan(const at::Tensor& x) {
  ClPlan p;
  p.B = x.size(0);
  p.C = x.size(1);
  p.HW = x.size(2) * x.size(3);
  int64_t k = 1;  // hw rows per piece: P = lcm(C, 64) for C < 64 (at most HW rows), else C
  if (p.C < 64) k = std::min<int64_t>(64 / std::gcd<int64_t>(p.C, 64), std::max<int64_t>(p.HW, 1));
  p.P = k * p.C;
  const int64_t pieces = std::clamp<int64_t>(kBlockValues / p.P, kMinBlockPieces, kBlockPieces);
  p.block = pieces * p.P;
  p.task_rows = pieces * k * std::max<int64_t>(1, kTaskValues / p.block);
  p.parts = std::max<int64_t>(1, (p.HW + p.task_rows - 1) / p.task_rows);
  p.grain = std::max<int64_t>(1, kTaskValues / std::max<int64_t>(1, std::min(p.task_rows, p.HW) * p.C));
  return p;
}

// body(t, b, r0, r1) for every task t = b parts + part (hw rows [r0, r1) of example b), in parallel.
template <typename Body>
inline void for_each_task(const ClPlan& p, bool streaming, Body body) {
  at::parallel_for(0, p.tasks(), p.grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / p.parts, r0 = (t % p.parts) * p.task_rows;
      body(t, b, r0, std::min(p.HW, r0 + p.task_rows));
    }
    if (streaming) streaming_fence();
  });
}

// Per-thread scratch of n values of T (the replicated per-channel vectors and a task's totals),
// reused across tasks and calls: no allocation per task.
template <typename T>
T* scratch(int64_t n) {
  thread_local std::vector<double> buffer;
  const size_t doubles = static_cast<size_t>((n * static_cast<int64_t>(sizeof(T)) + 7) / 8);
  if (buffer.size() < doubles) buffer.resize(doubles);
  return reinterpret_cast<T*>(buffer.data());
}

// rep[j] = per_channel(j) for j < C, then repeated: rep[j] = rep[j mod C] over a piece of P.
template <typename T, typename F>
inline void replicate(T* rep, int64_t C, int64_t P, F per_channel) {
  for (int64_t c = 0; c < C; ++c) rep[c] = static_cast<T>(per_channel(c));
  for (int64_t done = C; done < P; done *= 2) std::memcpy(rep + done, rep, std::min(done, P - done) * sizeof(T));
}

// Pieces wider than a strip (below) are summed strip by strip, so that a strip reads the block's
// pieces at a stride of P values, and the hardware prefetchers fall behind (a column sum of C = 128
// or 256 from memory ran at half the speed of the row path). While the first strip runs, the next
// block of the task (of up to two arrays) is fetched into L2 piece by piece.
struct NextBlock {
  const char* a = nullptr;  // the next block's first value, of each array (nullptr: none)
  const char* b = nullptr;
  int64_t piece_bytes = 0;
  bool active(int64_t P) const { return a != nullptr && P > kStrip; }
  void fetch(int64_t i) const {
    for (int64_t o = i * piece_bytes; o < (i + 1) * piece_bytes; o += 64) {
      __builtin_prefetch(a + o, 0, 2);
      if (b != nullptr) __builtin_prefetch(b + o, 0, 2);
    }
  }
};

// tot[(c0 + u) mod C] += lanes[u] for u < w: the lanes of a strip into their channels' totals, in
// runs of consecutive channels (vectorised).
template <typename acc_t>
inline void fold_lanes(const acc_t* __restrict lanes, int64_t w, int64_t c0, int64_t C, double* __restrict tot) {
  for (int64_t u = 0, c = c0; u < w; c = 0) {
    const int64_t run = std::min(w - u, C - c);
    for (int64_t i = 0; i < run; ++i) tot[c + i] += static_cast<double>(lanes[u + i]);
    u += run;
  }
}

// tot[c] += the column sums of f(e, j) over one block of n values (whole hw rows; e is the flat
// index from the block's first value, j = e mod P its position in a piece, channel j mod C). The
// piece is walked in strips of kStrip positions, each summed down the block's pieces in kStrip
// acc_t lanes held in registers (a lane adds one value per piece), and the lanes then go into
// their channels' double totals.
template <typename acc_t, typename F>
inline void column_reduce(int64_t n, int64_t P, int64_t C, double* __restrict tot, F f, NextBlock next = {}) {
  const int64_t pieces = n / P, rest = n - pieces * P;  // the last, partial piece: `rest` positions
  for (int64_t s0 = 0; s0 < P; s0 += kStrip) {
    acc_t lanes[kStrip] = {};
    const int64_t w = std::min(kStrip, P - s0);
    if (s0 == 0 && next.active(P)) {  // then w = kStrip
      for (int64_t i = 0; i < pieces; ++i) {
        next.fetch(i);
        const int64_t base = i * P;
        for (int64_t u = 0; u < kStrip; ++u) lanes[u] += f(base + u, u);
      }
    } else if (w == kStrip) {
      for (int64_t i = 0; i < pieces; ++i) {
        const int64_t base = i * P + s0;
        for (int64_t u = 0; u < kStrip; ++u) lanes[u] += f(base + u, s0 + u);
      }
    } else {
      for (int64_t i = 0; i < pieces; ++i) {
        const int64_t base = i * P + s0;
        for (int64_t u = 0; u < w; ++u) lanes[u] += f(base + u, s0 + u);
      }
    }
    const int64_t base = pieces * P + s0;
    for (int64_t u = 0; u < std::min(w, rest - s0); ++u) lanes[u] += f(base + u, s0 + u);
    fold_lanes(lanes, w, s0 % C, C, tot);
  }
}

// out[e] = f(e, j, cf, stride) over a task's n values, piece by piece (j = e mod P): cf holds the K
// replicated per-channel vectors of a piece, vector k at cf + k stride. The pieces of 64 values (C
// dividing 64, the common case) take a loop of fixed width with the vectors copied to a local array,
// which the compiler keeps in registers across the pieces; other widths read them from rep.
// Outputs of kStreamingBytes and more are streamed (store_block), the others stored directly.
template <int K, typename scalar_t, typename acc_t, typename F>
inline void column_write(scalar_t* out, int64_t n, int64_t P, bool streaming, const acc_t* rep, F f) {
  if (P == kStrip) {
    acc_t loc[K * kStrip];
    std::copy(rep, rep + K * kStrip, loc);
    int64_t e = 0;
    if (streaming) {
      for (; e + kStrip <= n; e += kStrip) {
        acc_t buf[kStrip];
        for (int64_t j = 0; j < kStrip; ++j) buf[j] = f(e + j, j, loc, kStrip);
        store_block<kStrip>(out + e, buf, true);
      }
    } else {
      for (; e + kStrip <= n; e += kStrip) {
        scalar_t* __restrict o = out + e;
        for (int64_t j = 0; j < kStrip; ++j) o[j] = static_cast<scalar_t>(f(e + j, j, loc, kStrip));
      }
    }
    for (int64_t j = 0; e + j < n; ++j) out[e + j] = static_cast<scalar_t>(f(e + j, j, loc, kStrip));
    return;
  }
  for (int64_t e = 0; e < n; e += P) {
    const int64_t m = std::min(P, n - e);
    if (streaming) {
      write_row<scalar_t, acc_t>(out + e, m, true, [&](int64_t j) { return f(e + j, j, rep, P); });
    } else {
      scalar_t* __restrict o = out + e;
      for (int64_t j = 0; j < m; ++j) o[j] = static_cast<scalar_t>(f(e + j, j, rep, P));
    }
  }
}

// Forward step 1 on the channels-last layout: row_mean and row_m2 [B, C] (see above).
template <typename scalar_t, typename acc_t>
void cl_row_stats(const ClPlan& p, const scalar_t* xp, acc_t* rm, acc_t* rm2) {
  const int64_t C = p.C;
  // per-task sums and M2 when an example has several tasks
  std::vector<double> part_sum(p.parts > 1 ? p.tasks() * C : 0), part_m2(part_sum.size());
  for_each_task(p, false, [&](int64_t t, int64_t b, int64_t r0, int64_t r1) {
    double* __restrict sum = scratch<double>(4 * C + p.P);  // acc_t is at most a double
    double* __restrict m2 = sum + C;
    double* __restrict block_sum = m2 + C;
    double* __restrict block_m2 = block_sum + C;
    acc_t* __restrict mean = reinterpret_cast<acc_t*>(block_m2 + C);
    const scalar_t* __restrict xt = xp + (b * p.HW + r0) * C;
    const int64_t n = (r1 - r0) * C;
    for (int64_t e0 = 0; e0 < n; e0 += p.block) {
      const int64_t m = std::min(p.block, n - e0);
      const scalar_t* __restrict xb = xt + e0;
      std::fill(block_sum, block_sum + 2 * C, 0.0);
      NextBlock next;
      if (e0 + m < n) next = {reinterpret_cast<const char*>(xb + m), nullptr, p.P * static_cast<int64_t>(sizeof(scalar_t))};
      column_reduce<acc_t>(m, p.P, C, block_sum, [=](int64_t e, int64_t) { return static_cast<acc_t>(xb[e]); }, next);
      const double rows = static_cast<double>(m / C), before = static_cast<double>(e0 / C);
      replicate(mean, C, p.P, [&](int64_t c) { return static_cast<acc_t>(block_sum[c] / rows); });
      column_reduce<acc_t>(m, p.P, C, block_m2, [=](int64_t e, int64_t j) {
        const acc_t d = static_cast<acc_t>(xb[e]) - mean[j];
        return d * d;
      });
      for (int64_t c = 0; c < C; ++c) {  // Chan: the block into the task's running sum and M2
        if (e0 == 0) {
          sum[c] = block_sum[c];
          m2[c] = block_m2[c];
        } else {
          const double delta = block_sum[c] / rows - sum[c] / before;
          m2[c] += block_m2[c] + delta * delta * (before * rows / (before + rows));
          sum[c] += block_sum[c];
        }
      }
    }
    if (p.parts == 1) {  // the whole example: its row statistics
      for (int64_t c = 0; c < C; ++c) {
        rm[b * C + c] = static_cast<acc_t>(sum[c] / static_cast<double>(p.HW));
        rm2[b * C + c] = static_cast<acc_t>(m2[c]);
      }
    } else {
      std::copy(sum, sum + C, part_sum.data() + t * C);
      std::copy(m2, m2 + C, part_m2.data() + t * C);
    }
  });
  if (p.parts == 1) return;
  // Per (b, c): the tasks in order; M2 = sum of the tasks' M2 + rows (task mean - mean)^2 (Chan).
  at::parallel_for(0, p.B * C, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      double total = 0;
      for (int64_t j = 0; j < p.parts; ++j) total += part_sum[(b * p.parts + j) * C + c];
      const double m = total / static_cast<double>(p.HW);
      double m2 = 0;
      for (int64_t j = 0; j < p.parts; ++j) {
        const int64_t t = b * p.parts + j;
        const double rows = static_cast<double>(std::min(p.HW, (j + 1) * p.task_rows) - j * p.task_rows);
        const double delta = part_sum[t * C + c] / rows - m;
        m2 += part_m2[t * C + c] + rows * delta * delta;
      }
      rm[bc] = static_cast<acc_t>(m);
      rm2[bc] = static_cast<acc_t>(m2);
    }
  });
}

// The three sums of the backward over one block, in one pass (as column_reduce: per strip, A's
// acc_t lanes, and Bs's and D's double lanes, as the row path).
template <typename scalar_t, typename acc_t>
inline void grad_sums_block(int64_t n, int64_t P, int64_t C, const scalar_t* __restrict g, const scalar_t* __restrict x,
                            const double* __restrict mrep, double* __restrict sa, double* __restrict sb,
                            double* __restrict sd, NextBlock next) {
  constexpr int64_t W = kStrip;
  const int64_t pieces = n / P, rest = n - pieces * P;
  for (int64_t s0 = 0; s0 < P; s0 += W) {
    acc_t la[W] = {};
    double lb[W] = {}, ld[W] = {}, mr[W];
    const int64_t w = std::min(W, P - s0);
    for (int64_t u = 0; u < w; ++u) mr[u] = mrep[s0 + u];
    auto step = [&](int64_t base, int64_t u) {
      const double gv = static_cast<double>(g[base + u]), dv = static_cast<double>(x[base + u]) - mr[u];
      la[u] += static_cast<acc_t>(g[base + u]);
      lb[u] += gv * dv;
      ld[u] += dv;
    };
    if (s0 == 0 && next.active(P)) {  // then w = W
      for (int64_t i = 0; i < pieces; ++i) {
        next.fetch(i);
        for (int64_t u = 0; u < W; ++u) step(i * P + s0, u);
      }
    } else if (w == W) {
      for (int64_t i = 0; i < pieces; ++i) {
        for (int64_t u = 0; u < W; ++u) step(i * P + s0, u);
      }
    } else {
      for (int64_t i = 0; i < pieces; ++i) {
        for (int64_t u = 0; u < w; ++u) step(i * P + s0, u);
      }
    }
    for (int64_t u = 0; u < std::min(w, rest - s0); ++u) step(pieces * P + s0, u);
    fold_lanes(la, w, s0 % C, C, sa);
    fold_lanes(lb, w, s0 % C, C, sb);
    fold_lanes(ld, w, s0 % C, C, sd);
  }
}

// Backward step 1 on the channels-last layout: A = sum g (acc_t lanes), Bs = sum g (x - mean) and
// D = sum (x - mean) (double lanes, as the row path) per (b, c), the mean of b's group per channel.
template <typename scalar_t, typename acc_t>
void cl_grad_sums(const ClPlan& p, const scalar_t* gp, const scalar_t* xp, const acc_t* mp, int64_t group_size,
                  double* A, double* Bs, double* D) {
  const int64_t C = p.C;
  // per-task sums when an example has several tasks, else the outputs themselves
  std::vector<double> part(p.parts > 1 ? 3 * p.tasks() * C : 0);
  double* const pa = p.parts > 1 ? part.data() : A;
  double* const pb = p.parts > 1 ? pa + p.tasks() * C : Bs;
  double* const pd = p.parts > 1 ? pb + p.tasks() * C : D;
  for_each_task(p, false, [&](int64_t t, int64_t b, int64_t r0, int64_t r1) {
    double* __restrict mrep = scratch<double>(p.P);
    const int64_t k0 = (b / group_size) * C;
    replicate(mrep, C, p.P, [&](int64_t c) { return static_cast<double>(mp[k0 + c]); });
    double* __restrict sa = pa + t * C;
    double* __restrict sb = pb + t * C;
    double* __restrict sd = pd + t * C;
    std::fill(sa, sa + C, 0.0);
    std::fill(sb, sb + C, 0.0);
    std::fill(sd, sd + C, 0.0);
    const int64_t offset = (b * p.HW + r0) * C, n = (r1 - r0) * C;
    for (int64_t e0 = 0; e0 < n; e0 += p.block) {
      const int64_t m = std::min(p.block, n - e0);
      NextBlock next;
      if (e0 + m < n) next = {reinterpret_cast<const char*>(gp + offset + e0 + m), reinterpret_cast<const char*>(xp + offset + e0 + m),
                              p.P * static_cast<int64_t>(sizeof(scalar_t))};
      grad_sums_block<scalar_t, acc_t>(m, p.P, C, gp + offset + e0, xp + offset + e0, mrep, sa, sb, sd, next);
    }
  });
  if (p.parts == 1) return;
  at::parallel_for(0, p.B * C, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      double a = 0, bs = 0, dd = 0;
      for (int64_t j = 0; j < p.parts; ++j) {
        const int64_t i = (b * p.parts + j) * C + c;
        a += pa[i];
        bs += pb[i];
        dd += pd[i];
      }
      A[bc] = a;
      Bs[bc] = bs;
      D[bc] = dd;
    }
  });
}

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
  const bool cl = channels_last_path(x_in);  // then x_in is channels-last-contiguous: no copy
  const auto x = cl ? x_in : x_in.contiguous();
  const auto arch = arch_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto bias = bias_in.contiguous();
  const auto acc_options = x.options().dtype(acc_scalar_type(x.scalar_type()));
  auto y = empty_output_like(x, cl);
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
    if (cl) {
      cl_row_stats<scalar_t, acc_t>(make_cl_plan(x), xp, rm, rm2);
    } else {
      at::parallel_for(0, B * C, row_grain(L), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* row = xp + r * L;
          const acc_t m = static_cast<acc_t>(row_reduce<scalar_t, acc_t>(row, L, [](acc_t v) { return v; }) /
                                             static_cast<double>(L));
          rm[r] = m;
          rm2[r] = static_cast<acc_t>(row_reduce<scalar_t, acc_t>(row, L, [m](acc_t v) { return (v - m) * (v - m); }));
        }
      });
    }
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
    if (cl) {
      const ClPlan p = make_cl_plan(x);
      for_each_task(p, streaming, [&](int64_t, int64_t b, int64_t r0, int64_t r1) {
        acc_t* __restrict mrep = scratch<acc_t>(3 * p.P);
        acc_t* __restrict srep = mrep + p.P;
        acc_t* __restrict hrep = srep + p.P;
        const int64_t k0 = (b / g) * C, s0 = ap[b] * C;
        replicate(mrep, C, p.P, [&](int64_t c) { return mp[k0 + c]; });
        replicate(srep, C, p.P, [&](int64_t c) { return ip[k0 + c] * static_cast<acc_t>(wp[s0 + c]); });
        replicate(hrep, C, p.P, [&](int64_t c) { return static_cast<acc_t>(bp[s0 + c]); });
        const int64_t offset = (b * p.HW + r0) * C;
        const scalar_t* __restrict xt = xp + offset;
        column_write<3, scalar_t, acc_t>(yp + offset, (r1 - r0) * C, p.P, streaming, mrep,
                                         [=](int64_t e, int64_t j, const acc_t* cf, int64_t st) {
                                           return (static_cast<acc_t>(xt[e]) - cf[j]) * cf[st + j] + cf[2 * st + j];
                                         });
      });
    } else {
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
    }
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
  // grad_y in x's layout (a copy only when it differs)
  const bool cl = channels_last_path(x_in);
  const auto x = cl ? x_in : x_in.contiguous();
  const auto gy = cl ? grad_y_in.contiguous(at::MemoryFormat::ChannelsLast) : grad_y_in.contiguous();
  const auto arch = arch_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto mean = mean_in.contiguous();
  const auto invstd = invstd_in.contiguous();
  const int64_t B = d.B, C = d.C, L = d.L, g = d.group_size, S = d.S;
  const auto acc_options = x.options().dtype(acc);
  auto grad_x = empty_output_like(x, cl);
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
    if (cl) {
      cl_grad_sums<scalar_t, acc_t>(make_cl_plan(x), gp, xp, mp, g, A, Bs, D);
    } else {
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
    }
    // 2. per channel: the group means of dxhat = g w and of dxhat xhat, and the parameter gradients
    //    (each channel owns its column of grad_weight / grad_bias; examples are added in order), with
    //    x - mean(x) = (x - mean) - delta, so sum g (x - mean(x)) = Bs - delta A.
    // No values per group (L = 0): every sum is 0, and so must the means be (not 0 * inf = NaN).
    const double inv_N = g * L > 0 ? 1.0 / static_cast<double>(g * L) : 0.0;
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
    // the coefficients of row (b, c)
    auto coefficients = [&](int64_t b, int64_t c, acc_t& a, acc_t& m, acc_t& bx, acc_t& c0) {
      const int64_t kc = (b / g) * C + c;
      const acc_t rs = ip[kc], m1 = cp[kc * 3], m2 = cp[kc * 3 + 1], delta = cp[kc * 3 + 2];
      m = mp[kc];
      a = rs * static_cast<acc_t>(wp[ap[b] * C + c]);
      bx = -rs * rs * m2;
      c0 = -rs * m1 - delta * bx;
    };
    if (cl) {
      const ClPlan p = make_cl_plan(x);
      for_each_task(p, streaming, [&](int64_t, int64_t b, int64_t r0, int64_t r1) {
        acc_t* __restrict arep = scratch<acc_t>(4 * p.P);
        acc_t* __restrict mrep = arep + p.P;
        acc_t* __restrict brep = mrep + p.P;
        acc_t* __restrict crep = brep + p.P;
        for (int64_t c = 0; c < C; ++c) coefficients(b, c, arep[c], mrep[c], brep[c], crep[c]);
        for (acc_t* rep : {arep, mrep, brep, crep}) replicate(rep, C, p.P, [rep](int64_t c) { return rep[c]; });
        const int64_t offset = (b * p.HW + r0) * C;
        const scalar_t* __restrict gt = gp + offset;
        const scalar_t* __restrict xt = xp + offset;
        column_write<4, scalar_t, acc_t>(gxp + offset, (r1 - r0) * C, p.P, streaming, arep,
                                         [=](int64_t e, int64_t j, const acc_t* cf, int64_t st) {
                                           return static_cast<acc_t>(gt[e]) * cf[j] +
                                                  (static_cast<acc_t>(xt[e]) - cf[st + j]) * cf[2 * st + j] + cf[3 * st + j];
                                         });
      });
    } else {
      at::parallel_for(0, B * C, row_grain(L), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          acc_t a, m, bx, c0;
          coefficients(r / C, r % C, a, m, bx, c0);
          const scalar_t* __restrict grow = gp + r * L;
          const scalar_t* __restrict xrow = xp + r * L;
          write_row<scalar_t, acc_t>(gxp + r * L, L, streaming, [=](int64_t l) {
            return static_cast<acc_t>(grow[l]) * a + (static_cast<acc_t>(xrow[l]) - m) * bx + c0;
          });
        }
        if (streaming) streaming_fence();
      });
    }
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
  const bool cl = channels_last_path(x_in);
  const auto x = cl ? x_in : x_in.contiguous();
  const auto scale = scale_in.contiguous();
  const auto shift = shift_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), L = B * C == 0 ? 0 : x.numel() / (B * C);
  auto y = empty_output_like(x, cl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "channel_affine", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* sp = scale.data_ptr<acc_t>();
    const acc_t* hp = shift.data_ptr<acc_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const bool streaming = stream_output(y);
    if (cl) {
      const ClPlan p = make_cl_plan(x);
      for_each_task(p, streaming, [&](int64_t, int64_t b, int64_t r0, int64_t r1) {
        acc_t* __restrict arep = scratch<acc_t>(2 * p.P);
        acc_t* __restrict hrep = arep + p.P;
        replicate(arep, C, p.P, [&](int64_t c) { return sp[b * C + c]; });
        replicate(hrep, C, p.P, [&](int64_t c) { return hp[b * C + c]; });
        const int64_t offset = (b * p.HW + r0) * C;
        const scalar_t* __restrict xt = xp + offset;
        column_write<2, scalar_t, acc_t>(yp + offset, (r1 - r0) * C, p.P, streaming, arep,
                                         [=](int64_t e, int64_t j, const acc_t* cf, int64_t st) {
                                           return static_cast<acc_t>(xt[e]) * cf[j] + cf[st + j];
                                         });
      });
    } else {
      at::parallel_for(0, B * C, row_grain(L), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const acc_t a = sp[r], h = hp[r];
          const scalar_t* __restrict row = xp + r * L;
          write_row<scalar_t, acc_t>(yp + r * L, L, streaming,
                                     [=](int64_t l) { return static_cast<acc_t>(row[l]) * a + h; });
        }
        if (streaming) streaming_fence();
      });
    }
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
  const bool cl = channels_last_path(x_in);
  const auto x = cl ? x_in : x_in.contiguous();
  const auto gy = cl ? grad_y_in.contiguous(at::MemoryFormat::ChannelsLast) : grad_y_in.contiguous();
  const auto scale = scale_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), L = B * C == 0 ? 0 : x.numel() / (B * C);
  auto grad_x = empty_output_like(x, cl);
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
    if (cl) {
      // per block: the two sums, then its grad_x, while the block is in L1
      const ClPlan p = make_cl_plan(x);
      std::vector<double> part(p.parts > 1 ? 2 * p.tasks() * C : 0);  // per-task sums, several tasks
      for_each_task(p, streaming, [&](int64_t t, int64_t b, int64_t r0, int64_t r1) {
        double* __restrict gs = scratch<double>(2 * C + p.P);  // acc_t is at most a double
        double* __restrict gh = gs + C;
        acc_t* __restrict arep = reinterpret_cast<acc_t*>(gh + C);
        replicate(arep, C, p.P, [&](int64_t c) { return sp[b * C + c]; });
        std::fill(gs, gs + 2 * C, 0.0);
        const int64_t offset = (b * p.HW + r0) * C, n = (r1 - r0) * C;
        for (int64_t e0 = 0; e0 < n; e0 += p.block) {
          const int64_t m = std::min(p.block, n - e0);
          const scalar_t* __restrict gb = gp + offset + e0;
          const scalar_t* __restrict xb = xp + offset + e0;
          NextBlock next;
          if (e0 + m < n) next = {reinterpret_cast<const char*>(gb + m), reinterpret_cast<const char*>(xb + m),
                                  p.P * static_cast<int64_t>(sizeof(scalar_t))};
          column_reduce<acc_t>(m, p.P, C, gs, [=](int64_t e, int64_t) {
            return static_cast<acc_t>(gb[e]) * static_cast<acc_t>(xb[e]);
          }, next);
          column_reduce<acc_t>(m, p.P, C, gh, [=](int64_t e, int64_t) { return static_cast<acc_t>(gb[e]); });
          column_write<1, scalar_t, acc_t>(
              gxp + offset + e0, m, p.P, streaming, arep,
              [=](int64_t e, int64_t j, const acc_t* cf, int64_t) { return static_cast<acc_t>(gb[e]) * cf[j]; });
        }
        if (p.parts == 1) {
          for (int64_t c = 0; c < C; ++c) {
            gsp[b * C + c] = static_cast<acc_t>(gs[c]);
            ghp[b * C + c] = static_cast<acc_t>(gh[c]);
          }
        } else {
          std::copy(gs, gs + 2 * C, part.data() + 2 * t * C);
        }
      });
      if (p.parts > 1) {
        at::parallel_for(0, B * C, 1024, [&](int64_t begin, int64_t end) {
          for (int64_t bc = begin; bc < end; ++bc) {
            const int64_t b = bc / C, c = bc % C;
            double s = 0, h = 0;
            for (int64_t j = 0; j < p.parts; ++j) {
              s += part[2 * (b * p.parts + j) * C + c];
              h += part[(2 * (b * p.parts + j) + 1) * C + c];
            }
            gsp[bc] = static_cast<acc_t>(s);
            ghp[bc] = static_cast<acc_t>(h);
          }
        });
      }
    } else {
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
    }
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
