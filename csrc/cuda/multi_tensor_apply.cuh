// Interface between the fused optimizer's host code (csrc/cpu/optim.cpp, which validates, holds
// the torch types and registers the CUDA kernels with the dispatcher) and its CUDA kernels
// (csrc/cuda/optim.cu, which includes no torch header).
//
// Why the split: torch >= 2.10's headers need C++20, and nvcc compiles as C++17 in this build, so
// a .cu file including any torch header does not compile; the kernels need nothing from torch
// but a stream and raw pointers. It also keeps the .cu file's compile time at seconds.
//
// Plain C++ only in this header (it is included by a .cpp file as well).
#pragma once

#include <cstdint>

namespace fastmlp {
namespace cuda_optim {

enum class DType : int { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };

// One parameter. Slots that an optimizer does not use are null. Every non-null array has `numel`
// elements in one dense layout (the host makes it so). State arrays have the param's dtype, or are
// float32 when `master` (an fp32 copy of an fp16/bf16 param) is given.
struct TensorPtrs {
  void* param;
  void* grad;     // written back unscaled when grad_scale is given (and the step not skipped)
  void* state0;   // adam: exp_avg; sgd: momentum_buffer (null when momentum == 0)
  void* state1;   // adam: exp_avg_sq
  void* state2;   // adam: max_exp_avg_sq (amsgrad)
  float* master;  // fp32 master copy or null
  float* step;    // adam: the float32 step counter (already incremented)
  int64_t numel;
};

// Values read on the device (lr_f / lr_d / grad_scale / found_inf) may be null: lr is then the
// host value, no scaling, no skipping.
struct DeviceScalars {
  double lr;
  const float* lr_f;
  const double* lr_d;
  const float* grad_scale;
  const float* found_inf;
};

struct AdamArgs {
  DeviceScalars s;
  double beta1, beta2, weight_decay, eps;
  bool amsgrad, maximize, decoupled;
};

struct SGDArgs {
  DeviceScalars s;
  double momentum, dampening, weight_decay;
  bool nesterov, maximize, first, has_momentum;
};

// Each returns nullptr on success, else the CUDA error string. `stream` is a cudaStream_t.
const char* increment_steps(float* const* steps, int n, const float* found_inf, void* stream);
const char* adam_step(const TensorPtrs* tensors, int n, DType dtype, bool master, const AdamArgs& args,
                      void* stream);
const char* sgd_step(const TensorPtrs* tensors, int n, DType dtype, bool master, const SGDArgs& args,
                     void* stream);

}  // namespace cuda_optim
}  // namespace fastmlp
