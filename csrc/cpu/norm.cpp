// Layer norm and batch norm (training mode) on the CPU, forward and backward.
//
// Why our own: torch's CPU kernels for an MLP's (batch, features) activations are slow for what
// they do. On the 2-core Xeon VM a 256x512 float32 BatchNorm1d took 0.81 ms forward+backward and a
// LayerNorm 0.60 ms, where one pass over the tensor (a copy) takes 0.022 ms. Here every kernel reads
// its inputs from memory once per pass that needs them (layer norm: one forward, one backward;
// batch norm, whose statistics span all rows: two each), works on rows while they are in L1, and
// runs in parallel over fixed chunks of rows.
//
// Numerics: statistics in acc_t (float for float32/float16/bfloat16, double for float64); the
// variance two-pass, mean first and then the squares of the deviations from it, so there is no
// cancellation when the mean is large against the spread (batch norm: two-pass within each chunk of
// rows, the chunks merged in double with Chan's formula); y = (x - mean) * rstd * weight + bias. Rows
// (columns) whose spread is within ~2^-10 of their mean, a constant one say, or whose float sums
// overflow are taken again in double (careful_statistics, below).
// Reductions within a row are `omp simd` reductions: their order depends on the build's vector width
// only. Chunks depend on the shape only and are merged in chunk order, so no result depends on the
// thread count (a resumed run is bitwise the same).
//
// Layout contract: the kernels (float32 and float64; float16 / bfloat16 inputs are converted to
// float32 by the host functions, see is_reduced) read and write contiguous row-major buffers, x of M
// rows and N columns (layer norm: N = the normalised size; batch norm: N = the channels). The host
// functions make the inputs contiguous; weight and bias arrive as acc_t arrays (given, or ones and
// zeros). mean and rstd / invstd are acc_t tensors of shape (M,) (layer norm) or (N,) (batch norm).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../activation.h"
#include "../checks.h"

namespace fastmlp {
namespace {

constexpr const char* kLayerNorm = "fastmlp.layer_norm";
constexpr const char* kLayerNormBwd = "fastmlp.layer_norm_backward";
constexpr const char* kBatchNorm = "fastmlp.batch_norm";
constexpr const char* kBatchNormBwd = "fastmlp.batch_norm_backward";

constexpr int64_t kElemsPerTask = 8192;  // below this a parallel region costs more than it saves
constexpr int64_t kChunkElems = 8192;     // a chunk of rows: 32 KiB of float32, one L1's worth

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// Rows in chunks of ~kChunkElems elements, at most max_chunks of them (each chunk keeps a partial
// of N values). Depends on the shape only.
struct RowChunks {
  int64_t rows, count;
  RowChunks(int64_t M, int64_t N, int64_t max_chunks) {
    rows = std::max<int64_t>({1, kChunkElems / std::max<int64_t>(N, 1), (M + max_chunks - 1) / max_chunks});
    count = (M + rows - 1) / rows;
  }
  int64_t begin(int64_t c) const { return c * rows; }
  int64_t end(int64_t c, int64_t M) const { return std::min(M, (c + 1) * rows); }
};

// at::parallel_for over [0, n) items of `elems_per_item` elements each, in one task when small.
template <typename F>
void parallel_items(int64_t n, int64_t elems_per_item, const F& f) {
  at::parallel_for(0, n, std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(elems_per_item, 1)), f);
}

constexpr int64_t kColBlock = 256;  // columns merged per task: a few KiB of partials per chunk row

// out[j] = sum over c of part[c * N + j] in chunk order (in double when sum_t is), vectorised across
// columns; nothing when out is nullptr.
template <typename sum_t, typename acc_t>
void sum_chunks(const acc_t* part, int64_t chunks, int64_t N, acc_t* out) {
  if (out == nullptr) return;
  parallel_items((N + kColBlock - 1) / kColBlock, kColBlock * chunks, [=](int64_t k0, int64_t k1) {
    sum_t s[kColBlock];
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t j0 = k * kColBlock, width = std::min(kColBlock, N - j0);
      std::fill(s, s + width, sum_t(0));
      for (int64_t c = 0; c < chunks; ++c) {
        const acc_t* __restrict__ p = part + c * N + j0;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) s[j] += static_cast<sum_t>(p[j]);
      }
      for (int64_t j = 0; j < width; ++j) out[j0 + j] = static_cast<acc_t>(s[j]);
    }
  });
}

