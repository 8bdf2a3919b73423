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
// The kernels compute the scaled keep soft * scale as 1 / (1 / scale + exp(z - log scale)) with
// z = (lambda + L) / temperature, and t * scale as that times the exp term: with lambda near the
// limit of the float32 rescale (about 87.7), soft alone underflows (it is e^-z) while soft * scale
// is of order 1, and exp(z) clamped at 88 gave dropped units a factor e^(lambda - 88) instead of 0.
//
// Nothing of the noise is stored: the backward regenerates it from (seed, offset). Per element, the
// work is split over rows (b, c) and every row is walked in blocks of kBlock units aligned to
// absolute multiples of kBlock, so the Philox calls and every row sum are the same whatever the
// thread count. Per (example, group), the B G keep factors are computed first (a small pass), then
// the rows are scaled. grad_lambda is reduced from per-row sums in row order: deterministic.
//
// Per element, generating the noise is most of the work (the op reads and writes little per unit):
// with AVX-512, Philox runs on 32 counters at a time and the noise on 16 words at a time in
// intrinsics (philox_x32, logistic_noise_x16); elsewhere (BNAS_FAST_PORTABLE=1) the scalar philox()
// and logistic_noise() give the same words and noise. Each block's noise stays in an L1 buffer that
// one vectorised pass per row segment turns into outputs (and row sums in the backward).
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
constexpr int64_t kChunk = 128;   // units per AVX-512 Philox call: 32 counters; divides kBlock

// The 4 words of Philox(counter) under key, one counter in scalar registers: the portable path.
inline void philox(uint64_t key, uint64_t counter, uint32_t words[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
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
  words[0] = c0, words[1] = c1, words[2] = c2, words[3] = c3;
}

// Coefficients of log(1 + f) = f - f^2 / 2 + f^3 P(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1) (Cephes'
// logf minimax polynomial, highest degree first).
constexpr float kLogPoly[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                               -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                               2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;  // ln 2 split in two, as in fast_exp

// log(s) for the noise's ratio s in [2^-33, 2^33]: s = 2^e (1 + f), f in [sqrt(1/2) - 1, sqrt(2) - 1),
// then the polynomial above. Unlike common.h's fast_log it needs no division (t = (m - 1) / (m + 1)),
// and it is more accurate: over all 2^32 words, the noise is within 1 ulp of the correctly rounded
// log of the (correctly rounded) ratio, where fast_log was within 3.
inline float noise_log(float s) {
  int32_t e;
  const float m = split_exponent(s, e);
  const float f = m - 1.0f, z = f * f;
  float p = kLogPoly[0];
  for (int i = 1; i < 9; ++i) p = p * f + kLogPoly[i];
  const float fe = static_cast<float>(e);
  return fe * kLn2High + ((fe * kLn2Low + (f * z * p - 0.5f * z)) + f);
}

// Standard logistic noise of one word (see the top): float32 on every backend. The division is the
// correctly rounded one of the reference, so the sign of L (the hard mask at lambda = 0) is exact.
inline float logistic_noise(uint32_t w) {
  const float a = static_cast<float>(w) + 0.5f;
  const float b = static_cast<float>(0xFFFFFFFFu - w) + 0.5f;
  return noise_log(a / b);
}

#if defined(__AVX512F__)
// Philox of the 32 counters first .. first + 31: words[v] holds units 16 v .. 16 v + 15 of them (word
// j of counter first + i is unit 4 i + j), bit-identical to philox(). GCC vectorises the scalar loop
// with 64 x 64-bit multiplies (vpmullq) and many permutes; here each counter sits in a 64-bit lane,
// whose low half is the word, so one vpmuludq gives the whole 32 x 32 -> 64-bit product (the high
// halves of the lanes carry garbage that vpmuludq ignores and the final packing drops): 3x faster.
// Four independent groups of 8 counters hide the multiplies' latency (2 or 8 groups were slower).
inline void philox_x32(uint64_t key, uint64_t first, __m512i words[8]) {
  constexpr int kGroups = 4;
  const __m512i mul_a = _mm512_set1_epi64(kMulA), mul_b = _mm512_set1_epi64(kMulB);
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  __m512i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int q = 0; q < kGroups; ++q) {
    const __m512i counter = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first + 8 * q)), lane);
    c0[q] = counter;                         // low word of the counter in the low half
    c1[q] = _mm512_srli_epi64(counter, 32);  // high word
    c2[q] = c3[q] = _mm512_setzero_si512();
  }
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < kRounds; ++round) {
    const __m512i key0 = _mm512_set1_epi64(k0), key1 = _mm512_set1_epi64(k1);
    for (int q = 0; q < kGroups; ++q) {
      const __m512i product_b = _mm512_mul_epu32(c2[q], mul_b), product_a = _mm512_mul_epu32(c0[q], mul_a);
      // 0x96 is the three-way exclusive or: hi(B c2) ^ c1 ^ k0 and hi(A c0) ^ c3 ^ k1
      c0[q] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(product_b, 32), c1[q], key0, 0x96);
      c2[q] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(product_a, 32), c3[q], key1, 0x96);
      c1[q] = product_b;  // lo(B c2) in the low half
      c3[q] = product_a;
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
  // 64-bit lane i of w01 is (c0, c1) of counter i, of w23 (c2, c3); interleaving the lanes of the two
  // gives the counters' 4 words in unit order.
  const __m512i first_four = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
  const __m512i last_four = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
  for (int q = 0; q < kGroups; ++q) {
    const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, c0[q], _mm512_slli_epi64(c1[q], 32));
    const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, c2[q], _mm512_slli_epi64(c3[q], 32));
    words[2 * q] = _mm512_permutex2var_epi64(w01, first_four, w23);
    words[2 * q + 1] = _mm512_permutex2var_epi64(w01, last_four, w23);
  }
}

