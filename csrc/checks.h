// Input validation shared by every host entry function (CPU and CUDA).
//
// Validation with messages lives here, once; the Python fake kernels in fastmlp/ops.py mirror the
// shape and dtype rules so that eager, torch.compile and export fail alike. Kernels assume inputs
// that passed these checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/accumulate.h>
#include <c10/util/string_view.h>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

#include "activation.h"

namespace fastmlp {

// Error and warning messages: msg(parts...) concatenates its parts into one std::string without
// iostreams, and every TORCH_CHECK / TORCH_WARN here passes that one string (c10::str hands a
// single std::string through untouched; FASTMLP_CHECK* below do this for the checks). On the H200
// machine (torch 2.11, g++ 13) every message that c10::str built by streaming a number into an
// std::ostringstream inside this extension crashed the process (SIGSEGV) instead of raising, for
// CPU tensors too, while messages made of strings only raised normally: numbers written through
// the stream's num_put facet are the common factor (a libstdc++ facet mix-up between this library
// and torch's is the likely cause). Numbers go through std::to_string / snprintf here instead; the
// text is what the stream would print, except bools, written as Python's True / False.
namespace msg_detail {
inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, std::string_view v) { s.append(v.data(), v.size()); }
inline void put(std::string& s, char v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? "True" : "False"; }
inline void put(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);  // what an ostream's default formatting prints
  s += buf;
}
inline void put(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void put(std::string& s, const c10::Device& v) { s += v.str(); }
// A symbolic size (torch.compile) is printed as the value it has in this trace (this specialises
// the trace, which does not matter on the way to an error).
inline void put(std::string& s, const c10::SymInt& v) { s += std::to_string(v.guard_int(__FILE__, __LINE__)); }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}
}  // namespace msg_detail

template <typename... Parts>
std::string msg(const Parts&... parts) {
  std::string s;
  (msg_detail::put(s, parts), ...);
  return s;
}

// TORCH_CHECK, TORCH_CHECK_VALUE and TORCH_CHECK_TYPE with their message parts joined by msg (only
// when the check fails): the checks every source file here uses.
#define FASTMLP_CHECK(cond, ...) TORCH_CHECK(cond, ::fastmlp::msg(__VA_ARGS__))
#define FASTMLP_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::fastmlp::msg(__VA_ARGS__))
#define FASTMLP_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::fastmlp::msg(__VA_ARGS__))

// "[4, 6]", for messages (see msg).
// "[2, 3]" for concrete (IntArrayRef) or symbolic (SymIntArrayRef) sizes.
template <typename T>
std::string shape_str(c10::ArrayRef<T> sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    msg_detail::put(s, sizes[i]);
  }
  return s + "]";
}

inline Act parse_activation(c10::string_view name, const char* op) {
  if (name == "none") return Act::None;
  if (name == "relu") return Act::Relu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "silu") return Act::Silu;
  FASTMLP_CHECK_VALUE(false, op, ": unknown activation '", std::string(name.data(), name.size()),
                      "'; expected one of: none, relu, gelu, gelu_tanh, silu");
}

inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  const auto st = t.scalar_type();
  FASTMLP_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                     op, ": ", arg,
                     " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ", st);
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name, const char* op) {
  FASTMLP_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": expected ", a_name, " and ", b_name,
                     " to have the same dtype, but got ", a_name, ": ", a.scalar_type(), ", ",
                     b_name, ": ", b.scalar_type(),
                     " (cast them, or run under torch.autocast to mix precisions)");
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name, const char* op) {
  FASTMLP_CHECK(a.device() == b.device(), op, ": expected ", a_name, " and ", b_name,
                " on the same device, but got ", a_name, " on ", a.device(), " and ", b_name,
                " on ", b.device());
}

