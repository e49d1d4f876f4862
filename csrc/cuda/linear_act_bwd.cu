// Backward prologue of fastmlp.linear_act on CUDA: dZ = dY * act'(.) and db = sum_rows(dZ) in
// one pass over dY, before the two GEMMs dX = dZ W and dW = dZ^T X (at::mm, in the host entry).
//
// The op receives dY, so the activation derivative must come before any GEMM; native eager
// spends one kernel on act' (threshold_backward / gelu_backward / silu_backward) and one more on
// the bias sum, both re-reading dZ: this kernel does both while dZ is in registers.
//
// Napkin math: reads dY and y-or-z, writes dZ: 6 bytes/element in bf16, ~16 us for 4096 x 4096
// at 3 TB/s; the floor for the whole backward is the two GEMMs.
#include "linear_act_kernels.cuh"

#include <algorithm>

namespace fastmlp {
namespace cuda {
namespace {

// Block (bx, by): thread (tx, ty) owns columns [c0, c0 + VEC) and rows r_begin + ty, + by, ... of
// the block's row chunk (blockIdx.y). Column sums: per-thread in registers, then over ty through
// shared memory in ty order, then (when gridDim.y > 1) over the chunks by the last block of each
// column range, in an order fixed by the grid: the bias gradient is deterministic for a given
// shape and GPU (no floating-point atomics).
// Rows whose loads one thread issues before using any of them: more loads in flight per thread,
// fewer threads per SM once the registers they take limit occupancy. ReLU's and identity's rows
// are cheap to hold; the transcendental derivatives (erf, tanh, exp) need registers of their own.
template <Act A>
constexpr int rows_in_flight() {
  return A == Act::Relu || A == Act::None ? 4 : 2;
}

template <Act A, typename T, int VEC>
__global__ void __launch_bounds__(kThreads) bwd_prologue_kernel(const BwdPrologueParams p) {
  using acc_t = acc_t_of<T>;
  __shared__ acc_t red[kThreads * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * bx + tx) * VEC;
  const bool active = c0 < p.cols;
  const int64_t chunk = (p.rows + gridDim.y - 1) / gridDim.y;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t r_end = r_begin + chunk < p.rows ? r_begin + chunk : p.rows;
  const T* __restrict__ g = static_cast<const T*>(p.g);
  const T* __restrict__ y = static_cast<const T*>(p.y);
  const T* __restrict__ z = static_cast<const T*>(p.z);
  T* __restrict__ dz = static_cast<T*>(p.dz);
  const bool write_dz = A != Act::None && dz != nullptr;
  acc_t acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
  using V = Vec<T, VEC>;
  // One row's inputs as loaded (fp16/bf16 stay packed until used, half the registers): dY into
  // dv, and the tensor act' reads (y for ReLU, z otherwise) into ov.
  auto load_row = [&](int64_t r, V& dv, V& ov) {
    const int64_t off = r * p.cols + c0;
    dv = load_vec<T, VEC>(g + off);
    if constexpr (A == Act::Relu) {
      ov = load_vec<T, VEC>(y + off);
    } else if constexpr (A != Act::None) {
      ov = load_vec<T, VEC>(z + off);
    }
  };
  // dZ = dY * act'(.) for one row, stored, and added to the column sums.
  auto finish_row = [&](int64_t r, const V& dv, const V& ov) {
    acc_t d[VEC];
    to_acc(dv, d);
    if constexpr (A != Act::None) {
      acc_t o[VEC];
      to_acc(ov, o);
      if constexpr (A == Act::Relu) {
        // As torch's threshold_backward(dY, y, 0): y <= 0 -> 0, so a NaN y passes dY through.
#pragma unroll
        for (int j = 0; j < VEC; ++j) d[j] = o[j] <= acc_t(0) ? acc_t(0) : d[j];
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) d[j] *= act_derivative<A>(o[j]);
      }
    }
    if (write_dz) store_acc<T, VEC>(dz + r * p.cols + c0, d);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] += d[j];
  };
  if (active) {
    constexpr int kRowsInFlight = rows_in_flight<A>();
    // kRowsInFlight rows' loads are issued before any of them is used, so each thread keeps
    // several 16-byte loads in flight instead of waiting on one row at a time; rows are still
    // added to the sums in increasing order, so db is bit for bit what a row-by-row loop gives.
    int64_t r = r_begin + ty;
    for (; r + (kRowsInFlight - 1) * by < r_end; r += kRowsInFlight * by) {
      V dv[kRowsInFlight], ov[kRowsInFlight];
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) load_row(r + u * by, dv[u], ov[u]);
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) finish_row(r + u * by, dv[u], ov[u]);
    }
    for (; r < r_end; r += by) {
      V dv, ov;
      load_row(r, dv, ov);
      finish_row(r, dv, ov);
    }
  }
  if (p.db == nullptr) return;  // uniform over the grid: no thread is left at a barrier
