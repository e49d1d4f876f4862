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
}