// ---- statistics of rows (layer norm) and columns (batch norm) ---------------------------------
//
// The plain two-pass statistics (a mean as a sum times 1/n, then the squares of the deviations from
// it) are accurate unless the spread is within a few ulps of the mean, a constant row for one: the
// mean's own rounding then matters, and rstd ~ 1/sqrt(eps) blows it up (a constant row of 12345.678
// in 512 columns gave -0.78 where torch's Welford statistics give the bias). Nor do they hold when
// the float sums overflow (a spread past ~1e19) or the values hold inf / NaN. Those rows / columns,
// rare, are taken again by careful_statistics.

// True when a row's (column's) plain statistics hold: a finite variance above ~2^-20 mean^2 (where
// a float mean's rounding, ~2^-24 |mean|, is below ~2^-14 of the spread; 1e-20 mean^2 in double).
template <typename acc_t>
inline bool plain_statistics_hold(acc_t var, acc_t mu) {
  constexpr acc_t near_constant = std::is_same_v<acc_t, float> ? acc_t(1.0 / (1 << 20)) : acc_t(1e-20);
  return (var > near_constant * mu * mu) & (var < std::numeric_limits<acc_t>::infinity());
}

// n values x[0], x[stride], ...: their mean, corrected (a second pass adds back the mean deviation
// from the first estimate, so a constant row gets its exact value), rounded to acc_t, and the sum
// of squared deviations from that rounded mean (the one the output subtracts), all in double.
template <typename scalar_t, typename acc_t>
[[gnu::noinline, gnu::cold]] void careful_statistics(const scalar_t* x, int64_t n, int64_t stride, acc_t& mean, double& m2) {
  const double inv = 1.0 / static_cast<double>(n);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i * stride]);
  double m = s * inv, c = 0;
  for (int64_t i = 0; i < n; ++i) c += static_cast<double>(x[i * stride]) - m;
  mean = static_cast<acc_t>(m + c * inv);
  m2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(x[i * stride]) - static_cast<double>(mean);
    m2 += d * d;
  }
}

// ---- layer norm -------------------------------------------------------------------------------
//
// One row at a time: a row's reductions are `omp simd` reductions (their order depends on the build's
// vector width only), and the row stays in L1 between the passes over it. (Reducing four rows in one
// loop, for four independent chains of adds, measured no faster, and with rows 4 KiB apart its eight
// input streams share one L1 set and evict each other: 1.8x slower at 1024 x 1024.)

template <typename scalar_t>
void layer_norm_forward_kernel(const scalar_t* x, const acc_type<scalar_t>* w, const acc_type<scalar_t>* b,
                               scalar_t* y, acc_type<scalar_t>* mean, acc_type<scalar_t>* rstd, int64_t M,
                               int64_t N, double eps) {
  using acc_t = acc_type<scalar_t>;
  parallel_items(M, N, [=](int64_t r0, int64_t r1) {
    // Local copies: a pointer read through the closure inside an `omp simd` loop is re-read every
    // iteration (a store might change it), and gcc then gathers instead of loading a vector.
    const acc_t *__restrict__ w_ = w, *__restrict__ b_ = b;
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ xr = x + r * N;
      scalar_t* __restrict__ yr = y + r * N;
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < N; ++j) s += static_cast<acc_t>(xr[j]);
      acc_t mu = s * inv_n;
      acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < N; ++j) {
        const acc_t d = static_cast<acc_t>(xr[j]) - mu;
        ss += d * d;
      }
      acc_t rs;
      if (plain_statistics_hold(ss * inv_n, mu)) {
        rs = acc_t(1) / std::sqrt(ss * inv_n + static_cast<acc_t>(eps));
      } else {
        double m2;
        careful_statistics(xr, N, 1, mu, m2);
        rs = static_cast<acc_t>(1.0 / std::sqrt(m2 / static_cast<double>(N) + eps));  // (m2 may not fit a float)
      }
      mean[r] = mu;
      rstd[r] = rs;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) yr[j] = static_cast<scalar_t>((static_cast<acc_t>(xr[j]) - mu) * rs * w_[j] + b_[j]);
    }
  });
}