// logistic_noise() of 16 words, operation for operation (the same roundings and fused multiply-adds
// as GCC contracts the scalar code to), so the two paths agree (checked on all 2^32 words).
inline __m512 logistic_noise_x16(__m512i w) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  // ~w = 2^32 - 1 - w, as a ternary logic of w alone: GCC 12 writes ~w as a vpternlogd that also
  // reads its destination register, and the register it picked held the previous vector's noise,
  // which chained every vector to the one before (a false dependency; 5x slower).
  const __m512i complement = _mm512_ternarylogic_epi32(w, w, w, 0x55);
  const __m512 a = _mm512_add_ps(_mm512_cvtepu32_ps(w), half);
  const __m512 b = _mm512_add_ps(_mm512_cvtepu32_ps(complement), half);
  const __m512i bits = _mm512_castps_si512(_mm512_div_ps(a, b));
  const __m512i e = _mm512_srai_epi32(_mm512_sub_epi32(bits, _mm512_set1_epi32(0x3f3504f3)), 23);
  const __m512 f = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_sub_epi32(bits, _mm512_slli_epi32(e, 23))), one);
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 p = _mm512_set1_ps(kLogPoly[0]);
  for (int i = 1; i < 9; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLogPoly[i]));
  const __m512 fe = _mm512_cvtepi32_ps(e);
  const __m512 y = _mm512_fmsub_ps(_mm512_mul_ps(f, z), p, _mm512_mul_ps(half, z));
  const __m512 low = _mm512_add_ps(_mm512_fmadd_ps(fe, _mm512_set1_ps(kLn2Low), y), f);
  return _mm512_fmadd_ps(fe, _mm512_set1_ps(kLn2High), low);
}
#endif

