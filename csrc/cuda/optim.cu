// Fused multi-tensor optimizer steps on CUDA: AdamW (Adam in L2 mode) and SGD.
//
// Multi-tensor apply: the host packs up to kMaxTensors tensors and kMaxBlocks chunks of kChunk
// elements into a kernel-argument struct (no host-to-device copy, so a step can be captured in a
// CUDA graph) and launches one block per chunk; a group of many small tensors costs a handful of
// launches instead of one per tensor. Chunk offsets are 64-bit, so tensors >= 2^31 elements work.
//
// Everything a step reads that can change between steps without the host knowing (the step
// counters, a tensor lr, GradScaler's grad_scale and found_inf) is read on the device: with
// capturable=True nothing syncs and a captured step replays correctly.
//
// Step counters: one small launch adds 1 to every step (unless found_inf) before the update
// launches, which then only read them; incrementing inside the update kernel would race between
// the blocks of one tensor.
//
// Napkin math: AdamW moves 28 bytes per fp32 parameter; at ~4 TB/s an H200 needs ~110 us for 16M
// parameters, so that case is bandwidth-bound and the small cases are launch-bound (which is why
// the launch count is what this file minimises).
//
// The math per element is the CPU kernel's (csrc/cpu/optim.cpp), which the tests check against
// torch.optim; validation, the dense-layout fix-up and the dispatcher registration are host code
// there. This file includes no torch header: see multi_tensor_apply.cuh for why.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "multi_tensor_apply.cuh"

