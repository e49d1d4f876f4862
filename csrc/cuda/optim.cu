// Fused multi-tensor optimizer steps on CUDA: adamw_step_ (AdamW, Adam in L2 mode) and sgd_step_.
//
// Multi-tensor apply: the host packs up to kMaxTensors tensors and kMaxBlocks chunks of kChunk
// elements into a kernel-argument struct (no host-to-device copy, so the step can be captured in a
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
// parameters, so the large-tensor case is bandwidth-bound and the small-tensor cases are
// launch-bound (which is why the launch count is what this file minimises).
//
// The math per element is the CPU kernel's (csrc/cpu/optim.cpp), which the tests check against
// torch.optim; host-side validation and the dense-layout helper live there too.
//
// Lean includes: <ATen/ATen.h> and <torch/extension.h> refuse to compile as C++17 (the nvcc
// standard setup.py selects) and cost minutes of compile time.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

namespace fastmlp {

// Defined in csrc/cpu/optim.cpp.
void check_adamw_step_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                           at::TensorList state_steps, at::TensorList master_params,
                           const std::optional<at::Tensor>& lr_tensor, bool amsgrad,
                           const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf);
void check_sgd_step_args(at::TensorList params, at::TensorList grads,
                         at::TensorList momentum_buffers, at::TensorList master_params,
                         const std::optional<at::Tensor>& lr_tensor,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf);
void make_dense_lists(const std::vector<at::TensorList>& slots, const std::vector<bool>& mutated,
                      std::vector<std::vector<at::Tensor>>& work,
                      std::vector<std::pair<at::Tensor, at::Tensor>>& copy_back);