// Per row, xhat = (x - mean) * rstd and gw = g * w: dx = rstd * (gw - avg(gw) - xhat * avg(gw * xhat));
// dw = sum over rows of g * xhat, db = sum over rows of g, each chunk of rows into a partial of its
// own (it stays in L1 while the chunk's rows stream past), the partials added up in chunk order. Two
// passes over each row: the averages with the partials' terms, then dx.
template <typename scalar_t>
void layer_norm_backward_kernel(const scalar_t* g, const scalar_t* x, const acc_type<scalar_t>* mean,
                                const acc_type<scalar_t>* rstd, const acc_type<scalar_t>* w, scalar_t* dx,
                                acc_type<scalar_t>* dw, acc_type<scalar_t>* db, int64_t M, int64_t N) {
  using acc_t = acc_type<scalar_t>;
  const RowChunks chunks(M, N, /*max_chunks=*/32);
  const bool want_params = dw != nullptr || db != nullptr;
  std::vector<acc_t> pw(want_params ? chunks.count * N : 0), pb(want_params ? chunks.count * N : 0);
  acc_t* const pwp = pw.data();
  acc_t* const pbp = pb.data();
  parallel_items(chunks.count, chunks.rows * N, [=](int64_t c0, int64_t c1) {
    const acc_t* __restrict__ w_ = w;  // a local copy, as in layer_norm_forward_kernel
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* __restrict__ pwc = want_params ? pwp + c * N : nullptr;
      acc_t* __restrict__ pbc = want_params ? pbp + c * N : nullptr;
      if (want_params) {
        std::fill(pwc, pwc + N, acc_t(0));
        std::fill(pbc, pbc + N, acc_t(0));
      }
      for (int64_t r = chunks.begin(c); r < chunks.end(c, M); ++r) {
        const scalar_t* __restrict__ gr = g + r * N;
        const scalar_t* __restrict__ xr = x + r * N;
        const acc_t mu = mean[r], rs = rstd[r];
        acc_t s1 = 0, s2 = 0;
        if (want_params) {
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t j = 0; j < N; ++j) {
            const acc_t gj = static_cast<acc_t>(gr[j]);
            const acc_t xhat = (static_cast<acc_t>(xr[j]) - mu) * rs;
            pwc[j] += gj * xhat;
            pbc[j] += gj;
            const acc_t gw = gj * w_[j];
            s1 += gw;
            s2 += gw * xhat;
          }
        } else {
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t j = 0; j < N; ++j) {
            const acc_t gw = static_cast<acc_t>(gr[j]) * w_[j];
            s1 += gw;
            s2 += gw * ((static_cast<acc_t>(xr[j]) - mu) * rs);
          }
        }
        if (dx == nullptr) continue;
        const acc_t a = s1 * inv_n, bb = s2 * inv_n;
        scalar_t* __restrict__ dxr = dx + r * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          const acc_t xhat = (static_cast<acc_t>(xr[j]) - mu) * rs;
          dxr[j] = static_cast<scalar_t>(rs * (static_cast<acc_t>(gr[j]) * w_[j] - a - xhat * bb));
        }
      }
    }
  });
  if (!want_params) return;
  sum_chunks<acc_t>(pw.data(), chunks.count, N, dw);
  sum_chunks<acc_t>(pb.data(), chunks.count, N, db);
}

// ---- batch norm -------------------------------------------------------------------------------

