// Fused multi-tensor optimizer steps on the CPU: adamw_step_ (AdamW, and Adam in L2 mode) and
// sgd_step_ (momentum, dampening, nesterov, weight decay).
//
// One op call updates every parameter of a group. The host function validates once, increments
// the step counters (unless found_inf is set), computes the per-tensor scalars (bias corrections
// depend on each tensor's own step, which differs for a parameter that was frozen for a while),
// cuts the flat list of all their elements into one fixed range per thread (see make_items) and
// runs ONE parallel region for the whole group. torch's fused CPU AdamW runs a parallel region per
// tensor, which for 200 small tensors is 200 x (fork/join + dispatch) and dominates its step time.
//
// fastmlp.optim reaches these kernels two ways: through the ops (any device, torch.compile, the
// general path), and on the CPU through a step plan (StepPlan below) that keeps a group's tensors
// in C++ so that a step passes no tensor lists through the dispatcher.
//
// Napkin math: AdamW reads p, g, m, v and writes p, m, v: 28 bytes per fp32 parameter. A 670k
// parameter MLP is 19 MB of traffic, which fits in this machine's 32 MB L3 when the L3 is not
// shared with busy neighbours; a 16M parameter tensor is 450 MB and runs at memory bandwidth. The
// inner loop is one sqrt and one division per element on fp32 registers, which gcc vectorises
// (-O3 -march=native -fno-math-errno); measured standalone, it runs at the speed of a plain
// 4-stream copy, so the loop is memory-bound, not compute-bound (an rsqrt/rcp Newton variant was
// slower).
//
// Layout contract of the kernels: every tensor handed to a chunk function is dense (non-overlapping
// and dense, all members of one parameter sharing one stride order), so a parameter is a flat
// array. make_dense() makes it so with contiguous copies for the rare parameter where it is not.
//
// This file also holds the CUDA host entry functions (validation, dense-layout fix-up, stream,
// dispatcher registration) for the kernels in csrc/cuda/optim.cu, so that CPU and CUDA share one
// validation with one set of messages; csrc/cuda/multi_tensor_apply.cuh says why the .cu file
// itself holds kernels only.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"

#ifdef FASTMLP_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../cuda/multi_tensor_apply.cuh"
#endif

namespace fastmlp {

constexpr const char* kAdamW = "fastmlp.adamw_step_";
constexpr const char* kSGD = "fastmlp.sgd_step_";

namespace {

void check_list_size(at::TensorList list, size_t n, const char* op, const char* name) {
  FASTMLP_CHECK_VALUE(list.size() == n, op, ": expected ", name, " to have ", n,
                      " tensors (one per parameter), got ", list.size());
}

void check_like_param(const at::Tensor& p, const at::Tensor& t, const char* op, const char* name,
                      size_t i, at::ScalarType dtype) {
  FASTMLP_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i,
                "] is sparse; fused optimizers take dense gradients only");
  FASTMLP_CHECK_VALUE(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", shape_str(t.sizes()),
                      " but params[", i, "] has shape ", shape_str(p.sizes()));
  FASTMLP_CHECK(t.device() == p.device(), op, ": ", name, "[", i, "] is on ", t.device(),
                " but params[", i, "] is on ", p.device(),
                "; all tensors of one call must be on one device");
  FASTMLP_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ",
                     t.scalar_type(), ", expected ", dtype);
}

// A tensor the step writes in place must not have elements that share memory (an expanded tensor):
// refused before this call changes anything (the write, or the copy back from a dense working copy,
// would fail half way through it otherwise). fastmlp.optim makes one call per (device, dtype) of a
// group, so buckets stepped before the refused one keep their step.
void check_writable(const at::Tensor& t, const char* op, const char* name, size_t i) {
  FASTMLP_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name, "[", i,
                      "] has elements that share memory (e.g. an expanded tensor), but the step writes it in "
                      "place; give it memory of its own (.clone())");
}

void check_writable(at::TensorList list, const char* op, const char* name) {
  for (size_t i = 0; i < list.size(); ++i) check_writable(list[i], op, name, i);
}

void check_scalar_tensor(const std::optional<at::Tensor>& t, const at::Device& dev,
                         const char* op, const char* name) {
  if (!t.has_value()) return;
  FASTMLP_CHECK_VALUE(t->numel() == 1, op, ": ", name, " must have one element, got ", t->numel());
  FASTMLP_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                     t->scalar_type());
  FASTMLP_CHECK(t->device() == dev, op, ": ", name, " is on ", t->device(),
                " but the parameters are on ", dev, " (move it with .to(param.device))");
}

void check_lr_tensor(const std::optional<at::Tensor>& lr, const at::Device& dev, const char* op) {
  if (!lr.has_value()) return;
  FASTMLP_CHECK_VALUE(lr->numel() == 1, op, ": lr must have one element, got ", lr->numel());
  FASTMLP_CHECK_TYPE(lr->scalar_type() == at::kFloat || lr->scalar_type() == at::kDouble, op,
                     ": a tensor lr must be float32 or float64, got ", lr->scalar_type());
  FASTMLP_CHECK(lr->device() == dev || lr->device().is_cpu(), op, ": lr is on ", lr->device(),
                " but the parameters are on ", dev);
}

// Common part: params non-empty-dtype floating, one device, one dtype; grads match; master
// params (optional) are float32 copies of fp16/bf16 params; state tensors have the params' dtype,
// or float32 when a master copy is kept.
at::ScalarType check_common(at::TensorList params, at::TensorList grads,
                            at::TensorList master_params, const char* op) {
  const size_t n = params.size();
  check_list_size(grads, n, op, "grads");
  if (!master_params.empty()) check_list_size(master_params, n, op, "master_params");
  if (n == 0) return at::kFloat;
  const at::Tensor& p0 = params[0];
  for (size_t i = 0; i < n; ++i) {
    check_floating(params[i], op, "params");
    FASTMLP_CHECK_TYPE(params[i].scalar_type() == p0.scalar_type(), op,
                       ": all params of one call must have one dtype, got ", p0.scalar_type(),
                       " and ", params[i].scalar_type(),
                       " (group the parameters by dtype, as fastmlp.optim does)");
    FASTMLP_CHECK(params[i].device() == p0.device(), op,
                  ": all params of one call must be on one device, got ", p0.device(), " and ",
                  params[i].device());
    check_like_param(params[i], grads[i], op, "grads", i, p0.scalar_type());
    if (!master_params.empty()) {
      check_like_param(params[i], master_params[i], op, "master_params", i, at::kFloat);
    }
  }
  if (!master_params.empty()) {
    FASTMLP_CHECK_TYPE(p0.scalar_type() == at::kHalf || p0.scalar_type() == at::kBFloat16, op,
                       ": an fp32 master copy is only kept for float16/bfloat16 params, got ",
                       p0.scalar_type());
  }
  return master_params.empty() ? p0.scalar_type() : at::kFloat;
}

