// Fused CPU kernels for the group-wise rational activation F(x) = P(x) / Q(x) and its residual form.
//
// The math is exactly nora/rational/functional.py (the single source of truth):
//   P(x) = a_0 + a_1 x + ... + a_m x^m                      (Horner)
//   form A: Q(x) = 1 + sum_j |b_j| |x|^j
//   form B: Q(x) = 1 + |R(x)|,  R(x) = sum_j b_j x^j
//   dF/dx   = P'/Q - Q' P/Q^2     (Q' = sign(x) sum_j j|b_j||x|^(j-1)  or  sign(R) R')
//   dF/da_i = x^i / Q
//   dF/db_j = -sign(b_j) |x|^j P/Q^2  (form A)   or   -sign(R) x^j P/Q^2  (form B)
// with sign(0) = 0 everywhere. Arithmetic is float32 for float32 / bfloat16 / float16 inputs
// (each element is upcast on load and the result rounded to nearest-even on store). No fast-math:
// NaN and inf propagate as in the torch reference.
//
// Residual form (residual_forward / residual_backward): with F the rational of the trained coefficients, F0 that
// of the frozen fit and phi one of the activations of KERNEL_ACTIVATIONS (none, gelu, gelu_tanh, silu, relu),
//   y = phi(x) + (F(x) - F0(x)),   grad_x = g phi'(x) + g (F'(x) - F0'(x)),   coefficient gradients: F's only.
// F and F0 run through the same inline functions (the same instruction sequence, lane for lane) and are subtracted
// before anything else touches them, so equal coefficients give F - F0 = 0.0 exactly and y, grad_x are exactly
// phi(x), g phi'(x). phi and phi' are computed here, lane-wise (own exp; GELU's Phi as exp(-x^2/2) t Q(t), t =
// 1/(1 + 0.331|x|), Q of degree 4, see gelu_cdf): within 2.2e-7 max(1, |x|) of the exact functions on [-60, 60] and
// in the tails (GELU: absolute accuracy, as torch's own float32 GELU, which is up to 0.36e-6 max(1, |x|) off;
// gelu_tanh 16, silu 2 float32 ulps where |phi| > 1e-3), finite for every finite x; +-inf and NaN as torch. They run in the plain form's kernels, behind a compile-time flag (RES),
// with the activation chosen at run time once per tile of rows (one non-inlined function serves every kernel).
//
// Layout: x is contiguous (rows, D) with D = G * C; group g owns channels [g*C, (g+1)*C) of every
// row. One code path serves every G from 1 to D (one rational per channel): the work is cut into
// fixed-size items of rows x channels (independent of the thread count and of G). Each item is walked
// in tiles of a few rows: chunk by chunk along the tile (W channels, one SIMD register, each lane with
// the coefficients of its own channel's group, from a per-channel table), the chunk's coefficients and,
// in backward, its m + 1 + n coefficient-gradient accumulators are loaded once and applied to the
// tile's rows; the next tile is prefetched. Every lane sums its channel's rows in row order into the
// item's per-channel partial sums; after the parallel loop those are summed per channel over the
// items in order, then over each group's channels in order, in float64: bit-identical run after run,
// for any thread count and any SIMD width W, no atomics, and no per-group work inside the loop.
//
// A chunk's coefficients are one contiguous block of the table (rows D apart shared L1 sets with the tile's rows of x
// and y when D is a multiple of 1024). With AVX-512 a chunk is loaded and stored with one masked instruction, in
// every I/O dtype (no branch, no bounce buffer, no lane past the row touched); other builds use whole vectors and
// a bounce buffer for a row's last, partial chunk. Both give the same bits.
//
// The Python side (nora/kernels/cpu.py) validates shapes, dtypes and contiguity, allocates every
// output and passes raw pointers; this file therefore only needs pybind11 and ATen's parallel_for
// (light headers: the JIT build is quick).
//
// Degrees: (m, n) = (5, 4), the default, runs with constant bounds (fully unrolled, accumulators in
// registers); other degrees up to MAXC - 1 / MAXC run through the same code with runtime bounds.

#include <pybind11/pybind11.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace {

constexpr int MAXC = 16;                   // max numerator coefficients (m + 1) / denominator ones (n)


// ------------------------------------------------------------------ dtype conversion
// Block conversions written so the compiler vectorises them (bit manipulation, no branches);
// float -> bfloat16 / float16 round to nearest even exactly as torch's .to() does, NaN stays NaN.
template <typename T>
inline void load_block(const T* __restrict src, float* __restrict dst, int64_t cnt);
template <typename T>
inline void store_block(const float* __restrict src, T* __restrict dst, int64_t cnt);

template <>
inline void load_block<c10::BFloat16>(const c10::BFloat16* __restrict src, float* __restrict dst,
                                      int64_t cnt) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < cnt; ++i) {
    const uint32_t u = static_cast<uint32_t>(s[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    dst[i] = f;
  }
}

template <>
inline void store_block<c10::BFloat16>(const float* __restrict src, c10::BFloat16* __restrict dst,
                                       int64_t cnt) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < cnt; ++i) {
    const float f = src[i];
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    d[i] = static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
  }
}

template <>
inline void load_block<c10::Half>(const c10::Half* __restrict src, float* __restrict dst, int64_t cnt) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= cnt; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < cnt; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void store_block<c10::Half>(const float* __restrict src, c10::Half* __restrict dst, int64_t cnt) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= cnt; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < cnt; ++i) dst[i] = static_cast<c10::Half>(src[i]);  // c10: round to nearest even
}

// ------------------------------------------------------------------ the channel-tiled kernels
// Items of CH_ITEM_ELEMS / CH_BLOCK rows x CH_BLOCK channels (any number of groups). W: SIMD lanes; the
// results do not depend on it (lane-wise arithmetic only), so an AVX2 build and an AVX-512 one agree bit
// for bit.
#ifndef NORA_W
#if defined(__AVX512F__)
#define NORA_W 16
#else
#define NORA_W 8
#endif
#endif
constexpr int W = NORA_W;                   // lanes: one AVX-512 (16) or AVX2 (8) register of float
constexpr int64_t CH_BLOCK = 256;           // channels per item (a multiple of W)
constexpr int64_t CH_ITEM_ELEMS = 65536;    // target elements per item

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

inline vf splat(float f) { return vf{} + f; }
inline vf vabs(vf v) { return (vf)((vi)v & 0x7FFFFFFF); }
inline vf vsign(vf v) {  // sign with sign(0) = sign(NaN) = 0, as the torch reference
  const vf one = splat(1.0f), zero = splat(0.0f);
  return (v > zero ? one : zero) - (v < zero ? one : zero);
}

