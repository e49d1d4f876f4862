// Autograd for linear_act, in C++.
//
// Why not torch.library.register_autograd (Python): its autograd.Function wrapper runs Python on
// every call, forward and backward, even under no_grad. Measured here on a 8x16 layer: the op
// through a Python autograd kernel took 60 us per call where the same op below autograd took 25
// us and native linear+relu 25 us. For small MLP layers that overhead is the whole budget (see
// ARCHITECTURE.md), so the autograd kernel is a torch::autograd::Function registered on the
// Autograd key. Dispatch still goes through the ops' schemas and fake kernels, so torch.compile
// and opcheck trace it like any ATen op with a derivative.
//
// Higher-order gradients (gradient penalties, MAML, Hessian-vector products): a backward that is
// itself recorded (create_graph=True) runs as the ATen ops the op's backward fuses, which carry
// their own derivatives; the pre-activation it reads is the op's second output, so its share of the
// second-order term comes back into this op's backward as a gradient for that output.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/native_batch_norm.h>
#include <ATen/ops/native_layer_norm.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "activation.h"
#include "checks.h"

namespace fastmlp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                  const std::optional<at::Tensor>&,
                                                  c10::string_view, bool);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    c10::string_view, std::array<bool, 3>);

const c10::TypedOperatorHandle<FwdSig>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastmlp::linear_act_forward", "")
                             .typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastmlp::linear_act_backward", "")
                             .typed<BwdSig>();
  return op;
}

// The gradients as ATen ops, differentiable to any order. dZ = grad_y * act'(Z) (+ grad_z, a gradient
// arriving for the pre-activation output), then dX = dZ W, dW = dZ^T X, db = sum of dZ's rows. Only
// what `mask` asks for is read: the input for dW, the weight for dX. ReLU's derivative is read from
// its output, as torch.relu's (whose second derivative is zero, with a graph). input_sizes: the
// input's shape, for dX (the input itself may not have been kept).
variable_list linear_act_gradients_aten(const at::Tensor& grad_y, const at::Tensor& grad_z,
                                        const at::Tensor& input, const at::Tensor& weight,
                                        const at::Tensor& output, const at::Tensor& saved, Act act,
                                        std::array<bool, 3> mask, c10::SymIntArrayRef input_sizes) {
  const c10::SymInt out_f = grad_y.defined() ? grad_y.sym_size(-1) : grad_z.sym_size(-1);
  // Explicit row counts: reshape(-1, 0) is ambiguous when a feature count is 0.
  const c10::SymInt rows = leading_rows(input_sizes);
  const auto as_rows = [&](const at::Tensor& t) { return t.reshape_symint({rows, out_f}); };
  at::Tensor dz;
  if (grad_y.defined()) {
    const at::Tensor g = as_rows(grad_y);
    switch (act) {
      case Act::Relu: dz = at::threshold_backward(g, as_rows(output), 0); break;
      case Act::Gelu: dz = at::gelu_backward(g, as_rows(saved)); break;
      case Act::GeluTanh: dz = at::gelu_backward(g, as_rows(saved), "tanh"); break;
      case Act::Silu: {
        // silu' = s (1 + z (1 - s)), s = sigmoid(z), as ATen ops: aten::silu_backward itself has
        // no derivative (torch's own SiLU switches to this form when its backward is recorded).
        const at::Tensor z = as_rows(saved);
        const at::Tensor s = at::sigmoid(z);
        dz = at::mul(g, at::mul(s, at::add(at::mul(z, at::rsub(s, 1)), 1)));
        break;
      }
      default: dz = g; break;
    }
  }
  if (grad_z.defined()) dz = dz.defined() ? at::add(dz, as_rows(grad_z)) : as_rows(grad_z);
  variable_list out(3);
  if (mask[0]) out[0] = dz.mm(weight).reshape_symint(input_sizes);
  if (mask[1]) out[1] = dz.t().mm(input.reshape_symint({rows, input_sizes.back()}));
  if (mask[2]) out[2] = dz.sum(0);
  return out;
}