// Column statistics over all rows: each chunk of rows gets its own mean and sum of squared
// deviations (two passes over rows still in cache), merged in chunk order in double (Chan et al.'s
// pairwise update), in parallel over columns.
template <typename scalar_t>
void batch_norm_forward_kernel(const scalar_t* x, const acc_type<scalar_t>* w, const acc_type<scalar_t>* b,
                               scalar_t* y, acc_type<scalar_t>* mean, acc_type<scalar_t>* invstd,
                               acc_type<scalar_t>* unbiased_var, int64_t M, int64_t N, double eps) {
  using acc_t = acc_type<scalar_t>;
  const RowChunks chunks(M, N, /*max_chunks=*/32);
  std::vector<acc_t> pmean_v(chunks.count * N), pm2_v(chunks.count * N);
  std::vector<char> careful_v(chunks.count, 0);  // chunks with a column for careful_statistics
  acc_t* const pmean = pmean_v.data();
  acc_t* const pm2 = pm2_v.data();
  char* const careful = careful_v.data();
  parallel_items(chunks.count, chunks.rows * N, [=](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* __restrict__ mc = pmean + c * N;
      acc_t* __restrict__ m2c = pm2 + c * N;
      const int64_t rb = chunks.begin(c), re = chunks.end(c, M);
      std::fill(mc, mc + N, acc_t(0));
      std::fill(m2c, m2c + N, acc_t(0));
      for (int64_t r = rb; r < re; ++r) {
        const scalar_t* __restrict__ xr = x + r * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) mc[j] += static_cast<acc_t>(xr[j]);
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(re - rb);
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) mc[j] *= inv;
      for (int64_t r = rb; r < re; ++r) {
        const scalar_t* __restrict__ xr = x + r * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          const acc_t d = static_cast<acc_t>(xr[j]) - mc[j];
          m2c[j] += d * d;
        }
      }
      int any = 0;  // (an int and |: a vector loop, where && would short-circuit element by element)
#pragma omp simd reduction(| : any)
      for (int64_t j = 0; j < N; ++j) any |= static_cast<int>(!plain_statistics_hold(m2c[j] * inv, mc[j]));
      careful[c] = static_cast<char>(any);
    }
  });
  // The rare chunks with a column whose plain statistics do not hold: those columns again, their
  // sums of squares in double for the merge (one may not fit a float), the others' copied.
  std::vector<double> wide_v;
  for (int64_t c = 0; c < chunks.count; ++c) {
    if (!careful[c]) continue;
    if (wide_v.empty()) wide_v.resize(chunks.count * N);
    const int64_t rb = chunks.begin(c), re = chunks.end(c, M);
    const acc_t inv = acc_t(1) / static_cast<acc_t>(re - rb);
    acc_t* mc = pmean + c * N;
    const acc_t* m2c = pm2 + c * N;
    double* wc = wide_v.data() + c * N;
    for (int64_t j = 0; j < N; ++j) {
      wc[j] = static_cast<double>(m2c[j]);
      if (!plain_statistics_hold(m2c[j] * inv, mc[j])) careful_statistics(x + rb * N + j, re - rb, N, mc[j], wc[j]);
    }
  }
  const double* const wide = wide_v.data();
  std::vector<acc_t> scale_v(N), shift_v(N);
  acc_t* const scale = scale_v.data();
  acc_t* const shift = shift_v.data();
  parallel_items((N + kColBlock - 1) / kColBlock, kColBlock * chunks.count, [=](int64_t k0, int64_t k1) {
    double mu[kColBlock], m2[kColBlock];
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t j0 = k * kColBlock, width = std::min(kColBlock, N - j0);
      std::fill(mu, mu + width, 0.0);
      std::fill(m2, m2 + width, 0.0);
      double n = 0;
      for (int64_t c = 0; c < chunks.count; ++c) {
        const double nc = static_cast<double>(chunks.end(c, M) - chunks.begin(c)), total = n + nc;
        const double fa = nc / total, fb = n * nc / total;
        const acc_t* __restrict__ mc = pmean + c * N + j0;
        const auto merge = [&](const auto* __restrict__ m2c) {
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) {
            const double delta = static_cast<double>(mc[j]) - mu[j];
            mu[j] += delta * fa;
            m2[j] += static_cast<double>(m2c[j]) + delta * delta * fb;
          }
        };
        if (careful[c]) {
          merge(wide + c * N + j0);
        } else {
          merge(pm2 + c * N + j0);
        }
        n = total;
      }
      for (int64_t j = 0; j < width; ++j) {
        const acc_t rs = static_cast<acc_t>(1.0 / std::sqrt(m2[j] / n + eps));
        mean[j0 + j] = static_cast<acc_t>(mu[j]);
        invstd[j0 + j] = rs;
        unbiased_var[j0 + j] = static_cast<acc_t>(m2[j] / (n - 1));
        // One scale and shift per column: (x - mean) * (rs * w) + b.
        scale[j0 + j] = rs * w[j0 + j];
        shift[j0 + j] = b[j0 + j];
      }
    }
  });
  const acc_t* __restrict__ mu = mean;
  const acc_t* __restrict__ sc = scale;
  const acc_t* __restrict__ sh = shift;
  parallel_items(M, N, [=](int64_t r0, int64_t r1) {
    const acc_t *__restrict__ mu_ = mu, *__restrict__ sc_ = sc, *__restrict__ sh_ = sh;  // local copies, as below
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ xr = x + r * N;
      scalar_t* __restrict__ yr = y + r * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) yr[j] = static_cast<scalar_t>((static_cast<acc_t>(xr[j]) - mu_[j]) * sc_[j] + sh_[j]);
    }
  });
}

