// Activation math shared by the CPU kernels and (later) the CUDA kernels.
//
// act(z) and act'(z) for none / relu / gelu (exact, erf) / gelu_tanh / silu, written once so that
// forward and backward of every backend agree on the formulas. Low-precision inputs are upcast
// to float by the caller: everything here computes in float or double.
//
// Why our own erf/exp on the CPU: std::erf and std::exp are scalar library calls that gcc does not
// vectorise, and at ~10 ns per element a GELU epilogue over a 1024 x 512 layer would cost more
// than its GEMM. The float versions below are branch-free polynomials (selects only) that gcc
// vectorises to AVX2; their error is below 3e-7 absolute on erf and 2 ulp on exp, inside the
// float32 tolerance of torch.testing. double keeps the exact library functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Always inline: the kernels instantiate every (activation, dtype) combination inside one
// parallel_for lambda, which grows past gcc's inlining budget; an out-of-line erf/exp call per
// element then blocks vectorisation (measured: the GELU epilogue took 6-8 ms instead of ~0.4 ms
// on a 1024 x 512 layer).
#if defined(__CUDACC__)
#define FASTMLP_HD __host__ __device__ __forceinline__
#define FASTMLP_INLINE __forceinline__
#else
#define FASTMLP_HD inline __attribute__((always_inline))
#define FASTMLP_INLINE inline __attribute__((always_inline))
#endif

