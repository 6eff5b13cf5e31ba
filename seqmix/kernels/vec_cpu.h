// Vectors of channels for the C++ CPU kernels (seqmix/kernels/cpu.py builds them): GCC vector types and
// the elementwise functions they need that libm offers only one element at a time (exp, log, sigmoid,
// softplus), and the
// dispatch that makes a small count a constant for arrays of vectors kept in registers (`as_constant`),
// written once for every kernel that includes this header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include <xmmintrin.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace seqmix_cpu {

// The bytes of one vector register of the instruction set the build targets (cpu.py's flags): AVX-512's 64,
// AVX2's 32, SSE's 16. A vector type wider than the registers compiles, but GCC then builds its broadcasts
// and moves through the stack, lane by lane, and reads them back whole (a stalled store forwarding each
// time): with 64-byte vectors on AVX2, Mamba-2's training step took 1.5x as long as with 32-byte ones, Mamba's
// 1.75x (docs/design.md, "Eighth round").
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

// One register of W channels, as GCC vector types: the arithmetic below is written once for every
// instruction set the compiler targets.
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(kVectorBytes)));
  typedef int32_t S;
  typedef S I __attribute__((vector_size(kVectorBytes)));
  typedef uint32_t U __attribute__((vector_size(kVectorBytes)));
  static constexpr int W = kVectorBytes / 4;
};

template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(kVectorBytes)));
  typedef int64_t S;
  typedef S I __attribute__((vector_size(kVectorBytes)));
  typedef uint64_t U __attribute__((vector_size(kVectorBytes)));
  static constexpr int W = kVectorBytes / 8;
};

template <typename T>
using Vec = typename Lanes<T>::V;

// An allocator of buffers aligned to a cache line (64 bytes, an AVX-512 vector) whose new values are left as they
// are. malloc aligns to 16 bytes, so every whole-vector load from its buffers straddles two cache lines on
// AVX-512: the SSD's chunk buffers aligned and not zeroed took 4-8% off its forward and backward (docs/design.md,
// "Thirty-fourth round"). The user writes a value before it reads it.
template <typename T>
struct UninitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* ptr, std::size_t) noexcept { ::operator delete(ptr, std::align_val_t(64)); }
  template <typename U>
  void construct(U* ptr) noexcept {
    ::new (static_cast<void*>(ptr)) U;
  }
  template <typename U, typename... Args>
  void construct(U* ptr, Args&&... args) {
    ::new (static_cast<void*>(ptr)) U(std::forward<Args>(args)...);
  }
};
template <typename T>
using Scratch = std::vector<T, UninitAllocator<T>>;

// x in every lane. x - 0 rather than 0 + x: the subtraction is x exactly (-0 included), so the compiler
// drops it and broadcasts x; the addition turns -0 into +0 and costs a scalar add before every broadcast.
template <typename T>
inline Vec<T> splat(T x) {
  return x - Vec<T>{};
}

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2's mask of the lanes below n: all ones in each (float's 32-bit or double's 64-bit) lane i < n.
template <typename T>
inline __m256i avx2_lanes_below(int64_t n) {
  if constexpr (std::is_same_v<T, float>)
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  else
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
#endif

// The first n (< W) lanes; the others are zero. With AVX-512 or AVX2 one masked move, which touches no memory
// past the n values. A memcpy of a variable count is a library call whose byte stores the whole vector's load
// then waits on (a failed store forwarding): 10% of Mamba-2's SSD backward at B16 T128, whose rows of the
// triangular masks mostly end inside a vector (docs/design.md, "Twenty-seventh round").
template <typename T>
inline Vec<T> load_part(const T* p, int64_t n) {
#if defined(__AVX512F__)
  const auto lanes = static_cast<uint32_t>((1u << n) - 1);
  if constexpr (std::is_same_v<T, float>) return (Vec<T>)_mm512_maskz_loadu_ps(static_cast<__mmask16>(lanes), p);
  else return (Vec<T>)_mm512_maskz_loadu_pd(static_cast<__mmask8>(lanes), p);
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) return (Vec<T>)_mm256_maskload_ps(p, avx2_lanes_below<T>(n));
  else return (Vec<T>)_mm256_maskload_pd(p, avx2_lanes_below<T>(n));
#else
  Vec<T> v{};
  std::memcpy(&v, p, n * sizeof(T));
  return v;
#endif
}

