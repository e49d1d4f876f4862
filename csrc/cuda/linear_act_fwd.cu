// Forward epilogue of fastmlp.linear_act on CUDA: y = act(z + bias), saved = z + bias, one pass.
//
// Used where cuBLASLt cannot fuse the activation itself: exact-erf GELU and SiLU always (no such
// epilogue exists), ReLU when the device's RELU epilogue drops NaN, GELU-tanh when its aux
// leading dimension is not a multiple of 8, fp64, and every shape cuBLASLt refuses. The GEMM
// before it (cuBLASLt with the BIAS epilogue, or at::mm / at::addmm) wrote z into src.
//
// Napkin math: memory-bound, reads z once and writes y (and saved) once: 4 (6) bytes/element in
// bf16, so a 4096 x 4096 bf16 layer costs ~11 us at 3 TB/s against ~170 us for its GEMM.
#include "linear_act_kernels.cuh"

#include <algorithm>

namespace fastmlp {
namespace cuda {
namespace {

// Block (bx, by): thread (tx, ty) owns columns [c0, c0 + VEC) and walks rows ty, ty + by*gridDim.y,
// ...; the bias slice is loaded once into registers. No integer division per element, and every
// offset is 64-bit (rows * cols may exceed 2^31).
template <Act A, typename T, int VEC>
__global__ void __launch_bounds__(kThreads) fwd_epilogue_kernel(const FwdEpilogueParams p) {
  using acc_t = acc_t_of<T>;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= p.cols) return;
  // src may alias y or saved: no __restrict__ on these three.
  const T* src = static_cast<const T*>(p.src);
  T* saved = static_cast<T*>(p.saved);
  T* y = static_cast<T*>(p.y);
  const bool has_bias = p.bias != nullptr;
  acc_t b[VEC];
  if (has_bias) {
    load_acc<T, VEC>(static_cast<const T*>(p.bias) + c0, b);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) b[j] = acc_t(0);
  }
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < p.rows; r += step) {
    const int64_t off = r * p.cols + c0;
    acc_t z[VEC];
    load_acc<T, VEC>(src + off, z);
    if (has_bias) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[j] += b[j];
    }
    if (saved != nullptr) store_acc<T, VEC>(saved + off, z);
    acc_t out[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = act_forward<A>(z[j]);
    store_acc<T, VEC>(y + off, out);
  }
}

}  // namespace

cudaError_t launch_fwd_epilogue(Act act, DType dt, const FwdEpilogueParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaSuccess;
  const bool aligned = aligned16(p.src) && aligned16(p.y) && (p.bias == nullptr || aligned16(p.bias)) &&
                       (p.saved == nullptr || aligned16(p.saved));
  const int vec = vec_for(dt, p.cols, aligned);
  const int bx = block_x(p.cols, vec), by = kThreads / bx;
  const int64_t lanes = (p.cols + vec - 1) / vec;
  const int64_t gx = (lanes + bx - 1) / bx;
  const int64_t gy = std::min<int64_t>((p.rows + by - 1) / by, 65535);
  if (gx > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  const dim3 block(bx, by);
  return dispatch_act(act, [&](auto a) {
    return dispatch_dtype(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      constexpr Act A = decltype(a)::value;
      if (vec == 1) {
        fwd_epilogue_kernel<A, T, 1><<<grid, block, 0, stream>>>(p);
      } else {
        fwd_epilogue_kernel<A, T, 16 / sizeof(T)><<<grid, block, 0, stream>>>(p);
      }
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace fastmlp