#pragma unroll
  for (int j = 0; j < VEC; ++j) red[(ty * bx + tx) * VEC + j] = acc[j];
  __syncthreads();
  const bool writer = ty == 0 && active;
  acc_t s[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) s[j] = acc_t(0);
  if (writer) {
    for (int k = 0; k < by; ++k) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) s[j] += red[(k * bx + tx) * VEC + j];
    }
  }
  T* db = static_cast<T*>(p.db);
  if (gridDim.y == 1) {
    if (writer) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) db[c0 + j] = from_acc<T>(s[j]);
    }
    return;
  }
  // Several row chunks: each block publishes its partial sums; the last block to finish for this
  // column range (a per-column-block counter) adds the partials and writes db, then resets the
  // counter to 0 for the next launch on the stream. One launch, no atomics on data.
  acc_t* partial = static_cast<acc_t*>(p.partial);
  if (writer) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) partial[static_cast<int64_t>(blockIdx.y) * p.cols + c0 + j] = s[j];
  }
  __threadfence();
  __syncthreads();
  __shared__ unsigned int is_last;
  if (tx == 0 && ty == 0) {
    is_last = atomicAdd(p.counters + blockIdx.x, 1u) == gridDim.y - 1 ? 1u : 0u;
  }
  __syncthreads();
  if (is_last == 0u) return;
  __threadfence();
  // The last block adds the gridDim.y partials of its bx * VEC columns with all 256 threads:
  // thread tid sums chunks part, part + parts, ... of column cl (loads from different chunks are
  // independent, so they overlap), then the parts are added in order through shared memory
  // (free again: every read of `red` above happened before the last barrier).
  const int tid = ty * bx + tx;
  const int ncols = bx * VEC;          // a power of two <= 256
  const int parts = kThreads / ncols;  // so parts * ncols == kThreads
  const int cl = tid % ncols, part = tid / ncols;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * ncols + cl;
  acc_t t = acc_t(0);
  if (c < p.cols) {
    // __ldcg: read through L2, where the other blocks' partials are (L1 is not coherent).
#pragma unroll 4
    for (unsigned k = part; k < gridDim.y; k += parts) t += __ldcg(partial + static_cast<int64_t>(k) * p.cols + c);
  }
  red[tid] = t;
  __syncthreads();
  if (part == 0 && c < p.cols) {
    acc_t total = acc_t(0);
    for (int q = 0; q < parts; ++q) total += red[q * ncols + cl];
    db[c] = from_acc<T>(total);
  }
  if (tid == 0) p.counters[blockIdx.x] = 0u;
}

int bwd_vec(Act act, DType dt, const BwdPrologueParams& p) {
  const void* other = act == Act::Relu ? p.y : act == Act::None ? nullptr : p.z;
  const bool aligned = aligned16(p.g) && (other == nullptr || aligned16(other)) &&
                       (p.dz == nullptr || aligned16(p.dz));
  return vec_for(dt, p.cols, aligned);
}

}  // namespace

int64_t bwd_counter_count(Act act, DType dt, const BwdPrologueParams& p) {
  if (p.cols <= 0) return 0;
  const int vec = bwd_vec(act, dt, p);
  const int bx = block_x(p.cols, vec);
  return ((p.cols + vec - 1) / vec + bx - 1) / bx;
}

int bwd_partial_rows(Act act, DType dt, const BwdPrologueParams& p, int num_sms, int blocks_per_sm,
                     int min_rows_per_thread) {
  if (p.rows <= 0 || p.cols <= 0) return 1;
  const int vec = bwd_vec(act, dt, p);
  const int bx = block_x(p.cols, vec), by = kThreads / bx;
  // No bias gradient (a layer without bias, or FASTMLP_LT_BGRAD's GEMM epilogue computes it): a
  // pure elementwise pass, streamed like the forward epilogue, whose grid moved 4.6 TB/s on an
  // H200 where the one-wave grid below moved 2.0 TB/s with the sums: a row a thread, as many
  // blocks as the rows need.
  if (p.db == nullptr) return static_cast<int>(std::min<int64_t>((p.rows + by - 1) / by, 65535));
  // Small layers: one row chunk, no cross-block reduction.
  if (p.rows * p.cols <= (int64_t(1) << 16)) return 1;
  const int64_t gx = ((p.cols + vec - 1) / vec + bx - 1) / bx;
  // Blocks to fill the GPU (by default 4 a SM: one resident wave).
  const int64_t target = static_cast<int64_t>(std::max(blocks_per_sm, 1)) * std::max(num_sms, 1);
  int64_t gy = (target + gx - 1) / gx;
  // At least min_rows_per_thread rows a thread (default 4), so the shared-memory reduction stays a
  // small part of the work.
  gy = std::min<int64_t>(gy, std::max<int64_t>(1, p.rows / (std::max(min_rows_per_thread, 1) * by)));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(gy, 65535)));
}

cudaError_t launch_bwd_prologue(Act act, DType dt, const BwdPrologueParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaSuccess;
  const int vec = bwd_vec(act, dt, p);
  const int bx = block_x(p.cols, vec), by = kThreads / bx;
  const int64_t gx = ((p.cols + vec - 1) / vec + bx - 1) / bx;
  if (gx > 0x7fffffff || p.partial_rows < 1 || p.partial_rows > 65535) return cudaErrorInvalidConfiguration;
  if (p.db != nullptr && p.partial_rows > 1 && (p.partial == nullptr || p.counters == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(p.partial_rows));
  const dim3 block(bx, by);
  return dispatch_act(act, [&](auto a) {
    return dispatch_dtype(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      constexpr Act A = decltype(a)::value;
      if (vec == 1) {
        bwd_prologue_kernel<A, T, 1><<<grid, block, 0, stream>>>(p);
      } else {
        bwd_prologue_kernel<A, T, 16 / sizeof(T)><<<grid, block, 0, stream>>>(p);
      }
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace fastmlp