template <typename T>
inline void store_part(T* p, Vec<T> v, int64_t n) {
#if defined(__AVX512F__)
  const auto lanes = static_cast<uint32_t>((1u << n) - 1);
  if constexpr (std::is_same_v<T, float>) _mm512_mask_storeu_ps(p, static_cast<__mmask16>(lanes), (__m512)v);
  else _mm512_mask_storeu_pd(p, static_cast<__mmask8>(lanes), (__m512d)v);
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) _mm256_maskstore_ps(p, avx2_lanes_below<T>(n), (__m256)v);
  else _mm256_maskstore_pd(p, avx2_lanes_below<T>(n), (__m256d)v);
#else
  std::memcpy(p, &v, n * sizeof(T));
#endif
}

// Each lane's index, 0 .. W - 1, as a value of T.
template <typename T>
inline Vec<T> lane_indices() {
  Vec<T> v;
  for (int i = 0; i < Lanes<T>::W; ++i) v[i] = static_cast<T>(i);
  return v;
}

// The first min(n, W) lanes (a whole vector when n >= W, else load_part / store_part): the last vector of a
// row whose length is not a multiple of W.
template <typename T>
inline Vec<T> load_upto(const T* p, int64_t n) {
  return n >= Lanes<T>::W ? load(p) : load_part(p, n);
}

template <typename T>
inline void store_upto(T* p, Vec<T> v, int64_t n) {
  if (n >= Lanes<T>::W) {
    store(p, v);
  } else {
    store_part(p, v, n);
  }
}

// The sum of a vector's lanes, pairwise (halves added until one lane is left): a chain of log2(W) adds
// rather than W, in a fixed order.
template <typename T>
inline T lane_sum(Vec<T> v) {
  constexpr int W = Lanes<T>::W;
  T x[W];
  std::memcpy(x, &v, sizeof(v));
  for (int w = W / 2; w >= 1; w /= 2)
    for (int c = 0; c < w; ++c) x[c] += x[c + w];
  return x[0];
}

// sum(a[i] b[i]) over n values, lane by lane and then across the lanes: a fixed order, and W independent
// chains of multiply-adds instead of one (a scalar loop's sum cannot be reordered by the compiler).
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int W = Lanes<T>::W;
  Vec<T> acc{};
  int64_t i = 0;
  for (; i + W <= n; i += W) acc += load(a + i) * load(b + i);
  if (i < n) acc += load_part(a + i, n - i) * load_part(b + i, n - i);
  return lane_sum<T>(acc);
}

// The lane sums of W vectors at once (P[i] -> out[i], P destroyed): pairs of vectors are folded into one
// whose halves hold their half sums, log2(W) times, W - 1 vector adds in all instead of W separate
// reductions of log2(W) shuffles and adds each. The lanes end in bit-reversed order.
template <typename T>
struct LaneSums {
  static constexpr int W = Lanes<T>::W;
  using S = typename Lanes<T>::S;
  using I = typename Lanes<T>::I;

  // Lanes [r h, (r + 1) h) of the fold take block r / 2 (2h lanes) of x (r even) or y (r odd): its low half
  // (A) plus its high half (B).
  static I mask(int h, bool high) {
    I m{};
    for (int r = 0; r < W / h; ++r)
      for (int l = 0; l < h; ++l) m[r * h + l] = (r & 1 ? W : 0) + (r / 2) * 2 * h + l + (high ? h : 0);
    return m;
  }

  I lo[8], hi[8];
  I order;  // order[i]: the lane that holds P[i]'s sum