struct LinearAct : public torch::autograd::Function<LinearAct> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               c10::string_view activation, bool save_for_backward) {
    const Act act = parse_activation(activation, "fastmlp.linear_act_forward");
    at::Tensor y, saved;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, saved) = forward_op().call(input, weight, bias, activation, save_for_backward);
    }
    ctx->saved_data["activation"] = std::string(activation.data(), activation.size());
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    // What nn.Linear's backward keeps: the input only when the weight can get a gradient (dW =
    // dZ^T X), the weight only when the input can (dX = dZ W). A frozen layer does not keep its
    // input alive until the backward, and an in-place edit of a tensor the backward does not read
    // is not an error. The weight is kept when neither is (a bias-only gradient): one of the two
    // gives the backward the shapes it needs. ReLU's derivative is read from the output (CPU) or
    // from `saved` (a backend's mask).
    const bool keep_input = weight.requires_grad();
    const bool keep_weight = input.requires_grad() || !keep_input;
    ctx->save_for_backward({keep_input ? input : at::Tensor(), keep_weight ? weight : at::Tensor(),
                            act == Act::Relu ? y : at::Tensor(), saved});
    if (!keep_input) ctx->saved_data["input_sizes"] = input.sym_sizes();
    // `saved` stays differentiable: a recorded backward (create_graph=True) reads the
    // pre-activation, and differentiating that backward sends the second-order term back here
    // through it. (For none and relu it is empty; marking it non-differentiable would gain nothing
    // and trips torch's compiled autograd.)
    // Mostly no gradient flows into `saved`; without this autograd would allocate and zero-fill
    // one for it on every backward (an output-sized buffer, page faults included).
    ctx->set_materialize_grads(false);
    return {y, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto vars = ctx->get_saved_variables();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    const Act act = parse_activation(activation, "fastmlp.linear_act_backward");
    const at::Tensor& grad_y = grads[0];
    // (none and relu: `saved` is empty, and so is any gradient a caller passes for it.)
    const at::Tensor grad_z = act_saves_preactivation(act) ? grads[1] : at::Tensor();
    variable_list out(5);  // one slot per forward argument
    if (!(grad_y.defined() || grad_z.defined()) || !(mask[0] || mask[1] || mask[2])) return out;
    const at::Tensor& weight = vars[1];
    at::Tensor input = vars[0];
    // The input's shape, also when it was not kept (dX still needs it).
    std::vector<c10::SymInt> kept_sizes;
    if (!input.defined()) kept_sizes = ctx->saved_data["input_sizes"].toSymIntList().vec();
    const c10::SymIntArrayRef input_sizes = input.defined() ? input.sym_sizes() : c10::SymIntArrayRef(kept_sizes);
    variable_list g;
    if (torch::autograd::GradMode::is_enabled() || grad_z.defined()) {
      // A recorded backward (create_graph=True), or a gradient for the pre-activation output.
      g = linear_act_gradients_aten(grad_y, grad_z, input, weight, vars[2], vars[3], act, mask, input_sizes);
    } else {
      const at::Tensor output = vars[2].defined() ? vars[2] : grad_y.new_empty({0});
      // A tensor that was not kept is not read (its gradient partner is not needed): the backward
      // op gets a one-element stand-in expanded to its shape, dtype and device, for its checks.
      if (!input.defined()) {
        input = at::empty({}, weight.options()).expand_symint(input_sizes);
      }
      const at::Tensor w = weight.defined()
                               ? weight
                               : at::empty({}, input.options()).expand_symint({grad_y.sym_size(-1), input.sym_size(-1)});
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [gx, gw, gb] = backward_op().call(grad_y, input, w, output, vars[3], c10::string_view(activation), mask);
      g = {gx, gw, gb};
    }
    if (mask[0]) out[0] = g[0];
    if (mask[1]) out[1] = g[1];
    if (mask[2]) out[2] = g[2];
    return out;
  }
};

// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) and the torch.func transforms (grad,
// vjp, jacrev, vmap): torch's C++ autograd Functions support neither (a tangent would be dropped
// silently; a transform raises). There the ops run as the ATen ops they fuse, which carry tangents,
// batching rules and their own backward: the same math, unfused.
bool run_as_aten_ops(std::initializer_list<const at::Tensor*> ts) {
  // The very test torch::autograd::Function::apply makes (it raises inside a transform).
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) {
    try {
      functorch->checkSupportsCppAutogradFunction();
    } catch (const c10::Error&) {
      return true;
    }
  }
  for (const at::Tensor* t : ts) {
    if (t != nullptr && t->defined() && t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// Whether autograd records a call with these tensors (undefined ones and nullptr skipped).
bool records(std::initializer_list<const at::Tensor*> ts) {
  if (!torch::autograd::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : ts) {
    if (t != nullptr && t->defined() && t->requires_grad()) return true;
  }
  return false;
}

// An optional tensor as the pointer run_as_aten_ops and records take.
const at::Tensor* ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

std::tuple<at::Tensor, at::Tensor> linear_act_aten(const at::Tensor& input, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, Act act, bool save) {
  const at::Tensor z = at::linear(input, weight, bias);
  at::Tensor y;
  switch (act) {
    case Act::Relu: y = at::relu(z); break;
    case Act::Gelu: y = at::gelu(z); break;
    case Act::GeluTanh: y = at::gelu(z, "tanh"); break;
    case Act::Silu: y = at::silu(z); break;
    default: y = z; break;
  }
  // ATen's nodes keep what their backward needs; the op's second output is what the op returns
  // for a direct caller: the pre-activation as (rows, out_features) when asked to save it.
  if (save && act_saves_preactivation(act)) {
    c10::SymInt rows = 1;
    for (int64_t d = 0; d + 1 < input.dim(); ++d) rows *= input.sym_size(d);
    return {y, z.reshape_symint({rows, weight.sym_size(0)})};
  }
  return {y, input.new_empty({0})};
}

// Plain vmap (torch.func.vmap without a grad transform around the op, e.g. a model ensemble): the
// vmap layer sees the op before autograd does, and with no batching rule torch would run it once per
// batch entry (with a warning on every call). The ATen ops it fuses have batching rules, so under
// vmap it runs as them, the way functorch decomposes ATen's composite ops.
std::tuple<at::Tensor, at::Tensor> linear_act_forward_batched(const at::Tensor& input, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              c10::string_view activation, bool save_for_backward) {
  return linear_act_aten(input, weight, bias, parse_activation(activation, "fastmlp.linear_act_forward"),
                         save_for_backward);
}

std::tuple<at::Tensor, at::Tensor> linear_act_forward_autograd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::string_view activation, bool save_for_backward) {
  // Keep what the backward needs whenever a gradient can flow, whatever the caller passed.
  if (run_as_aten_ops({&input, &weight, ptr(bias)})) {
    return linear_act_aten(input, weight, bias, parse_activation(activation, "fastmlp.linear_act_forward"),
                           save_for_backward);
  }
  if (!records({&input, &weight, ptr(bias)})) {
    // Nothing to record (inference, no_grad, frozen layers): skip the autograd Function's node,
    // input bookkeeping and output wrapping, a few us per call, as ATen's own ops do.
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(input, weight, bias, activation, save_for_backward);
  }
  auto r = LinearAct::apply(input, weight, bias, activation, true);
  return {r[0], r[1]};
}

// The backward op called directly while recording (its caller wants its gradients to have a graph):
// the ATen ops it fuses, differentiable. Otherwise the op itself, below autograd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& output, const at::Tensor& saved, c10::string_view activation,
    std::array<bool, 3> output_mask) {
  if (records({&grad_output, &input, &weight, &output, &saved})) {
    // The op's own checks first: the ATen ops below would raise their own errors, or none.
    const Act act = check_linear_act_backward_args(grad_output, input, weight, output, saved, activation,
                                                   "fastmlp.linear_act_backward");
    auto g = linear_act_gradients_aten(grad_output, at::Tensor(), input, weight, output, saved, act, output_mask,
                                       input.sym_sizes());
    // The op's contract: an empty tensor for a gradient not asked for.
    for (auto& t : g) {
      if (!t.defined()) t = grad_output.new_empty({0});
    }
    return {g[0], g[1], g[2]};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return backward_op().call(grad_output, input, weight, output, saved, activation, output_mask);
}

// dropout is linear in its input with a mask that is a pure function of (seed, shape): its
// gradient is the same op on the incoming gradient. Calling it through the dispatcher (Autograd
// key included) makes double backward work too.
using DropoutSig = at::Tensor(const at::Tensor&, double, const at::Tensor&);

const c10::TypedOperatorHandle<DropoutSig>& dropout_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::dropout", "").typed<DropoutSig>();
  return op;
}