// The lists both ops write: params, master copies, and the grads when a grad_scale has them
// written back unscaled.
void check_written(at::TensorList params, at::TensorList grads, at::TensorList master_params,
                   const std::optional<at::Tensor>& grad_scale, const char* op) {
  check_writable(params, op, "params");
  check_writable(master_params, op, "master_params");
  if (grad_scale.has_value()) check_writable(grads, op, "grads");
}

}  // namespace

void check_adamw_step_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                           at::TensorList state_steps, at::TensorList master_params,
                           const std::optional<at::Tensor>& lr_tensor, bool amsgrad,
                           const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf) {
  const char* op = kAdamW;
  const size_t n = params.size();
  const at::ScalarType state_dtype = check_common(params, grads, master_params, op);
  check_list_size(exp_avgs, n, op, "exp_avgs");
  check_list_size(exp_avg_sqs, n, op, "exp_avg_sqs");
  check_list_size(state_steps, n, op, "state_steps");
  FASTMLP_CHECK_VALUE(amsgrad ? max_exp_avg_sqs.size() == n : max_exp_avg_sqs.empty(), op,
                      ": max_exp_avg_sqs must have one tensor per parameter with amsgrad=True and "
                      "be empty otherwise, got ", max_exp_avg_sqs.size(), " for ", n,
                      " params, amsgrad=", amsgrad);
  if (n == 0) return;
  const at::Device dev = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    check_like_param(params[i], exp_avgs[i], op, "exp_avgs", i, state_dtype);
    check_like_param(params[i], exp_avg_sqs[i], op, "exp_avg_sqs", i, state_dtype);
    if (amsgrad) check_like_param(params[i], max_exp_avg_sqs[i], op, "max_exp_avg_sqs", i, state_dtype);
    const at::Tensor& s = state_steps[i];
    // The layout of torch.optim's fused=True: step is a float32 scalar on the param's device.
    FASTMLP_CHECK_VALUE(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device() == dev, op,
                        ": state_steps[", i, "] must be a one-element float32 tensor on ", dev,
                        ", got ", s.scalar_type(), " with ", s.numel(), " elements on ", s.device());
  }
  check_lr_tensor(lr_tensor, dev, op);
  check_scalar_tensor(grad_scale, dev, op, "grad_scale");
  check_scalar_tensor(found_inf, dev, op, "found_inf");
  check_written(params, grads, master_params, grad_scale, op);
  check_writable(exp_avgs, op, "exp_avgs");
  check_writable(exp_avg_sqs, op, "exp_avg_sqs");
  check_writable(max_exp_avg_sqs, op, "max_exp_avg_sqs");
}

void check_sgd_step_args(at::TensorList params, at::TensorList grads,
                         at::TensorList momentum_buffers, at::TensorList master_params,
                         const std::optional<at::Tensor>& lr_tensor,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  const char* op = kSGD;
  const size_t n = params.size();
  const at::ScalarType state_dtype = check_common(params, grads, master_params, op);
  FASTMLP_CHECK_VALUE(momentum_buffers.empty() || momentum_buffers.size() == n, op,
                      ": momentum_buffers must be empty (momentum=0) or have one tensor per "
                      "parameter, got ", momentum_buffers.size(), " for ", n, " params");
  if (n == 0) return;
  for (size_t i = 0; i < momentum_buffers.size(); ++i) {
    check_like_param(params[i], momentum_buffers[i], op, "momentum_buffers", i, state_dtype);
  }
  const at::Device dev = params[0].device();
  check_lr_tensor(lr_tensor, dev, op);
  check_scalar_tensor(grad_scale, dev, op, "grad_scale");
  check_scalar_tensor(found_inf, dev, op, "found_inf");
  check_written(params, grads, master_params, grad_scale, op);
  check_writable(momentum_buffers, op, "momentum_buffers");
}

// The tensors the kernels see: slot s of parameter i is work[s][i]. A parameter whose members do
// not share one dense layout (a sliced view, a grad with other strides) is replaced by contiguous
// copies, and the mutated slots are copied back by finish(). Dense non-contiguous parameters
// (e.g. transposed) are used in place: elementwise math does not care about the order.
struct DenseGroup {
  std::vector<std::vector<at::Tensor>> work;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (original, working copy)
  void finish() {
    for (auto& pr : copy_back) pr.first.copy_(pr.second);
  }
};

// What the CPU kernels read: slot s of parameter i starts at ptr[s][i] (an empty slot, e.g. no
// amsgrad, is an empty vector) and holds numel[i] elements laid out like the parameter. Filled
// from a DenseGroup by the ops, and from cached tensors plus p.grad by the step plans below.
struct Slots {
  std::vector<std::vector<void*>> ptr;
  std::vector<int64_t> numel;
};

Slots slots_of(const DenseGroup& d) {
  Slots sl;
  sl.ptr.resize(d.work.size());
  for (size_t s = 0; s < d.work.size(); ++s) {
    sl.ptr[s].reserve(d.work[s].size());
    for (const auto& t : d.work[s]) sl.ptr[s].push_back(t.data_ptr());
  }
  for (const auto& p : d.work[0]) sl.numel.push_back(p.numel());
  return sl;
}

// Whether t can be walked as a flat array in step with p (elementwise math ignores the order).
inline bool shares_dense_layout(const at::Tensor& p, const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() && t.strides() == p.strides();
}

DenseGroup make_dense(const std::vector<at::TensorList>& slots, const std::vector<bool>& mutated) {
  DenseGroup d;
  d.work.resize(slots.size());
  const size_t n = slots.empty() ? 0 : slots[0].size();
  for (size_t s = 0; s < slots.size(); ++s) d.work[s].assign(slots[s].begin(), slots[s].end());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = slots[0][i];
    if (p.numel() == 0) continue;
    bool ok = true;
    for (size_t s = 0; s < slots.size() && ok; ++s) {
      if (slots[s].empty()) continue;
      const at::Tensor& t = slots[s][i];
      ok = shares_dense_layout(p, t);
    }
    if (ok) continue;
    for (size_t s = 0; s < slots.size(); ++s) {
      if (slots[s].empty()) continue;
      at::Tensor c = slots[s][i].contiguous();
      if (mutated[s] && !c.is_same(slots[s][i])) d.copy_back.emplace_back(slots[s][i], c);
      d.work[s][i] = c;
    }
  }
  return d;
}