  LaneSums() {
    int level = 0;
    for (int h = W / 2; h >= 1; h /= 2, ++level) {
      lo[level] = mask(h, false);
      hi[level] = mask(h, true);
    }
    // Follow the labels: a lane of the fold is labelled as the lanes it adds.
    S label[W][W];
    for (int i = 0; i < W; ++i)
      for (int c = 0; c < W; ++c) label[i][c] = i;
    int n = W;
    level = 0;
    for (int h = W / 2; h >= 1; h /= 2, ++level, n /= 2)
      for (int i = 0; i < n / 2; ++i) {
        S folded[W];
        for (int c = 0; c < W; ++c) {
          const int src = lo[level][c];
          folded[c] = src < W ? label[2 * i][src] : label[2 * i + 1][src - W];
        }
        std::memcpy(label[i], folded, sizeof(folded));
      }
    for (int c = 0; c < W; ++c) order[label[0][c]] = c;
  }

  // Stores the W sums with one vector store (W scalar stores would stall the wider loads that read them).
  void operator()(Vec<T>* P, T* out) const {
    int n = W, level = 0;
    for (int h = W / 2; h >= 1; h /= 2, ++level, n /= 2)
      for (int i = 0; i < n / 2; ++i)
        P[i] = __builtin_shuffle(P[2 * i], P[2 * i + 1], lo[level]) +
               __builtin_shuffle(P[2 * i], P[2 * i + 1], hi[level]);
    const Vec<T> sums = __builtin_shuffle(P[0], order);
    std::memcpy(out, &sums, sizeof(sums));
  }
};

template <typename T>
const LaneSums<T>& lane_sums() {
  static const LaneSums<T> sums;
  return sums;
}

// y[i] = the lane sum of row(i) (a Vec<T>) for i < n: W rows' sums in one LaneSums pass, so that no row waits
// for its own horizontal sum and the rows' work overlaps; the rows past the last full W are summed alone.
template <typename T, typename Row>
inline void sum_rows(int64_t n, T* y, const Row& row) {
  constexpr int64_t W = Lanes<T>::W;
  const LaneSums<T>& sums = lane_sums<T>();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Vec<T> P[W];
    for (int64_t j = 0; j < W; ++j) P[j] = row(i + j);
    sums(P, y + i);
  }
  for (; i < n; ++i) y[i] = lane_sum<T>(row(i));
}

// Constants of exp and log per precision: the range where exp is finite and normal, ln 2 split in two
// (k ln2_hi is exact), 1.5 2^(mantissa bits) (adding it rounds to an integer), the exponent bias and
// the Taylor coefficients 1/k! of exp(r) for |r| <= ln2 / 2, highest first; for exp2 its range and the
// coefficients of 2^f for |f| <= 1/2, highest first.
template <typename T>
struct Consts;