// ------------------------------------------------------------------ the residual form's activations phi, lane-wise
// Lane-wise arithmetic only (no table lookups, no cross-lane operations): the results do not depend on W.
// max(lo, a) and min(hi, a) that keep a NaN a (x86 max/min return their second operand when unordered)
inline vf vmax_nan(vf lo, vf a) {
#if defined(__AVX512F__) && NORA_W == 16
  return (vf)_mm512_max_ps((__m512)lo, (__m512)a);
#elif defined(__AVX__) && NORA_W == 8
  return (vf)_mm256_max_ps((__m256)lo, (__m256)a);
#else
  return a < lo ? lo : a;
#endif
}
inline vf vmin_nan(vf hi, vf a) {
#if defined(__AVX512F__) && NORA_W == 16
  return (vf)_mm512_min_ps((__m512)hi, (__m512)a);
#elif defined(__AVX__) && NORA_W == 8
  return (vf)_mm256_min_ps((__m256)hi, (__m256)a);
#else
  return a > hi ? hi : a;
#endif
}

// y 2^k, the last step of both exponentials (k = kf - magic, an integer as a float): the portable code multiplies by
// two powers of two, each a normal float, so that a subnormal result or an overflow to inf is rounded once, as
// AVX-512's scalef does.
inline vf vscale_pow2(vf y, vf k, vf kf, vf magic) {
#if defined(__AVX512F__) && NORA_W == 16
  (void)kf;
  (void)magic;
  return (vf)_mm512_scalef_ps((__m512)y, (__m512)k);
#else
  (void)k;
  const vi ki = (vi)kf - (vi)magic;
  const vi k1 = ki >> 1, k2 = ki - k1;
  return y * (vf)((k1 + 127) << 23) * (vf)((k2 + 127) << 23);
#endif
}

// e^a, lane-wise: Cody-Waite reduction a = k ln2 + r, |r| <= ln2/2, Cephes' degree-6 polynomial for e^r (within
// 1 ulp), then y 2^k with one rounding (subnormal results and overflow to inf included). a is clamped to
// [-104, 88.8] first: 0 below, inf above; NaN stays NaN (NONPOS: the caller's a <= 0, no upper clamp). AVX-512's
// scalef computes y 2^k as the two exact power-of-two products of the portable code followed by one rounding: every
// build gives the same bits.
template <bool NONPOS = false>
inline vf vexp(vf a) {
  a = vmax_nan(splat(-104.0f), a);
  if (!NONPOS) a = vmin_nan(splat(88.8f), a);
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer (nearest even)
  const vf kf = a * 1.44269504088896341f + magic;
  const vf k = kf - magic;
  vf r = a - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf y = p * (r * r) + r + 1.0f;
  return vscale_pow2(y, k, kf, magic);
}

enum Act : int { kNone = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kRelu = 4 };

// e^(-x^2/2) for GELU (absolute accuracy is what it needs: every use is multiplied by at most 0.5, or x / sqrt(2 pi)):
// a = -x^2/2 clamped to [-104, 0] (0 below, as vexp; NaN stays NaN), one-constant Cody-Waite reduction a = k ln2 + r
// (the reduction's error, k 1.9e-9 relative, is negligible where e^a is not), a degree-5 minimax polynomial for e^r
// (1.8e-7 relative in float32), then y 2^k as vexp (every build gives the same bits).
inline vf vexp_neg_half_sq(vf x) {
  const vf a = vmax_nan(splat(-104.0f), (x * -0.5f) * x);
  const vf magic = splat(12582912.0f);
  const vf kf = a * 1.44269504088896341f + magic;
  const vf k = kf - magic;
  const vf r = a - k * 0.693147182f;
  vf p = splat(8.311569e-3f);
  p = p * r + 4.189893e-2f;
  p = p * r + 1.6667153e-1f;
  p = p * r + 4.9999171e-1f;
  p = p * r + 1.0f;
  const vf y = p * r + 1.0f;
  return vscale_pow2(y, k, kf, magic);
}

// GELU (erf): Phi(-|x|) = e t Q(t), e = exp(-x^2/2), t = 1/(1 + 0.331|x|), Q of degree 4 (in the manner of Abramowitz
// and Stegun 7.1.26, which torch's own vectorised GELU uses; fitted here for the absolute error of Phi: 6.1e-8 in exact
// arithmetic, under 2e-7 in float32 with e's error), and Phi(x) = 1 - Phi(-x) for x >= 0. Absolute accuracy, torch's
// level: far in the left tail, where Phi is below 1e-7, the relative error grows (t Q(t) tends to 0.37/|x|, the exact
// erfcx(|x|/sqrt2)/2 to 0.40/|x|), which changes gelu and gelu' by far less than 1e-7. +-inf and NaN come out as in
// torch: gelu(inf) = inf, gelu(-inf) = NaN.
inline vf gelu_cdf(vf x, vf& e) {
  const vf ax = vabs(x);
  e = vexp_neg_half_sq(x);
  const vf t = splat(1.0f) / (ax * 0.331f + 1.0f);
  vf q = splat(-0.110234775f);
  q = q * t + 0.37412053f;
  q = q * t + -0.09001601f;
  q = q * t + 0.20386127f;
  q = q * t + 0.122268915f;
  const vf c = (t * e) * q;  // Phi(-|x|)
  return x < splat(0.0f) ? c : splat(1.0f) - c;
}

constexpr float INV_SQRT_2PI = 0.398942280401432678f;
constexpr float GT_K0 = 0.797884560802865356f;  // sqrt(2/pi)
constexpr float GT_K1 = 0.044715f;

// phi(x) of the activation (runtime kind: the caller switches once per tile)
template <int ACT>
inline vf phi(vf x) {
  if constexpr (ACT == kGelu) {
    vf e;
    return x * gelu_cdf(x, e);
  } else if constexpr (ACT == kGeluTanh) {
    // 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3)
    const vf u = (x + (x * x) * x * GT_K1) * GT_K0;
    return x / (splat(1.0f) + vexp(u * -2.0f));
  } else if constexpr (ACT == kSilu) {
    return x / (splat(1.0f) + vexp(-x));
  } else if constexpr (ACT == kRelu) {
    return x < splat(0.0f) ? splat(0.0f) : x;  // NaN stays NaN, -0 stays -0 (as torch.relu)
  } else {
    return splat(0.0f);
  }
}