namespace {

// Work split: the flat list of all elements of all parameters is cut into one contiguous range
// per thread, the same ranges at every step, and each range into per-tensor segments. A fixed
// split keeps every thread on the same parameters step after step, so its share of p, g, m, v
// stays in its own core's caches (on this VM the two cores may not even share an L3). Handing out
// chunks dynamically instead (tried: 16k-element chunks pulled from an atomic counter) moved data
// between cores every step: 250 us instead of 142 us for the 670k-parameter MLP in a standalone
// measurement, and 1.7x slower in the optimizer benchmark. torch's fused step splits every tensor
// in halves per thread, which keeps the affinity but pays one parallel region per tensor; one
// region for the whole group keeps both.
//
// Below kMinPerThread elements per thread a parallel region (a few us to wake the pool) costs more
// than it saves.
constexpr int64_t kMinPerThread = 16384;
// Segment boundaries inside a tensor fall on multiples of 16 elements (64 bytes of fp32), so that
// two threads never write one cache line.
constexpr int64_t kAlign = 16;

struct Item {
  int32_t tensor;
  int64_t begin, end;
};

struct Items {
  std::vector<Item> items;          // segments, grouped by thread
  std::vector<int64_t> task_begin;  // thread t runs items [task_begin[t], task_begin[t + 1])
};

Items make_items(const std::vector<int64_t>& numel) {
  const size_t n = numel.size();
  std::vector<int64_t> base(n + 1, 0);  // global index of each tensor's first element
  for (size_t i = 0; i < n; ++i) base[i + 1] = base[i] + numel[i];
  const int64_t total = base[n];
  const int64_t tasks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), total / kMinPerThread));
  // Cut points: equal shares, moved down to an aligned offset inside the tensor they fall in.
  std::vector<int64_t> cut(tasks + 1, total);
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t c = total * t / tasks;
    const size_t i = std::upper_bound(base.begin(), base.end(), c) - base.begin() - 1;
    cut[t] = base[i] + (c - base[i]) / kAlign * kAlign;
  }
  Items r;
  r.task_begin.push_back(0);
  size_t i = 0;
  for (int64_t t = 0; t < tasks; ++t) {
    while (i < n && base[i + 1] <= cut[t]) ++i;
    for (size_t j = i; j < n && base[j] < cut[t + 1]; ++j) {
      const int64_t b = std::max(cut[t], base[j]) - base[j];
      const int64_t e = std::min(cut[t + 1], base[j + 1]) - base[j];
      if (e > b) r.items.push_back({static_cast<int32_t>(j), b, e});
    }
    r.task_begin.push_back(static_cast<int64_t>(r.items.size()));
  }
  return r;
}

// f(std::true_type{}) or f(std::false_type{}): a runtime flag as a template argument.
template <typename F>
void with_bool(bool flag, const F& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// Runs f(item) for every item, each thread its own fixed range.
template <typename F>
void for_each_item(const Items& items, const F& f) {
  const int64_t tasks = static_cast<int64_t>(items.task_begin.size()) - 1;
  auto run = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k = items.task_begin[t]; k < items.task_begin[t + 1]; ++k) f(items.items[k]);
    }
  };
  if (tasks <= 1) {
    run(0, tasks);
    return;
  }
  at::parallel_for(0, tasks, 1, run);
}

template <typename T>
T* ptr_or_null(const std::vector<void*>& v, size_t i) {
  return v.empty() ? nullptr : static_cast<T*>(v[i]);
}

// ---- AdamW / Adam --------------------------------------------------------------------------

template <typename acc_t>
struct AdamScalars {
  acc_t step_size;   // lr / (1 - beta1^step)
  // 1 / sqrt(1 - beta2^step). torch divides by sqrt(1 - beta2^step); multiplying by the
  // reciprocal differs by at most an ulp in the denominator and keeps one division per element
  // (sqrt and division are the throughput limit of this loop once the data is in cache).
  acc_t inv_bc2_sqrt;
  acc_t decay;       // 1 - lr * weight_decay in decoupled mode, else 1
};

template <typename acc_t>
struct AdamConsts {
  acc_t beta2, one_minus_beta2, lerp_w, eps, l2, inv_grad_scale, sign;
  bool unscale_grads;  // write the unscaled gradient back (with a grad_scale; see STORE_GRAD)
};

// torch's lerp, written the way its CPU kernel does it, so that exp_avg matches the for-loop
// optimizer: the form depends on which side of 0.5 the weight is.
template <typename acc_t>
inline acc_t lerp(acc_t a, acc_t b, acc_t w) {
  return w < acc_t(0.5) ? a + w * (b - a) : b - (b - a) * (acc_t(1) - w);
}

// One chunk of one parameter. scalar_t: the param and grad dtype; state_t: the moments' dtype
// (scalar_t, or float with a master copy, which then holds the param in fp32). STORE_GRAD: the
// step had a grad_scale, and the gradient is left unscaled as torch's fused optimizers leave it
// (GradScaler.unscale_ does that in place for the others), so that code reading p.grad after
// scaler.step(opt) sees the true gradient; a step skipped for found_inf leaves it as it was.
template <typename scalar_t, typename state_t, bool AMSGRAD, bool MASTER, bool STORE_GRAD>
void adam_chunk(scalar_t* __restrict__ p, scalar_t* __restrict__ g,
                state_t* __restrict__ m, state_t* __restrict__ v, state_t* __restrict__ vmax,
                float* __restrict__ master, int64_t b, int64_t e,
                const AdamScalars<at::opmath_type<scalar_t>> s,
                const AdamConsts<at::opmath_type<scalar_t>> c) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = b; i < e; ++i) {
    acc_t gi = static_cast<acc_t>(g[i]) * c.inv_grad_scale;
    if constexpr (STORE_GRAD) g[i] = static_cast<scalar_t>(gi);
    gi = gi * c.sign;
    acc_t pi = MASTER ? static_cast<acc_t>(master[i]) : static_cast<acc_t>(p[i]);
    pi = pi * s.decay;
    gi = c.l2 != acc_t(0) ? gi + c.l2 * pi : gi;
    const acc_t mi = lerp(static_cast<acc_t>(m[i]), gi, c.lerp_w);
    const acc_t vi = static_cast<acc_t>(v[i]) * c.beta2 + c.one_minus_beta2 * gi * gi;
    m[i] = static_cast<state_t>(mi);
    v[i] = static_cast<state_t>(vi);
    acc_t vv = vi;
    if constexpr (AMSGRAD) {
      // torch.maximum propagates NaN; std::max would not.
      const acc_t old = static_cast<acc_t>(vmax[i]);
      vv = (old > vi || std::isnan(old)) ? old : vi;
      vmax[i] = static_cast<state_t>(vv);
    }
    const acc_t denom = std::sqrt(vv) * s.inv_bc2_sqrt + c.eps;
    pi = pi + (-s.step_size) * (mi / denom);
    if constexpr (MASTER) master[i] = static_cast<float>(pi);
    p[i] = static_cast<scalar_t>(pi);
  }
}