// The forward op's contract: input (*, in_features), weight (out_features, in_features),
// bias (out_features) or None, all of one floating dtype on one device.
inline Act check_linear_act_args(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 c10::string_view activation, const char* op) {
  const Act act = parse_activation(activation, op);
  check_floating(input, op, "input");
  check_floating(weight, op, "weight");
  FASTMLP_CHECK_VALUE(weight.dim() == 2, op,
                      ": weight must be 2-D (out_features, in_features), got a ", weight.dim(),
                      "-D tensor of shape ", shape_str(weight.sizes()));
  FASTMLP_CHECK_VALUE(input.dim() >= 1, op,
                      ": input must have at least 1 dimension (*, in_features), got a 0-D tensor");
  FASTMLP_CHECK_VALUE(input.size(-1) == weight.size(1), op,
                      ": input.shape[-1] must equal in_features = weight.shape[1] = ",
                      weight.size(1), ", got input of shape ", shape_str(input.sizes()));
  check_same_device(input, "input", weight, "weight", op);
  check_same_dtype(input, "input", weight, "weight", op);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_floating(b, op, "bias");
    FASTMLP_CHECK_VALUE(b.dim() == 1 && b.size(0) == weight.size(0), op,
                        ": bias must be 1-D of shape [out_features] = [", weight.size(0),
                        "], got shape ", shape_str(b.sizes()));
    check_same_device(input, "input", b, "bias", op);
    check_same_dtype(input, "input", b, "bias", op);
  }
  return act;
}

// Rows of the 2-D view (rows, features) of a (*, features) tensor; explicit because reshape(-1, 0)
// is ambiguous when features == 0.
inline int64_t leading_rows(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
}

// The same from a (possibly symbolic, under torch.compile) shape.
inline c10::SymInt leading_rows(c10::SymIntArrayRef sizes) {
  c10::SymInt rows = 1;
  for (size_t d = 0; d + 1 < sizes.size(); ++d) rows = rows * sizes[d];
  return rows;
}

// The backward op's contract: grad_output (*, out_features) with as many elements as input
// (*, in_features) has rows, weight (out_features, in_features); for relu the forward's output and
// for gelu / gelu_tanh / silu the saved pre-activation, each with grad_output's element count; all
// of one floating dtype on one device. Returns the activation. Sizes are read symbolically: the
// recorded path (csrc/autograd.cpp) runs this on fake tensors under torch.compile.
inline Act check_linear_act_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                          const at::Tensor& weight, const at::Tensor& output,
                                          const at::Tensor& saved, c10::string_view activation,
                                          const char* op) {
  const Act act = parse_activation(activation, op);
  check_floating(grad_output, op, "grad_output");
  FASTMLP_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got a ",
                      weight.dim(), "-D tensor of shape ", shape_str(weight.sym_sizes()));
  check_same_device(grad_output, "grad_output", weight, "weight", op);
  check_same_device(grad_output, "grad_output", input, "input", op);
  check_same_dtype(grad_output, "grad_output", weight, "weight", op);
  check_same_dtype(grad_output, "grad_output", input, "input", op);
  const c10::SymInt in_f = weight.sym_size(1), out_f = weight.sym_size(0);
  FASTMLP_CHECK_VALUE(grad_output.dim() >= 1 && grad_output.sym_size(-1) == out_f, op,
                      ": grad_output.shape[-1] must equal out_features = ", out_f, ", got shape ",
                      shape_str(grad_output.sym_sizes()));
  FASTMLP_CHECK_VALUE(input.dim() >= 1 && input.sym_size(-1) == in_f, op,
                      ": input.shape[-1] must equal in_features = ", in_f, ", got shape ",
                      shape_str(input.sym_sizes()));
  const c10::SymInt n = leading_rows(input.sym_sizes()) * out_f;
  FASTMLP_CHECK_VALUE(grad_output.sym_numel() == n, op, ": grad_output of shape ",
                      shape_str(grad_output.sym_sizes()), " does not match input of shape ",
                      shape_str(input.sym_sizes()), " and out_features = ", out_f);
  if (act == Act::Relu) {
    FASTMLP_CHECK_VALUE(output.sym_numel() == n, op, ": relu needs the forward output, got shape ",
                        shape_str(output.sym_sizes()));
    check_same_device(grad_output, "grad_output", output, "output", op);
    check_same_dtype(grad_output, "grad_output", output, "output", op);
  }
  if (act_saves_preactivation(act)) {
    FASTMLP_CHECK_VALUE(saved.sym_numel() == n, op, ": ", std::string_view(activation.data(), activation.size()),
                        " needs the pre-activation saved by the forward (save_for_backward=True), "
                        "got saved of shape ", shape_str(saved.sym_sizes()));
    check_same_device(grad_output, "grad_output", saved, "saved", op);
    check_same_dtype(grad_output, "grad_output", saved, "saved", op);
  }
  return act;
}

}  // namespace fastmlp
