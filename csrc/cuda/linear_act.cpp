// Fused linear + bias + activation on CUDA: host entry functions and the cuBLASLt GEMM.
//
// forward:  y = act(x W^T + b). One cuBLASLt matmul whose epilogue adds the bias and, where
//           cuBLASLt has the activation, applies it: BIAS (none and, by default, relu: see
//           below), RELU_BIAS (relu, opt-in with FASTMLP_LT_RELU=1, and only when this GPU's
//           epilogue keeps NaN: probed once per device and dtype), GELU_AUX_BIAS
//           (gelu_tanh in fp16/bf16, aux = pre-activation = the saved tensor). Exact-erf GELU and SiLU have no
//           cuBLASLt epilogue: BIAS epilogue, then our one-pass epilogue kernel (which also
//           writes `saved`). fp64, and any shape / alignment / dtype cuBLASLt refuses, take the
//           fallback: at::mm (at::addmm for fp16/bf16 with bias, as on the CPU) + our kernel.
// backward: our one-pass prologue dZ = dY * act'(.) plus db = column sums of dZ (one launch), then
//           dX = dZ W and dW = dZ^T X with at::mm (cuBLAS, honouring torch's TF32 setting). Opt-in
//           with FASTMLP_LT_BGRAD=1: dW = dZ^T X is a cuBLASLt GEMM whose BGRADB epilogue also
//           writes db, and the prologue only computes dZ (none: no prologue); at::mm + at::sum
//           where cuBLASLt refuses the problem.
//
// `saved` on CUDA is what the CPU saves: the pre-activation (rows, out) for gelu, gelu_tanh and
// silu, empty for none and relu (relu's backward reads y like threshold_backward, so a NaN
// pre-activation passes its gradient as natively; a cuBLASLt RELU_AUX bit mask could not).
//
// Switches (read on every call, for tests and benchmarks): FASTMLP_CUBLASLT=0 forces the
// fallback path (forward and backward); FASTMLP_LT_RELU=1 opts in to the RELU epilogue;
// FASTMLP_LT_GELU=0 disables the GELU epilogue; FASTMLP_LT_BGRAD=1 opts in to the BGRADB
// backward (off until timed and tested on a GPU); FASTMLP_BWD_BLOCKS_PER_SM and
// FASTMLP_BWD_MIN_ROWS (defaults 4 and 4) set the backward prologue's grid (see
// bwd_partial_rows), for bench/bwd_prologue_sweep.py. The RELU epilogue is off by default because
// on an H200 (CUDA 13, torch 2.11) it returned numbers where torch.relu returns NaN in fp16 (x
// with +-inf times an identity W, so inf * 0 = NaN inside the GEMM), although the NaN probe below
// had passed.
//
// Layout: x is made contiguous (rows = prod(input.shape[:-1]), in), W contiguous (out, in).
// Row-major y (rows, out) is column-major y^T (out x rows, ld = out), and y^T = W x^T, so the
// cuBLASLt call is m = out, n = rows, k = in; A = W stored column-major as (in x out, ld = in)
// with transa = T; B = x stored column-major as (in x rows, ld = in) with transb = N; C = D = y
// as (out x rows, ld = out). The BIAS epilogue adds a length-m vector along the rows of D, i.e.
// bias[o] to every y[:, o]; the GELU aux has D's layout, which is saved (rows, out) row-major.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../activation.h"
#include "../checks.h"
#include "linear_act.h"

namespace fastmlp {
namespace cuda {
namespace {

constexpr const char* kFwd = "fastmlp.linear_act_forward";
constexpr const char* kBwd = "fastmlp.linear_act_backward";

bool env_on(const char* name, bool dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  return !(std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "off") == 0);
}

// An integer tuning switch: its default when unset or empty, else a whole number in [lo, hi].
int env_int(const char* name, int dflt, int lo, int hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  FASTMLP_CHECK_VALUE(*end == '\0' && n >= lo && n <= hi, "fastmlp: environment variable ", name,
                      " must be a whole number from ", lo, " to ", hi, ", got '", v, "'");
  return static_cast<int>(n);
}

DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: FASTMLP_CHECK(false, "fastmlp: unsupported dtype ", st);
  }
}

// The problem's shape, formatted only when an error message needs it (launch-bound calls must
// not pay for string formatting).
struct Shape {
  int64_t rows, in_f, out_f;
  at::ScalarType st;
};