struct Dropout : public torch::autograd::Function<Dropout> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, double p, const at::Tensor& seed) {
    ctx->saved_data["p"] = p;
    // Saved as a variable, so that changing the seed in place before the backward is caught by
    // autograd's version check instead of silently drawing another mask.
    ctx->save_for_backward({seed});
    at::AutoDispatchBelowADInplaceOrView guard;
    return dropout_op().call(input, p, seed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    return {dropout_op().call(g, ctx->saved_data["p"].toDouble(), ctx->get_saved_variables()[0]),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor dropout_autograd(const at::Tensor& input, double p, const at::Tensor& seed) {
  if (run_as_aten_ops({&input})) {
    // The same mask (the op on ones: 0 or 1/(1-p)), applied with an ATen multiply.
    at::Tensor scale;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      scale = dropout_op().call(at::ones_like(input), p, seed);
    }
    return at::mul(input, scale);
  }
  if (!(torch::autograd::GradMode::is_enabled() && input.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;  // nothing to record
    return dropout_op().call(input, p, seed);
  }
  return Dropout::apply(input, p, seed);
}


// ---- norms ----
// The same pattern as linear_act: a C++ autograd Function over the forward op, the backward op
// below autograd; a recorded backward (create_graph=True) and forward-mode AD / torch.func run as
// differentiable ATen ops instead. The statistics outputs (mean, rstd / invstd, unbiased_var) are
// not differentiable, as the saved statistics of torch's native norms.
using NormBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, std::array<bool, 3>);
using LayerNormSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double);
using LayerNormBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, at::IntArrayRef, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, std::array<bool, 3>);
using BatchNormSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double);

const c10::TypedOperatorHandle<LayerNormSig>& layer_norm_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::layer_norm", "").typed<LayerNormSig>();
  return op;
}
const c10::TypedOperatorHandle<LayerNormBwdSig>& layer_norm_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::layer_norm_backward", "").typed<LayerNormBwdSig>();
  return op;
}
const c10::TypedOperatorHandle<BatchNormSig>& batch_norm_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::batch_norm", "").typed<BatchNormSig>();
  return op;
}
const c10::TypedOperatorHandle<NormBwdSig>& batch_norm_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::batch_norm_backward", "").typed<NormBwdSig>();
  return op;
}