template <>
struct Consts<float> {
  static constexpr float lo = -87.0f, hi = 88.0f, log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f, magic = 12582912.0f;
  static constexpr int mantissa = 23, bias = 127;
  static constexpr int32_t magic_bits = 0x4B400000;
  static constexpr int exp_terms = 7;  // to r^6 / 6!: the remainder is below 1.3e-7 (about an ulp)
  static constexpr float exp_coef[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  static constexpr int log_terms = 5;  // atanh series to s^9, |s| <= 0.172
  static constexpr float exp2_lo = -125.0f, exp2_hi = 127.0f;
  // 1 + f q(f), q of degree 4 fitted for the least largest relative error (a Lawson-weighted least-squares fit
  // over [-1/2, 1/2]): 9.2e-8 from the polynomial, 1.7e-7 as evaluated in float32 multiply-adds, where the
  // Taylor polynomial of degree 6 (exp's in f ln 2) gives 2.2e-7 with one multiply-add more. Exactly 1 at 0.
  static constexpr int exp2_terms = 6;
  static constexpr float exp2_coef[] = {1.3264714507e-3f, 9.6715092659e-3f, 5.5507335812e-2f, 2.4022242427e-1f,
                                        6.9314700365e-1f, 1.0f};
};

template <>
struct Consts<double> {
  static constexpr double lo = -708.0, hi = 709.0, log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  static constexpr double magic = 6755399441055744.0;
  static constexpr int mantissa = 52, bias = 1023;
  static constexpr int64_t magic_bits = 0x4338000000000000LL;
  static constexpr int exp_terms = 14;  // r^13 / 13!: below 1e-17
  static constexpr double exp_coef[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                        1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,      1.0 / 720.0,
                                        1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,         0.5,
                                        1.0,                1.0};
  static constexpr int log_terms = 11;  // to s^21
  static constexpr double exp2_lo = -1021.0, exp2_hi = 1023.0;
  static constexpr int exp2_terms = 14;  // Taylor, (ln 2)^k / k! to k = 13: below 5e-18 for |f| <= 1/2
  static constexpr double exp2_coef[] = {
      1.369148885390412888e-12, 2.567843599348820514e-11, 4.445538271870811498e-10, 7.054911620801123330e-9,
      1.017808600923969973e-7,  1.321548679014430949e-6,  1.525273380405984028e-5,  1.540353039338160995e-4,
      1.333355814642844342e-3,  9.618129107628477162e-3,  5.550410866482157995e-2,  2.402265069591007123e-1,
      6.931471805599453094e-1,  1.0};
};

// exp_v(x), e^x of every lane (std::exp is a libm call per element): x = k ln2 + r with k the integer nearest
// x log2(e), exp(r) by its Taylor polynomial, times 2^k. Below the smallest normal it gives 0 (the exact limit of the
// strong decays), past the largest finite value infinity.
// exp2_v(x), 2^x of every lane: x = k + f with k the nearest integer and f = x - k (exact), 2^f by its polynomial,
// times 2^k. Where a caller can fold log2(e) into a factor it multiplies by anyway (the selective scan's A),
// exp2_v(x log2 e) is exp_v(x) without its range reduction: three multiply-adds fewer, and in float32 one fewer in
// the polynomial (docs/design.md, "Fifteenth round"). Below 2^-125 it gives 0, past the largest finite value
// infinity.
// NaN stays NaN in both. With AVX-512 the rounding to k and the scale by 2^k (with the range's ends) are one
// instruction each, vrndscaleps and vscalefps, where the generic form takes ten: the selective scan's state update
// 2.83 -> 2.40 ns a vector of 16 (docs/design.md, "Thirty-third round").
// exp(r) for r = x - k ln 2 (k ln2_hi exact), |r| <= ln2 / 2: the range reduction and the Taylor polynomial.
template <typename T>
inline Vec<T> exp_reduced(Vec<T> x, Vec<T> k) {
  using K = Consts<T>;
  Vec<T> r = x - k * K::ln2_hi;
  r = r - k * K::ln2_lo;
  Vec<T> p = splat<T>(K::exp_coef[0]);
  for (int i = 1; i < K::exp_terms; ++i) p = p * r + K::exp_coef[i];
  return p;
}

// 2^f for |f| <= 1/2: the fitted polynomial.
template <typename T>
inline Vec<T> exp2_reduced(Vec<T> f) {
  using K = Consts<T>;
  Vec<T> p = splat<T>(K::exp2_coef[0]);
  for (int i = 1; i < K::exp2_terms; ++i) p = p * f + K::exp2_coef[i];
  return p;
}

#if defined(__AVX512F__)
// p 2^k, k an integer as a value of T, zero in the lanes of x below lo (x: the argument, clamp_above'd).
template <typename T>
inline Vec<T> times_pow2(Vec<T> p, Vec<T> k, Vec<T> x, T lo) {
  if constexpr (std::is_same_v<T, float>) {
    const __mmask16 kept = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(lo), _CMP_NLT_UQ);  // NaN kept
    return (Vec<T>)_mm512_maskz_scalef_ps(kept, (__m512)p, (__m512)k);
  } else {
    const __mmask8 kept = _mm512_cmp_pd_mask((__m512d)x, _mm512_set1_pd(lo), _CMP_NLT_UQ);
    return (Vec<T>)_mm512_maskz_scalef_pd(kept, (__m512d)p, (__m512d)k);
  }
}

// The integer nearest each lane (ties to even), as a value of T.
template <typename T>
inline Vec<T> nearest_integer(Vec<T> x) {
  constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  if constexpr (std::is_same_v<T, float>) return (Vec<T>)_mm512_roundscale_ps((__m512)x, kMode);
  else return (Vec<T>)_mm512_roundscale_pd((__m512d)x, kMode);
}