namespace fastmlp {

enum class Act : int64_t { None = 0, Relu = 1, Gelu = 2, GeluTanh = 3, Silu = 4 };

// Runtime activation -> compile-time template argument: f(std::integral_constant<Act, A>{}).
// act has been validated by parse_activation, so None is the only fall-through.
template <typename F>
inline auto dispatch_act(Act act, F&& f) -> decltype(f(std::integral_constant<Act, Act::None>{})) {
  switch (act) {
    case Act::Relu: return f(std::integral_constant<Act, Act::Relu>{});
    case Act::Gelu: return f(std::integral_constant<Act, Act::Gelu>{});
    case Act::GeluTanh: return f(std::integral_constant<Act, Act::GeluTanh>{});
    case Act::Silu: return f(std::integral_constant<Act, Act::Silu>{});
    default: return f(std::integral_constant<Act, Act::None>{});
  }
}

// Whether the backward of this activation needs the pre-activation z saved by the forward.
inline bool act_saves_preactivation(Act a) {
  return a == Act::Gelu || a == Act::GeluTanh || a == Act::Silu;
}

namespace math {

// double so that the double kernels get full precision; T(k) rounds them once for float.
constexpr double kSqrt1_2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1/sqrt(2*pi)
constexpr double kSqrt2_Pi = 0.79788456080286535588;    // sqrt(2/pi)
constexpr double kGeluTanhC = 0.044715;

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float exp(float x) { return ::expf(x); }
__device__ __forceinline__ float erf(float x) { return ::erff(x); }
__device__ __forceinline__ float tanh(float x) { return ::tanhf(x); }
#else
FASTMLP_INLINE float bits_to_float(int32_t i) { float f; std::memcpy(&f, &i, 4); return f; }

// a * b + c, as one fused multiply-add where the build targets FMA hardware (x86-64 with FMA under
// -march=native, aarch64), else as two operations. Explicit, not left to the compiler's
// contraction (off: see setup.py): std::fma is the same instruction in a vectorised loop and in
// its scalar remainder, so every element still gets the same arithmetic whatever the thread split.
// The polynomials below are chains of these: fused, GELU over 131k floats took 460 us instead
// of 720 on one core of a skylake-avx512 Xeon (its backward 820 instead of 1110), side by side.
FASTMLP_INLINE float madd(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(x): Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, degree-6 polynomial for e^r, then
// scale by 2^k through the exponent bits, in two halves 2^k1 * 2^k2 so that k from -150
// (subnormal results) to 128 (just below FLT_MAX) stays a normal float's exponent and the
// subnormal result is rounded once. Overflow gives +inf, underflow 0, NaN stays NaN (the
// selects at the end; k is computed from a NaN-free value, as a NaN to int cast is undefined).
FASTMLP_INLINE float exp(float x) {
  const float xc = x > 88.72283935546875f ? 88.72283935546875f : (x < -103.97208f ? -103.97208f : x);
  const float kx = (x != x ? 0.0f : xc) * 1.44269504088896341f;
#if defined(__x86_64__) && !defined(__SSE4_1__)
  // The portable x86-64 build (SSE2) has no vector round instruction, and a std::nearbyint call
  // keeps the whole loop scalar: round to nearest (ties to even, as nearbyint) by adding and
  // subtracting 1.5 * 2^23 instead, exact for |kx| < 2^22 (here |kx| <= 150). The same k either
  // way; GELU and its backward ran 3.2x-3.7x faster there (131k floats, one core).
  constexpr float kRound = 12582912.0f;
  const float k = (kx + kRound) - kRound;
#else
  const float k = std::nearbyint(kx);
#endif
  float r = madd(-k, 0.693359375f, xc);
  r = madd(-k, -2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = madd(p, r, 1.3981999507e-3f);
  p = madd(p, r, 8.3334519073e-3f);
  p = madd(p, r, 4.1665795894e-2f);
  p = madd(p, r, 1.6666665459e-1f);
  p = madd(p, r, 5.0000001201e-1f);
  p = madd(p * r, r, r) + 1.0f;
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t k1 = ki >> 1;  // floor(k / 2): k1, k - k1 in [-75, 64]
  const int32_t k2 = ki - k1;
  float y = p * bits_to_float((k1 + 127) << 23) * bits_to_float((k2 + 127) << 23);
  y = x > 88.72283935546875f ? INFINITY : y;
  y = x < -103.97208f ? 0.0f : y;
  y = x != x ? x : y;
  return y;
}

// erf(x) = sign(x) (1 - t P(t) exp(-x^2)), t = 1/(1 + p|x|): Abramowitz & Stegun 7.1.26,
// |error| <= 1.5e-7 (plus the exp error); the same scheme ATen's AVX2 Vectorized<float>::erf uses.
FASTMLP_INLINE float erf(float x) {
  const float ax = std::fabs(x);
  const float t = 1.0f / madd(0.3275911f, ax, 1.0f);
  float p = 1.061405429f;
  p = madd(p, t, -1.453152027f);
  p = madd(p, t, 1.421413741f);
  p = madd(p, t, -0.284496736f);
  p = madd(p, t, 0.254829592f);
  const float y = madd(-(p * t), exp(-ax * ax), 1.0f);
  return std::copysign(y, x);
}

// tanh(x) = sign(x) (1 - 2 / (exp(2|x|) + 1)); absolute error ~1e-7, which is what matters
// for gelu_tanh's 0.5 z (1 + tanh(u)).
FASTMLP_INLINE float tanh(float x) {
  const float ax = std::fabs(x);
  const float y = 1.0f - 2.0f / (exp(2.0f * ax) + 1.0f);
  return std::copysign(y, x);
}
#endif

FASTMLP_HD double exp(double x) { return ::exp(x); }
FASTMLP_HD double erf(double x) { return ::erf(x); }
FASTMLP_HD double tanh(double x) { return ::tanh(x); }

}  // namespace math

// act(z). relu keeps NaN (z < 0 is false for NaN), like torch.relu.
template <Act A, typename T>
FASTMLP_HD T act_forward(T z) {
  if constexpr (A == Act::None) {
    return z;
  } else if constexpr (A == Act::Relu) {
    return z < T(0) ? T(0) : z;
  } else if constexpr (A == Act::Gelu) {
    return T(0.5) * z * (T(1) + math::erf(z * T(math::kSqrt1_2)));
  } else if constexpr (A == Act::GeluTanh) {
    const T u = T(math::kSqrt2_Pi) * (z + T(math::kGeluTanhC) * z * z * z);
    return T(0.5) * z * (T(1) + math::tanh(u));
  } else {  // Silu: z / (1 + e^-z), the form torch uses (silu(-inf) is NaN there too)
    return z / (T(1) + math::exp(-z));
  }
}

// act'(z) for the activations that save the pre-activation.
template <Act A, typename T>
FASTMLP_HD T act_derivative(T z) {
  if constexpr (A == Act::Gelu) {
    const T cdf = T(0.5) * (T(1) + math::erf(z * T(math::kSqrt1_2)));
    const T pdf = T(math::kInvSqrt2Pi) * math::exp(T(-0.5) * z * z);
    return cdf + z * pdf;
  } else if constexpr (A == Act::GeluTanh) {
    const T z2 = z * z;
    const T u = T(math::kSqrt2_Pi) * (z + T(math::kGeluTanhC) * z2 * z);
    const T t = math::tanh(u);
    const T du = T(math::kSqrt2_Pi) * (T(1) + T(3 * math::kGeluTanhC) * z2);
    return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * du;
  } else if constexpr (A == Act::Silu) {
    const T s = T(1) / (T(1) + math::exp(-z));
    return s * (T(1) + z * (T(1) - s));
  } else {
    return T(1);
  }
}

}  // namespace fastmlp