// db = sum over rows of g, dw = invstd * sum over rows of g * (x - mean) (chunk partials in acc_t,
// added up in chunk order in double), then dx = w * invstd * (g - db/M - xhat * dw/M).
template <typename scalar_t>
void batch_norm_backward_kernel(const scalar_t* g, const scalar_t* x, const acc_type<scalar_t>* mean,
                                const acc_type<scalar_t>* invstd, const acc_type<scalar_t>* w, scalar_t* dx,
                                acc_type<scalar_t>* dw, acc_type<scalar_t>* db, int64_t M, int64_t N) {
  using acc_t = acc_type<scalar_t>;
  const RowChunks chunks(M, N, /*max_chunks=*/32);
  std::vector<acc_t> pg_v(chunks.count * N), pgx_v(chunks.count * N);
  acc_t* const pg = pg_v.data();
  acc_t* const pgx = pgx_v.data();
  const acc_t* __restrict__ mu = mean;
  parallel_items(chunks.count, chunks.rows * N, [=](int64_t c0, int64_t c1) {
    const acc_t* __restrict__ mu_ = mu;  // a local copy (see batch_norm_backward_kernel's last loop)
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* __restrict__ sg = pg + c * N;
      acc_t* __restrict__ sgx = pgx + c * N;
      std::fill(sg, sg + N, acc_t(0));
      std::fill(sgx, sgx + N, acc_t(0));
      for (int64_t r = chunks.begin(c); r < chunks.end(c, M); ++r) {
        const scalar_t* __restrict__ gr = g + r * N;
        const scalar_t* __restrict__ xr = x + r * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          const acc_t gj = static_cast<acc_t>(gr[j]);
          sg[j] += gj;
          sgx[j] += gj * (static_cast<acc_t>(xr[j]) - mu_[j]);
        }
      }
    }
  });
  std::vector<acc_t> sum_g(N), sum_gx(N), k1(N), k2(N), coef(N);
  sum_chunks<double>(pg, chunks.count, N, sum_g.data());
  sum_chunks<double>(pgx, chunks.count, N, sum_gx.data());
  for (int64_t j = 0; j < N; ++j) {
    const acc_t rs = invstd[j];
    const acc_t sum_gxhat = sum_gx[j] * rs;
    if (db != nullptr) db[j] = sum_g[j];
    if (dw != nullptr) dw[j] = sum_gxhat;
    k1[j] = sum_g[j] / static_cast<acc_t>(M);
    k2[j] = sum_gxhat / static_cast<acc_t>(M) * rs;  // times (x - mean) = xhat / rs
    coef[j] = w[j] * rs;
  }
  if (dx == nullptr) return;
  const acc_t* __restrict__ a = k1.data();
  const acc_t* __restrict__ bq = k2.data();
  const acc_t* __restrict__ cf = coef.data();
  parallel_items(M, N, [=](int64_t r0, int64_t r1) {
    // Local copies: a pointer read through the closure inside an `omp simd` loop is re-read every
    // iteration (a store might change it), and gcc then gathers instead of loading a vector.
    const acc_t *__restrict__ a_ = a, *__restrict__ bq_ = bq, *__restrict__ cf_ = cf, *__restrict__ mu_ = mu;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ gr = g + r * N;
      const scalar_t* __restrict__ xr = x + r * N;
      scalar_t* __restrict__ dxr = dx + r * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) {
        dxr[j] = static_cast<scalar_t>(cf_[j] * (static_cast<acc_t>(gr[j]) - a_[j] - (static_cast<acc_t>(xr[j]) - mu_[j]) * bq_[j]));
      }
    }
  });
}

// ---- host functions ---------------------------------------------------------------------------

// weight / bias: the input's dtype, or float32 with a float16 / bfloat16 input (torch's mixed
// precision norm: fp32 parameters on half activations). Both of one dtype when both given.
void check_param(const std::optional<at::Tensor>& p, const char* name, const at::Tensor& input,
                 at::IntArrayRef want_shape, const char* want_what, const char* op) {
  if (!p.has_value()) return;
  const at::Tensor& t = *p;
  check_floating(t, op, name);
  check_same_device(input, "input", t, name, op);
  const auto it = input.scalar_type(), pt = t.scalar_type();
  const bool mixed = pt == at::kFloat && (it == at::kHalf || it == at::kBFloat16);
  FASTMLP_CHECK_TYPE(pt == it || mixed, op, ": expected ", name, " to have the input's dtype (", it,
                     ") or float32 with a float16/bfloat16 input, got ", pt);
  FASTMLP_CHECK_VALUE(t.sizes() == want_shape, op, ": ", name, " must have shape ", want_what, " = ",
                      shape_str(want_shape), ", got ", shape_str(t.sizes()));
}

// float16 / bfloat16 inputs run as float32: the kernels compute in float32 anyway, so converting the
// inputs up front (torch's vectorised conversion) and the results back once gives the same values,
// while gcc left c10's scalar Half / BFloat16 conversions inside the kernels' loops unvectorised
// (3x-30x slower than torch's norms at 256x512).
bool is_reduced(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

std::optional<at::Tensor> as_float(const std::optional<at::Tensor>& p) {
  if (!p.has_value()) return std::nullopt;
  return p->to(at::kFloat);
}

// A parameter as an acc_t array of n elements (contiguous, converted), `fill` where not given: the
// kernels always scale and shift (by 1 and 0 exactly), so their loops have no branch.
at::Tensor as_acc(const std::optional<at::Tensor>& p, at::ScalarType acc, int64_t n, double fill, const at::Tensor& like) {
  if (!p.has_value()) return at::full({n}, fill, like.options().dtype(acc));
  if (p->scalar_type() == acc && p->is_contiguous()) return *p;  // the common case: no copy, no dispatch
  return p->to(acc).contiguous();
}

at::ScalarType acc_of(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// The backward host work both norms share, after their checks: contiguous inputs, the gradients asked
// for (grad_weight and grad_bias in the weight's dtype and of shape param_shape, empty tensors for
// those not asked for), the kernel over M rows of N, zero parameter gradients for an empty batch.
// stat: rstd (layer norm, per row) or invstd (batch norm, per column).
template <bool kLayer>
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                             const at::Tensor& mean, const at::Tensor& stat,
                                                             const std::optional<at::Tensor>& weight,
                                                             std::array<bool, 3> output_mask, int64_t M, int64_t N,
                                                             at::IntArrayRef param_shape) {
  const auto param_dtype = weight.has_value() ? weight->scalar_type() : input.scalar_type();
  if (is_reduced(input)) {
    auto [dx, dw, db] = norm_backward<kLayer>(grad_output.to(at::kFloat), input.to(at::kFloat), mean, stat,
                                              as_float(weight), output_mask, M, N, param_shape);
    return {dx.to(input.scalar_type()), dw.to(param_dtype), db.to(param_dtype)};
  }
  const auto acc = acc_of(input.scalar_type());
  const at::Tensor x = input.contiguous(), g = grad_output.contiguous();
  at::Tensor dx = output_mask[0] ? at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous))
                                 : input.new_empty({0});
  at::Tensor dw = output_mask[1] ? at::empty({N}, input.options().dtype(acc)) : at::Tensor();
  at::Tensor db = output_mask[2] ? at::empty({N}, input.options().dtype(acc)) : at::Tensor();
  if (M > 0 && N > 0) {
    const at::Tensor w = as_acc(weight, acc, N, 1.0, x), mu = mean.contiguous(), st = stat.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kLayer ? kLayerNormBwd : kBatchNormBwd, [&] {
      using acc_t = acc_type<scalar_t>;
      const auto kernel = kLayer ? &layer_norm_backward_kernel<scalar_t> : &batch_norm_backward_kernel<scalar_t>;
      kernel(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mu.const_data_ptr<acc_t>(),
             st.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), output_mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr,
             dw.defined() ? dw.mutable_data_ptr<acc_t>() : nullptr, db.defined() ? db.mutable_data_ptr<acc_t>() : nullptr,
             M, N);
    });
  } else {  // an empty batch: nothing to sum, zero gradients
    if (dw.defined()) dw.zero_();
    if (db.defined()) db.zero_();
  }
  const auto param = [&](const at::Tensor& t) {
    if (!t.defined()) return input.new_empty({0}, input.options().dtype(param_dtype));
    const at::Tensor r = t.scalar_type() == param_dtype ? t : t.to(param_dtype);
    return param_shape.size() == 1 ? r : r.reshape(param_shape);
  };
  return {dx, param(dw), param(db)};
}