at::ScalarType norm_acc(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Gradients of a norm over the columns of x2 (M, N) (layer norm, stats (M, 1)) or over its rows (batch
// norm, stats (1, N)) as ATen ops, differentiable in every argument: xhat = (x - mean) * rstd,
// gw = g * weight, dx = rstd * (gw - avg(gw) - xhat * avg(gw * xhat)) with avg over the normalised
// dimension, dweight = sum of g * xhat and dbias = sum of g over the rows. In acc_t; the results
// in x's dtype (dx) and the weight's (dweight, dbias), shaped as x2 and as (N,).
variable_list norm_gradients_aten(const at::Tensor& g2, const at::Tensor& x2, const at::Tensor& mean,
                                  const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                                  std::array<bool, 3> mask, int64_t norm_dim) {
  const auto acc = norm_acc(x2);
  const at::Tensor gf = g2.to(acc), xf = x2.to(acc);
  const at::Tensor xhat = (xf - mean) * rstd;
  variable_list out(3);
  const auto param_dtype = weight.has_value() ? weight->scalar_type() : x2.scalar_type();
  if (mask[0]) {
    const at::Tensor gw = weight.has_value() ? gf * weight->to(acc).reshape({-1}) : gf;
    const at::Tensor dx = rstd * (gw - gw.mean(norm_dim, true) - xhat * (gw * xhat).mean(norm_dim, true));
    out[0] = dx.to(x2.scalar_type());
  }
  if (mask[1]) out[1] = (gf * xhat).sum(0).to(param_dtype);
  if (mask[2]) out[2] = gf.sum(0).to(param_dtype);
  return out;
}

// Mean and 1 / sqrt(biased var + eps) of x2 along dim, as differentiable ATen ops (keepdim).
std::pair<at::Tensor, at::Tensor> norm_stats_aten(const at::Tensor& x2, int64_t dim, double eps) {
  const at::Tensor xf = x2.to(norm_acc(x2));
  const at::Tensor mean = xf.mean(dim, true);
  const at::Tensor var = (xf - mean).pow(2).mean(dim, true);
  return {mean, at::rsqrt(var + eps)};
}

// Which of input, weight and bias need a gradient. needs_input_grad counts the tensors given to
// apply() only (not the sizes or eps, nor a weight or bias that is None).
std::array<bool, 3> norm_grad_mask(AutogradContext* ctx, bool has_weight) {
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  return {ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
          has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
}

// A norm backward op's outputs from norm_gradients_aten's: an empty tensor (the input's dtype for
// grad_input, param_dtype for the others) for each gradient not asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_op_result(variable_list& g, const at::Tensor& grad_output,
                                                              at::ScalarType param_dtype) {
  for (int i = 0; i < 3; ++i) {
    if (!g[i].defined()) g[i] = grad_output.new_empty({0}, grad_output.options().dtype(i == 0 ? grad_output.scalar_type() : param_dtype));
  }
  return {g[0], g[1], g[2]};
}

struct LayerNorm : public torch::autograd::Function<LayerNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, at::IntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               double eps) {
    at::Tensor y, mean, rstd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, mean, rstd) = layer_norm_op().call(input, normalized_shape, weight, bias, eps);
    }
    ctx->saved_data["normalized_shape"] = normalized_shape.vec();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->save_for_backward({input, weight.has_value() ? *weight : at::Tensor(), mean, rstd});
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(5);  // input, normalized_shape, weight, bias, eps
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;
    const auto vars = ctx->get_saved_variables();
    const at::Tensor& input = vars[0];
    const std::optional<at::Tensor> weight = vars[1].defined() ? std::optional<at::Tensor>(vars[1]) : std::nullopt;
    const std::vector<int64_t> shape = ctx->saved_data["normalized_shape"].toIntVector();
    const std::array<bool, 3> mask = norm_grad_mask(ctx, weight.has_value());
    variable_list r;
    if (torch::autograd::GradMode::is_enabled()) {
      // create_graph=True: the statistics recomputed from the input, so that their dependence on
      // it is part of the recorded graph.
      const int64_t N = c10::multiply_integers(shape);
      const int64_t M = N == 0 ? 0 : input.numel() / N;
      const at::Tensor x2 = input.reshape({M, N});
      const auto [mean, rstd] = norm_stats_aten(x2, 1, ctx->saved_data["eps"].toDouble());
      r = norm_gradients_aten(g.reshape({M, N}), x2, mean, rstd, weight, mask, 1);
      if (r[0].defined()) r[0] = r[0].reshape(input.sizes());
      for (int i = 1; i < 3; ++i) {
        if (r[i].defined()) r[i] = r[i].reshape(shape);
      }
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [gx, gw, gb] = layer_norm_backward_op().call(g, input, shape, vars[2], vars[3], weight, mask);
      r = {gx, gw, gb};
    }
    if (mask[0]) out[0] = r[0];
    if (mask[1]) out[2] = r[1];
    if (mask[2]) out[3] = r[2];
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_aten(const at::Tensor& input, at::IntArrayRef normalized_shape,
                                                               const std::optional<at::Tensor>& weight,
                                                               const std::optional<at::Tensor>& bias, double eps) {
  auto [y, mean, rstd] = at::native_layer_norm(input, normalized_shape, weight, bias, eps);
  const int64_t rows = input.numel() == 0 ? 0 : input.numel() / c10::multiply_integers(normalized_shape);
  return {y, mean.detach().reshape({rows}).to(norm_acc(input)), rstd.detach().reshape({rows}).to(norm_acc(input))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_autograd(const at::Tensor& input,
                                                                   at::IntArrayRef normalized_shape,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias, double eps) {
  if (run_as_aten_ops({&input, ptr(weight), ptr(bias)})) {
    return layer_norm_aten(input, normalized_shape, weight, bias, eps);
  }
  if (!records({&input, ptr(weight), ptr(bias)})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return layer_norm_op().call(input, normalized_shape, weight, bias, eps);
  }
  auto r = LayerNorm::apply(input, normalized_shape, weight, bias, eps);
  return {r[0], r[1], r[2]};
}

// The backward op called directly while recording: its formula as ATen ops (mean and rstd as the
// explicit inputs they are here).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef normalized_shape, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, std::array<bool, 3> output_mask) {
  if (!records({&grad_output, &input, &mean, &rstd, ptr(weight)})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return layer_norm_backward_op().call(grad_output, input, normalized_shape, mean, rstd, weight, output_mask);
  }
  {
    // The op's own checks, on tensors that do not record.
    at::AutoDispatchBelowADInplaceOrView guard;
    at::NoGradGuard no_grad;
    layer_norm_backward_op().call(grad_output.detach(), input.detach(), normalized_shape, mean.detach(), rstd.detach(),
                                  weight.has_value() ? std::optional<at::Tensor>(weight->detach()) : std::nullopt,
                                  {false, false, false});
  }
  const int64_t N = c10::multiply_integers(normalized_shape);
  const int64_t M = mean.numel();
  auto g = norm_gradients_aten(grad_output.reshape({M, N}), input.reshape({M, N}), mean.reshape({M, 1}),
                               rstd.reshape({M, 1}), weight, output_mask, 1);
  if (g[0].defined()) g[0] = g[0].reshape(input.sizes());
  for (int i = 1; i < 3; ++i) {
    if (g[i].defined()) g[i] = g[i].reshape(normalized_shape);
  }
  return norm_op_result(g, grad_output, weight.has_value() ? weight->scalar_type() : input.scalar_type());
}

struct BatchNorm : public torch::autograd::Function<BatchNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
    at::Tensor y, mean, invstd, uvar;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, mean, invstd, uvar) = batch_norm_op().call(input, weight, bias, eps);
    }
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->save_for_backward({input, weight.has_value() ? *weight : at::Tensor(), mean, invstd});
    ctx->mark_non_differentiable({mean, invstd, uvar});
    ctx->set_materialize_grads(false);
    return {y, mean, invstd, uvar};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);  // input, weight, bias, eps
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;
    const auto vars = ctx->get_saved_variables();
    const at::Tensor& input = vars[0];
    const std::optional<at::Tensor> weight = vars[1].defined() ? std::optional<at::Tensor>(vars[1]) : std::nullopt;
    const std::array<bool, 3> mask = norm_grad_mask(ctx, weight.has_value());
    variable_list r;
    if (torch::autograd::GradMode::is_enabled()) {
      const auto [mean, invstd] = norm_stats_aten(input, 0, ctx->saved_data["eps"].toDouble());
      r = norm_gradients_aten(g, input, mean, invstd, weight, mask, 0);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [gx, gw, gb] = batch_norm_backward_op().call(g, input, vars[2], vars[3], weight, mask);
      r = {gx, gw, gb};
    }
    if (mask[0]) out[0] = r[0];
    if (mask[1]) out[1] = r[1];
    if (mask[2]) out[2] = r[2];
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_aten(const at::Tensor& input,
                                                                           const std::optional<at::Tensor>& weight,
                                                                           const std::optional<at::Tensor>& bias,
                                                                           double eps) {
  auto [y, mean, invstd] = at::native_batch_norm(input, weight, bias, std::nullopt, std::nullopt, true, 0.0, eps);
  const auto acc = norm_acc(input);
  return {y, mean.detach().to(acc), invstd.detach().to(acc), input.detach().to(acc).var(0, /*unbiased=*/true)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_autograd(const at::Tensor& input,
                                                                               const std::optional<at::Tensor>& weight,
                                                                               const std::optional<at::Tensor>& bias,
                                                                               double eps) {
  if (run_as_aten_ops({&input, ptr(weight), ptr(bias)})) {
    return batch_norm_aten(input, weight, bias, eps);
  }
  if (!records({&input, ptr(weight), ptr(bias)})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_op().call(input, weight, bias, eps);
  }
  auto r = BatchNorm::apply(input, weight, bias, eps);
  return {r[0], r[1], r[2], r[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, std::array<bool, 3> output_mask) {
  if (!records({&grad_output, &input, &mean, &invstd, ptr(weight)})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_backward_op().call(grad_output, input, mean, invstd, weight, output_mask);
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::NoGradGuard no_grad;
    batch_norm_backward_op().call(grad_output.detach(), input.detach(), mean.detach(), invstd.detach(),
                                  weight.has_value() ? std::optional<at::Tensor>(weight->detach()) : std::nullopt,
                                  {false, false, false});
  }
  auto g = norm_gradients_aten(grad_output, input, mean.reshape({1, -1}), invstd.reshape({1, -1}), weight,
                               output_mask, 0);
  return norm_op_result(g, grad_output, weight.has_value() ? weight->scalar_type() : input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_batched(const at::Tensor& input, at::IntArrayRef normalized_shape,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias, double eps) {
  return layer_norm_aten(input, normalized_shape, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, FuncTorchBatched, m) {
  m.impl("linear_act_forward", &linear_act_forward_batched);
  m.impl("layer_norm", &layer_norm_batched);
  m.impl("batch_norm", &batch_norm_aten);
}

TORCH_LIBRARY_IMPL(fastmlp, Autograd, m) {
  m.impl("linear_act_forward", &linear_act_forward_autograd);
  m.impl("linear_act_backward", &linear_act_backward_autograd);
  m.impl("dropout", &dropout_autograd);
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("layer_norm_backward", &layer_norm_backward_autograd);
  m.impl("batch_norm", &batch_norm_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}

}  // namespace fastmlp