template <typename scalar_t, typename state_t, bool AMSGRAD, bool MASTER>
void adam_run(const Slots& sl, const Items& items,
              const std::vector<AdamScalars<at::opmath_type<scalar_t>>>& scalars,
              const AdamConsts<at::opmath_type<scalar_t>>& c) {
  const auto& S = sl.ptr;
  with_bool(c.unscale_grads, [&](auto store_grad) {
    for_each_item(items, [&](const Item& it) {
      const size_t i = it.tensor;
      adam_chunk<scalar_t, state_t, AMSGRAD, MASTER, decltype(store_grad)::value>(
          static_cast<scalar_t*>(S[0][i]), static_cast<scalar_t*>(S[1][i]),
          static_cast<state_t*>(S[2][i]), static_cast<state_t*>(S[3][i]),
          ptr_or_null<state_t>(S[4], i), ptr_or_null<float>(S[5], i), it.begin, it.end, scalars[i], c);
    });
  });
}

template <typename scalar_t, typename state_t, bool MASTER>
void adam_dispatch(const Slots& d, const Items& items, bool amsgrad,
                   const std::vector<double>& steps, double lr, double beta1, double beta2,
                   double weight_decay, double eps, bool maximize, bool decoupled, double gscale,
                   bool unscale) {
  using acc_t = at::opmath_type<scalar_t>;
  // Scalars are computed in double like the for-loop optimizer's Python floats, then rounded to
  // acc_t once, as the tensor ops do with their scalar arguments.
  std::vector<AdamScalars<acc_t>> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    // Parameters of a group usually share their step count: two pow() per distinct count.
    if (i > 0 && steps[i] == steps[i - 1]) {
      scalars[i] = scalars[i - 1];
      continue;
    }
    const double bc1 = 1.0 - std::pow(beta1, steps[i]);
    const double bc2 = 1.0 - std::pow(beta2, steps[i]);
    scalars[i] = {static_cast<acc_t>(lr / bc1), static_cast<acc_t>(1.0 / std::sqrt(bc2)),
                  static_cast<acc_t>(decoupled ? 1.0 - lr * weight_decay : 1.0)};
  }
  const AdamConsts<acc_t> c{static_cast<acc_t>(beta2),
                            static_cast<acc_t>(1.0 - beta2),
                            static_cast<acc_t>(1.0 - beta1),
                            static_cast<acc_t>(eps),
                            static_cast<acc_t>(decoupled ? 0.0 : weight_decay),
                            static_cast<acc_t>(gscale),
                            static_cast<acc_t>(maximize ? -1.0 : 1.0),
                            unscale};
  if (amsgrad) adam_run<scalar_t, state_t, true, MASTER>(d, items, scalars, c);
  else adam_run<scalar_t, state_t, false, MASTER>(d, items, scalars, c);
}

// The float32 reciprocal GradScaler.unscale_ multiplies by, so that a scaled step equals
// unscale-then-step bit for bit.
double inv_scale(const std::optional<at::Tensor>& grad_scale) {
  if (!grad_scale.has_value()) return 1.0;
  return static_cast<float>(1.0 / static_cast<double>(grad_scale->item<float>()));
}

double read_lr(double lr, const std::optional<at::Tensor>& lr_tensor) {
  return lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
}

// A skipped step (GradScaler found inf/NaN in the grads) changes nothing, step counts included.
bool skip_step(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<float>() != 0.f;
}

// Adds 1 to n float32 step counters, the k-th at counter_at(k); returns the new counts.
template <typename CounterAt>
std::vector<double> count_steps(size_t n, const CounterAt& counter_at) {
  std::vector<double> steps(n);
  for (size_t k = 0; k < n; ++k) {
    float* s = counter_at(k);
    *s += 1.f;
    steps[k] = *s;
  }
  return steps;
}

// Adds 1 to each step counter (only those listed in `only`, when given); returns the new counts.
std::vector<double> bump_steps(at::TensorList state_steps, const std::vector<size_t>* only = nullptr) {
  return count_steps(only ? only->size() : state_steps.size(), [&](size_t k) {
    return static_cast<float*>(state_steps[only ? (*only)[k] : k].data_ptr());  // validated float32
  });
}

// The AdamW/Adam update over validated slots; steps already counted.
void adam_cpu(const Slots& sl, at::ScalarType dtype, bool master, bool amsgrad,
              const std::vector<double>& steps, double lr, double beta1, double beta2,
              double weight_decay, double eps, bool maximize, bool decoupled, double gscale,
              bool unscale) {
  const Items items = make_items(sl.numel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "adamw_step_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (master) {
        adam_dispatch<scalar_t, float, true>(sl, items, amsgrad, steps, lr, beta1, beta2,
                                             weight_decay, eps, maximize, decoupled, gscale, unscale);
        return;
      }
    }
    adam_dispatch<scalar_t, scalar_t, false>(sl, items, amsgrad, steps, lr, beta1, beta2,
                                             weight_decay, eps, maximize, decoupled, gscale, unscale);
  });
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList state_steps, at::TensorList master_params, double lr,
                    const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                    double weight_decay, double eps, bool amsgrad, bool maximize,
                    bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  check_adamw_step_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                        master_params, lr_tensor, amsgrad, grad_scale, found_inf);
  if (params.empty() || skip_step(found_inf)) return;
  const double gscale = inv_scale(grad_scale);
  lr = read_lr(lr, lr_tensor);
  const std::vector<double> steps = bump_steps(state_steps);
  DenseGroup d = make_dense({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params},
                            {true, grad_scale.has_value(), true, true, true, true});
  adam_cpu(slots_of(d), params[0].scalar_type(), !master_params.empty(), amsgrad, steps, lr, beta1,
           beta2, weight_decay, eps, maximize, decoupled_weight_decay, gscale, grad_scale.has_value());
  d.finish();
}

// ---- SGD ------------------------------------------------------------------------------------

template <typename acc_t>
struct SGDConsts {
  acc_t lr, momentum, one_minus_dampening, weight_decay, inv_grad_scale, sign;
  bool unscale_grads;  // as in AdamConsts
};

// STORE_GRAD: as in adam_chunk.
template <typename scalar_t, typename state_t, bool MOMENTUM, bool FIRST, bool NESTEROV, bool MASTER,
          bool STORE_GRAD>
