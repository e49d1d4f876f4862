// Input validation shared by every host entry function (CPU now, CUDA later).
//
// Validation with messages lives here, once; the Python fake kernels in fastmlp/ops.py mirror the
// shape and dtype rules so that eager, torch.compile and export fail alike. Kernels assume inputs
// that passed these checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>
#include <optional>
#include <string>

#include "activation.h"

namespace fastmlp {

// "[4, 6]". Error messages format shapes with this rather than streaming t.sizes(): on the H200
// machine (torch 2.11, its own gcc) every TORCH_CHECK message that streamed an IntArrayRef
// crashed the process with a segfault instead of raising; messages with plain numbers did not.
inline std::string shape_str(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

inline Act parse_activation(c10::string_view name, const char* op) {
  if (name == "none") return Act::None;
  if (name == "relu") return Act::Relu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "silu") return Act::Silu;
  TORCH_CHECK_VALUE(false, op, ": unknown activation '", std::string(name.data(), name.size()),
                    "'; expected one of: none, relu, gelu, gelu_tanh, silu");
}

inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   op, ": ", arg,
                   " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
                   st);
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name, const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": expected ", a_name, " and ", b_name,
                   " to have the same dtype, but got ", a_name, ": ", a.scalar_type(), ", ",
                   b_name, ": ", b.scalar_type(),
                   " (cast them, or run under torch.autocast to mix precisions)");
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name, const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected ", a_name, " and ", b_name,
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
  TORCH_CHECK_VALUE(weight.dim() == 2, op,
                    ": weight must be 2-D (out_features, in_features), got a ", weight.dim(),
                    "-D tensor of shape ", shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(input.dim() >= 1, op,
                    ": input must have at least 1 dimension (*, in_features), got a 0-D tensor");
  TORCH_CHECK_VALUE(input.size(-1) == weight.size(1), op,
                    ": input.shape[-1] must equal in_features = weight.shape[1] = ",
                    weight.size(1), ", got input of shape ", shape_str(input.sizes()));
  check_same_device(input, "input", weight, "weight", op);
  check_same_dtype(input, "input", weight, "weight", op);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_floating(b, op, "bias");
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == weight.size(0), op,
                      ": bias must be 1-D of shape [out_features] = [", weight.size(0),
                      "], got shape ", shape_str(b.sizes()));
    check_same_device(input, "input", b, "bias", op);
    check_same_dtype(input, "input", b, "bias", op);
  }
  return act;
}

}  // namespace fastmlp