// g * phi'(x) (relu'(0) = 0 and relu'(NaN) = 0: torch's where(x > 0, g, 0))
template <int ACT>
inline vf grad_phi(vf x, vf g) {
  if constexpr (ACT == kGelu) {
    vf e;
    const vf cdf = gelu_cdf(x, e);
    return g * (cdf + x * (e * INV_SQRT_2PI));
  } else if constexpr (ACT == kGeluTanh) {
    const vf x2 = x * x;
    const vf u = (x + x2 * x * GT_K1) * GT_K0;
    const vf E = vexp(u * -2.0f);
    const vf s = splat(1.0f) / (splat(1.0f) + E);      // (1 + tanh u) / 2
    const vf oms = u >= splat(0.0f) ? E * s : splat(1.0f) - s;  // (1 - tanh u) / 2, without cancellation
    vf term = (x * 2.0f) * (s * oms) * ((x2 * (3.0f * GT_K1) + 1.0f) * GT_K0);
    // beyond |x| = 64 the term is 0 in float32 (and x^2 may overflow): 0, or NaN at +-inf as torch
    term = vabs(x) <= splat(64.0f) ? term : x - x;
    return g * (s + term);
  } else if constexpr (ACT == kSilu) {
    const vf E = vexp(-x);
    const vf s = splat(1.0f) / (splat(1.0f) + E);
    const vf oms = x >= splat(0.0f) ? E * s : splat(1.0f) - s;
    return g * (s * (splat(1.0f) + x * oms));
  } else if constexpr (ACT == kRelu) {
    return x > splat(0.0f) ? g : splat(0.0f);
  } else {
    return splat(0.0f);
  }
}

// res[i] = phi(xs[i]) + res[i] for the tile's rows (forward), res[i] = g phi'(x) + g res[i] (backward): the
// activation is chosen once per tile, outside the per-element code. Not inlined: one copy serves every kernel
// (dtype, form, degrees), which keeps the JIT build short; a call per tile of RT rows x W lanes costs nothing.
template <int ACT>
inline void add_phi_rows(const vf* xs, vf* res, int64_t nr) {
  for (int64_t i = 0; i < nr; ++i) res[i] = phi<ACT>(xs[i]) + res[i];
}
__attribute__((noinline)) void add_phi(int act, const vf* xs, vf* res, int64_t nr) {
  switch (act) {
    case kGelu: add_phi_rows<kGelu>(xs, res, nr); break;
    case kGeluTanh: add_phi_rows<kGeluTanh>(xs, res, nr); break;
    case kSilu: add_phi_rows<kSilu>(xs, res, nr); break;
    case kRelu: add_phi_rows<kRelu>(xs, res, nr); break;
    default: break;  // none: phi = 0, y = F - F0
  }
}
template <int ACT>
inline void add_grad_phi_rows(const vf* xs, const vf* gs, vf* res, int64_t nr) {
  for (int64_t i = 0; i < nr; ++i) res[i] = grad_phi<ACT>(xs[i], gs[i]) + gs[i] * res[i];
}
__attribute__((noinline)) void add_grad_phi(int act, const vf* xs, const vf* gs, vf* res, int64_t nr) {
  switch (act) {
    case kGelu: add_grad_phi_rows<kGelu>(xs, gs, res, nr); break;
    case kGeluTanh: add_grad_phi_rows<kGeluTanh>(xs, gs, res, nr); break;
    case kSilu: add_grad_phi_rows<kSilu>(xs, gs, res, nr); break;
    case kRelu: add_grad_phi_rows<kRelu>(xs, gs, res, nr); break;
    default:
      for (int64_t i = 0; i < nr; ++i) res[i] = gs[i] * res[i];
  }
}

// Lanes in and out: w (1..W) consecutive elements, upcast to float32 on load, rounded to the I/O dtype on store
// (as load_block / store_block, bit for bit). With AVX-512 (W = 16) one masked load or store, no branch and no lane
// past w touched; otherwise whole vectors when w == W and a bounce buffer for the last, partial chunk of a row.
#if defined(__AVX512F__) && defined(__AVX512BW__) && NORA_W == 16
#define NORA_MASKED_IO 1
inline __mmask16 lane_mask(int w) { return static_cast<__mmask16>((1u << w) - 1u); }
#endif

template <typename T>
inline vf load_lanes(const T* p, int w) {
#ifdef NORA_MASKED_IO
  const __mmask16 m = lane_mask(w);
  if constexpr (std::is_same<T, float>::value) {
    return (vf)_mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same<T, c10::BFloat16>::value) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return (vf)_mm512_slli_epi32(u, 16);
  } else {
    return (vf)_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
#else
  if constexpr (std::is_same<T, float>::value) {
    if (w == W) {
      vf v;
      std::memcpy(&v, p, sizeof(v));
      return v;
    }
  }
  alignas(64) float f[W] = {};
  if constexpr (std::is_same<T, float>::value) {
    for (int l = 0; l < w; ++l) f[l] = p[l];
  } else {
    load_block<T>(p, f, w);
  }
  vf v;
  std::memcpy(&v, f, sizeof(v));
  return v;
#endif
}

template <typename T>
inline void store_lanes(T* p, vf v, int w) {
#ifdef NORA_MASKED_IO
  const __mmask16 m = lane_mask(w);
  if constexpr (std::is_same<T, float>::value) {
    _mm512_mask_storeu_ps(p, m, (__m512)v);
  } else if constexpr (std::is_same<T, c10::BFloat16>::value) {
    const vi u = (vi)v;  // round to nearest even as store_block; NaN -> 0x7FC0
    const vi rounded = (vi)(((__v16su)u + 0x7FFFu + (((__v16su)u >> 16) & 1u)) >> 16);
    const vi bits = v != v ? vi{} + 0x7FC0 : rounded;
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16((__m512i)bits));
  } else {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#else
  if constexpr (std::is_same<T, float>::value) {
    if (w == W) {
      std::memcpy(p, &v, sizeof(v));
      return;
    }
  }
  alignas(64) float f[W];
  std::memcpy(f, &v, sizeof(v));
  if constexpr (std::is_same<T, float>::value) {
    for (int l = 0; l < w; ++l) p[l] = f[l];
  } else {
    store_block<T>(f, p, w);
  }
#endif
}

struct ChannelPlan {
  int64_t rows = 0, D = 0, C = 0, Dp = 0;  // Dp: D rounded up to a multiple of W (the table's lanes)
  int64_t n_cb = 0, row_block = 1, n_rb = 0, n_items = 0;
  ChannelPlan(int64_t numel, int64_t D_, int64_t G) : D(D_) {
    rows = numel / D;
    C = D / G;
    Dp = (D + W - 1) / W * W;
    n_cb = (D + CH_BLOCK - 1) / CH_BLOCK;
    row_block = std::max<int64_t>(1, CH_ITEM_ELEMS / std::min(D, CH_BLOCK));
    n_rb = (rows + row_block - 1) / row_block;
    n_items = n_rb * n_cb;
  }
};

// Scratch buffers reused across calls by the calling thread (the coefficient table, the per-item partial
// sums, the per-channel totals): no allocation, page faults or zero-fill per call. Each call fully writes
// what it later reads. Buffers above SCRATCH_KEEP elements are released after the call.
constexpr size_t SCRATCH_KEEP = size_t(1) << 24;
template <typename V>
typename V::value_type* scratch(V& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}
template <typename V>
void release_large(V& buf) {
  if (buf.size() > SCRATCH_KEEP) V().swap(buf);
}