void sgd_chunk(scalar_t* __restrict__ p, scalar_t* __restrict__ g, state_t* __restrict__ buf,
               float* __restrict__ master, int64_t b, int64_t e,
               const SGDConsts<at::opmath_type<scalar_t>> c) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = b; i < e; ++i) {
    acc_t gi = static_cast<acc_t>(g[i]) * c.inv_grad_scale;
    if constexpr (STORE_GRAD) g[i] = static_cast<scalar_t>(gi);
    gi = gi * c.sign;
    acc_t pi = MASTER ? static_cast<acc_t>(master[i]) : static_cast<acc_t>(p[i]);
    gi = c.weight_decay != acc_t(0) ? gi + c.weight_decay * pi : gi;
    if constexpr (MOMENTUM) {
      // The first step seeds the buffer with the gradient itself (torch: clone(grad)).
      const acc_t bi = FIRST ? gi : static_cast<acc_t>(buf[i]) * c.momentum + c.one_minus_dampening * gi;
      buf[i] = static_cast<state_t>(bi);
      gi = NESTEROV ? gi + c.momentum * bi : bi;
    }
    pi = pi + (-c.lr) * gi;
    if constexpr (MASTER) master[i] = static_cast<float>(pi);
    p[i] = static_cast<scalar_t>(pi);
  }
}

template <typename scalar_t, typename state_t, bool MOMENTUM, bool FIRST, bool NESTEROV, bool MASTER>
void sgd_run(const Slots& sl, const Items& items,
             const SGDConsts<at::opmath_type<scalar_t>>& c) {
  const auto& S = sl.ptr;
  with_bool(c.unscale_grads, [&](auto store_grad) {
    for_each_item(items, [&](const Item& it) {
      const size_t i = it.tensor;
      sgd_chunk<scalar_t, state_t, MOMENTUM, FIRST, NESTEROV, MASTER, decltype(store_grad)::value>(
          static_cast<scalar_t*>(S[0][i]), static_cast<scalar_t*>(S[1][i]),
          ptr_or_null<state_t>(S[2], i), ptr_or_null<float>(S[3], i), it.begin, it.end, c);
    });
  });
}

template <typename scalar_t, typename state_t, bool MASTER>
void sgd_dispatch(const Slots& d, const Items& items, bool has_momentum,
                  bool first, bool nesterov, const SGDConsts<at::opmath_type<scalar_t>>& c) {
  if (!has_momentum) return sgd_run<scalar_t, state_t, false, false, false, MASTER>(d, items, c);
  if (first) {
    if (nesterov) return sgd_run<scalar_t, state_t, true, true, true, MASTER>(d, items, c);
    return sgd_run<scalar_t, state_t, true, true, false, MASTER>(d, items, c);
  }
  if (nesterov) return sgd_run<scalar_t, state_t, true, false, true, MASTER>(d, items, c);
  return sgd_run<scalar_t, state_t, true, false, false, MASTER>(d, items, c);
}

// The SGD update over validated slots.
void sgd_cpu(const Slots& sl, at::ScalarType dtype, bool master, bool has_momentum, double lr,
             double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
             bool is_first_step, double gscale, bool unscale) {
  const Items items = make_items(sl.numel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sgd_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SGDConsts<acc_t> c{static_cast<acc_t>(lr), static_cast<acc_t>(momentum),
                             static_cast<acc_t>(1.0 - dampening), static_cast<acc_t>(weight_decay),
                             static_cast<acc_t>(gscale), static_cast<acc_t>(maximize ? -1.0 : 1.0),
                             unscale};
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (master) {
        sgd_dispatch<scalar_t, float, true>(sl, items, has_momentum, is_first_step, nesterov, c);
        return;
      }
    }
    sgd_dispatch<scalar_t, scalar_t, false>(sl, items, has_momentum, is_first_step, nesterov, c);
  });
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::TensorList master_params, double lr,
                  const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, bool is_first_step,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf) {
  check_sgd_step_args(params, grads, momentum_buffers, master_params, lr_tensor, grad_scale,
                      found_inf);
  if (params.empty() || skip_step(found_inf)) return;
  const double gscale = inv_scale(grad_scale);
  lr = read_lr(lr, lr_tensor);
  DenseGroup d = make_dense({params, grads, momentum_buffers, master_params},
                            {true, grad_scale.has_value(), true, true});
  sgd_cpu(slots_of(d), params[0].scalar_type(), !master_params.empty(), !momentum_buffers.empty(),
          lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step, gscale,
          grad_scale.has_value());
  d.finish();
}

// ---- EMA ------------------------------------------------------------------------------------

void check_ema_args(at::TensorList averages, at::TensorList values, double weight, const char* op) {
  check_list_size(values, averages.size(), op, "values");
  FASTMLP_CHECK_VALUE(std::isfinite(weight) && weight >= 0.0 && weight <= 1.0, op,
                      ": weight must be in [0, 1], got ", weight);
  for (size_t i = 0; i < averages.size(); ++i) {
    check_floating(averages[i], op, "averages");
    FASTMLP_CHECK_TYPE(averages[i].scalar_type() == averages[0].scalar_type(), op,
                       ": all averages of one call must have one dtype, got ", averages[0].scalar_type(),
                       " and ", averages[i].scalar_type());
    FASTMLP_CHECK(averages[i].device() == averages[0].device(), op,
                  ": all averages of one call must be on one device, got ", averages[0].device(), " and ",
                  averages[i].device());
    check_like_param(averages[i], values[i], op, "values", i, averages[0].scalar_type());
  }
  check_writable(averages, op, "averages");
}

void ema_update_cpu(at::TensorList averages, at::TensorList values, double weight) {
  constexpr const char* op = "fastmlp.ema_update_";
  check_ema_args(averages, values, weight, op);
  if (averages.empty()) return;
  DenseGroup d = make_dense({averages, values}, {true, false});
  const Slots sl = slots_of(d);
  const Items items = make_items(sl.numel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, averages[0].scalar_type(), "ema_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t w = static_cast<acc_t>(weight);
    // lerp's form is chosen once for the call (it depends on the weight only), so the inner loop
    // has no branch and vectorises.
    with_bool(w < acc_t(0.5), [&](auto low) {
      for_each_item(items, [&](const Item& it) {
        scalar_t* __restrict__ a = static_cast<scalar_t*>(sl.ptr[0][it.tensor]);
        const scalar_t* __restrict__ v = static_cast<const scalar_t*>(sl.ptr[1][it.tensor]);
        for (int64_t i = it.begin; i < it.end; ++i) {
          const acc_t ai = static_cast<acc_t>(a[i]), vi = static_cast<acc_t>(v[i]);
          a[i] = static_cast<scalar_t>(decltype(low)::value ? ai + w * (vi - ai) : vi - (vi - ai) * (acc_t(1) - w));
        }
      });
    });
  });
  d.finish();
}

// ---- norms ----------------------------------------------------------------------------------

void check_norms_args(at::TensorList tensors, const char* op) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_floating(tensors[i], op, "tensors");
    FASTMLP_CHECK(tensors[i].device() == tensors[0].device(), op,
                  ": all tensors of one call must be on one device, got ", tensors[0].device(), " and ",
                  tensors[i].device());
  }
}