namespace {

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
  void* ptr[6][kMaxTensors];  // adam: p, g, m, v, vmax, master; sgd: p, g, buf, master
  float* step[kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

struct Scalars {
  double lr;                 // used when lr_f and lr_d are null
  const float* lr_f;         // a tensor lr on the device
  const double* lr_d;
  const float* grad_scale;   // null: no scaling
  const float* found_inf;    // null: never skip
  double beta1, beta2, weight_decay, eps, momentum, dampening;
  bool amsgrad, maximize, decoupled, nesterov, first, has_momentum;
};

__device__ __forceinline__ double device_lr(const Scalars& s) {
  return s.lr_f ? static_cast<double>(*s.lr_f) : s.lr_d ? *s.lr_d : s.lr;
}

__device__ __forceinline__ bool skip_step(const Scalars& s) {
  return s.found_inf != nullptr && *s.found_inf != 0.f;
}

// The float32 reciprocal GradScaler.unscale_ multiplies by.
template <typename acc_t>
__device__ __forceinline__ acc_t inv_scale(const Scalars& s) {
  return s.grad_scale ? static_cast<acc_t>(static_cast<float>(1.0 / static_cast<double>(*s.grad_scale)))
                      : acc_t(1);
}

template <typename acc_t>
__device__ __forceinline__ acc_t lerp(acc_t a, acc_t b, acc_t w) {
  return w < acc_t(0.5) ? a + w * (b - a) : b - (b - a) * (acc_t(1) - w);
}

struct StepMeta {
  float* step[kMaxSteps];
};

__global__ void increment_steps(StepMeta meta, int n, const float* found_inf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && !(found_inf != nullptr && *found_inf != 0.f)) *meta.step[i] += 1.f;
}

template <typename scalar_t, typename state_t, bool MASTER>
__global__ void __launch_bounds__(kThreads) adam_kernel(Meta meta, Scalars s) {
  using acc_t = at::opmath_type<scalar_t>;
  if (skip_step(s)) return;
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(meta.numel[t], begin + kChunk);
  scalar_t* __restrict__ p = static_cast<scalar_t*>(meta.ptr[0][t]);
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(meta.ptr[1][t]);
  state_t* __restrict__ m = static_cast<state_t*>(meta.ptr[2][t]);
  state_t* __restrict__ v = static_cast<state_t*>(meta.ptr[3][t]);
  state_t* __restrict__ vmax = static_cast<state_t*>(meta.ptr[4][t]);
  float* __restrict__ master = static_cast<float*>(meta.ptr[5][t]);

  // Per-tensor scalars in double, as the for-loop optimizer's Python floats, rounded once.
  const double lr = device_lr(s);
  const double step = static_cast<double>(*meta.step[t]);
  const acc_t step_size = static_cast<acc_t>(lr / (1.0 - pow(s.beta1, step)));
  const acc_t inv_bc2_sqrt = static_cast<acc_t>(1.0 / sqrt(1.0 - pow(s.beta2, step)));
  const acc_t decay = static_cast<acc_t>(s.decoupled ? 1.0 - lr * s.weight_decay : 1.0);
  const acc_t l2 = static_cast<acc_t>(s.decoupled ? 0.0 : s.weight_decay);
  const acc_t beta2 = static_cast<acc_t>(s.beta2), omb2 = static_cast<acc_t>(1.0 - s.beta2);
  const acc_t lerp_w = static_cast<acc_t>(1.0 - s.beta1), eps = static_cast<acc_t>(s.eps);
  const acc_t gmul = inv_scale<acc_t>(s) * (s.maximize ? acc_t(-1) : acc_t(1));

  for (int64_t base = begin; base < end; base += static_cast<int64_t>(kThreads) * kILP) {
    acc_t rp[kILP], rg[kILP], rm[kILP], rv[kILP], rx[kILP];
    // Loads first, then math, then stores: kILP independent loads in flight per thread.
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + threadIdx.x + static_cast<int64_t>(k) * kThreads;
      if (i < end) {
        rp[k] = MASTER ? static_cast<acc_t>(master[i]) : static_cast<acc_t>(p[i]);
        rg[k] = static_cast<acc_t>(g[i]);
        rm[k] = static_cast<acc_t>(m[i]);
        rv[k] = static_cast<acc_t>(v[i]);
        rx[k] = s.amsgrad ? static_cast<acc_t>(vmax[i]) : acc_t(0);
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      acc_t gi = rg[k] * gmul;
      acc_t pi = rp[k] * decay;
      if (l2 != acc_t(0)) gi = gi + l2 * pi;
      rm[k] = lerp(rm[k], gi, lerp_w);
      rv[k] = rv[k] * beta2 + omb2 * gi * gi;
      acc_t vv = rv[k];
      if (s.amsgrad) {
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
        p[i] = static_cast<scalar_t>(rp[k]);
        m[i] = static_cast<state_t>(rm[k]);
        v[i] = static_cast<state_t>(rv[k]);
        if (s.amsgrad) vmax[i] = static_cast<state_t>(rx[k]);
      }
    }
  }
}

template <typename scalar_t, typename state_t, bool MASTER>
__global__ void __launch_bounds__(kThreads) sgd_kernel(Meta meta, Scalars s) {
  using acc_t = at::opmath_type<scalar_t>;
  if (skip_step(s)) return;
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(meta.numel[t], begin + kChunk);
  scalar_t* __restrict__ p = static_cast<scalar_t*>(meta.ptr[0][t]);
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(meta.ptr[1][t]);
  state_t* __restrict__ buf = static_cast<state_t*>(meta.ptr[2][t]);
  float* __restrict__ master = static_cast<float*>(meta.ptr[3][t]);
  const acc_t lr = static_cast<acc_t>(device_lr(s));
  const acc_t mom = static_cast<acc_t>(s.momentum), omd = static_cast<acc_t>(1.0 - s.dampening);
  const acc_t wd = static_cast<acc_t>(s.weight_decay);
  const acc_t gmul = inv_scale<acc_t>(s) * (s.maximize ? acc_t(-1) : acc_t(1));
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    acc_t gi = static_cast<acc_t>(g[i]) * gmul;
    acc_t pi = MASTER ? static_cast<acc_t>(master[i]) : static_cast<acc_t>(p[i]);
    if (wd != acc_t(0)) gi = gi + wd * pi;
    if (s.has_momentum) {
      const acc_t bi = s.first ? gi : static_cast<acc_t>(buf[i]) * mom + omd * gi;
      buf[i] = static_cast<state_t>(bi);
      gi = s.nesterov ? gi + mom * bi : bi;
    }
    pi = pi + (-lr) * gi;
    if (MASTER) master[i] = static_cast<float>(pi);
    p[i] = static_cast<scalar_t>(pi);
  }
}

// Packs tensors and chunks into Meta and launches `launch(meta, nblocks)` whenever it is full.
template <typename Launch>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& work, int depth,
                        at::TensorList steps, const Launch& launch) {
  Meta meta{};
  int nt = 0, nb = 0;
  const size_t n = work[0].size();
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = work[0][i].numel();
    if (numel == 0) continue;
    auto add_tensor = [&] {
      for (int d = 0; d < depth; ++d) {
        meta.ptr[d][nt] = work[d].empty() ? nullptr : work[d][i].data_ptr();
      }
      meta.step[nt] = steps.empty() ? nullptr : steps[i].data_ptr<float>();
      meta.numel[nt] = numel;
      ++nt;
    };
    add_tensor();
    const int64_t nchunks = (numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < nchunks; ++c) {
      meta.block_tensor[nb] = static_cast<unsigned char>(nt - 1);
      meta.block_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool blocks_full = nb == kMaxBlocks;
      const bool tensors_full = nt == kMaxTensors && c == nchunks - 1;
      if (blocks_full || tensors_full) {
        launch(meta, nb);
        nb = 0;
        nt = 0;
        // The rest of this tensor's chunks go into the next launch.
        if (c != nchunks - 1) add_tensor();
      }
    }
  }
  if (nb > 0) launch(meta, nb);
}