// per-channel coefficient table, one block of R vectors per chunk of W channels ([Dp / W][R][W]): each coefficient
// set (F's; in the residual form F0's after it, from row0) is a_0..a_m, then b_1..b_n as evaluated (|b_j| in form
// A); a chunk's coefficients are contiguous (rows Dp apart would share L1 sets with the tile's rows of x and y when
// D is a multiple of 1024). deriv (backward): the derivative's coefficients follow, i a_i (i = 1..m), then j |b_j|
// or j b_j (j = 1..n), the float32 products the kernels used to form per tile.
int table_rows(int m1, int n, bool deriv) { return deriv ? 2 * (m1 + n) - 1 : m1 + n; }
void fill_channel_table(float* tab, const float* a, const float* b, int m1, int n, bool form_b,
                        const ChannelPlan& pl, int R, int row0, bool deriv) {
  const int rows = table_rows(m1, n, deriv);
  std::vector<float> v(static_cast<size_t>(rows));
  auto put = [&](int64_t d, int i, float val) { tab[(d / W) * R * W + (row0 + i) * W + d % W] = val; };
  for (int64_t g = 0; g < pl.D / pl.C; ++g) {
    for (int i = 0; i < m1; ++i) v[i] = a[g * m1 + i];
    for (int j = 0; j < n; ++j) v[m1 + j] = form_b ? b[g * n + j] : std::fabs(b[g * n + j]);
    if (deriv) {
      for (int i = 1; i < m1; ++i) v[m1 + n + i - 1] = v[i] * static_cast<float>(i);
      for (int j = 0; j < n; ++j) v[2 * m1 + n - 1 + j] = v[m1 + j] * static_cast<float>(j + 1);
    }
    for (int64_t d = g * pl.C; d < (g + 1) * pl.C; ++d)
      for (int i = 0; i < rows; ++i) put(d, i, v[i]);
  }
  for (int64_t d = pl.D; d < pl.Dp; ++d)  // the lanes past D
    for (int i = 0; i < rows; ++i) put(d, i, 0.0f);
}

template <int M1T, int NT>
struct LaneCoefs {
  static constexpr int MA = M1T ? M1T : MAXC;
  static constexpr int NA = NT ? NT : MAXC;
  vf a[MA], da[MA], b[NA], db[NA];
  // blk: the chunk's block of the table (+ row0 * W): a, b, then (deriv) i a_i and j b_j as the table holds them
  LaneCoefs(const float* blk, int m1, int n, bool deriv) {
    for (int i = 0; i < m1; ++i) std::memcpy(&a[i], blk + i * W, sizeof(vf));
    for (int j = 0; j < n; ++j) std::memcpy(&b[j], blk + (m1 + j) * W, sizeof(vf));
    if (deriv) {
      for (int i = 0; i < m1 - 1; ++i) std::memcpy(&da[i], blk + (m1 + n + i) * W, sizeof(vf));
      for (int j = 0; j < n; ++j) std::memcpy(&db[j], blk + (2 * m1 + n - 1 + j) * W, sizeof(vf));
    }
  }
};

template <int M1T, int NT, bool FB>
inline vf lane_forward(const LaneCoefs<M1T, NT>& L, int m1r, int nr, vf x) {
  const int M1 = M1T ? M1T : m1r;
  const int N = NT ? NT : nr;
  vf p = L.a[M1 - 1];
  for (int k = M1 - 2; k >= 0; --k) p = p * x + L.a[k];
  const vf u = FB ? x : vabs(x);
  vf r = L.b[N - 1];
  for (int k = N - 2; k >= 0; --k) r = r * u + L.b[k];
  r = r * u;
  const vf q = splat(1.0f) + (FB ? vabs(r) : r);
  return p / q;
}

// dF/dx of one rational and what its coefficient gradients need (backward, the plain form)
struct LaneGrad {
  vf dfdx, u, s, inv_q, f_over_q;
};
template <int M1T, int NT, bool FB>
inline LaneGrad lane_grad(const LaneCoefs<M1T, NT>& L, int M1, int N, vf xv) {
  LaneGrad o;
  vf p = L.a[M1 - 1];
  for (int k = M1 - 2; k >= 0; --k) p = p * xv + L.a[k];
  vf dp = splat(0.0f);
  if (M1 > 1) {
    dp = L.da[M1 - 2];
    for (int k = M1 - 3; k >= 0; --k) dp = dp * xv + L.da[k];
  }
  o.u = FB ? xv : vabs(xv);
  vf rr = L.b[N - 1], dr = L.db[N - 1];
  for (int k = N - 2; k >= 0; --k) {
    rr = rr * o.u + L.b[k];
    dr = dr * o.u + L.db[k];
  }
  rr = rr * o.u;
  const vf q = splat(1.0f) + (FB ? vabs(rr) : rr);
  o.s = FB ? vsign(rr) : vsign(xv);
  o.inv_q = splat(1.0f) / q;
  o.f_over_q = p * o.inv_q * o.inv_q;
  o.dfdx = dp * o.inv_q - (o.s * dr) * o.f_over_q;
  return o;
}

// The residual form's dF/dx, run for F and for F0 (the same instruction sequence, so equal coefficients give equal
// bits), with what F's coefficient gradients need: inv_q and P/Q^2 = (P inv_q) inv_q are lane_grad's bit for bit
// (sign(v) w as a sign flip and a mask instead of a product with sign(v), which is exact either way), so they are the
// plain kernel's; dF/dx is (P' - sign Q'' F) / Q, one product after the division instead of two.
inline vf sign_times(vf v, vf w) {  // sign(v) * w for finite w, with sign(0) = 0 (NaN v: +-w, the result is NaN anyway)
  return (vf)((((vi)w) ^ ((vi)v & (int32_t)0x80000000)) & (vi)(v != splat(0.0f)));
}
struct LaneGradRes {
  vf dfdx, u, inv_q, f, sv;  // sv: the value whose sign is sign(x) (form A) or sign(R) (form B)
};
// A chunk's coefficients read where the table holds them (memory operands of the FMAs, no copy per tile): the
// residual kernels evaluate two rationals per row, whose coefficients do not fit the registers together.
template <int M1T, int NT>
struct CoefRef {
  const float* p;
  int m1, n;
  CoefRef(const float* blk, int m1r, int nr) : p(blk), m1(M1T ? M1T : m1r), n(NT ? NT : nr) {}
  static vf ld(const float* q) {
    vf v;
    std::memcpy(&v, q, sizeof(v));
    return v;
  }
  vf a(int i) const { return ld(p + i * W); }
  vf b(int j) const { return ld(p + (m1 + j) * W); }
  vf da(int i) const { return ld(p + (m1 + n + i) * W); }
  vf db(int j) const { return ld(p + (2 * m1 + n - 1 + j) * W); }
};

