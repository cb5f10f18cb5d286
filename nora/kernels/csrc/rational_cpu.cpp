// Fused CPU kernels for the group-wise rational activation F(x) = P(x) / Q(x).
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

#if defined(__F16C__)
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

template <typename T>
inline vf load_lanes(const T* p, int w) {
  alignas(64) float f[W] = {};
  if constexpr (std::is_same<T, float>::value) {
    if (w == W) {
      vf v;
      std::memcpy(&v, p, sizeof(v));
      return v;
    }
    for (int l = 0; l < w; ++l) f[l] = p[l];
  } else {
    load_block<T>(p, f, w);
  }
  vf v;
  std::memcpy(&v, f, sizeof(v));
  return v;
}

template <typename T>
inline void store_lanes(T* p, vf v, int w) {
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
}

struct ChannelPlan {
  int64_t rows = 0, D = 0, C = 0, Dp = 0;  // Dp: D rounded up to a multiple of W (table stride)
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

// per-channel coefficient table [(m1 + n), Dp]: a_0..a_m, then b_1..b_n as evaluated (|b_j| in form A)
void fill_channel_table(float* tab, const float* a, const float* b, int m1, int n, bool form_b,
                        const ChannelPlan& pl) {
  for (int i = 0; i < m1 + n; ++i) {
    float* row = tab + i * pl.Dp;
    for (int64_t d = 0; d < pl.D; ++d) {
      const int64_t g = d / pl.C;
      row[d] = i < m1 ? a[g * m1 + i] : (form_b ? b[g * n + (i - m1)] : std::fabs(b[g * n + (i - m1)]));
    }
    for (int64_t d = pl.D; d < pl.Dp; ++d) row[d] = 0.0f;
  }
}

template <int M1T, int NT>
struct LaneCoefs {
  static constexpr int MA = M1T ? M1T : MAXC;
  static constexpr int NA = NT ? NT : MAXC;
  vf a[MA], da[MA], b[NA], db[NA];
  LaneCoefs(const float* tab, int64_t Dp, int64_t c, int m1, int n, bool deriv) {
    for (int i = 0; i < m1; ++i) {
      std::memcpy(&a[i], tab + i * Dp + c, sizeof(vf));
      if (deriv && i >= 1) da[i - 1] = a[i] * static_cast<float>(i);
    }
    for (int j = 0; j < n; ++j) {
      std::memcpy(&b[j], tab + (m1 + j) * Dp + c, sizeof(vf));
      if (deriv) db[j] = b[j] * static_cast<float>(j + 1);
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

// An item is walked in tiles of RT rows: for each tile, chunk by chunk along the item's channels, the chunk's
// coefficients (and, in backward, its accumulators) are loaded once and applied to the tile's RT rows, and
// the next tile's rows are prefetched (a row segment is CH_BLOCK channels, too short for the hardware
// prefetcher). Results of a chunk's rows are stored only after all of its rows were loaded: rows are D
// elements apart, so at D = 14336 (a multiple of 4 KB) a load of the next row has the same low 12 address
// bits as the store just before it, which the CPU treats as a possible dependence (4K aliasing) and stalls.
constexpr int64_t RT = 8;   // rows per tile, forward
constexpr int64_t RTB = 8;  // rows per tile, backward

template <int M1T, int NT, bool FB, typename T>
void channel_forward_impl(const T* __restrict x, T* __restrict y, const float* tab, int m1, int n,
                          const ChannelPlan& pl) {
  const ChannelPlan P = pl;
  at::parallel_for(0, P.n_items, 1, [=](int64_t begin, int64_t end) {
    const T* __restrict xp = x;
    T* __restrict yp = y;
    const int64_t D = P.D, Dp = P.Dp;
    auto tile = [&](auto nr_tag, int64_t rt, int64_t rn, int64_t r1, int64_t c, int w) {
      constexpr int64_t NR = decltype(nr_tag)::value;  // rows, or 0: rn rows (< RT, the item's last tile)
      const int64_t nr = NR ? NR : rn;
      const LaneCoefs<M1T, NT> L(tab, Dp, c, m1, n, false);
      vf res[RT];
#pragma GCC unroll 16
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t off = (rt + i) * D + c;
        if (rt + i + RT < r1) {
          __builtin_prefetch(xp + off + RT * D, 0, 3);
          __builtin_prefetch(yp + off + RT * D, 1, 3);
        }
        res[i] = lane_forward<M1T, NT, FB>(L, m1, n, load_lanes<T>(xp + off, w));
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
          if (rn == RT) tile(std::integral_constant<int64_t, RT>{}, rt, rn, r1, c, w);
          else tile(std::integral_constant<int64_t, 0>{}, rt, rn, r1, c, w);
        }
      }
    }
  });
}

template <int M1T, int NT, bool FB, bool NC, typename T>
void channel_backward_impl(const T* __restrict x, const T* __restrict go, T* __restrict gx, const float* tab,
                           int m1r, int nr_, const ChannelPlan& pl, float* __restrict partial /* [items, K, CH_BLOCK] */) {
  const int M1 = M1T ? M1T : m1r;
  const int N = NT ? NT : nr_;
  const int K = M1 + N;
  const ChannelPlan P = pl;
  at::parallel_for(0, P.n_items, 1, [=](int64_t begin, int64_t end) {
    const T* __restrict x_ = x;
    const T* __restrict go_ = go;
    T* __restrict gx_ = gx;
    const int64_t D = P.D, Dp = P.Dp;
    // one chunk (W channels) of one tile: acc are the chunk's per-lane accumulators (sums over its rows so far)
    auto tile = [&](auto nr_tag, int64_t rt, int64_t rn, int64_t r1, int64_t c, int w, vf* acc) {
      constexpr int64_t NR = decltype(nr_tag)::value;
      const int64_t nr = NR ? NR : rn;
      const LaneCoefs<M1T, NT> L(tab, Dp, c, M1, N, true);
      vf res[RTB];
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
        vf p = L.a[M1 - 1];
        for (int k = M1 - 2; k >= 0; --k) p = p * xv + L.a[k];
        vf dp = splat(0.0f);
        if (M1 > 1) {
          dp = L.da[M1 - 2];
          for (int k = M1 - 3; k >= 0; --k) dp = dp * xv + L.da[k];
        }
        const vf u = FB ? xv : vabs(xv);
        vf rr = L.b[N - 1], dr = L.db[N - 1];
        for (int k = N - 2; k >= 0; --k) {
          rr = rr * u + L.b[k];
          dr = dr * u + L.db[k];
        }
        rr = rr * u;
        const vf q = splat(1.0f) + (FB ? vabs(rr) : rr);
        const vf s = FB ? vsign(rr) : vsign(xv);
        const vf inv_q = splat(1.0f) / q;
        const vf f_over_q = p * inv_q * inv_q;
        res[i] = g * (dp * inv_q - (s * dr) * f_over_q);
        if (NC) {
          const vf gn = g * inv_q;
          const vf gd = FB ? g * f_over_q * s : g * f_over_q;
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
          if (rn == RTB) tile(std::integral_constant<int64_t, RTB>{}, rt, rn, r1, c, w, acc);
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

template <typename T>
void channel_forward_typed(uintptr_t x, uintptr_t y, const float* tab, int m1, int n, bool form_b,
                           const ChannelPlan& pl) {
  const T* px = reinterpret_cast<const T*>(x);
  T* py = reinterpret_cast<T*>(y);
  if (m1 == 6 && n == 4) {
    if (form_b) channel_forward_impl<6, 4, true>(px, py, tab, m1, n, pl);
    else channel_forward_impl<6, 4, false>(px, py, tab, m1, n, pl);
  } else {
    if (form_b) channel_forward_impl<0, 0, true>(px, py, tab, m1, n, pl);
    else channel_forward_impl<0, 0, false>(px, py, tab, m1, n, pl);
  }
}

template <typename T>
void channel_backward_typed(uintptr_t x, uintptr_t go, uintptr_t gx, const float* tab, int m1, int n,
                            bool form_b, bool nc, const ChannelPlan& pl, float* pp) {
  const T* px = reinterpret_cast<const T*>(x);
  const T* pg = reinterpret_cast<const T*>(go);
  T* pgx = reinterpret_cast<T*>(gx);
#define NORA_CBWD(M1T, NT, FB, NC) channel_backward_impl<M1T, NT, FB, NC, T>(px, pg, pgx, tab, m1, n, pl, pp)
  if (m1 == 6 && n == 4) {
    if (form_b) { if (nc) NORA_CBWD(6, 4, true, true); else NORA_CBWD(6, 4, true, false); }
    else { if (nc) NORA_CBWD(6, 4, false, true); else NORA_CBWD(6, 4, false, false); }
  } else {
    if (form_b) { if (nc) NORA_CBWD(0, 0, true, true); else NORA_CBWD(0, 0, true, false); }
    else { if (nc) NORA_CBWD(0, 0, false, true); else NORA_CBWD(0, 0, false, false); }
  }
#undef NORA_CBWD
}

void forward(uintptr_t x, uintptr_t y, uintptr_t a, uintptr_t b, int64_t numel, int64_t D, int64_t G,
             int m1, int n, int dtype, bool form_b) {
  check(numel, D, G, m1, n);
  if (numel == 0) return;
  const ChannelPlan cp(numel, D, G);
  static thread_local std::vector<float> tab_buf;
  float* tab = scratch(tab_buf, static_cast<size_t>((m1 + n) * cp.Dp));
  fill_channel_table(tab, reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(b), m1, n, form_b, cp);
  py::gil_scoped_release no_gil;
  switch (dtype) {
    case kF32: channel_forward_typed<float>(x, y, tab, m1, n, form_b, cp); break;
    case kBF16: channel_forward_typed<c10::BFloat16>(x, y, tab, m1, n, form_b, cp); break;
    case kF16: channel_forward_typed<c10::Half>(x, y, tab, m1, n, form_b, cp); break;
    default: throw std::invalid_argument("unsupported dtype code");
  }
}

// grad_x into gx; if need_coef, grad_numerator (G, m1) into ga and grad_denominator (G, n) into gb
// (float32, summed over every element of each group).
void backward(uintptr_t x, uintptr_t go, uintptr_t gx, uintptr_t a, uintptr_t b, uintptr_t ga,
              uintptr_t gb, int64_t numel, int64_t D, int64_t G, int m1, int n, int dtype,
              bool form_b, bool need_coef) {
  check(numel, D, G, m1, n);
  const int K = m1 + n;
  const float* pa = reinterpret_cast<const float*>(a);
  const float* pb = reinterpret_cast<const float*>(b);
  const ChannelPlan cp(numel, D, G);
  static thread_local std::vector<float> tab_buf, partial_buf;
  static thread_local std::vector<double> chan_buf;
  float* tab = scratch(tab_buf, static_cast<size_t>((m1 + n) * cp.Dp));
  fill_channel_table(tab, pa, pb, m1, n, form_b, cp);
  float* pp = need_coef ? scratch(partial_buf, static_cast<size_t>(cp.n_items * K * CH_BLOCK)) : nullptr;
  {
    py::gil_scoped_release no_gil;
    if (numel > 0) {
      switch (dtype) {
        case kF32: channel_backward_typed<float>(x, go, gx, tab, m1, n, form_b, need_coef, cp, pp); break;
        case kBF16: channel_backward_typed<c10::BFloat16>(x, go, gx, tab, m1, n, form_b, need_coef, cp, pp); break;
        case kF16: channel_backward_typed<c10::Half>(x, go, gx, tab, m1, n, form_b, need_coef, cp, pp); break;
        default: throw std::invalid_argument("unsupported dtype code");
      }
    }
    if (need_coef)
      channel_reduce(pp, m1, n, G, cp, pb, form_b, reinterpret_cast<float*>(ga), reinterpret_cast<float*>(gb),
                     scratch(chan_buf, static_cast<size_t>(K * D)));
  }
  release_large(partial_buf);
  release_large(chan_buf);
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
  m.def("plan_info", &plan_info, "(n_items, rows_per_item, channel_blocks, channels_per_block)");
  m.attr("MAXC") = MAXC;
  m.attr("ITEM_ELEMS") = CH_ITEM_ELEMS;
}