void fill_lr(Scalars& s, double lr, const std::optional<at::Tensor>& lr_tensor) {
  s.lr = lr;
  s.lr_f = nullptr;
  s.lr_d = nullptr;
  if (!lr_tensor.has_value()) return;
  if (lr_tensor->is_cpu()) {
    s.lr = lr_tensor->item<double>();  // a host value: no device sync
  } else if (lr_tensor->scalar_type() == at::kFloat) {
    s.lr_f = lr_tensor->data_ptr<float>();
  } else {
    s.lr_d = lr_tensor->data_ptr<double>();
  }
}

const float* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList state_steps, at::TensorList master_params, double lr,
                     const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                     double weight_decay, double eps, bool amsgrad, bool maximize,
                     bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  check_adamw_step_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                        master_params, lr_tensor, amsgrad, grad_scale, found_inf);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Scalars s{};
  fill_lr(s, lr, lr_tensor);
  s.grad_scale = opt_ptr(grad_scale);
  s.found_inf = opt_ptr(found_inf);
  s.beta1 = beta1;
  s.beta2 = beta2;
  s.weight_decay = weight_decay;
  s.eps = eps;
  s.amsgrad = amsgrad;
  s.maximize = maximize;
  s.decoupled = decoupled_weight_decay;

  for (size_t b = 0; b < state_steps.size(); b += kMaxSteps) {
    StepMeta sm{};
    const int n = static_cast<int>(std::min<size_t>(kMaxSteps, state_steps.size() - b));
    for (int k = 0; k < n; ++k) sm.step[k] = state_steps[b + k].data_ptr<float>();
    increment_steps<<<(n + 127) / 128, 128, 0, stream>>>(sm, n, s.found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  std::vector<std::vector<at::Tensor>> work;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
  make_dense_lists({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params},
                   {true, false, true, true, true, true}, work, copy_back);
  const bool master = !master_params.empty();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adamw_step_cuda", [&] {
    auto run = [&](auto kernel) {
      multi_tensor_apply(work, 6, state_steps, [&](const Meta& meta, int nblocks) {
        kernel<<<nblocks, kThreads, 0, stream>>>(meta, s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (master) {
        run(adam_kernel<scalar_t, float, true>);
        return;
      }
    }
    run(adam_kernel<scalar_t, scalar_t, false>);
  });
  for (auto& pr : copy_back) pr.first.copy_(pr.second);
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList master_params, double lr,
                   const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                   double weight_decay, bool nesterov, bool maximize, bool is_first_step,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  check_sgd_step_args(params, grads, momentum_buffers, master_params, lr_tensor, grad_scale,
                      found_inf);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Scalars s{};
  fill_lr(s, lr, lr_tensor);
  s.grad_scale = opt_ptr(grad_scale);
  s.found_inf = opt_ptr(found_inf);
  s.momentum = momentum;
  s.dampening = dampening;
  s.weight_decay = weight_decay;
  s.nesterov = nesterov;
  s.maximize = maximize;
  s.first = is_first_step;
  s.has_momentum = !momentum_buffers.empty();
  std::vector<std::vector<at::Tensor>> work;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
  make_dense_lists({params, grads, momentum_buffers, master_params}, {true, false, true, true},
                   work, copy_back);
  const bool master = !master_params.empty();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_step_cuda", [&] {
    auto run = [&](auto kernel) {
      multi_tensor_apply(work, 4, {}, [&](const Meta& meta, int nblocks) {
        kernel<<<nblocks, kThreads, 0, stream>>>(meta, s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (master) {
        run(sgd_kernel<scalar_t, float, true>);
        return;
      }
    }
    run(sgd_kernel<scalar_t, scalar_t, false>);
  });
  for (auto& pr : copy_back) pr.first.copy_(pr.second);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) {
  m.impl("adamw_step_", &adamw_step_cuda);
  m.impl("sgd_step_", &sgd_step_cuda);
}

}  // namespace fastmlp