// v rounded, and opaque to the optimiser, which cannot contract the product that gave it into an FMA with the
// operation using it: F' and F0' end in a product, and an FMA on one side of F' - F0' would leave that product's
// rounding error where equal coefficients must give exactly 0
inline vf opaque(vf v) {
#if defined(__AVX512F__) || (defined(__AVX__) && NORA_W == 8)
  asm("" : "+v"(v));
#else
  asm("" : "+m"(v));
#endif
  return v;
}

template <int M1T, int NT, bool FB>
inline LaneGradRes lane_grad_res(const CoefRef<M1T, NT>& L, vf xv) {
  const int M1 = L.m1, N = L.n;
  LaneGradRes o;
  vf p = L.a(M1 - 1);
  for (int k = M1 - 2; k >= 0; --k) p = p * xv + L.a(k);
  vf dp = splat(0.0f);
  if (M1 > 1) {
    dp = L.da(M1 - 2);
    for (int k = M1 - 3; k >= 0; --k) dp = dp * xv + L.da(k);
  }
  o.u = FB ? xv : vabs(xv);
  vf rr = L.b(N - 1), dr = L.db(N - 1);
  for (int k = N - 2; k >= 0; --k) {
    rr = rr * o.u + L.b(k);
    dr = dr * o.u + L.db(k);
  }
  rr = rr * o.u;
  const vf q = splat(1.0f) + (FB ? vabs(rr) : rr);
  o.sv = FB ? rr : xv;
  o.inv_q = splat(1.0f) / q;
  o.f = p * o.inv_q;  // F; F / Q = f * inv_q is the plain kernel's p * inv_q * inv_q
  // F' = (P' - sign Q'' F) / Q: one product after the division (the plain kernel's P'/Q - sign Q'' P/Q^2 has two)
  o.dfdx = opaque((dp - sign_times(o.sv, dr) * o.f) * o.inv_q);
  return o;
}

// P and Q of one rational (the residual forward): lane_forward's before its division
template <int M1T, int NT, bool FB>
inline void lane_pq(const CoefRef<M1T, NT>& L, vf x, vf& p, vf& q) {
  const int M1 = L.m1, N = L.n;
  p = L.a(M1 - 1);
  for (int k = M1 - 2; k >= 0; --k) p = p * x + L.a(k);
  const vf u = FB ? x : vabs(x);
  vf r = L.b(N - 1);
  for (int k = N - 2; k >= 0; --k) r = r * u + L.b(k);
  r = r * u;
  q = splat(1.0f) + (FB ? vabs(r) : r);
}

// F(x) - F0(x) of the residual forward
template <int M1T, int NT, bool FB>
inline vf lane_forward_diff(const CoefRef<M1T, NT>& L, const CoefRef<M1T, NT>& L0, vf x) {
  vf p1, q1, p0, q0;
  lane_pq<M1T, NT, FB>(L, x, p1, q1);
  lane_pq<M1T, NT, FB>(L0, x, p0, q0);
  return p1 / q1 - p0 / q0;
}

// An item is walked in tiles of RT rows: for each tile, chunk by chunk along the item's channels, the chunk's
// coefficients (and, in backward, its accumulators) are loaded once and applied to the tile's RT rows, and
// the next tile's rows are prefetched (a row segment is CH_BLOCK channels, too short for the hardware
// prefetcher). Results of a chunk's rows are stored only after all of its rows were loaded: rows are D
// elements apart, so at D = 14336 (a multiple of 4 KB) a load of the next row has the same low 12 address
// bits as the store just before it, which the CPU treats as a possible dependence (4K aliasing) and stalls.
// RES: the residual form (the table then holds F0's coefficients after F's, act is the activation phi).
constexpr int64_t RT = 8;   // rows per tile, forward
constexpr int64_t RTB = 8;  // rows per tile, backward

template <int M1T, int NT, bool FB, bool RES, typename T>
void channel_forward_impl(const T* __restrict x, T* __restrict y, const float* tab, int m1r, int nr_,
                          const ChannelPlan& pl, int act) {
  const int m1 = M1T ? M1T : m1r;  // constants in the specialised kernels: coefficients in registers
  const int n = NT ? NT : nr_;
  const ChannelPlan P = pl;
  at::parallel_for(0, P.n_items, 1, [=](int64_t begin, int64_t end) {
    const T* __restrict xp = x;
    T* __restrict yp = y;
    const int64_t D = P.D;
    auto tile = [&](auto nr_tag, int64_t rt, int64_t rn, int64_t r1, int64_t c, int w) {
      constexpr int64_t NR = decltype(nr_tag)::value;  // rows, or 0: rn rows (< RT, the item's last tile)
      const int64_t nr = NR ? NR : rn;
      const float* blk = tab + (c / W) * (RES ? 2 : 1) * (m1 + n) * W;
      vf res[RT];
      if constexpr (!RES) {
        const LaneCoefs<M1T, NT> L(blk, m1, n, false);
#pragma GCC unroll 16
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t off = (rt + i) * D + c;
          if (rt + i + RT < r1) {
            __builtin_prefetch(xp + off + RT * D, 0, 3);
            __builtin_prefetch(yp + off + RT * D, 1, 3);
          }
          res[i] = lane_forward<M1T, NT, FB>(L, m1, n, load_lanes<T>(xp + off, w));
        }
      } else {
        const CoefRef<M1T, NT> L(blk, m1, n), L0(blk + (m1 + n) * W, m1, n);  // F's, F0's
        vf xs[RT];
#pragma GCC unroll 16
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t off = (rt + i) * D + c;
          if (rt + i + RT < r1) {
            __builtin_prefetch(xp + off + RT * D, 0, 3);
            __builtin_prefetch(yp + off + RT * D, 1, 3);
          }
          xs[i] = load_lanes<T>(xp + off, w);
          res[i] = lane_forward_diff<M1T, NT, FB>(L, L0, xs[i]);
        }
        add_phi(act, xs, res, nr);
      }
#pragma GCC unroll 16
      for (int64_t i = 0; i < nr; ++i) store_lanes<T>(yp + (rt + i) * D + c, res[i], w);
    };
    for (int64_t it = begin; it < end; ++it) {
      const int64_t rb = it / P.n_cb, cb = it % P.n_cb;
      const int64_t r0 = rb * P.row_block, r1 = std::min(P.rows, r0 + P.row_block);
      const int64_t c_end = std::min(D, (cb + 1) * CH_BLOCK);
      for (int64_t rt = r0; rt < r1; rt += RT) {
        const int64_t rn = std::min(RT, r1 - rt);
        for (int64_t c = cb * CH_BLOCK; c < c_end; c += W) {
          const int w = static_cast<int>(std::min<int64_t>(W, c_end - c));
          if constexpr (M1T == 0 && RES) tile(std::integral_constant<int64_t, 0>{}, rt, rn, r1, c, w);
          else if (rn == RT) tile(std::integral_constant<int64_t, RT>{}, rt, rn, r1, c, w);
          else tile(std::integral_constant<int64_t, 0>{}, rt, rn, r1, c, w);
        }
      }
    }
  });
}