// noise[i] = the noise of unit block_start + i for i in [first, first + count) (block_start is a
// multiple of kBlock, first + count <= kBlock); neighbours of that range may be written too. The
// AVX-512 path always computes whole chunks of kChunk units, so a unit's noise never depends on
// which range (thread, row) asked for it.
inline void block_noise(uint64_t seed, uint64_t offset, int64_t block_start, int64_t first, int64_t count,
                        float* __restrict noise) {
#if defined(__AVX512F__)
  for (int64_t chunk = (first / kChunk) * kChunk; chunk < first + count; chunk += kChunk) {
    __m512i words[8];
    philox_x32(seed, offset + static_cast<uint64_t>((block_start + chunk) / 4), words);
    for (int v = 0; v < 8; ++v) _mm512_store_ps(noise + chunk + 16 * v, logistic_noise_x16(words[v]));
  }
#else
  for (int64_t u = (first / 4) * 4; u < first + count; u += 4) {
    uint32_t words[4];
    philox(seed, offset + static_cast<uint64_t>((block_start + u) / 4), words);
    for (int j = 0; j < 4; ++j) noise[u + j] = logistic_noise(words[j]);
  }
#endif
}

// Per-channel constants, in the accumulation type, expanded from the per-group logits.
template <typename acc_t>
struct ChannelConstants {
  // lambda_g, scale = 1 + r exp(lambda_g), its inverse and log, p_g r
  std::vector<acc_t> lambda, scale, inv_scale, log_scale, p_rescale;
};

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
ChannelConstants<acc_t> channel_constants(const at::Tensor& drop_logit, int64_t C, int64_t group_size, bool rescale) {
  const scalar_t* logit = drop_logit.data_ptr<scalar_t>();
  ChannelConstants<acc_t> k;
  k.lambda.resize(C), k.scale.resize(C), k.inv_scale.resize(C), k.log_scale.resize(C), k.p_rescale.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const double lambda = static_cast<double>(logit[c / group_size]);
    k.lambda[c] = static_cast<acc_t>(lambda);
    k.scale[c] = static_cast<acc_t>(rescale ? 1.0 + std::exp(lambda) : 1.0);
    k.inv_scale[c] = static_cast<acc_t>(rescale ? 1.0 / (1.0 + std::exp(lambda)) : 1.0);
    // log(1 + e^lambda), without overflow for large lambda
    k.log_scale[c] = static_cast<acc_t>(rescale ? std::max(lambda, 0.0) + std::log1p(std::exp(-std::abs(lambda))) : 0.0);
    k.p_rescale[c] = static_cast<acc_t>(rescale ? 1.0 / (1.0 + std::exp(-lambda)) : 0.0);
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

// One unit's keep factor times scale, and its slope times scale: t scale = soft (1 - soft) scale /
// temperature (0 in hard mode). With e = exp(z - log scale), z = (lambda + L) / temperature:
// soft scale = 1 / (1 / scale + e) and 1 - soft = e soft scale (see the header).
template <typename acc_t, int64_t kMode>
inline void scaled_keep(acc_t lambda, float noise, acc_t inv_temperature, acc_t scale, acc_t inv_scale,
                        acc_t log_scale, acc_t& keep_scaled, acc_t& slope_scaled) {
  const acc_t sum = lambda + static_cast<acc_t>(noise);
  const acc_t hard_scaled = sum < acc_t(0) ? scale : acc_t(0);
  if constexpr (kMode == 2) {
    keep_scaled = hard_scaled;
    slope_scaled = acc_t(0);
  } else {
    // exp's argument at most 88 (float32: fast_exp clamps there) or 700 (float64): e stays finite, so
    // e * soft_scaled is about 1 and not inf * 0 at a tiny temperature
    constexpr acc_t kMaxExponent = sizeof(acc_t) == 4 ? acc_t(88) : acc_t(700);
    const acc_t e = fast_exp(std::min(sum * inv_temperature - log_scale, kMaxExponent));
    const acc_t soft_scaled = acc_t(1) / (inv_scale + e);
    keep_scaled = kMode == 0 ? soft_scaled : hard_scaled;
    slope_scaled = soft_scaled * (e * soft_scaled) * inv_temperature;
  }
}

// The row sums of the backward are kept in kLanes partial sums, lane j taking the units i = j mod
// kLanes of each segment (a row's part in one block): a single running sum would be a serial chain
// that GCC does not vectorise (reordering it needs -ffast-math), while kLanes independent sums are
// one or two vector registers. The segments, hence the order of every addition, follow from the
// absolute block boundaries, whatever the thread count.
constexpr int64_t kLanes = 16;

// One row segment of n units of channel c: the forward writes y = x k scale to out; the backward
// writes grad_x = grad_y k scale to out and adds the units' grad_y x scale (k p r - t) to lanes. The
// loops over units are plain arithmetic that GCC vectorises.
template <typename scalar_t, int64_t kMode, typename acc_t = acc_type<scalar_t>>
inline void forward_segment(const float* __restrict noise, const scalar_t* __restrict x, int64_t n,
                            const ChannelConstants<acc_t>& k, int64_t c, acc_t inv_temperature,
                            acc_t* __restrict out) {
  const acc_t lambda = k.lambda[c], scale = k.scale[c], inv_scale = k.inv_scale[c], log_scale = k.log_scale[c];
  for (int64_t i = 0; i < n; ++i) {
    const acc_t sum = lambda + static_cast<acc_t>(noise[i]);
    // mode 0 needs only the soft keep, modes 1 and 2 only the hard one (no exp)
    // (the forward needs no clamp: 1 / (inv_scale + inf) is the right 0)
    const acc_t keep_scaled = kMode == 0 ? acc_t(1) / (inv_scale + fast_exp(sum * inv_temperature - log_scale))
                                         : (sum < acc_t(0) ? scale : acc_t(0));
    out[i] = static_cast<acc_t>(x[i]) * keep_scaled;
  }
}

template <typename scalar_t, int64_t kMode, typename acc_t = acc_type<scalar_t>>
inline void backward_unit(float noise, scalar_t grad_y, scalar_t x, acc_t lambda, acc_t scale, acc_t inv_scale,
                          acc_t log_scale, acc_t p_rescale, acc_t inv_temperature, acc_t& grad_x, acc_t& lane) {
  acc_t keep_scaled, slope_scaled;
  scaled_keep<acc_t, kMode>(lambda, noise, inv_temperature, scale, inv_scale, log_scale, keep_scaled, slope_scaled);
  const acc_t g = static_cast<acc_t>(grad_y);
  grad_x = g * keep_scaled;
  lane += g * static_cast<acc_t>(x) * (keep_scaled * p_rescale - slope_scaled);
}

template <typename scalar_t, int64_t kMode, typename acc_t = acc_type<scalar_t>>
inline void backward_segment(const float* __restrict noise, const scalar_t* __restrict grad_y,
                             const scalar_t* __restrict x, int64_t n, const ChannelConstants<acc_t>& k, int64_t c,
                             acc_t inv_temperature, acc_t* __restrict out, acc_t* __restrict lanes) {
  const acc_t lambda = k.lambda[c], scale = k.scale[c], inv_scale = k.inv_scale[c], log_scale = k.log_scale[c];
  const acc_t p_rescale = k.p_rescale[c];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      backward_unit<scalar_t, kMode>(noise[i + j], grad_y[i + j], x[i + j], lambda, scale, inv_scale, log_scale,
                                     p_rescale, inv_temperature, out[i + j], lanes[j]);
    }
  }
  for (int64_t j = 0; i + j < n; ++j) {
    backward_unit<scalar_t, kMode>(noise[i + j], grad_y[i + j], x[i + j], lambda, scale, inv_scale, log_scale,
                                   p_rescale, inv_temperature, out[i + j], lanes[j]);
  }
}

