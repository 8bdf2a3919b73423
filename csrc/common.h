// Shared argument checks and helpers for the bnas_fast CPU kernels.
//
// Every user error is a TORCH_CHECK with a message that names the op and the argument; the Python
// wrappers check the same things first with friendlier messages, these checks guard direct calls
// of torch.ops.bnas_fast.*. All index arithmetic is int64_t.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <string>
#include <vector>

namespace bnas_fast {

// float32 accumulation for bfloat16/float16, native for float32/float64.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

inline void check_cpu_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the C++ kernel, got ",
              t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

// Largest kernel size, stride, padding, dilation or image side the convolution ops take: with
// every such value below 2^31, sums like H + 2 * padding - dilation * (kernel - 1) stay far inside
// int64_t (no signed overflow, which is undefined behaviour).
constexpr int64_t kMaxGeometry = (int64_t(1) << 31) - 1;

// Each entry of a geometry argument (kernel_size, stride, padding, dilation, input_size) at most
// kMaxGeometry; the ops check the lower bounds themselves.
inline void check_geometry(at::IntArrayRef values, const char* op, const char* name) {
  for (const int64_t v : values) {
    TORCH_CHECK_VALUE(v <= kMaxGeometry, op, ": ", name, " must be below 2^31, got ", values);
  }
}

// Rejects NaN and infinity in a small tensor (weights are [B, K]); reads every element once.
template <typename scalar_t>
void check_finite(const scalar_t* data, int64_t n, const char* op, const char* name) {
  for (int64_t i = 0; i < n; ++i) {
    // In the accumulation type: a float cast would turn finite float64 values above 3.4e38 into inf.
    const acc_type<scalar_t> v = static_cast<acc_type<scalar_t>>(data[i]);
    TORCH_CHECK_VALUE(std::isfinite(v), op, ": ", name, " contains a non-finite value (", v,
                      ") at flat position ", i);
  }
}

// Allocates an output of `sizes` and, when it is large, asks Linux to back it with transparent
// huge pages before the kernel first touches it. glibc returns big freed blocks to the OS, so a
// large output is often fresh memory that faults on first write: one fault per 4 KiB page (about
// 4000 per 16 MiB, which cost more than the kernel itself); a 2 MiB huge page takes one fault.
// madvise is only a hint: memory that is already mapped, or a kernel with THP off, is unaffected.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (last > first && last - first >= 2 * kHuge) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// Outputs of 16 MiB and more are written with non-temporal (streaming) stores: a streaming store
// skips the read-for-ownership that a normal store of a missing line costs, i.e. a third of the
// traffic of an op that reads one tensor and writes another. But it also sends the output past the
// caches, and the next op of a network reads it back from memory. The threshold was 4 MiB (beyond a
// core's L2), which made an NSA-i training step (mix gradients of 10 MiB, consumed at once) about 7%
// slower; at half of this machine's 32 MiB L3, outputs that a following op can still find in L3 are
// stored normally, and the large tensors of the op benchmarks (16 MiB and more) still stream.
constexpr int64_t kStreamingBytes = int64_t(16) << 20;

inline bool aligned64(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 63) == 0; }

// dst[0:kN] = src[0:kN], streamed when asked and possible (float/double, 64-byte aligned dst);
// kN is a multiple of 16.
template <int64_t kN, typename scalar_t, typename acc_t>
inline void store_block(scalar_t* __restrict dst, const acc_t* __restrict src, bool streaming) {
  static_assert(kN % 16 == 0, "store_block: kN must be a multiple of 16");
#if defined(__AVX512F__)
  if constexpr (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
    if (streaming && aligned64(dst)) {
      for (int64_t u = 0; u < kN; u += 16) _mm512_stream_ps(dst + u, _mm512_loadu_ps(src + u));
      return;
    }
  } else if constexpr (std::is_same<scalar_t, double>::value && std::is_same<acc_t, double>::value) {
    if (streaming && aligned64(dst)) {
      for (int64_t u = 0; u < kN; u += 8) _mm512_stream_pd(dst + u, _mm512_loadu_pd(src + u));
      return;
    }
  }
#elif defined(__SSE2__)
  if constexpr (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
    if (streaming && aligned64(dst)) {
      for (int64_t u = 0; u < kN; u += 4) _mm_stream_ps(dst + u, _mm_loadu_ps(src + u));
      return;
    }
  } else if constexpr (std::is_same<scalar_t, double>::value && std::is_same<acc_t, double>::value) {
    if (streaming && aligned64(dst)) {
      for (int64_t u = 0; u < kN; u += 2) _mm_stream_pd(dst + u, _mm_loadu_pd(src + u));
      return;
    }
  }
#endif
  for (int64_t u = 0; u < kN; ++u) dst[u] = static_cast<scalar_t>(src[u]);
}

// Streaming stores are weakly ordered: fence before another thread may read what they wrote.
inline void streaming_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// exp(x) for float32 in plain arithmetic, so that the compiler vectorises it (std::exp stays a
// scalar libm call without -ffast-math, and that call was 3x the cost of the whole op):
// x = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial (relative error
// <= 1.2e-7, about 1 ulp), 2^n assembled in the exponent bits. n is rounded by adding and
// subtracting 1.5 * 2^23, which leaves n in the low mantissa bits: a float-to-int conversion (or
// std::floor) may trap, and GCC then refuses to vectorise the loop unless -fno-trapping-math.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);  // keeps 2^n a normal float; exp(-87) ~ 1.6e-38
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23, bit pattern 0x4b400000
  const float shifted = x * 1.44269504088896341f + kRoundMagic;
  const float n = shifted - kRoundMagic;  // round(x / ln2), exactly
  int32_t n_int;
  std::memcpy(&n_int, &shifted, sizeof(n_int));
  n_int -= 0x4b400000;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two for exactness
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (n_int + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }  // float64 keeps libm's accuracy

// The range reduction of both float32 logs (here and gumbel_sigmoid_dropout.cpp's noise_log):
// s = 2^e m with m in [sqrt(1/2), sqrt(2)), by integer arithmetic on the bits (vectorisable).
inline float split_exponent(float s, int32_t& e) {
  int32_t bits;
  std::memcpy(&bits, &s, sizeof(bits));
  e = (bits - 0x3f3504f3) >> 23;  // 0x3f3504f3 is sqrt(1/2)
  const int32_t mantissa_bits = bits - (e << 23);
  float m;
  std::memcpy(&m, &mantissa_bits, sizeof(m));
  return m;
}

// log(s) for a normal float32 s > 0, vectorisable
// for the same reason as fast_exp: s = 2^e m with m in [sqrt(1/2), sqrt(2)), and
// log m = 2 atanh(t) = 2 (t + t^3/3 + ... + t^9/9) with t = (m - 1) / (m + 1), |t| <= 0.172
// (truncation error < 1e-9); e ln2 is added with ln2 split in two, as in fast_exp.
inline float fast_log(float s) {
  int32_t e;
  const float m = split_exponent(s, e);
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  float p = 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  const float fe = static_cast<float>(e);
  return fe * 0.693359375f + (fe * -2.12194440e-4f + 2.0f * t * p);
}
inline double fast_log(double s) { return std::log(s); }

}  // namespace bnas_fast