// the coefficient-gradient terms of one row into the lanes' accumulators: g/Q x^i, then g P/Q^2 (sign) u^j
template <int M1T, int NT>
inline void accumulate(vf* acc, int M1, int N, vf gn, vf gd, vf xv, vf u) {
  vf pw = gn;
  for (int k = 0; k < M1; ++k) {
    acc[k] += pw;
    pw = pw * xv;
  }
  pw = gd * u;
  for (int k = 0; k < N; ++k) {
    acc[M1 + k] += pw;
    pw = pw * u;
  }
}

template <int M1T, int NT, bool FB, bool NC, bool RES, typename T>
void channel_backward_impl(const T* __restrict x, const T* __restrict go, T* __restrict gx, const float* tab,
                           int m1r, int nr_, const ChannelPlan& pl, float* __restrict partial /* [items, K, CH_BLOCK] */,
                           int act) {
  const int M1 = M1T ? M1T : m1r;
  const int N = NT ? NT : nr_;
  const int K = M1 + N;
  const ChannelPlan P = pl;
  at::parallel_for(0, P.n_items, 1, [=](int64_t begin, int64_t end) {
    const T* __restrict x_ = x;
    const T* __restrict go_ = go;
    T* __restrict gx_ = gx;
    const int64_t D = P.D;
    // one chunk (W channels) of one tile: acc are the chunk's per-lane accumulators (sums over its rows so far)
    auto tile = [&](auto nr_tag, int64_t rt, int64_t rn, int64_t r1, int64_t c, int w, vf* acc) {
      constexpr int64_t NR = decltype(nr_tag)::value;
      const int64_t nr = NR ? NR : rn;
      const int KD = 2 * K - 1;  // rows per coefficient set with the derivative rows
      const float* blk = tab + (c / W) * (RES ? 2 : 1) * KD * W;
      vf res[RTB];
      if constexpr (RES) {
        // F' and F0' row by row (coefficients read from the table, not copied per tile), then g phi'(x) + g (F' - F0')
        const CoefRef<M1T, NT> L(blk, M1, N), L0(blk + KD * W, M1, N);  // F's, F0's
        vf xs[RTB], gs[RTB];
#pragma GCC unroll 16
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t off = (rt + i) * D + c;
          if (rt + i + RTB < r1) {
            __builtin_prefetch(x_ + off + RTB * D, 0, 3);
            __builtin_prefetch(go_ + off + RTB * D, 0, 3);
            __builtin_prefetch(gx_ + off + RTB * D, 1, 3);
          }
          const vf xv = load_lanes<T>(x_ + off, w);
          const vf g = load_lanes<T>(go_ + off, w);
          const LaneGradRes o = lane_grad_res<M1T, NT, FB>(L, xv);
          const vf d0 = lane_grad_res<M1T, NT, FB>(L0, xv).dfdx;
          xs[i] = xv;
          gs[i] = g;
          res[i] = o.dfdx - d0;
          // the plain kernel's terms bit for bit: the same coefficient gradients
          const vf gn = g * o.inv_q;
          const vf f_over_q = o.f * o.inv_q;
          const vf gd = FB ? sign_times(o.sv, g * f_over_q) : g * f_over_q;
          accumulate<M1T, NT>(acc, M1, N, gn, gd, xv, o.u);
        }
        add_grad_phi(act, xs, gs, res, nr);
      } else {
        const LaneCoefs<M1T, NT> L(blk, M1, N, true);
#pragma GCC unroll 16
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t off = (rt + i) * D + c;
          if (rt + i + RTB < r1) {
            __builtin_prefetch(x_ + off + RTB * D, 0, 3);
            __builtin_prefetch(go_ + off + RTB * D, 0, 3);
            __builtin_prefetch(gx_ + off + RTB * D, 1, 3);
          }
          const vf xv = load_lanes<T>(x_ + off, w);
          const vf g = load_lanes<T>(go_ + off, w);
          const LaneGrad o = lane_grad<M1T, NT, FB>(L, M1, N, xv);
          res[i] = g * o.dfdx;
          if (NC) {
            const vf gn = g * o.inv_q;
            const vf gd = FB ? g * o.f_over_q * o.s : g * o.f_over_q;
            accumulate<M1T, NT>(acc, M1, N, gn, gd, xv, o.u);
          }
        }
      }
#pragma GCC unroll 16
      for (int64_t i = 0; i < nr; ++i) store_lanes<T>(gx_ + (rt + i) * D + c, res[i], w);
    };
    for (int64_t it = begin; it < end; ++it) {
      const int64_t rb = it / P.n_cb, cb = it % P.n_cb;
      const int64_t r0 = rb * P.row_block, r1 = std::min(P.rows, r0 + P.row_block);
      const int64_t c_begin = cb * CH_BLOCK, c_end = std::min(D, c_begin + CH_BLOCK);
      // the item's per-channel accumulators live in its partial-sum slice ([K, CH_BLOCK] floats, L1-resident);
      // every lane sums its channel's rows in row order
      float* __restrict item_acc = NC ? partial + (it * K) * CH_BLOCK : nullptr;
      for (int64_t rt = r0; rt < r1; rt += RTB) {
        const int64_t rn = std::min(RTB, r1 - rt);
        for (int64_t c = c_begin; c < c_end; c += W) {
          const int w = static_cast<int>(std::min<int64_t>(W, c_end - c));
          vf acc[LaneCoefs<M1T, NT>::MA + LaneCoefs<M1T, NT>::NA];
          if (NC) {
            for (int k = 0; k < K; ++k) {
              if (rt == r0) acc[k] = splat(0.0f);
              else std::memcpy(&acc[k], item_acc + k * CH_BLOCK + (c - c_begin), sizeof(vf));
            }
          }
          if constexpr (M1T == 0 && RES) tile(std::integral_constant<int64_t, 0>{}, rt, rn, r1, c, w, acc);
          else if (rn == RTB) tile(std::integral_constant<int64_t, RTB>{}, rt, rn, r1, c, w, acc);
          else tile(std::integral_constant<int64_t, 0>{}, rt, rn, r1, c, w, acc);
          if (NC) {  // whole vectors: CH_BLOCK is a multiple of W, lanes past the block's width are ignored
            for (int k = 0; k < K; ++k) std::memcpy(item_acc + k * CH_BLOCK + (c - c_begin), &acc[k], sizeof(vf));
          }
        }
      }
    }
  });
}