std::string shape_str(const Shape& s) {
  return fastmlp::msg("x [", s.rows, ", ", s.in_f, "], weight [", s.out_f, ", ", s.in_f, "], ", s.st);
}

void check_launch(cudaError_t err, const char* op, const char* what, const Shape& shape) {
  if (err == cudaSuccess) return;
  FASTMLP_CHECK(false, op, ": CUDA launch of the ", what, " kernel failed for ", shape_str(shape), ": ",
                cudaGetErrorString(err));
}

// ------------------------------------------------------------------------------------------------
// cuBLASLt

// One cuBLASLt GEMM in its column-major terms: D (m x n, ld ldd) = epi(op(A) op(B)), op(A) being
// m x k and op(B) k x n. A is stored k x m (ld lda) when ta (op = transpose), else m x k; B is
// stored n x k (ld ldb) when tb, else k x n. `bias` is read (BIAS epilogues: length m) or written
// (BGRADB: length n, the sums of op(B) over k); `aux` has D's shape with leading dimension aux_ld.
struct LtGemm {
  const void* a;
  const void* b;
  void* d;
  int64_t m, n, k, lda, ldb, ldd;
  bool ta, tb;
  at::ScalarType st;
  cublasLtEpilogue_t epi;
  const void* bias = nullptr;  // 16-byte aligned when set
  void* aux = nullptr;
  int64_t aux_ld = 0;
  const char* op = "";  // names the op and layer in the warning if cuBLASLt fails to run
  Shape shape{};
};

// The forward GEMM y = x W^T (+ bias) (see the file header): m = out, n = rows, k = in.
LtGemm forward_gemm(const void* x, const void* w, const void* bias, void* d, int64_t rows, int64_t in_f,
                    int64_t out_f, at::ScalarType st, cublasLtEpilogue_t epi) {
  LtGemm g{w, x, d, out_f, rows, in_f, in_f, in_f, out_f, true, false, st, epi};
  g.bias = bias;
  g.op = kFwd;
  g.shape = Shape{rows, in_f, out_f, st};
  return g;
}

uint32_t pointer_alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a % al) != 0) al /= 2;
  return al;
}

struct LtDesc {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDesc() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

struct AlgoEntry {
  bool ok = false;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

// Heuristic results keyed by everything the heuristic sees (pointers only through alignment).
using AlgoKey = std::array<int64_t, 18>;
std::mutex g_algo_mutex;
std::map<AlgoKey, AlgoEntry> g_algo_cache;
constexpr size_t kMaxAlgos = 4096;

// A descriptor call that fails is a broken setup (not a shape cuBLASLt refuses): say so once, as
// the op then runs its fallback for that shape and would otherwise hide it (tests and benchmarks
// pass on either path).
cublasStatus_t lt_setup_failed(cublasStatus_t s, const char* call, const char* op) {
  TORCH_WARN_ONCE(fastmlp::msg(op, ": cuBLASLt setup failed (", cublasLtGetStatusString(s), ") in ", call,
                               "; using the at::mm fallback"));
  return s;
}

// Inside lt_matmul (names the op of its LtGemm g).
#define FASTMLP_LT_TRY(expr)                                                  \
  do {                                                                        \
    const cublasStatus_t s_ = (expr);                                         \
    if (s_ != CUBLAS_STATUS_SUCCESS) return lt_setup_failed(s_, #expr, g.op); \
  } while (0)

// Runs g (see LtGemm). Returns CUBLAS_STATUS_NOT_SUPPORTED when the heuristic has no algorithm
// for it; the caller falls back.
cublasStatus_t lt_matmul(const LtGemm& g, const at::Tensor& like) {
  cudaDataType_t dt;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  switch (g.st) {
    case at::kFloat:
      dt = CUDA_R_32F;
      // IEEE fp32 unless torch itself would use TF32 for nn.Linear's matmul: read as torch's own
      // GEMMs read it (CUDABlas.cpp), through float32Precision, which both the legacy
      // allow_tf32 flag and the newer fp32_precision setting write (allowTF32CuBLAS() raises once
      // the newer one is used), and never inside an at::NoTF32Guard.
      if (!at::NoTF32Guard::should_disable_tf32() &&
          at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
              at::Float32Precision::TF32) {
        compute = CUBLAS_COMPUTE_32F_FAST_TF32;
      }
      break;
    case at::kHalf: dt = CUDA_R_16F; break;
    case at::kBFloat16: dt = CUDA_R_16BF; break;
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  LtDesc desc;
  FASTMLP_LT_TRY(cublasLtMatmulDescCreate(&desc.op, compute, CUDA_R_32F));
  const cublasOperation_t ta = g.ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  FASTMLP_LT_TRY(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  FASTMLP_LT_TRY(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  FASTMLP_LT_TRY(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epi, sizeof(g.epi)));
  if (g.bias != nullptr) {
    FASTMLP_LT_TRY(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias,
                                                  sizeof(g.bias)));
  }
  const int64_t aux_ld = g.aux != nullptr ? g.aux_ld : 0;
  if (g.aux != nullptr) {
    FASTMLP_LT_TRY(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                                  &g.aux, sizeof(g.aux)));
    FASTMLP_LT_TRY(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld,
                                                  sizeof(aux_ld)));
  }
  const uint64_t m = g.m, n = g.n, k = g.k;
  FASTMLP_LT_TRY(cublasLtMatrixLayoutCreate(&desc.a, dt, g.ta ? k : m, g.ta ? m : k, g.lda));
  FASTMLP_LT_TRY(cublasLtMatrixLayoutCreate(&desc.b, dt, g.tb ? n : k, g.tb ? k : n, g.ldb));
  FASTMLP_LT_TRY(cublasLtMatrixLayoutCreate(&desc.d, dt, m, n, g.ldd));

  const uint32_t al_a = pointer_alignment(g.a), al_b = pointer_alignment(g.b), al_d = pointer_alignment(g.d);
  const int device = like.get_device();
  // torch's own cuBLASLt workspace for this handle and stream, and its size: the one nn.Linear's
  // addmm passes, so the heuristic sees what it sees for eager (with a larger limit it picked a
  // split-K kernel plus a separate reduction kernel, one launch more than eager's GEMM on the
  // H200 at 256x512x512 fp32), and no allocation per call.
  const uint64_t ws_limit = at::cuda::getCUDABlasLtWorkspaceSize();
  // torch.backends.cuda.matmul.allow_fp16/bf16_reduced_precision_reduction, applied as torch's
  // cuBLASLt GEMMs apply them: when reduced-precision reductions are disallowed, only split-K
  // schemes that reduce in the compute type (fp32), or no split-K at all (SCHEME_NONE, which is 0:
  // so "no restriction" is the full mask, cuBLASLt's default, and the attribute is always set).
  uint32_t reduction_mask = CUBLASLT_REDUCTION_SCHEME_MASK;
  if (g.st == at::kHalf || g.st == at::kBFloat16) {
    const auto option = g.st == at::kHalf ? at::globalContext().allowFP16ReductionCuBLAS()
                                          : at::globalContext().allowBF16ReductionCuBLAS();
    if (option == at::CuBLASReductionOption::DisallowReducedPrecisionAllowSplitK) {
      reduction_mask = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    } else if (option == at::CuBLASReductionOption::DisallowReducedPrecisionDisallowSplitK) {
      reduction_mask = CUBLASLT_REDUCTION_SCHEME_NONE;
    }
  }
  // The heuristic reads the bias pointer's alignment too (cublasLt.h, BIAS_POINTER).
  const uint32_t al_bias = g.bias != nullptr ? pointer_alignment(g.bias) : 0;
  const AlgoKey key{device, static_cast<int64_t>(g.st), static_cast<int64_t>(compute),
                    static_cast<int64_t>(g.epi), g.m, g.n, g.k, (g.ta ? 2 : 0) + (g.tb ? 1 : 0), g.lda, g.ldb, g.ldd,
                    al_a, al_b, al_d, al_bias, aux_ld, static_cast<int64_t>(ws_limit), reduction_mask};
  AlgoEntry entry;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    auto it = g_algo_cache.find(key);
    if (it != g_algo_cache.end()) {
      entry = it->second;
      cached = true;
    }
  }
  if (!cached) {
    FASTMLP_LT_TRY(cublasLtMatmulPreferenceCreate(&desc.pref));
    FASTMLP_LT_TRY(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                        &ws_limit, sizeof(ws_limit)));
    // Tell the heuristic the real pointer alignment (it assumes 256 bytes otherwise), so it never
    // picks a kernel that would issue misaligned vector loads on an offset view.
    FASTMLP_LT_TRY(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                        &al_a, sizeof(al_a)));
    FASTMLP_LT_TRY(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                        &al_b, sizeof(al_b)));
    FASTMLP_LT_TRY(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                        &al_d, sizeof(al_d)));
    FASTMLP_LT_TRY(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                        &al_d, sizeof(al_d)));
    FASTMLP_LT_TRY(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                        &reduction_mask, sizeof(reduction_mask)));
    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), desc.op,
                                                            desc.a, desc.b, desc.d, desc.d, desc.pref, 1,
                                                            &result, &returned);
    if (s != CUBLAS_STATUS_SUCCESS && s != CUBLAS_STATUS_NOT_SUPPORTED) lt_setup_failed(s, "the heuristic", g.op);
    entry.ok = s == CUBLAS_STATUS_SUCCESS && returned > 0 && result.state == CUBLAS_STATUS_SUCCESS;
    if (entry.ok) {
      entry.algo = result.algo;
      entry.workspace = result.workspaceSize;
    }
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    // Bounded: a workload of ever-new batch sizes (each one key) starts over past kMaxAlgos
    // instead of growing for good; a heuristic call costs tens of microseconds.
    if (g_algo_cache.size() >= kMaxAlgos) g_algo_cache.clear();
    g_algo_cache[key] = entry;
  }
  if (!entry.ok) return CUBLAS_STATUS_NOT_SUPPORTED;
  // Per (handle, stream), as for torch's own GEMMs: calls on one stream never overlap, and torch
  // keeps it valid while a graph is captured.
  void* ws_ptr = entry.workspace > 0 ? at::cuda::getCUDABlasLtWorkspace() : nullptr;
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t s = cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), desc.op, &alpha, g.a, desc.a,
                                          g.b, desc.b, &beta, g.d, desc.d, g.d, desc.d, &entry.algo, ws_ptr,
                                          entry.workspace, at::cuda::getCurrentCUDAStream());
  if (s != CUBLAS_STATUS_SUCCESS) {
    TORCH_WARN_ONCE(fastmlp::msg(g.op, ": cuBLASLt matmul failed (", cublasLtGetStatusString(s), ") for ",
                    shape_str(g.shape), ", epilogue ", static_cast<int>(g.epi),
                    "; using the at::mm fallback for this shape from now on"));
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    g_algo_cache[key].ok = false;  // do not retry a failing algorithm for this key
  }
  return s;
}

// Whether this device's cuBLASLt RELU epilogue keeps NaN (relu(NaN) = NaN, as torch.relu). GPU
// max() may drop NaN, so it is probed once per (device, dtype, bias) on two GEMMs with a NaN row,
// a negative row and a positive row, and compared exactly. The probe synchronises, so it
// is skipped (answer: no, use our kernel) while the stream is being captured into a CUDA graph.
bool relu_epilogue_ok(const at::Tensor& like, bool with_bias) {
  static std::atomic<int> state[64][3][2];  // 0 unknown, 1 keeps NaN, 2 drops it / fails
  const int dev = like.get_device();
  const int dti = like.scalar_type() == at::kFloat ? 0 : like.scalar_type() == at::kHalf ? 1 : 2;
  if (dev < 0 || dev >= 64) return false;
  std::atomic<int>& st = state[dev][dti][with_bias ? 1 : 0];
  const int known = st.load();
  if (known != 0) return known == 1;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture) != cudaSuccess ||
      capture != cudaStreamCaptureStatusNone) {
    return false;
  }
  // Two shapes, so that both a small-tile and a large-tile kernel are asked. W = 1/k keeps every
  // value exact in bf16: row 0 of x is NaN, row 1 is -1 (z = -1 + b), row 2 is +1 (z = 1 + b).
  const auto opts = like.options();
  bool ok = true;
  for (const int64_t n : {16, 512}) {
    const int64_t k = n == 16 ? 16 : 256, m = n;
    at::Tensor x = at::zeros({n, k}, opts);
    x[0].fill_(std::numeric_limits<double>::quiet_NaN());
    x[1].fill_(-1.0);
    x[2].fill_(1.0);
    at::Tensor w = at::full({m, k}, 1.0 / static_cast<double>(k), opts);
    at::Tensor b = at::full({m}, 0.5, opts);
    at::Tensor y = at::empty({n, m}, opts);
    const LtGemm g = forward_gemm(x.data_ptr(), w.data_ptr(), with_bias ? b.data_ptr() : nullptr, y.data_ptr(), n,
                                  k, m, like.scalar_type(),
                                  with_bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU);
    ok = lt_matmul(g, like) == CUBLAS_STATUS_SUCCESS;
    if (!ok) break;
    at::Tensor expect = at::matmul(x.to(at::kDouble), w.to(at::kDouble).t());
    if (with_bias) expect = expect + 0.5;
    expect = at::relu(expect).cpu();  // torch.relu keeps NaN
    const at::Tensor got = y.to(at::kDouble).cpu();
    ok = at::isnan(got[0]).all().item<bool>() && at::equal(got.narrow(0, 1, n - 1), expect.narrow(0, 1, n - 1));
    if (!ok) break;
  }
  st.store(ok ? 1 : 2);
  if (!ok) {
    TORCH_WARN_ONCE("fastmlp: this GPU's cuBLASLt RELU epilogue does not keep NaN (or failed); "
                    "linear_act uses its own ReLU kernel after the GEMM instead (correct, one extra pass).");
  }
  return ok;
}

// ------------------------------------------------------------------------------------------------
// Forward

void run_epilogue(Act act, const at::Tensor& src, const at::Tensor* bias, at::Tensor* saved, at::Tensor& y,
                  const Shape& shape) {
  FwdEpilogueParams p{};
  p.src = src.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.saved = saved ? saved->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.rows = y.size(0);
  p.cols = y.size(1);
  check_launch(launch_fwd_epilogue(act, to_dtype(y.scalar_type()), p, at::cuda::getCurrentCUDAStream()), kFwd,
               "forward epilogue", shape);
}

// cuBLASLt path; false (nothing written that the fallback does not overwrite) when cuBLASLt
// refuses the problem.
bool forward_lt(Act act, const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                at::Tensor& y, at::Tensor& saved, bool save, const Shape& shape) {
  at::Tensor b;
  if (bias.has_value()) {
    b = *bias;
    if (!aligned16(b.data_ptr())) b = b.clone(at::MemoryFormat::Contiguous);  // fresh storage: aligned
  }
  const bool hb = b.defined();
  const int64_t out_f = w.size(0);
  LtGemm g = forward_gemm(x2.data_ptr(), w.data_ptr(), hb ? b.data_ptr() : nullptr, y.data_ptr(), x2.size(0),
                          x2.size(1), out_f, x2.scalar_type(), hb ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT);
  if (act == Act::None) return lt_matmul(g, x2) == CUBLAS_STATUS_SUCCESS;
  if (act == Act::Relu && env_on("FASTMLP_LT_RELU", false) && relu_epilogue_ok(x2, hb)) {
    g.epi = hb ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
    if (lt_matmul(g, x2) == CUBLAS_STATUS_SUCCESS) return true;
    g.epi = hb ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  }
  if (act == Act::GeluTanh && x2.scalar_type() != at::kFloat && env_on("FASTMLP_LT_GELU", true) &&
      (!save || out_f % 8 == 0)) {
    // cuBLASLt's GELU is the tanh approximation; its aux (pre-activation) needs ld % 8 == 0,
    // which is ld = out_f here because `saved` is contiguous (rows, out_f). fp16/bf16 only: the
    // epilogue's tanh is not documented to be IEEE-accurate, and in fp32 our kernel must match
    // torch to float32 tolerance; in fp16/bf16 the output rounding hides any approximation.
    if (save) {
      g.epi = hb ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
      g.aux = saved.data_ptr();
      g.aux_ld = out_f;
    } else {
      g.epi = hb ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    }
    if (lt_matmul(g, x2) == CUBLAS_STATUS_SUCCESS) return true;
    g.epi = hb ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    g.aux = nullptr;
  }
  // GEMM + bias into saved (when kept) or y, then our kernel applies the activation.
  at::Tensor& dst = save ? saved : y;
  g.d = dst.data_ptr();
  if (lt_matmul(g, x2) != CUBLAS_STATUS_SUCCESS) return false;
  run_epilogue(act, dst, nullptr, nullptr, y, shape);
  return true;
}

// at::mm / at::addmm + our kernel: fp64, and whatever cuBLASLt refuses.
void forward_fallback(Act act, const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                      at::Tensor& y, at::Tensor& saved, bool save, const Shape& shape) {
  const bool low_precision = x2.scalar_type() == at::kHalf || x2.scalar_type() == at::kBFloat16;
  at::Tensor& dst = save ? saved : y;
  const at::Tensor* bias_in_kernel = nullptr;
  if (bias.has_value() && low_precision) {
    // fp16/bf16: the GEMM adds the bias before its single rounding, as nn.Linear's addmm does.
    at::addmm_out(dst, *bias, x2, w.t());
  } else {
    at::mm_out(dst, x2, w.t());
    if (bias.has_value()) bias_in_kernel = &*bias;
  }
  if (act == Act::None && bias_in_kernel == nullptr) return;  // y already final (save is false)
  run_epilogue(act, dst, bias_in_kernel, save ? &saved : nullptr, y, shape);
}

std::tuple<at::Tensor, at::Tensor> linear_act_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           c10::string_view activation, bool save_for_backward) {
  const Act act = check_linear_act_args(input, weight, bias, activation, kFwd);
  FASTMLP_CHECK(input.is_cuda(), kFwd, ": expected CUDA tensors, got input on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t in_f = weight.size(1), out_f = weight.size(0);
  const int64_t rows = leading_rows(input);
  const at::Tensor x2 = input.reshape({rows, in_f}).contiguous();
  const at::Tensor w = weight.contiguous();
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->contiguous();
  const auto opts = input.options();
  at::Tensor y = at::empty({rows, out_f}, opts);
  const bool save = save_for_backward && act_saves_preactivation(act);
  at::Tensor saved = save ? at::empty({rows, out_f}, opts) : at::empty({0}, opts);
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = out_f;
  if (rows > 0 && out_f > 0) {
    const Shape shape{rows, in_f, out_f, input.scalar_type()};
    const bool lt = input.scalar_type() != at::kDouble && in_f > 0 && env_on("FASTMLP_CUBLASLT", true);
    if (!(lt && forward_lt(act, x2, w, b, y, saved, save, shape))) {
      forward_fallback(act, x2, w, b, y, saved, save, shape);
    }
  }
  return {y.view(out_shape), saved};
}

// ------------------------------------------------------------------------------------------------
// Backward

// A zeroed uint32 array of at least n elements for the backward prologue's "last block" counters.
// The kernel leaves it zeroed, so one buffer per (device, stream) is reused by every launch on
// that stream (launches on one stream never overlap). While the stream is captured into a CUDA
// graph, a fresh zeroed buffer (its memset captured too) is used instead of the cached one.
at::Tensor zeroed_counters(const at::Tensor& like, int64_t n) {
  const auto opts = like.options().dtype(at::kInt);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
    return at::zeros({n}, opts);
  }
  static std::mutex mutex;
  static auto* cache = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();  // never freed: no
  std::lock_guard<std::mutex> lock(mutex);                                         // CUDA calls at exit
  at::Tensor& t = (*cache)[{like.get_device(), stream}];
  if (!t.defined() || t.numel() < n) t = at::zeros({std::max<int64_t>(n, 4096)}, opts);
  return t;
}

// dW = dZ^T X and, in the same cuBLASLt GEMM, db = the column sums of dZ (BGRADB epilogue). Row-major
// dW (out, in) is column-major D (in x out, ld = in) = A op(B) with m = in, n = out, k = rows:
// A = x2 stored column-major as (in x rows, ld = in), not transposed; B = dZ stored column-major
// as (out x rows, ld = out), transposed, so op(B) = (rows x out) and the epilogue's sums over k are
// db[o] = sum_r dZ[r, o]. False when cuBLASLt refuses the problem (grad_w and grad_b
// then hold nothing the caller keeps).
bool weight_grad_lt(const at::Tensor& dz, const at::Tensor& x2, at::Tensor& grad_w, at::Tensor& grad_b,
                    const Shape& shape) {
  const int64_t rows = x2.size(0), in_f = x2.size(1), out_f = dz.size(1);
  grad_w = at::empty({out_f, in_f}, dz.options());
  LtGemm g{x2.data_ptr(), dz.data_ptr(), grad_w.data_ptr(), in_f, out_f, rows, in_f, out_f, in_f,
           false, true, dz.scalar_type(), CUBLASLT_EPILOGUE_BGRADB};
  g.bias = grad_b.data_ptr();  // written: a fresh tensor, so 16-byte aligned
  g.op = kBwd;
  g.shape = shape;
  return lt_matmul(g, dz) == CUBLAS_STATUS_SUCCESS;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& output,
    const at::Tensor& saved, c10::string_view activation, std::array<bool, 3> output_mask) {
  const Act act = check_linear_act_backward_args(grad_output, input, weight, output, saved, activation, kBwd);
  FASTMLP_CHECK(grad_output.is_cuda(), kBwd, ": expected CUDA tensors, got grad_output on ",
                grad_output.device());
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const int64_t in_f = weight.size(1), out_f = weight.size(0);
  const int64_t rows = leading_rows(input);
  const at::Tensor g = grad_output.reshape({rows, out_f}).contiguous();
  at::Tensor y, z;
  if (act == Act::Relu) y = output.reshape({rows, out_f}).contiguous();
  if (act_saves_preactivation(act)) z = saved.reshape({rows, out_f}).contiguous();
  const auto opts = grad_output.options();
  const bool need_dz = output_mask[0] || output_mask[1];
  at::Tensor dz = (act == Act::None || !need_dz) ? g : at::empty({rows, out_f}, opts);
  at::Tensor grad_b = at::empty({0}, opts);
  if (output_mask[2]) grad_b = rows == 0 ? at::zeros({out_f}, opts) : at::empty({out_f}, opts);
  const Shape shape{rows, in_f, out_f, g.scalar_type()};
  // Opt-in (FASTMLP_LT_BGRAD=1): the bias gradient from the weight-gradient GEMM's epilogue, so
  // the prologue is a pure elementwise pass (none: no prologue at all).
  const bool lt_bgrad = output_mask[1] && output_mask[2] && rows > 0 && in_f > 0 && out_f > 0 &&
                        g.scalar_type() != at::kDouble && env_on("FASTMLP_CUBLASLT", true) &&
                        env_on("FASTMLP_LT_BGRAD", false);
  const bool prologue_db = output_mask[2] && !lt_bgrad;
  const bool need_kernel = (act != Act::None && need_dz) || prologue_db;
  if (need_kernel && rows > 0 && out_f > 0) {
    const DType dt = to_dtype(g.scalar_type());
    BwdPrologueParams p{};
    p.g = g.data_ptr();
    p.y = y.defined() ? y.data_ptr() : nullptr;
    p.z = z.defined() ? z.data_ptr() : nullptr;
    p.dz = (act != Act::None && need_dz) ? dz.data_ptr() : nullptr;
    p.db = prologue_db ? grad_b.data_ptr() : nullptr;
    p.rows = rows;
    p.cols = out_f;
    p.partial_rows = bwd_partial_rows(act, dt, p, at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                                      env_int("FASTMLP_BWD_BLOCKS_PER_SM", kBwdBlocksPerSm, 1, 64),
                                      env_int("FASTMLP_BWD_MIN_ROWS", kBwdMinRowsPerThread, 1, 1024));
    at::Tensor partial, counters;
    if (p.db != nullptr && p.partial_rows > 1) {
      partial = at::empty({static_cast<int64_t>(p.partial_rows) * out_f},
                          opts.dtype(dt == DType::F64 ? at::kDouble : at::kFloat));
      p.partial = partial.data_ptr();
      counters = zeroed_counters(g, bwd_counter_count(act, dt, p));
      p.counters = reinterpret_cast<unsigned int*>(counters.data_ptr());
    }
    check_launch(launch_bwd_prologue(act, dt, p, at::cuda::getCurrentCUDAStream()), kBwd, "backward prologue",
                 shape);
  }
  at::Tensor grad_x = at::empty({0}, opts), grad_w = at::empty({0}, opts);
  if (output_mask[0]) grad_x = at::mm(dz, weight).view(input.sizes());
  if (lt_bgrad) {
    const at::Tensor x2 = input.reshape({rows, in_f}).contiguous();
    if (!weight_grad_lt(dz, x2, grad_w, grad_b, shape)) {
      grad_w = at::mm(dz.t(), x2);
      at::sum_out(grad_b, dz, at::IntArrayRef{0});  // as eager sums the bias gradient
    }
  } else if (output_mask[1]) {
    grad_w = at::mm(dz.t(), input.reshape({rows, in_f}));
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastmlp, CUDA, m) {
  m.impl("linear_act_forward", &cuda::linear_act_forward_cuda);
  m.impl("linear_act_backward", &cuda::linear_act_backward_cuda);
}

}  // namespace fastmlp
