// Autocast rules: under torch.autocast the forward runs in the autocast dtype, as nn.Linear does
// (both are on the "lower precision" list). The cast copies are recorded by autograd, so fp32
// parameters receive fp32 gradients. The backward op is not cast: it runs in the dtype of the
// tensors the forward saved.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace fastmlp {
namespace {

template <c10::DeviceType Dev, c10::DispatchKey Key>
std::tuple<at::Tensor, at::Tensor> linear_act_forward_autocast(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::string_view activation, bool save_for_backward) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmlp::linear_act_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           c10::string_view, bool)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
  const auto dtype = at::autocast::get_autocast_dtype(Dev);
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = at::autocast::cached_cast(dtype, *bias, Dev);
  return op.call(at::autocast::cached_cast(dtype, input, Dev),
                 at::autocast::cached_cast(dtype, weight, Dev), b, activation, save_for_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, AutocastCPU, m) {
  m.impl("linear_act_forward",
         &linear_act_forward_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(fastmlp, AutocastCUDA, m) {
  m.impl("linear_act_forward",
         &linear_act_forward_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace fastmlp
