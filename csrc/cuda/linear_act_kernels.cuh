// Device helpers shared by linear_act_fwd.cu and linear_act_bwd.cu: element types, float
// conversions, 16-byte vector access, the block shape and the (act, dtype) dispatch.
//
// Lean on purpose: CUDA's own fp16/bf16 headers only, no ATen, so each .cu compiles in seconds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "linear_act.h"

namespace fastmlp {
namespace cuda {

// Accumulation type: float for fp16/bf16/fp32, double for fp64 (as at::opmath_type).
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t_of = typename AccType<T>::type;

template <typename T> __device__ __forceinline__ acc_t_of<T> to_acc(T v) { return v; }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_acc(acc_t_of<T> v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N consecutive elements moved as one 16-byte (or N * sizeof(T)-byte) transaction. Callers
// guarantee the address is a multiple of sizeof(Vec) (see aligned16 in linear_act.h).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* __restrict__ p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void to_acc(const Vec<T, N>& v, acc_t_of<T> (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_acc(v.v[j]);
}

template <typename T, int N>
__device__ __forceinline__ void load_acc(const T* __restrict__ p, acc_t_of<T> (&out)[N]) {
  to_acc(load_vec<T, N>(p), out);
}

template <typename T, int N>
__device__ __forceinline__ void store_acc(T* __restrict__ p, const acc_t_of<T> (&in)[N]) {
  Vec<T, N> v;
#pragma unroll
  for (int j = 0; j < N; ++j) v.v[j] = from_acc<T>(in[j]);
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Block shape for the row-structured kernels: 256 threads, bx threads along a row (each covering
// VEC consecutive columns), by = 256 / bx rows at a time. Narrow layers (cols/VEC < 32) get
// bx < 32 so a warp spans several rows instead of idling.
constexpr int kThreads = 256;

inline int block_x(int64_t cols, int vec) {
  const int64_t lanes = (cols + vec - 1) / vec;
  int bx = 1;
  while (bx < 32 && bx < lanes) bx *= 2;
  return bx;
}

inline int vec_for(DType dt, int64_t cols, bool pointers_aligned) {
  const int v = vec_width(dt);
  return (pointers_aligned && cols % v == 0) ? v : 1;
}

// dispatch_act (runtime activation -> template argument) comes from activation.h.

template <typename T> struct TypeTag { using type = T; };

template <typename F>
inline cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: return f(TypeTag<float>{});
    case DType::F64: return f(TypeTag<double>{});
    case DType::F16: return f(TypeTag<__half>{});
    case DType::BF16: return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastmlp
