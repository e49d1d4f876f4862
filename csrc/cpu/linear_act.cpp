// Fused linear + bias + activation on the CPU.
//
// forward:  Z = X W^T (ATen/MKL GEMM), then ONE pass over Z: add bias, keep Z for the backward
//           when the activation needs it, write Y = act(Z).
// backward: ONE pass over dY: dZ = dY * act'(.) and db = sum_rows(dZ) together, then the two
//           GEMMs dX = dZ W and dW = dZ^T X.
// Native eager does the same GEMMs plus separate passes for the bias broadcast (addmm copies it
// into the output first), the activation, its backward and the bias sum; these passes are what
// the fusion removes. The floor we measure against is the three GEMMs alone.
//
// Layout contract of the kernels below: Z/Y/dY/dZ/saved are contiguous row-major (rows, cols);
// bias is contiguous (cols). The host functions make it so.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/accumulate.h>

#include <vector>

#include "../activation.h"
#include "../checks.h"

namespace fastmlp {
namespace {

constexpr const char* kFwd = "fastmlp.linear_act_forward";
constexpr const char* kBwd = "fastmlp.linear_act_backward";

// About 8k elements per task: enough work to amortise a parallel region (~2 us), small enough
// that a 64 x 512 layer's passes use both cores (ATen hands each thread one contiguous range of
// at least this many elements). Measured at 64 x 512, forward + backward kernels interleaved:
// 32k per task (one thread for the whole pass) took 6-20% longer than 8k for relu, gelu and silu;
// from 256 rows on both use every thread and time the same.
constexpr int64_t kElemsPerTask = 8192;

template <Act A, typename scalar_t, bool HasBias, bool Save>
void epilogue_rows(scalar_t* __restrict__ y, scalar_t* __restrict__ saved,
                   const scalar_t* __restrict__ bias, int64_t r0, int64_t r1, int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* __restrict__ yr = y + r * cols;
    scalar_t* __restrict__ sr = Save ? saved + r * cols : nullptr;
    for (int64_t c = 0; c < cols; ++c) {
      acc_t z = static_cast<acc_t>(yr[c]);
      if constexpr (HasBias) z += static_cast<acc_t>(bias[c]);
      if constexpr (Save) sr[c] = static_cast<scalar_t>(z);
      yr[c] = static_cast<scalar_t>(act_forward<A>(z));
    }
  }
}

// In place on y (holding X W^T): y = act(y + bias), saved = y + bias when Save.
template <Act A, typename scalar_t>
void epilogue(at::Tensor& y, at::Tensor& saved, const at::Tensor* bias, bool save) {
  const int64_t rows = y.size(0), cols = y.size(1);
  if (rows == 0 || cols == 0) return;
  if (A == Act::None && bias == nullptr && !save) return;
  scalar_t* yp = y.data_ptr<scalar_t>();
  scalar_t* sp = save ? saved.data_ptr<scalar_t>() : nullptr;
  const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kElemsPerTask / cols);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    if (bp && save) epilogue_rows<A, scalar_t, true, true>(yp, sp, bp, r0, r1, cols);
    else if (bp) epilogue_rows<A, scalar_t, true, false>(yp, sp, bp, r0, r1, cols);
    else if (save) epilogue_rows<A, scalar_t, false, true>(yp, sp, bp, r0, r1, cols);
    else epilogue_rows<A, scalar_t, false, false>(yp, sp, bp, r0, r1, cols);
  });
}

// act'(.) * dY for one element. ReLU reads the output like torch's threshold_backward
// (y <= 0 -> 0), so a NaN pre-activation passes its gradient through as it does natively.
template <Act A, typename acc_t, typename scalar_t>
FASTMLP_INLINE acc_t dz_of(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                   const scalar_t* __restrict__ z, int64_t i) {
  const acc_t gi = static_cast<acc_t>(g[i]);
  if constexpr (A == Act::None) {
    return gi;
  } else if constexpr (A == Act::Relu) {
    return static_cast<acc_t>(y[i]) <= acc_t(0) ? acc_t(0) : gi;
  } else {
    return gi * act_derivative<A>(static_cast<acc_t>(z[i]));
  }
}

// Rows per block of the bias-gradient sum: fixed, so that the summation order (rows in order
// within a block, then blocks in order) never depends on the thread count.
constexpr int64_t kRowsPerBlock = 64;

// dZ (written unless A is None, where dZ is dY itself) and, when db != nullptr, the column sums
// of dZ, in one pass. Results are deterministic: the same for any thread count. The sums
// accumulate in double: a sequential float sum over thousands of rows loses ~n*eps, far more than
// torch's pairwise sum, and the reduction is cheap next to the GEMMs.
//
// Few rows (< 2 blocks): threads split the columns and walk all rows in order. More rows: threads
// take whole blocks of kRowsPerBlock rows, streaming through memory row after row, each block
// summing into its own row of partial sums (an L1-sized array), which a second, small pass adds up
// in block order. (Splitting columns for every shape walked each thread down 2 KB-strided
// 128-byte pieces of every row: twice as slow as native's separate passes at 1024 x 512.)
template <Act A, typename scalar_t>
void backward_prologue(const at::Tensor& g, const at::Tensor& y, const at::Tensor& z,
                       at::Tensor& dz, double* db) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = g.size(0), cols = g.size(1);
  if (cols == 0) return;
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const scalar_t* yp = A == Act::Relu ? y.data_ptr<scalar_t>() : nullptr;
  const scalar_t* zp = act_saves_preactivation(A) ? z.data_ptr<scalar_t>() : nullptr;
  scalar_t* dp = A == Act::None ? nullptr : dz.data_ptr<scalar_t>();
  // dZ and the running column sums of rows [r0, r1) into a[0, w) for columns [c0, c0 + w).
  auto rows_into = [&](int64_t r0, int64_t r1, int64_t c0, int64_t w, double* __restrict__ a) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * cols + c0;
      for (int64_t c = 0; c < w; ++c) {
        const acc_t d = dz_of<A, acc_t>(gp, yp, zp, base + c);
        if constexpr (A != Act::None) dp[base + c] = static_cast<scalar_t>(d);
        a[c] += static_cast<double>(d);
      }
    }
  };
  if (db == nullptr) {
    if (A == Act::None) return;
    const int64_t n = rows * cols;
    at::parallel_for(0, n, kElemsPerTask, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dp[i] = static_cast<scalar_t>(dz_of<A, acc_t>(gp, yp, zp, i));
    });
    return;
  }
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks < 2) {
    const int64_t col_grain = std::max<int64_t>(16, kElemsPerTask / std::max<int64_t>(rows, 1));
    at::parallel_for(0, cols, col_grain, [&](int64_t c0, int64_t c1) {
      std::vector<double> acc(c1 - c0, 0.0);
      rows_into(0, rows, c0, c1 - c0, acc.data());
      for (int64_t c = c0; c < c1; ++c) db[c] = acc[c - c0];
    });
    return;
  }
  std::vector<double> partial(blocks * cols, 0.0);
  const int64_t block_grain = std::max<int64_t>(1, kElemsPerTask / (kRowsPerBlock * cols));
  at::parallel_for(0, blocks, block_grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      rows_into(b * kRowsPerBlock, std::min(rows, (b + 1) * kRowsPerBlock), 0, cols,
                partial.data() + b * cols);
    }
  });
  at::parallel_for(0, cols, std::max<int64_t>(16, kElemsPerTask / blocks), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s = 0.0;
      for (int64_t b = 0; b < blocks; ++b) s += partial[b * cols + c];
      db[c] = s;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> linear_act_forward_cpu(const at::Tensor& input,
                                                          const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          c10::string_view activation,
                                                          bool save_for_backward) {
  const Act act = check_linear_act_args(input, weight, bias, activation, kFwd);
  const int64_t in_f = weight.size(1), out_f = weight.size(0);
  const int64_t rows = leading_rows(input);
  const at::Tensor x2 = input.reshape({rows, in_f});
  at::Tensor y = at::empty({rows, out_f}, input.options());
  const bool save = save_for_backward && act_saves_preactivation(act);
  at::Tensor saved = save ? at::empty({rows, out_f}, input.options()) : at::empty({0}, input.options());
  const bool low_precision = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->contiguous();
  const at::Tensor* bias_in_epilogue = nullptr;
  if (b.has_value() && low_precision) {
    // fp16/bf16: let the GEMM add the bias before its single rounding, exactly as nn.Linear's
    // addmm does, so the pre-activation is bit-identical to native and the epilogue does not
    // round twice.
    at::addmm_out(y, *b, x2, weight.t());
  } else {
    at::mm_out(y, x2, weight.t());
    if (b.has_value()) bias_in_epilogue = &*b;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), kFwd, [&] {
    dispatch_act(act, [&](auto a) { epilogue<decltype(a)::value, scalar_t>(y, saved, bias_in_epilogue, save); });
  });
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = out_f;
  return {y.view(out_shape), saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& output, const at::Tensor& saved, c10::string_view activation,
    std::array<bool, 3> output_mask) {
  const Act act = check_linear_act_backward_args(grad_output, input, weight, output, saved, activation, kBwd);
  const int64_t in_f = weight.size(1), out_f = weight.size(0);
  const int64_t rows = leading_rows(input);
  const at::Tensor g = grad_output.reshape({rows, out_f}).contiguous();
  const at::Tensor y = act == Act::Relu ? output.reshape({rows, out_f}).contiguous() : output;
  const at::Tensor z = act_saves_preactivation(act) ? saved.contiguous() : saved;
  const auto opts = grad_output.options();
  at::Tensor dz = act == Act::None ? g : at::empty({rows, out_f}, opts);
  at::Tensor grad_b = at::empty({0}, opts);
  const bool need_dz = output_mask[0] || output_mask[1];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), kBwd, [&] {
    // The bias gradient's double sums, rounded once into grad_b (as .to() would, without two
    // more dispatcher calls: at ~1-2 us each they are a visible share of a small layer's call).
    std::vector<double> db_acc(output_mask[2] ? out_f : 0, 0.0);
    double* db = output_mask[2] ? db_acc.data() : nullptr;
    if (need_dz || db != nullptr) {
      dispatch_act(act, [&](auto a) {
        backward_prologue<decltype(a)::value, scalar_t>(g, y, z, dz, db);
      });
    }
    if (output_mask[2]) {
      grad_b = at::empty({out_f}, opts);
      scalar_t* gb = grad_b.data_ptr<scalar_t>();
      for (int64_t c = 0; c < out_f; ++c) gb[c] = static_cast<scalar_t>(db_acc[c]);
    }
  });
  at::Tensor grad_x = at::empty({0}, opts), grad_w = at::empty({0}, opts);
  if (output_mask[0]) grad_x = at::mm(dz, weight).view(input.sizes());
  if (output_mask[1]) grad_w = at::mm(dz.t(), input.reshape({rows, in_f}));
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("linear_act_forward", &linear_act_forward_cpu);
  m.impl("linear_act_backward", &linear_act_backward_cpu);
}

}  // namespace fastmlp