// The per-channel partials, summed per channel over the row blocks in order (channel blocks in parallel: each
// channel's sum has one fixed order), then over each group's channels in order, in float64, into the outputs
// (grad_numerator (G, m1), grad_denominator (G, n) with the sign of b_j in form A).
void channel_reduce(const float* partial, int m1, int n, int64_t G, const ChannelPlan& pl, const float* pb,
                    bool form_b, float* oa, float* ob, double* chan /* [K, D] */) {
  const int K = m1 + n;
  const ChannelPlan P = pl;
  at::parallel_for(0, P.n_cb, 1, [=](int64_t begin, int64_t end) {
    for (int64_t cb = begin; cb < end; ++cb) {
      const int64_t c_begin = cb * CH_BLOCK, width = std::min(P.D, c_begin + CH_BLOCK) - c_begin;
      for (int k = 0; k < K; ++k) {
        double* dst = chan + k * P.D + c_begin;
        for (int64_t l = 0; l < width; ++l) dst[l] = 0.0;
        for (int64_t rb = 0; rb < P.n_rb; ++rb) {
          const float* src = partial + ((rb * P.n_cb + cb) * K + k) * CH_BLOCK;
          for (int64_t l = 0; l < width; ++l) dst[l] += src[l];
        }
      }
    }
  });
  for (int64_t g = 0; g < G; ++g)
    for (int k = 0; k < K; ++k) {
      double acc = 0.0;
      for (int64_t d = g * pl.C; d < (g + 1) * pl.C; ++d) acc += chan[k * pl.D + d];
      if (k < m1) {
        oa[g * m1 + k] = static_cast<float>(acc);
      } else {
        const int j = k - m1;
        double v = -acc;
        if (!form_b) {
          const float bj = pb[g * n + j];
          v *= bj > 0.0f ? 1.0 : (bj < 0.0f ? -1.0 : 0.0);
        }
        ob[g * n + j] = static_cast<float>(v);
      }
    }
}

// ------------------------------------------------------------------ entry points
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

void check(int64_t numel, int64_t D, int64_t G, int m1, int n) {
  if (m1 < 1 || m1 > MAXC) throw std::invalid_argument("numerator degree out of range");
  if (n < 1 || n > MAXC) throw std::invalid_argument("denominator degree out of range");
  if (D <= 0 || G <= 0 || D % G != 0 || numel % D != 0)
    throw std::invalid_argument("channel dimension must be divisible by the number of groups");
}

template <bool RES, typename T>
void channel_forward_typed(uintptr_t x, uintptr_t y, const float* tab, int m1, int n, bool form_b,
                           const ChannelPlan& pl, int act) {
  const T* px = reinterpret_cast<const T*>(x);
  T* py = reinterpret_cast<T*>(y);
  if (m1 == 6 && n == 4) {
    if (form_b) channel_forward_impl<6, 4, true, RES>(px, py, tab, m1, n, pl, act);
    else channel_forward_impl<6, 4, false, RES>(px, py, tab, m1, n, pl, act);
  } else if constexpr (RES && !std::is_same<T, float>::value) {
    throw std::invalid_argument("the residual form's generic-degree kernels take float32 (upcast on the Python side)");
  } else {
    if (form_b) channel_forward_impl<0, 0, true, RES>(px, py, tab, m1, n, pl, act);
    else channel_forward_impl<0, 0, false, RES>(px, py, tab, m1, n, pl, act);
  }
}

// the residual form always accumulates the coefficient gradients (into scratch when they are not asked for):
// half the instantiations, and a backward without them is rare
template <bool RES, typename T>
void channel_backward_typed(uintptr_t x, uintptr_t go, uintptr_t gx, const float* tab, int m1, int n,
                            bool form_b, bool nc, const ChannelPlan& pl, float* pp, int act) {
  const T* px = reinterpret_cast<const T*>(x);
  const T* pg = reinterpret_cast<const T*>(go);
  T* pgx = reinterpret_cast<T*>(gx);
#define NORA_CBWD(M1T, NT, FB, NC) \
  channel_backward_impl<M1T, NT, FB, NC, RES, T>(px, pg, pgx, tab, m1, n, pl, pp, act)
  if constexpr (RES) {
    if (m1 == 6 && n == 4) {
      if (form_b) NORA_CBWD(6, 4, true, true); else NORA_CBWD(6, 4, false, true);
    } else if constexpr (!std::is_same<T, float>::value) {
      throw std::invalid_argument("the residual form's generic-degree kernels take float32 (upcast on the Python side)");
    } else {
      if (form_b) NORA_CBWD(0, 0, true, true); else NORA_CBWD(0, 0, false, true);
    }
  } else if (m1 == 6 && n == 4) {
    if (form_b) { if (nc) NORA_CBWD(6, 4, true, true); else NORA_CBWD(6, 4, true, false); }
    else { if (nc) NORA_CBWD(6, 4, false, true); else NORA_CBWD(6, 4, false, false); }
  } else {
    if (form_b) { if (nc) NORA_CBWD(0, 0, true, true); else NORA_CBWD(0, 0, true, false); }
    else { if (nc) NORA_CBWD(0, 0, false, true); else NORA_CBWD(0, 0, false, false); }
  }
#undef NORA_CBWD
}

// the coefficient table: F's rows, then (residual form) F0's; deriv (backward): each set with its derivative rows
float* channel_table(std::vector<float>& buf, uintptr_t a, uintptr_t b, uintptr_t fa, uintptr_t fb, int m1, int n,
                     bool form_b, bool res, bool deriv, const ChannelPlan& cp) {
  const int per_set = table_rows(m1, n, deriv);
  const int R = per_set * (res ? 2 : 1);
  float* tab = scratch(buf, static_cast<size_t>(R * cp.Dp));
  fill_channel_table(tab, reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(b), m1, n, form_b, cp, R, 0,
                     deriv);
  if (res)
    fill_channel_table(tab, reinterpret_cast<const float*>(fa), reinterpret_cast<const float*>(fb), m1, n, form_b, cp,
                       R, per_set, deriv);
  return tab;
}

void check_act(int act) {
  if (act < kNone || act > kRelu) throw std::invalid_argument("unknown activation code");
}

void forward_any(uintptr_t x, uintptr_t y, uintptr_t a, uintptr_t b, uintptr_t fa, uintptr_t fb, int64_t numel,
                 int64_t D, int64_t G, int m1, int n, int dtype, bool form_b, bool res, int act) {
  check(numel, D, G, m1, n);
  if (numel == 0) return;
  const ChannelPlan cp(numel, D, G);
  static thread_local std::vector<float> tab_buf;
  const float* tab = channel_table(tab_buf, a, b, fa, fb, m1, n, form_b, res, false, cp);
  py::gil_scoped_release no_gil;
#define NORA_FWD(T)                                                           \
  (res ? channel_forward_typed<true, T>(x, y, tab, m1, n, form_b, cp, act) \
       : channel_forward_typed<false, T>(x, y, tab, m1, n, form_b, cp, act))
  switch (dtype) {
    case kF32: NORA_FWD(float); break;
    case kBF16: NORA_FWD(c10::BFloat16); break;
    case kF16: NORA_FWD(c10::Half); break;
    default: throw std::invalid_argument("unsupported dtype code");
  }
#undef NORA_FWD
}