int64_t check_layer_norm_args(const at::Tensor& input, at::IntArrayRef normalized_shape,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              const char* op) {
  check_floating(input, op, "input");
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  FASTMLP_CHECK_VALUE(k >= 1, op, ": normalized_shape must have at least one size, got []");
  FASTMLP_CHECK_VALUE(input.dim() >= k && input.sizes().slice(input.dim() - k) == normalized_shape, op,
                      ": input's last ", k, " dimension(s) must be normalized_shape = ",
                      shape_str(normalized_shape), ", got input of shape ", shape_str(input.sizes()));
  check_param(weight, "weight", input, normalized_shape, "normalized_shape", op);
  check_param(bias, "bias", input, normalized_shape, "normalized_shape", op);
  if (weight.has_value() && bias.has_value()) check_same_dtype(*weight, "weight", *bias, "bias", op);
  return c10::multiply_integers(normalized_shape);
}

// The saved statistics: acc_t tensors of `n` elements on the input's device.
void check_stats(const at::Tensor& input, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                 const char* b_name, int64_t n, const char* op) {
  const auto acc = acc_of(input.scalar_type());
  const auto check = [&](const at::Tensor& t, const char* name) {
    check_same_device(input, "input", t, name, op);
    FASTMLP_CHECK_TYPE(t.scalar_type() == acc, op, ": ", name, " must be ", acc, " (the forward's), got ",
                       t.scalar_type());
    FASTMLP_CHECK_VALUE(t.numel() == n, op, ": ", name, " must have ", n,
                        " elements (the forward's statistics), got shape ", shape_str(t.sizes()));
  };
  check(a, a_name);
  check(b, b_name);
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const char* op) {
  check_floating(grad_output, op, "grad_output");
  check_same_device(input, "input", grad_output, "grad_output", op);
  check_same_dtype(grad_output, "grad_output", input, "input", op);
  FASTMLP_CHECK_VALUE(grad_output.sizes() == input.sizes(), op, ": grad_output must have the input's shape ",
                      shape_str(input.sizes()), ", got ", shape_str(grad_output.sizes()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(const at::Tensor& input,
                                                              at::IntArrayRef normalized_shape,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps) {
  const int64_t N = check_layer_norm_args(input, normalized_shape, weight, bias, kLayerNorm);
  if (is_reduced(input)) {
    auto [y, mean, rstd] = layer_norm_cpu(input.to(at::kFloat), normalized_shape, as_float(weight), as_float(bias), eps);
    return {y.to(input.scalar_type()), mean, rstd};
  }
  const at::Tensor x = input.contiguous();
  const int64_t M = N == 0 ? c10::multiply_integers(input.sizes().slice(0, input.dim() - normalized_shape.size()))
                           : x.numel() / N;
  const auto acc = acc_of(input.scalar_type());
  at::Tensor y = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mean = at::empty({M}, input.options().dtype(acc));
  at::Tensor rstd = at::empty({M}, input.options().dtype(acc));
  if (M == 0) return {y, mean, rstd};
  const at::Tensor w = as_acc(weight, acc, N, 1.0, x), b = as_acc(bias, acc, N, 0.0, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kLayerNorm, [&] {
    using acc_t = acc_type<scalar_t>;
    layer_norm_forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                                        y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
                                        rstd.mutable_data_ptr<acc_t>(), M, N, eps);
  });
  return {y, mean, rstd};
}

// Gradients not asked for by output_mask come back as empty tensors; grad_weight and grad_bias have
// the weight's dtype (`weight` given) and shape normalized_shape.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef normalized_shape,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    std::array<bool, 3> output_mask) {
  const char* op = kLayerNormBwd;
  const int64_t N = check_layer_norm_args(input, normalized_shape, weight, std::nullopt, op);
  check_grad_output(grad_output, input, op);
  const int64_t M = c10::multiply_integers(input.sizes().slice(0, input.dim() - normalized_shape.size()));
  check_stats(input, mean, "mean", rstd, "rstd", M, op);
  return norm_backward<true>(grad_output, input, mean, rstd, weight, output_mask, M, N, normalized_shape);
}

void check_batch_norm_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const char* op) {
  check_floating(input, op, "input");
  FASTMLP_CHECK_VALUE(input.dim() == 2, op, ": input must be 2-D (batch, channels), got a ", input.dim(),
                      "-D tensor of shape ", shape_str(input.sizes()));
  const int64_t C = input.size(1);
  check_param(weight, "weight", input, {C}, "[channels]", op);
  check_param(bias, "bias", input, {C}, "[channels]", op);
  if (weight.has_value() && bias.has_value()) check_same_dtype(*weight, "weight", *bias, "bias", op);
}