// Sum of squares of x[0, n) in double, in 16 independent partial sums (two 8-wide vectors once
// vectorised: a single running sum would wait on each add's latency), added up in a fixed order.
template <typename scalar_t>
double sum_of_squares(const scalar_t* __restrict__ x, int64_t n) {
  constexpr int kLanes = 16;
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double v = static_cast<double>(x[i + j]);
      acc[j] += v * v;
    }
  }
  double tail = 0.0;
  for (; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    tail += v * v;
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0] + tail;
}

at::Tensor norms_cpu(at::TensorList tensors) {
  constexpr const char* op = "fastmlp.norms";
  check_norms_args(tensors, op);
  const int64_t n = static_cast<int64_t>(tensors.size());
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  if (n == 0) return out;
  // Dense working copies only for the rare tensor that is not (the sum ignores element order).
  std::vector<at::Tensor> work(tensors.begin(), tensors.end());
  for (auto& t : work) {
    if (!t.is_non_overlapping_and_dense()) t = t.contiguous();
  }
  // Fixed chunks of kChunk elements, each summed on its own, then each tensor's chunks in order:
  // the same result for any thread count.
  constexpr int64_t kChunk = 16384;
  struct Chunk {
    int64_t tensor, begin, end;
  };
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t numel = work[t].numel();
    total += numel;
    for (int64_t b = 0; b < numel; b += kChunk) chunks.push_back({t, b, std::min(numel, b + kChunk)});
  }
  std::vector<double> partial(chunks.size(), 0.0);
  auto run = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& k = chunks[c];
      const at::Tensor& t = work[k.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "norms_cpu", [&] {
        partial[c] = sum_of_squares(t.const_data_ptr<scalar_t>() + k.begin, k.end - k.begin);
      });
    }
  };
  const int64_t nc = static_cast<int64_t>(chunks.size());
  if (total < 2 * kMinPerThread || at::get_num_threads() == 1) {
    run(0, nc);
  } else {
    at::parallel_for(0, nc, 1, run);
  }
  double* o = out.data_ptr<double>();
  std::fill(o, o + n, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) o[chunks[c].tensor] += partial[c];
  for (int64_t t = 0; t < n; ++t) o[t] = std::sqrt(o[t]);
  return out;
}

// ---- Step plans -----------------------------------------------------------------------------
//
// fastmlp.optim's fast path on the CPU. Passing every tensor of a group through the dispatcher
// each step costs ~1 us per parameter (Python list -> IValue conversion of five lists, and a
// GIL round trip whenever a Python-owned tensor's last C++ reference is dropped): 240 us of a
// 200-tensor step that does 1 ms of math. A plan holds the group's parameters and state tensors
// once and reads each gradient from p.grad itself, so a step crosses from Python with scalars
// only. A parameter whose grad is None is skipped (state untouched). step() returns false, having
// changed nothing, when a gradient does not match its parameter's dtype, shape or layout, or a
// tensor changed layout since the plan was made; fastmlp.optim then takes the general path (the
// op, and torch's own errors).

// A state slot whose tensors all view one storage, as fastmlp.optim packs them (pack_state in
// fastmlp/optim/_common.py): the plan keeps the storage and each tensor's byte offset in it, and a
// step reads neither the state tensors nor their metadata. Those reads were the step's largest
// per-parameter cost: after the previous step's data went through the caches every TensorImpl and
// StorageImpl is a cache miss, ~1 us per parameter over p, g, m, v and step (measured: a cold
// plan gather took 280-580 us for 200 tensors, ~200-290 us without the state slots).
// The storage's size is checked at every step, so a state tensor resized in place (which may
// reallocate the storage) makes the plan decline instead of writing to freed memory.
struct Packed {
  c10::Storage storage;
  size_t nbytes = 0;
  std::vector<int64_t> offset;  // bytes from the storage's start, per parameter

  // The packed view of ts, or nullopt when they do not all view one storage within its bounds.
  // want_layout_of: each tensor must have that parameter's sizes and dense layout (moments,
  // master copies); nullptr: 0-dim float32 tensors (step counters).
  static std::optional<Packed> of(const std::vector<at::Tensor>& ts,
                                  const std::vector<at::Tensor>* want_layout_of) {
    if (ts.empty() || !ts[0].has_storage()) return std::nullopt;
    Packed pk;
    pk.storage = ts[0].storage();
    pk.nbytes = pk.storage.nbytes();
    const c10::StorageImpl* impl = pk.storage.unsafeGetStorageImpl();
    pk.offset.reserve(ts.size());
    for (size_t i = 0; i < ts.size(); ++i) {
      const at::Tensor& t = ts[i];
      if (!t.has_storage() || t.storage().unsafeGetStorageImpl() != impl) return std::nullopt;
      if (want_layout_of != nullptr) {
        const at::Tensor& p = (*want_layout_of)[i];
        if (t.sizes() != p.sizes() || (p.numel() != 0 && !shares_dense_layout(p, t))) return std::nullopt;
      } else if (t.dim() != 0 || t.scalar_type() != at::kFloat) {
        return std::nullopt;
      }
      const int64_t off = t.storage_offset() * static_cast<int64_t>(t.element_size());
      // Dense: the elements fill numel * element_size bytes from the offset.
      const int64_t span = t.numel() * static_cast<int64_t>(t.element_size());
      if (off < 0 || off + span > static_cast<int64_t>(pk.nbytes)) return std::nullopt;
      pk.offset.push_back(off);
    }
    return pk;
  }

  // This step's base address, or nullptr when the storage changed size since the plan was made.
  char* base() const {
    if (storage.nbytes() != nbytes) return nullptr;
    return static_cast<char*>(storage.mutable_data());
  }
};

class StepPlan : public torch::CustomClassHolder {
 protected:
  // slot 0: params, slot 1: grads (read at each step), slots 2...: state, in the op's order.
  std::vector<std::vector<at::Tensor>> slots_;
  std::vector<std::optional<Packed>> packed_;  // per slot: set for packed state slots
  // The parameters' sizes and strides when the plan was made (all parameters, back to back): a
  // packed state slot was checked against them once, so a parameter must keep them (a parameter
  // resized in place, or given new .data of another size, would walk past its packed state).
  std::vector<int64_t> p_layout_;
  std::vector<size_t> p_layout_at_;
  at::ScalarType dtype_ = at::kFloat;