void backward_any(uintptr_t x, uintptr_t go, uintptr_t gx, uintptr_t a, uintptr_t b, uintptr_t fa, uintptr_t fb,
                  uintptr_t ga, uintptr_t gb, int64_t numel, int64_t D, int64_t G, int m1, int n, int dtype,
                  bool form_b, bool need_coef, bool res, int act) {
  check(numel, D, G, m1, n);
  const int K = m1 + n;
  const float* pb = reinterpret_cast<const float*>(b);
  const ChannelPlan cp(numel, D, G);
  static thread_local std::vector<float> tab_buf, partial_buf;
  static thread_local std::vector<double> chan_buf;
  const float* tab = channel_table(tab_buf, a, b, fa, fb, m1, n, form_b, res, true, cp);
  const bool acc = need_coef || res;  // the residual kernels always accumulate
  float* pp = acc ? scratch(partial_buf, static_cast<size_t>(cp.n_items * K * CH_BLOCK)) : nullptr;
  {
    py::gil_scoped_release no_gil;
    if (numel > 0) {
#define NORA_BWD(T)                                                                           \
  (res ? channel_backward_typed<true, T>(x, go, gx, tab, m1, n, form_b, need_coef, cp, pp, act) \
       : channel_backward_typed<false, T>(x, go, gx, tab, m1, n, form_b, need_coef, cp, pp, act))
      switch (dtype) {
        case kF32: NORA_BWD(float); break;
        case kBF16: NORA_BWD(c10::BFloat16); break;
        case kF16: NORA_BWD(c10::Half); break;
        default: throw std::invalid_argument("unsupported dtype code");
      }
#undef NORA_BWD
    }
    if (need_coef)
      channel_reduce(pp, m1, n, G, cp, pb, form_b, reinterpret_cast<float*>(ga), reinterpret_cast<float*>(gb),
                     scratch(chan_buf, static_cast<size_t>(K * D)));
  }
  release_large(partial_buf);
  release_large(chan_buf);
}

void forward(uintptr_t x, uintptr_t y, uintptr_t a, uintptr_t b, int64_t numel, int64_t D, int64_t G,
             int m1, int n, int dtype, bool form_b) {
  forward_any(x, y, a, b, 0, 0, numel, D, G, m1, n, dtype, form_b, false, kNone);
}

// grad_x into gx; if need_coef, grad_numerator (G, m1) into ga and grad_denominator (G, n) into gb
// (float32, summed over every element of each group).
void backward(uintptr_t x, uintptr_t go, uintptr_t gx, uintptr_t a, uintptr_t b, uintptr_t ga,
              uintptr_t gb, int64_t numel, int64_t D, int64_t G, int m1, int n, int dtype,
              bool form_b, bool need_coef) {
  backward_any(x, go, gx, a, b, 0, 0, ga, gb, numel, D, G, m1, n, dtype, form_b, need_coef, false, kNone);
}

// the residual form: y = phi(x) + (F(x) - F0(x)); fa, fb: the fit's coefficients (F0), shaped as a, b
void residual_forward(uintptr_t x, uintptr_t y, uintptr_t a, uintptr_t b, uintptr_t fa, uintptr_t fb, int64_t numel,
                      int64_t D, int64_t G, int m1, int n, int dtype, bool form_b, int act) {
  check_act(act);
  forward_any(x, y, a, b, fa, fb, numel, D, G, m1, n, dtype, form_b, true, act);
}

// grad_x = g phi'(x) + g (F'(x) - F0'(x)); the coefficient gradients are F's, as backward's
void residual_backward(uintptr_t x, uintptr_t go, uintptr_t gx, uintptr_t a, uintptr_t b, uintptr_t fa, uintptr_t fb,
                       uintptr_t ga, uintptr_t gb, int64_t numel, int64_t D, int64_t G, int m1, int n, int dtype,
                       bool form_b, int act, bool need_coef) {
  check_act(act);
  backward_any(x, go, gx, a, b, fa, fb, ga, gb, numel, D, G, m1, n, dtype, form_b, need_coef, true, act);
}

py::tuple plan_info(int64_t numel, int64_t D, int64_t G) {
  const ChannelPlan cp(numel, D, G);
  return py::make_tuple(cp.n_items, cp.row_block, cp.n_cb, CH_BLOCK);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nora: fused CPU kernels for group-wise rational activations (raw-pointer interface; "
            "use nora.kernels.cpu)";
  m.def("forward", &forward, "y = P(x)/Q(x)", py::arg("x"), py::arg("y"), py::arg("numerator"),
        py::arg("denominator"), py::arg("numel"), py::arg("D"), py::arg("G"), py::arg("m1"),
        py::arg("n"), py::arg("dtype"), py::arg("form_b"));
  m.def("backward", &backward, "grad_x and coefficient gradients", py::arg("x"), py::arg("grad_out"),
        py::arg("grad_x"), py::arg("numerator"), py::arg("denominator"), py::arg("grad_numerator"),
        py::arg("grad_denominator"), py::arg("numel"), py::arg("D"), py::arg("G"), py::arg("m1"),
        py::arg("n"), py::arg("dtype"), py::arg("form_b"), py::arg("need_coef"));
  m.def("residual_forward", &residual_forward, "y = phi(x) + (P(x)/Q(x) - P0(x)/Q0(x))", py::arg("x"),
        py::arg("y"), py::arg("numerator"), py::arg("denominator"), py::arg("fit_numerator"),
        py::arg("fit_denominator"), py::arg("numel"), py::arg("D"), py::arg("G"), py::arg("m1"), py::arg("n"),
        py::arg("dtype"), py::arg("form_b"), py::arg("activation"));
  m.def("residual_backward", &residual_backward, "grad_x and the coefficient gradients of P/Q", py::arg("x"),
        py::arg("grad_out"), py::arg("grad_x"), py::arg("numerator"), py::arg("denominator"),
        py::arg("fit_numerator"), py::arg("fit_denominator"), py::arg("grad_numerator"),
        py::arg("grad_denominator"), py::arg("numel"), py::arg("D"), py::arg("G"), py::arg("m1"), py::arg("n"),
        py::arg("dtype"), py::arg("form_b"), py::arg("activation"), py::arg("need_coef"));
  m.def("plan_info", &plan_info, "(n_items, rows_per_item, channel_blocks, channels_per_block)");
  m.attr("MAXC") = MAXC;
  m.attr("ITEM_ELEMS") = CH_ITEM_ELEMS;
  m.attr("ACTIVATIONS") = py::make_tuple("none", "gelu", "gelu_tanh", "silu", "relu");  // the codes' order
}