// One row of the per-(example, group) path: out = in * factor, streamed when asked (see
// store_block), and, with kDot, the row's dot product of in and x kept in kLanes partial sums for
// the same reason as backward_segment's (their order depends only on P: thread-count independent).
// Every kBlock values the lanes are added into a double, so that long rows keep their digits.
template <typename acc_t>
inline double flush_lanes(acc_t* lanes) {
  acc_t sum = 0;
  for (int64_t j = 0; j < kLanes; ++j) sum += lanes[j];
  std::fill(lanes, lanes + kLanes, acc_t(0));
  return static_cast<double>(sum);
}

template <typename scalar_t, bool kDot, typename acc_t = acc_type<scalar_t>>
inline double scale_row(const scalar_t* __restrict in, const scalar_t* __restrict x, acc_t factor, int64_t P,
                        scalar_t* __restrict out, bool streaming) {
  acc_t lanes[kLanes] = {};
  double total = 0;
  alignas(64) acc_t chunk[kLanes];
  int64_t s = 0;
  for (; s + kLanes <= P; s += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t v = static_cast<acc_t>(in[s + j]);
      chunk[j] = v * factor;
      if constexpr (kDot) lanes[j] += v * static_cast<acc_t>(x[s + j]);
    }
    store_block<kLanes>(out + s, chunk, streaming);
    if (kDot && (s + kLanes) % kBlock == 0) total += flush_lanes(lanes);
  }
  for (int64_t j = 0; s + j < P; ++j) {
    const acc_t v = static_cast<acc_t>(in[s + j]);
    out[s + j] = static_cast<scalar_t>(v * factor);
    if constexpr (kDot) lanes[j] += v * static_cast<acc_t>(x[s + j]);
  }
  return total + flush_lanes(lanes);
}

