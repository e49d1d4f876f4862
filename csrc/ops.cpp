// Every fastmlp op schema, in one place. Backends register kernels in csrc/cpu/*.cpp and
// csrc/cuda/*.cu; fastmlp/ops.py registers the fake (meta) kernels and autograd formulas.
#include <torch/library.h>

TORCH_LIBRARY(fastmlp, m) {
  // y = act(input @ weight^T + bias), input (*, in), weight (out, in), bias (out) or None.
  // Returns (y, saved). `saved` is whatever the backend's backward needs besides y: the
  // pre-activation (flattened to 2-D) for gelu, gelu_tanh and silu; an empty tensor for none and
  // for relu on the CPU (its derivative is read from y); a backend may store a packed mask for
  // relu instead. With save_for_backward=False (inference) `saved` is always empty.
  m.def(
      "linear_act_forward(Tensor input, Tensor weight, Tensor? bias, str activation, "
      "bool save_for_backward) -> (Tensor, Tensor)");
  // Gradients of linear_act_forward. `output` is y (needed for relu on the CPU, may be empty
  // otherwise); `saved` is the forward's second output. Outputs not asked for by output_mask
  // (grad_input, grad_weight, grad_bias) come back as empty tensors.
  m.def(
      "linear_act_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor output, "
      "Tensor saved, str activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- dropout ----
  // input * keep / (1 - p), keep = 1 for each element whose counter-based hash of (seed, index in
  // row-major order) clears p, else 0: the mask is a pure function of (seed, shape), so the
  // backward is this same op applied to the gradient and nothing is saved. Kernel in
  // csrc/cpu/dropout.cpp (CPU only; fastmlp.nn.Dropout uses torch's dropout elsewhere).
  // seed: a one-element int64 CPU tensor, so that torch.compile traces the seed's draw
  // (torch.randint) into the graph instead of baking one Python int into it.
  m.def("dropout(Tensor input, float p, Tensor seed) -> Tensor");

  // ---- optimizers ----
  // Fused multi-tensor optimizer steps, updating every parameter of a group (one device, one
  // dtype) in place in one call; kernels in csrc/cpu/optim.cpp and csrc/cuda/optim.cu, front doors
  // in fastmlp/optim. state_steps are one-element float32 tensors on the params' device (the
  // layout of torch.optim's fused=True); the op adds 1 to each before using it. With found_inf
  // (a float32 scalar on the params' device) nonzero, nothing changes, step counts included.
  // grad_scale: grads are multiplied by its float32 reciprocal first, as GradScaler.unscale_ does,
  // and (unless found_inf) written back so, as torch's fused optimizers do: grads are mutable.
  // lr_tensor, when given, replaces lr and is read on the device (capturable, no host sync).
  // master_params: empty, or fp32 copies of fp16/bf16 params that hold the true value (the
  // moments are then fp32 too); the params receive the rounded result.
  // decoupled_weight_decay=True is AdamW, False is Adam's L2 penalty added to the gradient.
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, "
      "Tensor(g!)[] master_params, float lr, Tensor? lr_tensor, float beta1, float beta2, "
      "float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");
  // SGD with momentum, dampening, nesterov and weight decay. momentum_buffers is empty when
  // momentum == 0; with is_first_step the buffers are seeded with the gradient (torch's
  // clone(grad)) instead of being read.
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "Tensor(d!)[] master_params, float lr, Tensor? lr_tensor, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize, bool is_first_step, Tensor? grad_scale, "
      "Tensor? found_inf) -> ()");
  // Exponential moving average: averages[i] = lerp(averages[i], values[i], weight), in the form of
  // torch's lerp (fp32 math for fp16/bf16), for every tensor of one device and dtype in one call
  // (fastmlp.optim.EMA). CPU: one parallel region over all elements (torch's _foreach_lerp_ runs
  // one per tensor there); CUDA: torch's fused _foreach_lerp_.
  m.def("ema_update_(Tensor(a!)[] averages, Tensor[] values, float weight) -> ()");
  // The L2 norm of each tensor, accumulated in float64 (a sum of squares of finite fp32 values
  // overflows fp32 once they reach ~1e19, which a diverging run's gradients do before any is Inf),
  // as a float64 tensor of shape (len(tensors),) on their device (a non-empty list: the dispatcher
  // picks the kernel from the tensors); NaN and Inf propagate. CPU: one
  // parallel pass over fixed chunks of every tensor, summed in a fixed order, so the result does not
  // depend on the thread count (torch's _foreach_norm with dtype=float64 converts each tensor to a
  // float64 copy there first); CUDA: torch's _foreach_norm. fastmlp.monitor's gradient norms.
  m.def("norms(Tensor[] tensors) -> Tensor");

  // ---- norms (CPU kernels in csrc/cpu/norm.cpp; fastmlp.nn.LayerNorm / BatchNorm1d use torch's
  // norms on other devices) ----
  // Layer norm over the trailing dimensions normalized_shape: returns (y, mean, rstd), mean and rstd
  // of shape (rows,) in float32 (float64 for a float64 input), rstd = 1 / sqrt(biased var + eps).
  // weight and bias: shape normalized_shape, the input's dtype or float32 with a float16/bfloat16
  // input. The backward's grad_weight / grad_bias have the weight's dtype; outputs not asked for
  // by output_mask come back empty.
  m.def(
      "layer_norm(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_backward(Tensor grad_output, Tensor input, int[] normalized_shape, Tensor mean, "
      "Tensor rstd, Tensor? weight, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Training-mode batch norm of a (batch, channels) input with the batch's statistics: returns (y,
  // mean, invstd, unbiased_var) per channel (float32, or float64 for a float64 input). The running
  // estimates are the caller's to update (fastmlp.functional.batch_norm, from mean and
  // unbiased_var), so the op mutates nothing.
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
