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
// fixed-size items of rows x channels (independent of the thread count and of G), each item is
// walked W channels at a time (one SIMD register, each lane with the coefficients of its own
// channel's group, from a per-channel table) down all of its rows. In backward the m + 1 + n
// coefficient-gradient terms accumulate per lane in registers over the rows and are stored once
// per item into per-channel partial sums; after the parallel loop those are summed per channel
// over the items in order, then over each group's channels in order, in float64: bit-identical
// run after run and for any thread count, no atomics, and no per-group work inside the loop (the
// earlier per-group runs were too short to vectorise once C = D / G got small).
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

struct Coefs {
  float a[MAXC];   // a_0 .. a_m
  float b[MAXC];   // b[j-1] = |b_j| (form A) or b_j (form B)
};

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
// Items of CH_ITEM_ELEMS / CH_BLOCK rows x CH_BLOCK channels (any number of groups), walked chunk by
// chunk: W adjacent channels, every row of the item. Each lane holds its own channel's coefficients
// (loaded once per chunk from the per-channel table), the W-lane accumulators of the m + 1 + n
// coefficient-gradient terms stay in registers over the rows and are stored once per chunk into the
// item's per-channel partial sums (float). After the parallel loop the partials are summed per channel
// over the row blocks in order and then over each group's channels in order, in float64.
constexpr int W = 8;                       // lanes (one AVX2 register of float)
constexpr int64_t CH_BLOCK = 256;           // channels per item
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
  alignas(32) float f[W] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
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
  alignas(32) float f[W];
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

// per-channel coefficient table [(m1 + n), Dp]: a_0..a_m, then b_1..b_n as evaluated (|b_j| in form A)
std::vector<float> channel_table(const std::vector<Coefs>& cfs, int m1, int n, const ChannelPlan& pl) {
  std::vector<float> tab(static_cast<size_t>((m1 + n) * pl.Dp), 0.0f);
  for (int64_t d = 0; d < pl.D; ++d) {
    const Coefs& cf = cfs[d / pl.C];
    for (int i = 0; i < m1; ++i) tab[i * pl.Dp + d] = cf.a[i];
    for (int j = 0; j < n; ++j) tab[(m1 + j) * pl.Dp + d] = cf.b[j];
  }
  return tab;
}

template <int M1T, int NT>
struct LaneCoefs {
  static constexpr int MA = M1T ? M1T : MAXC;
  static constexpr int NA = NT ? NT : MAXC;
  vf a[MA], da[MA], b[NA], db[NA];
  LaneCoefs(const float* tab, int64_t Dp, int64_t c, int m1, int n) {
    for (int i = 0; i < m1; ++i) {
      std::memcpy(&a[i], tab + i * Dp + c, sizeof(vf));
      if (i >= 1) da[i - 1] = a[i] * static_cast<float>(i);
    }
    for (int j = 0; j < n; ++j) {
      std::memcpy(&b[j], tab + (m1 + j) * Dp + c, sizeof(vf));
      db[j] = b[j] * static_cast<float>(j + 1);
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

template <int M1T, int NT, bool FB, typename T>
void channel_forward_impl(const T* __restrict x, T* __restrict y, const float* tab, int m1, int n,
                          const ChannelPlan& pl) {
  at::parallel_for(0, pl.n_items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t rb = it / pl.n_cb, cb = it % pl.n_cb;
      const int64_t r0 = rb * pl.row_block, r1 = std::min(pl.rows, r0 + pl.row_block);
      const int64_t c_end = std::min(pl.D, (cb + 1) * CH_BLOCK);
      for (int64_t c = cb * CH_BLOCK; c < c_end; c += W) {
        const int w = static_cast<int>(std::min<int64_t>(W, c_end - c));
        const LaneCoefs<M1T, NT> L(tab, pl.Dp, c, m1, n);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t off = r * pl.D + c;
          store_lanes<T>(y + off, lane_forward<M1T, NT, FB>(L, m1, n, load_lanes<T>(x + off, w)), w);
        }
      }
    }
  });
}

template <int M1T, int NT, bool FB, bool NC, typename T>
void channel_backward_impl(const T* __restrict x, const T* __restrict go, T* __restrict gx, const float* tab,
                           int m1r, int nr, const ChannelPlan& pl, float* __restrict partial /* [items, K, CH_BLOCK] */) {
  const int M1 = M1T ? M1T : m1r;
  const int N = NT ? NT : nr;
  const int K = M1 + N;
  at::parallel_for(0, pl.n_items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t rb = it / pl.n_cb, cb = it % pl.n_cb;
      const int64_t r0 = rb * pl.row_block, r1 = std::min(pl.rows, r0 + pl.row_block);
      const int64_t c_begin = cb * CH_BLOCK, c_end = std::min(pl.D, c_begin + CH_BLOCK);
      for (int64_t c = c_begin; c < c_end; c += W) {
        const int w = static_cast<int>(std::min<int64_t>(W, c_end - c));
        const LaneCoefs<M1T, NT> L(tab, pl.Dp, c, M1, N);
        vf acc[LaneCoefs<M1T, NT>::MA + LaneCoefs<M1T, NT>::NA];
        for (int k = 0; k < K; ++k) acc[k] = splat(0.0f);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t off = r * pl.D + c;
          const vf xv = load_lanes<T>(x + off, w);
          const vf g = load_lanes<T>(go + off, w);
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
          store_lanes<T>(gx + off, g * (dp * inv_q - (s * dr) * f_over_q), w);
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
        if (NC) {
          float* out = partial + (it * K) * CH_BLOCK + (c - c_begin);
          for (int k = 0; k < K; ++k) {
            alignas(32) float f[W];
            std::memcpy(f, &acc[k], sizeof(f));
            for (int l = 0; l < w; ++l) out[k * CH_BLOCK + l] = f[l];
          }
        }
      }
    }
  });
}