// Per element: rows [row_begin, row_end) of x, in blocks of kBlock units. Forward writes y; backward
// writes grad_x and row_sum[row] = sum_s grad_y * x * scale * (k p r - t) (in double). Each
// block's noise and outputs stay in stack buffers (8 KiB for float32, in L1); the outputs then go to
// memory in one pass, streamed past the caches when `streaming` (outputs of kStreamingBytes and more,
// common.h).
template <typename scalar_t, int64_t kMode, bool kBackward>
void per_element_rows(const Config& cfg, const ChannelConstants<acc_type<scalar_t>>& k, const scalar_t* __restrict in,
                      const scalar_t* __restrict x, scalar_t* __restrict out, double* __restrict row_sum,
                      int64_t C, int64_t P, int64_t row_begin, int64_t row_end, bool streaming) {
  using acc_t = acc_type<scalar_t>;
  alignas(64) float noise[kBlock];
  alignas(64) acc_t result[kBlock];
  acc_t lanes[kLanes] = {};  // the current segment's partial sums (backward)
  double row_total = 0;      // the current row's sum: its segments' lanes added in double
  const acc_t inv_temperature = static_cast<acc_t>(cfg.inv_temperature);
  int64_t e = row_begin * P;
  const int64_t end = row_end * P;
  while (e < end) {
    const int64_t block_start = (e / kBlock) * kBlock;
    const int64_t block_end = std::min(block_start + kBlock, end);
    const int64_t first = e - block_start, count = block_end - e;
    block_noise(cfg.seed, cfg.offset, block_start, first, count, noise);
    while (e < block_end) {
      const int64_t row = e / P;
      const int64_t segment_end = std::min((row + 1) * P, block_end);
      const int64_t c = row % C, i0 = e - block_start, n = segment_end - e;
      if constexpr (!kBackward) {
        forward_segment<scalar_t, kMode>(noise + i0, in + e, n, k, c, inv_temperature, result + i0);
      } else {
        backward_segment<scalar_t, kMode>(noise + i0, in + e, x + e, n, k, c, inv_temperature, result + i0, lanes);
        row_total += flush_lanes(lanes);
        if (segment_end == (row + 1) * P) {
          row_sum[row] = row_total;
          row_total = 0;
        }
      }
      e = segment_end;
    }
    scalar_t* __restrict dst = out + block_start + first;
    if (count == kBlock) {
      store_block<kBlock>(dst, result, streaming);
    } else {
      for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<scalar_t>(result[first + i]);
    }
  }
  if (streaming) streaming_fence();
}