namespace fastmlp {
namespace cuda_optim {
namespace detail {

// 64k elements per block: big enough that a block's fixed cost (scalars, bias corrections) is
// noise, small enough that a 670k-parameter MLP still spreads over ~16 SMs.
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;
constexpr int kILP = 4;
// The metadata struct below stays under the classic 4 KB kernel-parameter limit.
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;
constexpr int kMaxSteps = 400;

struct Meta {
  TensorPtrs t[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(Meta) + sizeof(AdamArgs) <= 4096, "kernel arguments over 4 KB");

struct StepMeta {
  float* step[kMaxSteps];
};

// fp32 math for fp16/bf16 (and fp64 for fp64), as at::opmath_type.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
// Round to nearest even, as c10::Half / c10::BFloat16 do.
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(double* p, int64_t i, double v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

__device__ __forceinline__ double device_lr(const DeviceScalars& s) {
  return s.lr_f ? static_cast<double>(*s.lr_f) : s.lr_d ? *s.lr_d : s.lr;
}

__device__ __forceinline__ bool skip_step(const DeviceScalars& s) {
  return s.found_inf != nullptr && *s.found_inf != 0.f;
}

// The float32 reciprocal GradScaler.unscale_ multiplies by. With a grad_scale, a
// step that is not skipped writes the unscaled gradient back into the grad, as torch's fused
// optimizers do (GradScaler.unscale_ does it in place for the others), so that p.grad read after
// scaler.step(opt) is the true gradient.
template <typename acc_t>
__device__ __forceinline__ acc_t inv_scale(const DeviceScalars& s) {
  return s.grad_scale ? static_cast<acc_t>(static_cast<float>(1.0 / static_cast<double>(*s.grad_scale)))
                      : acc_t(1);
}

// torch's lerp: the form depends on which side of 0.5 the weight is.
template <typename acc_t>
__device__ __forceinline__ acc_t lerp(acc_t a, acc_t b, acc_t w) {
  return w < acc_t(0.5) ? a + w * (b - a) : b - (b - a) * (acc_t(1) - w);
}

__global__ void increment_steps_kernel(StepMeta meta, int n, const float* found_inf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && !(found_inf != nullptr && *found_inf != 0.f)) *meta.step[i] += 1.f;
}

template <typename scalar_t, typename state_t, bool MASTER>
__global__ void __launch_bounds__(kThreads) adam_kernel(Meta meta, AdamArgs a) {
  using acc_t = typename Acc<scalar_t>::type;
  if (skip_step(a.s)) return;
  const TensorPtrs& t = meta.t[meta.block_tensor[blockIdx.x]];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(t.numel, begin + kChunk);
  scalar_t* __restrict__ p = static_cast<scalar_t*>(t.param);
  scalar_t* __restrict__ g = static_cast<scalar_t*>(t.grad);
  state_t* __restrict__ m = static_cast<state_t*>(t.state0);
  state_t* __restrict__ v = static_cast<state_t*>(t.state1);
  state_t* __restrict__ vmax = static_cast<state_t*>(t.state2);
  float* __restrict__ master = t.master;

  // Per-tensor scalars in double, as the for-loop optimizer's Python floats, rounded once.
  const double lr = device_lr(a.s);
  const double step = static_cast<double>(*t.step);
  const acc_t step_size = static_cast<acc_t>(lr / (1.0 - pow(a.beta1, step)));
  const acc_t inv_bc2_sqrt = static_cast<acc_t>(1.0 / sqrt(1.0 - pow(a.beta2, step)));
  const acc_t decay = static_cast<acc_t>(a.decoupled ? 1.0 - lr * a.weight_decay : 1.0);
  const acc_t l2 = static_cast<acc_t>(a.decoupled ? 0.0 : a.weight_decay);
  const acc_t beta2 = static_cast<acc_t>(a.beta2), omb2 = static_cast<acc_t>(1.0 - a.beta2);
  const acc_t lerp_w = static_cast<acc_t>(1.0 - a.beta1), eps = static_cast<acc_t>(a.eps);
  const acc_t inv = inv_scale<acc_t>(a.s), sign = a.maximize ? acc_t(-1) : acc_t(1);
  const bool store_grad = a.s.grad_scale != nullptr;

  for (int64_t base = begin; base < end; base += static_cast<int64_t>(kThreads) * kILP) {
    acc_t rp[kILP], rg[kILP], rm[kILP], rv[kILP], rx[kILP];
    // Loads first, then math, then stores: kILP independent loads in flight per thread.
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + threadIdx.x + static_cast<int64_t>(k) * kThreads;
      rp[k] = rg[k] = rm[k] = rv[k] = rx[k] = acc_t(0);
      if (i < end) {
        rp[k] = MASTER ? static_cast<acc_t>(master[i]) : static_cast<acc_t>(load(p, i));
        rg[k] = static_cast<acc_t>(load(g, i));
        rm[k] = static_cast<acc_t>(load(m, i));
        rv[k] = static_cast<acc_t>(load(v, i));
        if (a.amsgrad) rx[k] = static_cast<acc_t>(load(vmax, i));
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      rg[k] = rg[k] * inv;  // the unscaled gradient, stored back below (see inv_scale)
      acc_t gi = rg[k] * sign;
      const acc_t pi = rp[k] * decay;
      if (l2 != acc_t(0)) gi = gi + l2 * pi;
      rm[k] = lerp(rm[k], gi, lerp_w);
      rv[k] = rv[k] * beta2 + omb2 * gi * gi;
      acc_t vv = rv[k];
      if (a.amsgrad) {
        // torch.maximum propagates NaN.
        vv = (rx[k] > vv || isnan(rx[k])) ? rx[k] : vv;
        rx[k] = vv;
      }
      const acc_t denom = sqrt(vv) * inv_bc2_sqrt + eps;
      rp[k] = pi + (-step_size) * (rm[k] / denom);
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + threadIdx.x + static_cast<int64_t>(k) * kThreads;
      if (i < end) {
        if (MASTER) master[i] = static_cast<float>(rp[k]);
        store(p, i, rp[k]);
        store(m, i, rm[k]);
        store(v, i, rv[k]);
        if (a.amsgrad) store(vmax, i, rx[k]);
        if (store_grad) store(g, i, rg[k]);
      }
    }
  }
}

template <typename scalar_t, typename state_t, bool MASTER>
__global__ void __launch_bounds__(kThreads) sgd_kernel(Meta meta, SGDArgs a) {
  using acc_t = typename Acc<scalar_t>::type;
  if (skip_step(a.s)) return;
  const TensorPtrs& t = meta.t[meta.block_tensor[blockIdx.x]];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(t.numel, begin + kChunk);
  scalar_t* __restrict__ p = static_cast<scalar_t*>(t.param);
  scalar_t* __restrict__ g = static_cast<scalar_t*>(t.grad);
  state_t* __restrict__ buf = static_cast<state_t*>(t.state0);
  float* __restrict__ master = t.master;
  const acc_t lr = static_cast<acc_t>(device_lr(a.s));
  const acc_t mom = static_cast<acc_t>(a.momentum), omd = static_cast<acc_t>(1.0 - a.dampening);
  const acc_t wd = static_cast<acc_t>(a.weight_decay);
  const acc_t inv = inv_scale<acc_t>(a.s), sign = a.maximize ? acc_t(-1) : acc_t(1);
  const bool store_grad = a.s.grad_scale != nullptr;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    acc_t gi = static_cast<acc_t>(load(g, i)) * inv;
    if (store_grad) store(g, i, gi);  // see inv_scale
    gi = gi * sign;
    acc_t pi = MASTER ? static_cast<acc_t>(master[i]) : static_cast<acc_t>(load(p, i));
    if (wd != acc_t(0)) gi = gi + wd * pi;
    if (a.has_momentum) {
      // The first step seeds the buffer with the gradient itself (torch: clone(grad)).
      const acc_t bi = a.first ? gi : static_cast<acc_t>(load(buf, i)) * mom + omd * gi;
      store(buf, i, bi);
      gi = a.nesterov ? gi + mom * bi : bi;
    }
    pi = pi + (-lr) * gi;
    if (MASTER) master[i] = static_cast<float>(pi);
    store(p, i, pi);
  }
}

// Packs tensors and chunks into Meta and calls launch(meta, nblocks) whenever it is full.
template <typename Launch>
const char* multi_tensor_apply(const TensorPtrs* tensors, int n, const Launch& launch) {
  Meta meta{};
  int nt = 0, nb = 0;
  for (int i = 0; i < n; ++i) {
    const int64_t numel = tensors[i].numel;
    if (numel == 0) continue;
    meta.t[nt++] = tensors[i];
    const int64_t nchunks = (numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < nchunks; ++c) {
      meta.block_tensor[nb] = static_cast<unsigned char>(nt - 1);
      meta.block_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool last_chunk = c == nchunks - 1;
      if (nb == kMaxBlocks || (nt == kMaxTensors && last_chunk)) {
        launch(meta, nb);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return cudaGetErrorString(err);
        nb = 0;
        nt = 0;
        // The rest of this tensor's chunks go into the next launch.
        if (!last_chunk) meta.t[nt++] = tensors[i];
      }
    }
  }
  if (nb > 0) {
    launch(meta, nb);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  return nullptr;
}

template <typename scalar_t, typename state_t, bool MASTER>
const char* run_adam(const TensorPtrs* tensors, int n, const AdamArgs& args, cudaStream_t stream) {
  return multi_tensor_apply(tensors, n, [&](const Meta& meta, int nblocks) {
    adam_kernel<scalar_t, state_t, MASTER><<<nblocks, kThreads, 0, stream>>>(meta, args);
  });
}

template <typename scalar_t, typename state_t, bool MASTER>
const char* run_sgd(const TensorPtrs* tensors, int n, const SGDArgs& args, cudaStream_t stream) {
  return multi_tensor_apply(tensors, n, [&](const Meta& meta, int nblocks) {
    sgd_kernel<scalar_t, state_t, MASTER><<<nblocks, kThreads, 0, stream>>>(meta, args);
  });
}

}  // namespace detail

const char* increment_steps(float* const* steps, int n, const float* found_inf, void* stream) {
  using namespace detail;
  for (int b = 0; b < n; b += kMaxSteps) {
    StepMeta sm{};
    const int m = std::min(kMaxSteps, n - b);
    for (int k = 0; k < m; ++k) sm.step[k] = steps[b + k];
    increment_steps_kernel<<<(m + 127) / 128, 128, 0, static_cast<cudaStream_t>(stream)>>>(sm, m, found_inf);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  return nullptr;
}

const char* adam_step(const TensorPtrs* tensors, int n, DType dtype, bool master, const AdamArgs& args,
                      void* stream) {
  using namespace detail;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float: return run_adam<float, float, false>(tensors, n, args, st);
    case DType::Double: return run_adam<double, double, false>(tensors, n, args, st);
    case DType::Half:
      return master ? run_adam<__half, float, true>(tensors, n, args, st)
                    : run_adam<__half, __half, false>(tensors, n, args, st);
    case DType::BFloat16:
      return master ? run_adam<__nv_bfloat16, float, true>(tensors, n, args, st)
                    : run_adam<__nv_bfloat16, __nv_bfloat16, false>(tensors, n, args, st);
  }
  return "fastmlp.adamw_step_: unsupported dtype";
}

const char* sgd_step(const TensorPtrs* tensors, int n, DType dtype, bool master, const SGDArgs& args,
                     void* stream) {
  using namespace detail;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float: return run_sgd<float, float, false>(tensors, n, args, st);
    case DType::Double: return run_sgd<double, double, false>(tensors, n, args, st);
    case DType::Half:
      return master ? run_sgd<__half, float, true>(tensors, n, args, st)
                    : run_sgd<__half, __half, false>(tensors, n, args, st);
    case DType::BFloat16:
      return master ? run_sgd<__nv_bfloat16, float, true>(tensors, n, args, st)
                    : run_sgd<__nv_bfloat16, __nv_bfloat16, false>(tensors, n, args, st);
  }
  return "fastmlp.sgd_step_: unsupported dtype";
}

}  // namespace cuda_optim
}  // namespace fastmlp