// the per-channel partials, summed over row blocks per channel, then over each group's channels (float64)
std::vector<double> channel_reduce(const std::vector<float>& partial, int K, int64_t G, const ChannelPlan& pl) {
  std::vector<double> chan(static_cast<size_t>(K * pl.D), 0.0);
  for (int64_t it = 0; it < pl.n_items; ++it) {
    const int64_t cb = it % pl.n_cb;
    const int64_t c_begin = cb * CH_BLOCK, width = std::min(pl.D, c_begin + CH_BLOCK) - c_begin;
    for (int k = 0; k < K; ++k) {
      const float* src = partial.data() + (it * K + k) * CH_BLOCK;
      double* dst = chan.data() + k * pl.D + c_begin;
      for (int64_t l = 0; l < width; ++l) dst[l] += src[l];
    }
  }
  std::vector<double> tot(static_cast<size_t>(G * K), 0.0);
  for (int64_t g = 0; g < G; ++g)
    for (int k = 0; k < K; ++k) {
      double acc = 0.0;
      for (int64_t d = g * pl.C; d < (g + 1) * pl.C; ++d) acc += chan[k * pl.D + d];
      tot[g * K + k] = acc;
    }
  return tot;
}

// ------------------------------------------------------------------ entry points
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

std::vector<Coefs> make_coefs(const float* a, const float* b, int64_t G, int m1, int n, bool form_b) {
  std::vector<Coefs> cfs(G);
  for (int64_t g = 0; g < G; ++g) {
    Coefs& c = cfs[g];
    std::memset(&c, 0, sizeof(c));
    for (int i = 0; i < m1; ++i) c.a[i] = a[g * m1 + i];
    for (int j = 0; j < n; ++j) c.b[j] = form_b ? b[g * n + j] : std::fabs(b[g * n + j]);
  }
  return cfs;
}

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
  const auto cfs = make_coefs(reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(b), G,
                              m1, n, form_b);
  const ChannelPlan cp(numel, D, G);
  const auto tab = channel_table(cfs, m1, n, cp);
  py::gil_scoped_release no_gil;
  switch (dtype) {
    case kF32: channel_forward_typed<float>(x, y, tab.data(), m1, n, form_b, cp); break;
    case kBF16: channel_forward_typed<c10::BFloat16>(x, y, tab.data(), m1, n, form_b, cp); break;
    case kF16: channel_forward_typed<c10::Half>(x, y, tab.data(), m1, n, form_b, cp); break;
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
  const auto cfs = make_coefs(pa, pb, G, m1, n, form_b);
  const ChannelPlan cp(numel, D, G);
  const auto tab = channel_table(cfs, m1, n, cp);
  std::vector<float> partial(need_coef ? static_cast<size_t>(cp.n_items * K * CH_BLOCK) : 0, 0.0f);
  {
    py::gil_scoped_release no_gil;
    if (numel > 0) {
      float* pp = partial.data();
      switch (dtype) {
        case kF32: channel_backward_typed<float>(x, go, gx, tab.data(), m1, n, form_b, need_coef, cp, pp); break;
        case kBF16:
          channel_backward_typed<c10::BFloat16>(x, go, gx, tab.data(), m1, n, form_b, need_coef, cp, pp);
          break;
        case kF16: channel_backward_typed<c10::Half>(x, go, gx, tab.data(), m1, n, form_b, need_coef, cp, pp); break;
        default: throw std::invalid_argument("unsupported dtype code");
      }
    }
  }
  if (!need_coef) return;
  const std::vector<double> tot = channel_reduce(partial, K, G, cp);
  float* oa = reinterpret_cast<float*>(ga);
  float* ob = reinterpret_cast<float*>(gb);
  for (int64_t g = 0; g < G; ++g) {
    for (int i = 0; i < m1; ++i) oa[g * m1 + i] = static_cast<float>(tot[g * K + i]);
    for (int j = 0; j < n; ++j) {
      double v = -tot[g * K + m1 + j];
      if (!form_b) {
        const float bj = pb[g * n + j];
        v *= bj > 0.0f ? 1.0 : (bj < 0.0f ? -1.0 : 0.0);
      }
      ob[g * n + j] = static_cast<float>(v);
    }
  }
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