// Per (example, group): factor[b C + c] = k(b, g) scale_c and coefficient[b C + c] = the unit's
// scale_c (k p r - t) for every channel of the group. B G units: a serial pass over blocks of kBlock.
template <typename acc_t, int64_t kMode>
void unit_factors(const Config& cfg, const ChannelConstants<acc_t>& k, int64_t B, int64_t C, acc_t* factor,
                  acc_t* coefficient) {
  alignas(64) float noise[kBlock];
  const int64_t G = C / cfg.group_size, units = B * G;
  const acc_t inv_temperature = static_cast<acc_t>(cfg.inv_temperature);
  for (int64_t block_start = 0; block_start < units; block_start += kBlock) {
    const int64_t n = std::min(kBlock, units - block_start);
    block_noise(cfg.seed, cfg.offset, block_start, 0, n, noise);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t u = block_start + i, b = u / G, g = u % G;
      for (int64_t c = g * cfg.group_size; c < (g + 1) * cfg.group_size; ++c) {
        acc_t keep_scaled, slope_scaled;
        scaled_keep<acc_t, kMode>(k.lambda[c], noise[i], inv_temperature, k.scale[c], k.inv_scale[c],
                                  k.log_scale[c], keep_scaled, slope_scaled);
        factor[b * C + c] = keep_scaled;
        coefficient[b * C + c] = keep_scaled * k.p_rescale[c] - slope_scaled;
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
    const bool streaming = static_cast<int64_t>(y.nbytes()) >= kStreamingBytes;
    at::parallel_for(0, B * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(P, 1)), [&](int64_t begin, int64_t end) {
      per_element_rows<scalar_t, kMode, false>(cfg, k, xp, xp, yp, nullptr, C, P, begin, end, streaming);
    });
    return;
  }
  std::vector<acc_t> factor(B * C), coefficient(B * C);
  unit_factors<acc_t, kMode>(cfg, k, B, C, factor.data(), coefficient.data());
  const bool streaming = static_cast<int64_t>(y.nbytes()) >= kStreamingBytes;
  at::parallel_for(0, B * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(P, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scale_row<scalar_t, false>(xp + row * P, xp + row * P, factor[row], P, yp + row * P, streaming);
    }
    if (streaming) streaming_fence();
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
  // row_sum[b C + c]: sum over the row of grad_y * x * scale_c * (k p r - t), the row's share of
  // grad_lambda (in double: grad_lambda may sum millions of rows).
  std::vector<double> row_sum(B * C, 0.0);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(P, 1));
  if (cfg.per_element) {
    const bool streaming = static_cast<int64_t>(grad_x.nbytes()) >= kStreamingBytes;
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      per_element_rows<scalar_t, kMode, true>(cfg, k, gp, xp, gxp, row_sum.data(), C, P, begin, end, streaming);
    });
  } else {
    std::vector<acc_t> factor(B * C), coefficient(B * C);
    unit_factors<acc_t, kMode>(cfg, k, B, C, factor.data(), coefficient.data());
    const bool streaming = static_cast<int64_t>(grad_x.nbytes()) >= kStreamingBytes;
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const double dot = scale_row<scalar_t, true>(gp + row * P, xp + row * P, factor[row], P, gxp + row * P, streaming);
        row_sum[row] = dot * static_cast<double>(coefficient[row]);
      }
      if (streaming) streaming_fence();
    });
  }
  // grad_lambda_g = sum_b sum_{c in g} row_sum[b C + c], in a fixed order.
  std::vector<double> total(G, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) total[c / cfg.group_size] += row_sum[b * C + c];
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
  float* noise = out.data_ptr<float>();
#if defined(__AVX512F__)
  // the kernels' vector path, the last vector masked
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(noise + i, mask, logistic_noise_x16(_mm512_maskz_loadu_epi32(mask, bits.data() + i)));
  }
#else
  for (int64_t i = 0; i < n; ++i) noise[i] = logistic_noise(bits[i]);
#endif
  return out.view(words.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(bnas_fast, CPU, m) {
  m.impl("gumbel_sigmoid_dropout", &gumbel_sigmoid_dropout_cpu);
  m.impl("gumbel_sigmoid_dropout_backward", &gumbel_sigmoid_dropout_backward_cpu);
  m.impl("logistic_noise_of_words", &logistic_noise_of_words_cpu);
}

}  // namespace bnas_fast