// Training-mode batch norm over the rows of a (batch, channels) input: returns the output, the batch
// mean, 1 / sqrt(biased variance + eps) and the unbiased variance (for the running estimate, which
// the caller updates). An empty batch gives NaN statistics.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_cpu(const at::Tensor& input,
                                                                          const std::optional<at::Tensor>& weight,
                                                                          const std::optional<at::Tensor>& bias,
                                                                          double eps) {
  check_batch_norm_args(input, weight, bias, kBatchNorm);
  if (is_reduced(input)) {
    auto [y, mean, invstd, uvar] = batch_norm_cpu(input.to(at::kFloat), as_float(weight), as_float(bias), eps);
    return {y.to(input.scalar_type()), mean, invstd, uvar};
  }
  const int64_t M = input.size(0), N = input.size(1);
  const auto acc = acc_of(input.scalar_type());
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({M, N}, input.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mean = at::empty({N}, input.options().dtype(acc));
  at::Tensor invstd = at::empty({N}, input.options().dtype(acc));
  at::Tensor uvar = at::empty({N}, input.options().dtype(acc));
  if (M == 0) {
    mean.fill_(NAN);
    invstd.fill_(NAN);
    uvar.fill_(NAN);
    return {y, mean, invstd, uvar};
  }
  if (N == 0) return {y, mean, invstd, uvar};
  const at::Tensor w = as_acc(weight, acc, N, 1.0, x), b = as_acc(bias, acc, N, 0.0, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBatchNorm, [&] {
    using acc_t = acc_type<scalar_t>;
    batch_norm_forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                                        y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
                                        invstd.mutable_data_ptr<acc_t>(), uvar.mutable_data_ptr<acc_t>(), M, N, eps);
  });
  return {y, mean, invstd, uvar};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, std::array<bool, 3> output_mask) {
  const char* op = kBatchNormBwd;
  check_batch_norm_args(input, weight, std::nullopt, op);
  check_grad_output(grad_output, input, op);
  const int64_t M = input.size(0), N = input.size(1);
  check_stats(input, mean, "mean", invstd, "invstd", N, op);
  return norm_backward<false>(grad_output, input, mean, invstd, weight, output_mask, M, N, {N});
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
  m.impl("batch_norm", &batch_norm_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace fastmlp