// min(x, hi + 2) with NaN kept (vminps returns its second operand when either is NaN): the result is infinity
// there either way, and +inf itself would turn the range reduction into NaN.
template <typename T>
inline Vec<T> clamp_above(Vec<T> x, T hi) {
  if constexpr (std::is_same_v<T, float>) return (Vec<T>)_mm512_min_ps(_mm512_set1_ps(hi + 2), (__m512)x);
  else return (Vec<T>)_mm512_min_pd(_mm512_set1_pd(hi + 2), (__m512d)x);
}

template <typename T>
inline Vec<T> exp_v(Vec<T> x) {
  using K = Consts<T>;
  x = clamp_above<T>(x, K::hi);
  const Vec<T> k = nearest_integer<T>(x * K::log2e);
  return times_pow2<T>(exp_reduced<T>(x, k), k, x, K::lo);
}

template <typename T>
inline Vec<T> exp2_v(Vec<T> x) {
  using K = Consts<T>;
  x = clamp_above<T>(x, K::exp2_hi);
  const Vec<T> k = nearest_integer<T>(x);
  return times_pow2<T>(exp2_reduced<T>(x - k), k, x, K::exp2_lo);
}
#else
// p 2^k, k from `shifted` (k + magic, k rounded to nearest): 2^k put in the exponent bits (a multiply, which keeps
// NaN; an integer add into the exponent bits would not). Lanes of x below lo give 0, above hi infinity: those
// computed garbage, which this replaces (no clamp before).
template <typename T>
inline Vec<T> times_pow2(Vec<T> p, Vec<T> shifted, Vec<T> x, T lo, T hi) {
  using K = Consts<T>;
  using U = typename Lanes<T>::U;
  // Unsigned: the garbage lanes wrap around rather than overflow.
  const U ki = reinterpret_cast<const U&>(shifted) - K::magic_bits;
  const U bits = (ki + K::bias) << K::mantissa;
  const Vec<T> e = p * reinterpret_cast<const Vec<T>&>(bits);
  const Vec<T> zero{}, inf = splat<T>(std::numeric_limits<T>::infinity());
  return x < lo ? zero : (x > hi ? inf : e);
}

template <typename T>
inline Vec<T> exp_v(Vec<T> x) {
  using K = Consts<T>;
  const Vec<T> shifted = x * K::log2e + K::magic;  // k + magic: round to nearest
  return times_pow2<T>(exp_reduced<T>(x, shifted - K::magic), shifted, x, K::lo, K::hi);
}

template <typename T>
inline Vec<T> exp2_v(Vec<T> x) {
  using K = Consts<T>;
  const Vec<T> shifted = x + K::magic;  // k + magic: round to nearest
  return times_pow2<T>(exp2_reduced<T>(x - (shifted - K::magic)), shifted, x, K::exp2_lo, K::exp2_hi);
}
#endif

constexpr double kSoftplusThreshold = 20.0;  // as F.softplus: x itself above it

// log of every lane, for m >= 1: m = 2^e f with f in [sqrt(1/2), sqrt(2)), log f = 2 atanh((f-1)/(f+1)).
template <typename T>
inline Vec<T> log_v(Vec<T> m) {
  using K = Consts<T>;
  using I = typename Lanes<T>::I;
  using S = typename Lanes<T>::S;
  const I bits = reinterpret_cast<const I&>(m);  // m >= 1: the sign bit is 0
  Vec<T> e = __builtin_convertvector((bits >> K::mantissa) - K::bias, Vec<T>);
  const I f_bits = (bits & ((S(1) << K::mantissa) - 1)) | (S(K::bias) << K::mantissa);
  Vec<T> f = reinterpret_cast<const Vec<T>&>(f_bits);
  const auto big = f > T(1.41421356237309504880);
  f = big ? f * T(0.5) : f;
  e = big ? e + T(1) : e;
  const Vec<T> s = (f - T(1)) / (f + T(1)), s2 = s * s;
  Vec<T> q = splat<T>(T(1) / T(2 * K::log_terms - 1));
  for (int i = K::log_terms - 2; i >= 0; --i) q = q * s2 + T(1) / T(2 * i + 1);
  return T(2) * s * q + e * T(0.69314718055994530942);
}