  void init(const char* op) {
    for (const auto& p : slots_[0]) {
      FASTMLP_CHECK(p.device().is_cpu(), op, " plan: the parameters must be on the CPU, got ", p.device());
    }
    if (!slots_[0].empty()) dtype_ = slots_[0][0].scalar_type();
    packed_.assign(slots_.size(), std::nullopt);
    for (size_t s = 2; s < slots_.size(); ++s) packed_[s] = Packed::of(slots_[s], &slots_[0]);
    for (const auto& p : slots_[0]) {
      p_layout_at_.push_back(p_layout_.size());
      p_layout_.insert(p_layout_.end(), p.sizes().begin(), p.sizes().end());
      p_layout_.insert(p_layout_.end(), p.strides().begin(), p.strides().end());
    }
    p_layout_at_.push_back(p_layout_.size());
  }

  bool same_layout_as_at_init(size_t i, c10::IntArrayRef sizes, c10::IntArrayRef strides) const {
    const size_t b = p_layout_at_[i], e = p_layout_at_[i + 1];
    const size_t dim = sizes.size();
    if (2 * dim != e - b) return false;
    for (size_t d = 0; d < dim; ++d) {
      if (sizes[d] != p_layout_[b + d] || strides[d] != p_layout_[b + dim + d]) return false;
    }
    return true;
  }

  // This step's pointers for the parameters that have a gradient, their indices in `active`; a
  // parameter whose grad is None is skipped with its state untouched, as torch.optim does (frozen
  // layers never leave the plan). False, having changed nothing, when the general path must run.
  bool gather(Slots& sl, std::vector<size_t>& active, bool write_grads) const {
    const auto& P = slots_[0];
    const size_t n = P.size();
    sl.ptr.assign(slots_.size(), {});
    for (size_t s = 0; s < slots_.size(); ++s) {
      if (s < 2 || !slots_[s].empty()) sl.ptr[s].reserve(n);
    }
    sl.numel.clear();
    sl.numel.reserve(n);
    active.clear();
    active.reserve(n);
    std::vector<char*> base(slots_.size(), nullptr);
    for (size_t s = 2; s < slots_.size(); ++s) {
      if (packed_[s].has_value() && (base[s] = packed_[s]->base()) == nullptr) return false;
    }
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& p = P[i];
      const at::Tensor& g = p.grad();
      if (!g.defined()) continue;
      const c10::IntArrayRef sizes = p.sizes();
      if (g.layout() != at::kStrided || !g.device().is_cpu() || p.scalar_type() != dtype_ ||
          g.scalar_type() != dtype_ || g.sizes() != sizes) {
        return false;
      }
      const bool empty = p.numel() == 0;
      if (!empty && !(p.is_non_overlapping_and_dense() && shares_dense_layout(p, g))) return false;
      if (!same_layout_as_at_init(i, sizes, p.strides())) return false;
      for (size_t s = 2; s < slots_.size(); ++s) {
        if (slots_[s].empty() || base[s] != nullptr) continue;
        const at::Tensor& t = slots_[s][i];
        if (t.sizes() != sizes || (!empty && !shares_dense_layout(p, t))) return false;
      }
      active.push_back(i);
      sl.numel.push_back(p.numel());
      sl.ptr[0].push_back(p.data_ptr());
      // The mutable pointer (which gives a lazily copied grad its own storage) only when the
      // step writes the grads back unscaled.
      sl.ptr[1].push_back(write_grads ? g.data_ptr() : const_cast<void*>(g.const_data_ptr()));
      for (size_t s = 2; s < slots_.size(); ++s) {
        if (base[s] != nullptr) sl.ptr[s].push_back(base[s] + packed_[s]->offset[i]);
        else if (!slots_[s].empty()) sl.ptr[s].push_back(slots_[s][i].data_ptr());
      }
    }
    return true;
  }

  enum class Start { Decline, Skip, Run };

  // The common start of a step: gather this step's pointers (Decline: the general path must run),
  // validate the scalar tensors, honour found_inf (Skip: nothing to do).
  Start start(Slots& sl, std::vector<size_t>& active, const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, const char* op) const {
    if (!gather(sl, active, grad_scale.has_value())) return Start::Decline;
    if (active.empty()) return Start::Skip;
    const at::Device cpu(at::kCPU);
    check_lr_tensor(lr_tensor, cpu, op);
    check_scalar_tensor(grad_scale, cpu, op, "grad_scale");
    check_scalar_tensor(found_inf, cpu, op, "found_inf");
    return skip_step(found_inf) ? Start::Skip : Start::Run;
  }
};

class AdamWPlan : public StepPlan {
  std::vector<at::Tensor> steps_;
  std::optional<Packed> packed_steps_;

  // Counts a step for the active parameters (the op's bump_steps, through the packed storage
  // when the counters are packed). False, having changed nothing, when that storage changed.
  bool bump(const std::vector<size_t>& active, std::vector<double>& steps) const {
    if (!packed_steps_.has_value()) {
      steps = bump_steps(steps_, &active);
      return true;
    }
    char* b = packed_steps_->base();
    if (b == nullptr) return false;
    steps = count_steps(active.size(), [&](size_t k) {
      return reinterpret_cast<float*>(b + packed_steps_->offset[active[k]]);
    });
    return true;
  }

 public:
  AdamWPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> exp_avgs,
            std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> max_exp_avg_sqs,
            std::vector<at::Tensor> state_steps, std::vector<at::Tensor> master_params)
      : steps_(std::move(state_steps)) {
    // The op's own validation, with the params standing in for the grads.
    check_adamw_step_args(params, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps_,
                          master_params, std::nullopt, !max_exp_avg_sqs.empty(), std::nullopt,
                          std::nullopt);
    slots_ = {std::move(params), {}, std::move(exp_avgs), std::move(exp_avg_sqs),
              std::move(max_exp_avg_sqs), std::move(master_params)};
    init(kAdamW);
    packed_steps_ = Packed::of(steps_, nullptr);
  }

  bool step(double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
            double weight_decay, double eps, bool maximize, bool decoupled_weight_decay,
            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
    Slots sl;
    std::vector<size_t> active;
    const Start st = start(sl, active, lr_tensor, grad_scale, found_inf, kAdamW);
    if (st != Start::Run) return st == Start::Skip;
    const double gscale = inv_scale(grad_scale);
    std::vector<double> steps;
    if (!bump(active, steps)) return false;
    adam_cpu(sl, dtype_, !slots_[5].empty(), !slots_[4].empty(), steps, read_lr(lr, lr_tensor),
             beta1, beta2, weight_decay, eps, maximize, decoupled_weight_decay, gscale,
             grad_scale.has_value());
    return true;
  }
};

