// Interface between the CUDA host entry (linear_act.cpp, compiled by the host compiler) and the
// elementwise kernels (linear_act_fwd.cu, linear_act_bwd.cu, compiled by nvcc with lean includes).
//
// Plain C++: no ATen types cross this boundary, so the .cu files need neither <ATen/ATen.h> nor
// <torch/extension.h> (each of those costs 1-2 minutes of nvcc time per architecture).
//
// Layout contract (the host entry guarantees it): every matrix is contiguous row-major
// (rows, cols), i.e. element (r, c) at r * cols + c, with 64-bit offsets; vectors have length
// cols. Pointers may alias exactly as documented per field below and nowhere else.
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

#include "../activation.h"

namespace fastmlp {
namespace cuda {

// Element types as the kernels see them (mapped from at::ScalarType by the host).
enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// Forward epilogue: for every (r, c):
//   z = src[r, c] (+ bias[c] when bias != nullptr)       in acc_t (float, double for F64)
//   saved[r, c] = z                                      when saved != nullptr
//   y[r, c] = act(z)
// src may equal y or saved (each element is read before it is written by the same thread).
struct FwdEpilogueParams {
  const void* src;
  const void* bias;  // nullable
  void* saved;       // nullable
  void* y;
  int64_t rows;
  int64_t cols;
};

// Backward prologue: for every (r, c):
//   dz[r, c] = g[r, c] * act'(.)       act' read from z = saved (gelu, gelu_tanh, silu) or from
//                                       y (relu: y <= 0 -> 0, as torch's threshold_backward)
//   db[c]    = sum_r dz[r, c]          when db != nullptr, accumulated in acc_t, summed in a
//                                       fixed order (deterministic for a given shape and GPU)
// dz is not written for Act::None (dz is g itself) or when dz == nullptr.
// When db is requested and partial_rows > 1 (see bwd_partial_rows): partial is acc_t scratch of
// partial_rows * cols elements, counters a zero-initialised array of bwd_counter_count() uint32
// that the kernel leaves zeroed again (reusable by the next launch on the same stream).
struct BwdPrologueParams {
  const void* g;
  const void* y;      // relu only
  const void* z;      // gelu / gelu_tanh / silu only
  void* dz;           // nullable
  void* db;           // nullable, element type = the tensor dtype
  void* partial;      // acc_t scratch, see above
  unsigned int* counters;  // see above
  int64_t rows;
  int64_t cols;
  int partial_rows;   // grid.y of the prologue launch; 1 = no cross-block reduction needed
};

// Length of the counters array the backward prologue needs for these params.
int64_t bwd_counter_count(Act act, DType dt, const BwdPrologueParams& p);

// Launchers: enqueue on `stream`, return the launch status (cudaSuccess or the error) so the
// host can raise an error that names the op and the shape.
cudaError_t launch_fwd_epilogue(Act act, DType dt, const FwdEpilogueParams& p, cudaStream_t stream);
cudaError_t launch_bwd_prologue(Act act, DType dt, const BwdPrologueParams& p, cudaStream_t stream);

// How many row chunks (grid.y) the backward prologue splits `rows` into for these params (all
// fields but partial / partial_rows filled): with db requested, enough for blocks_per_sm blocks on
// each of the GPU's num_sms, with at least min_rows_per_thread rows a thread, 1 for small layers;
// without db (elementwise only), a row a thread (up to grid.y's limit). The host
// allocates `partial` from it when db is requested and it exceeds 1.
constexpr int kBwdBlocksPerSm = 4, kBwdMinRowsPerThread = 4;  // the defaults (tuning: linear_act.cpp)
int bwd_partial_rows(Act act, DType dt, const BwdPrologueParams& p, int num_sms,
                     int blocks_per_sm = kBwdBlocksPerSm, int min_rows_per_thread = kBwdMinRowsPerThread);

// Whether the vectorised (16-byte) path applies: cols a multiple of the vector width and every
// pointer 16-byte aligned. Exposed so the host and the launchers agree.
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline int dtype_size(DType dt) {
  return dt == DType::F64 ? 8 : dt == DType::F32 ? 4 : 2;
}
inline int vec_width(DType dt) { return 16 / dtype_size(dt); }

}  // namespace cuda
}  // namespace fastmlp