// log(1 + u) for u in [0, 1]. In float32 u r(u), r a polynomial of degree 9 fitted to log(1 + u) / u for the least
// largest relative error over [0, 1] (Lawson-weighted least squares; 4.7e-9 from the polynomial, within 2 ulps
// as evaluated): no division and no split of the exponent. softplus_v, once a value in each of the selective scan's
// steps, took 11.0 ns a vector of 16 through log_v's atanh form (two divisions) and takes 6.6 this way
// (docs/design.md, "Thirty-third round"). In float64 (the oracles' precision) log(m) u / (m - 1) with
// m = 1 + u, which keeps the digits of a small u that 1 + u rounds away.
template <typename T>
inline Vec<T> log1p_unit_v(Vec<T> u) {
  if constexpr (std::is_same_v<T, double>) {
    const Vec<T> m = T(1) + u, d = m - T(1);
    return d == T(0) ? u : log_v<T>(m) * (u / (d == T(0) ? splat<T>(T(1)) : d));
  } else {
    static constexpr float r[] = {-3.2439046176e-03f, 1.9850781806e-02f, -5.6957960876e-02f, 1.0603460196e-01f,
                                  -1.5305451966e-01f, 1.9675878886e-01f,  -2.4954118683e-01f, 3.3329960445e-01f,
                                  -4.9999902308e-01f, 9.9999999527e-01f};
    Vec<T> p = splat<T>(r[0]);
    for (int i = 1; i < 10; ++i) p = p * u + r[i];
    return u * p;
  }
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)) (exp's argument never positive, log1p's in [0, 1]), and x itself
// above the threshold, as F.softplus. `slope` gets its derivative, sigmoid(x) = 1 / (1 + exp(-x)) (1 above the
// threshold), when asked for.
template <typename T>
inline Vec<T> softplus_v(Vec<T> x, Vec<T>* slope = nullptr) {
  const auto positive = x >= T(0), above = x > T(kSoftplusThreshold);
  const Vec<T> u = exp_v<T>(positive ? -x : x);
  if (slope) *slope = above ? splat<T>(T(1)) : (positive ? splat<T>(T(1)) : u) / (T(1) + u);
  return above ? x : (positive ? x : Vec<T>{}) + log1p_unit_v<T>(u);
}

template <typename T>
inline Vec<T> sigmoid_v(Vec<T> x) {
  return T(1) / (T(1) + exp_v<T>(-x));
}

// f(std::integral_constant<int, n>{}) for 1 <= n <= kMax <= 8 (n past kMax: kMax): a count as a constant, so
// that the loops over it unroll and the arrays it sizes stay in registers.
template <int kMax, typename F>
inline void as_constant(int64_t n, const F& f) {
  static_assert(kMax >= 1 && kMax <= 8, "counts of 1 to 8");
  if constexpr (kMax == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (n >= kMax) {
    f(std::integral_constant<int, kMax>{});
  } else {
    as_constant<kMax - 1>(n, f);
  }
}

// The widest short conv (W taps) the kernels take: conv_cpu.cpp's and the SSD's conv inside its chunks
// (ssd_cpu.cpp) keep per-vector arrays of that many taps and rows.
constexpr int kMaxConvWidth = 16;

// While in scope, this thread's SSE/AVX arithmetic flushes denormal results to zero and reads denormal operands
// as zero (MXCSR's FTZ and DAZ bits); the caller's mode comes back after. A chunked scan's decays such as
// exp(lcum_i - lcum_j) fall below the smallest normal (float: 1.2e-38) once a chunk's log decay passes -87,
// and every multiply or add on such a value takes a microcode assist: the SSD's forward and backward ran 1.4-2x
// slower on random inputs that reach it (docs/design.md). The flushed values are below 1e-38 of the terms they
// are added to, so nothing a float32 result can show changes.
class FlushDenormals {
 public:
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | _MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON); }
  ~FlushDenormals() { _mm_setcsr(saved_); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned saved_;
};

}  // namespace seqmix_cpu