class SGDPlan : public StepPlan {
 public:
  SGDPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> momentum_buffers,
          std::vector<at::Tensor> master_params) {
    check_sgd_step_args(params, params, momentum_buffers, master_params, std::nullopt,
                        std::nullopt, std::nullopt);
    slots_ = {std::move(params), {}, std::move(momentum_buffers), std::move(master_params)};
    init(kSGD);
  }

  bool step(double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
            double dampening, double weight_decay, bool nesterov, bool maximize,
            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
    Slots sl;
    std::vector<size_t> active;
    const Start st = start(sl, active, lr_tensor, grad_scale, found_inf, kSGD);
    if (st != Start::Run) return st == Start::Skip;
    sgd_cpu(sl, dtype_, !slots_[3].empty(), !slots_[2].empty(), read_lr(lr, lr_tensor), momentum,
            dampening, weight_decay, nesterov, maximize, /*is_first_step=*/false, inv_scale(grad_scale),
            grad_scale.has_value());
    return true;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("ema_update_", &ema_update_cpu);
  m.impl("norms", &norms_cpu);
}

// The step plans are classes, not ops: they hold tensors between calls. csrc/ops.cpp holds the
// op schemas; these two are the library's only classes.
TORCH_LIBRARY_FRAGMENT(fastmlp, m) {
  m.class_<AdamWPlan>("AdamWPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>())
      .def("step", &AdamWPlan::step);
  m.class_<SGDPlan>("SGDPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>())
      .def("step", &SGDPlan::step);
}

// Optimizer steps are not differentiable and fastmlp.optim calls them under no_grad. Without a
// kernel here every call runs autograd's not-implemented fallback, which walks all (hundreds of)
// tensor arguments; a fallthrough skips it. Like torch's own fused optimizers (_fused_adamw_), the
// step does not bump the parameters' version counters.
TORCH_LIBRARY_IMPL(fastmlp, Autograd, m) {
  m.impl("adamw_step_", torch::CppFunction::makeFallthrough());
  m.impl("sgd_step_", torch::CppFunction::makeFallthrough());
  m.impl("ema_update_", torch::CppFunction::makeFallthrough());
  m.impl("norms", torch::CppFunction::makeFallthrough());
}

#ifdef FASTMLP_WITH_CUDA
namespace {

cuda_optim::DType cuda_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return cuda_optim::DType::Float;
    case at::kDouble: return cuda_optim::DType::Double;
    case at::kHalf: return cuda_optim::DType::Half;
    case at::kBFloat16: return cuda_optim::DType::BFloat16;
    default: FASTMLP_CHECK_TYPE(false, "fastmlp optimizers: unsupported dtype ", st);
  }
}

cuda_optim::DeviceScalars device_scalars(double lr, const std::optional<at::Tensor>& lr_tensor,
                                         const std::optional<at::Tensor>& grad_scale,
                                         const std::optional<at::Tensor>& found_inf) {
  cuda_optim::DeviceScalars s{lr, nullptr, nullptr, nullptr, nullptr};
  if (lr_tensor.has_value()) {
    if (lr_tensor->is_cpu()) s.lr = lr_tensor->item<double>();  // a host value: no device sync
    else if (lr_tensor->scalar_type() == at::kFloat) s.lr_f = lr_tensor->data_ptr<float>();
    else s.lr_d = lr_tensor->data_ptr<double>();
  }
  if (grad_scale.has_value()) s.grad_scale = grad_scale->data_ptr<float>();
  if (found_inf.has_value()) s.found_inf = found_inf->data_ptr<float>();
  return s;
}

template <typename T>
T* raw_or_null(const std::vector<at::Tensor>& v, size_t i) {
  return v.empty() ? nullptr : static_cast<T*>(v[i].data_ptr());
}

void check_cuda(const char* err, const char* op) {
  FASTMLP_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
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
  void* stream = at::cuda::getCurrentCUDAStream().stream();
  cuda_optim::AdamArgs args{device_scalars(lr, lr_tensor, grad_scale, found_inf), beta1, beta2,
                            weight_decay, eps, amsgrad, maximize, decoupled_weight_decay};
  const size_t n = params.size();
  // The dense copies (which may fail, e.g. out of memory) come before the counters are bumped.
  DenseGroup d = make_dense({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params},
                            {true, grad_scale.has_value(), true, true, true, true});
  std::vector<float*> steps(n);
  for (size_t i = 0; i < n; ++i) steps[i] = state_steps[i].data_ptr<float>();
  check_cuda(cuda_optim::increment_steps(steps.data(), static_cast<int>(n), args.s.found_inf, stream), kAdamW);
  std::vector<cuda_optim::TensorPtrs> tp(n);
  for (size_t i = 0; i < n; ++i) {
    tp[i] = {d.work[0][i].data_ptr(), d.work[1][i].data_ptr(), d.work[2][i].data_ptr(),
             d.work[3][i].data_ptr(), raw_or_null<void>(d.work[4], i), raw_or_null<float>(d.work[5], i),
             steps[i], d.work[0][i].numel()};
  }
  check_cuda(cuda_optim::adam_step(tp.data(), static_cast<int>(n), cuda_dtype(params[0].scalar_type()),
                                   !master_params.empty(), args, stream), kAdamW);
  d.finish();
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
  void* stream = at::cuda::getCurrentCUDAStream().stream();
  cuda_optim::SGDArgs args{device_scalars(lr, lr_tensor, grad_scale, found_inf), momentum, dampening,
                           weight_decay, nesterov, maximize, is_first_step, !momentum_buffers.empty()};
  DenseGroup d = make_dense({params, grads, momentum_buffers, master_params},
                            {true, grad_scale.has_value(), true, true});
  const size_t n = params.size();
  std::vector<cuda_optim::TensorPtrs> tp(n);
  for (size_t i = 0; i < n; ++i) {
    tp[i] = {d.work[0][i].data_ptr(), d.work[1][i].data_ptr(), raw_or_null<void>(d.work[2], i),
             nullptr, nullptr, raw_or_null<float>(d.work[3], i), nullptr, d.work[0][i].numel()};
  }
  check_cuda(cuda_optim::sgd_step(tp.data(), static_cast<int>(n), cuda_dtype(params[0].scalar_type()),
                                  !master_params.empty(), args, stream), kSGD);
  d.finish();
}

// torch's fused multi-tensor lerp is already one launch per ~hundred tensors on CUDA; this adds
// the op's validation and the device guard.
void ema_update_cuda(at::TensorList averages, at::TensorList values, double weight) {
  check_ema_args(averages, values, weight, "fastmlp.ema_update_");
  if (averages.empty()) return;
  const c10::cuda::CUDAGuard guard(averages[0].device());
  at::_foreach_lerp_(averages, values, at::Scalar(weight));
}

at::Tensor norms_cuda(at::TensorList tensors) {
  check_norms_args(tensors, "fastmlp.norms");
  if (tensors.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA));
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  return at::stack(at::_foreach_norm(tensors, 2, at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) {
  m.impl("adamw_step_", &adamw_step_cuda);
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("ema_update_", &ema_update_cuda);
  m.impl("norms", &norms_cuda);
}
#endif  // FASTMLP_WITH_CUDA

}  // namespace fastmlp
