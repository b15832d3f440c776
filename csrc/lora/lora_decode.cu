// Fused LoRA forward for decode-sized batches (M <= 16), one launch:
//
//   t = x A^T                     (M, r), fp32, written by block 0
//   y = x W^T + b + s * t B^T     (M, out), x's dtype
//
// Memory-bound on W. Layout of the work:
//  * A block owns a contiguous range of output rows; a warp owns kRowsPerWarp consecutive rows at
//    a time and walks them along `in` in 16-byte chunks (lane l takes chunks l, l+32, ...: each
//    warp load is 512 contiguous bytes per row), two chunks per row in flight per lane.
//  * x is staged in shared memory as fp32, in tiles of `in` when M x in does not fit. Inside a tile
//    the four-float groups of a chunk are split into planes (group 0 of every chunk, then group 1)
//    so that the float4 reads of consecutive lanes are consecutive: no bank conflicts.
//  * t is recomputed by every block into shared memory (warp-parallel dot products of the r rows
//    of A with the M rows of x, interleaved with the W tiles), so the kernel needs no grid-wide
//    synchronisation. The grid has at most one block per SM to bound that recomputation.
//  * Epilogue per warp: each lane adds its share of s * t B^T (lanes split r), one butterfly sum
//    per (row, m), bias, one store per output.
// Fp32 accumulation throughout; exact (non fast-math) conversions.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "peftkern/dtype.cuh"
#include "peftkern/kernels.cuh"
#include "peftkern/reduce.cuh"
#include "peftkern/vec.cuh"

namespace peftkern {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;   // W rows a warp walks together (x reads shared by these rows)
constexpr int kARowsPerWarp = 2;  // A rows a warp walks together when computing t
constexpr int kRowsPerRound = kWarps * kRowsPerWarp;
constexpr int kMaxM = kLoraDecodeMaxM;
constexpr int kMaxR = kLoraDecodeMaxR;

struct Params {
  const void* x;
  const void* w;
  const void* bias;
  const void* a;
  const void* b;
  void* y;
  float* t;
  int M, K, N, R;
  float scaling;
  int tile_k;          // elements of x per staged tile (multiple of 8)
  int plane_stride;    // floats between the group planes of a staged x row
  int x_stride;        // floats between staged x rows
  int t_floats;        // floats reserved for t at the start of shared memory
  int rows_per_block;  // contiguous output rows per block (multiple of kRowsPerWarp)
};

// Offset (in floats) of float4 group `gi` of a staged x row; gi counts groups from the start of
// the tile. kGT: groups per x chunk.
template <int kGT>
__device__ __forceinline__ int x_group_offset(int gi, int plane_stride) {
  if constexpr (kGT == 1) {
    return gi * 4;
  } else {
    return (gi % kGT) * plane_stride + (gi / kGT) * 4;
  }
}

// Stage x[:, k0:k0+len] into shared memory as fp32.
template <typename T>
__device__ __forceinline__ void stage_x(const T* __restrict__ x, const Params& p, int k0, int len,
                                        float* __restrict__ xs) {
  using CT = ChunkTraits<T>;
  const int nch = len / CT::kElems;
  const int len_vec = nch * CT::kElems;
  const int total = p.M * nch;
  for (int i = threadIdx.x; i < total; i += kThreads) {
    const int m = i / nch;
    const int c = i - m * nch;
    const T* src = x + static_cast<int64_t>(m) * p.K + k0 + c * CT::kElems;
    const uint4 v = load_chunk16<false>(src);
    float* dst = xs + m * p.x_stride;
#pragma unroll
    for (int g = 0; g < CT::kGroups; ++g) {
      const float4 f = chunk_group_to_float4<T>(v, g);
      *reinterpret_cast<float4*>(dst + x_group_offset<CT::kGroups>(c * CT::kGroups + g, p.plane_stride)) = f;
    }
  }
  // Tail (len % chunk elements, only in the last tile): stored after the planes.
  const int tail = len - len_vec;
  if (tail > 0) {
    const int tail_base = CT::kGroups * p.plane_stride;
    for (int i = threadIdx.x; i < p.M * tail; i += kThreads) {
      const int m = i / tail;
      const int e = i - m * tail;
      xs[m * p.x_stride + tail_base + e] = to_float(x[static_cast<int64_t>(m) * p.K + k0 + len_vec + e]);
    }
  }
}

// acc[i][m] += sum over this lane's share of the tile of rows[i][k] * x[m][k].
// T: x's element type (fixes the staged layout); E: the rows' element type.
template <typename T, typename E, int kNR, bool kStream>
__device__ __forceinline__ void dot_tile(const E* const (&rows)[kNR], int nrows, const float* __restrict__ xs,
                                         const Params& p, int len, int lane, float (&acc)[kNR][kMaxM]) {
  using CT = ChunkTraits<T>;
  using CE = ChunkTraits<E>;
  const int M = p.M;
  const int nch_t = len / CT::kElems;
  const int len_vec = nch_t * CT::kElems;
  const int nch = len_vec / CE::kElems;  // row chunks covering the vector part

  auto fma_chunk = [&](int c, const uint4 (&w)[kNR]) {
#pragma unroll
    for (int g = 0; g < CE::kGroups; ++g) {
      const int off = x_group_offset<CT::kGroups>(c * CE::kGroups + g, p.plane_stride);
      float4 wf[kNR];
#pragma unroll
      for (int i = 0; i < kNR; ++i) wf[i] = chunk_group_to_float4<E>(w[i], g);
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) {
          const float4 xv = *reinterpret_cast<const float4*>(xs + m * p.x_stride + off);
#pragma unroll
          for (int i = 0; i < kNR; ++i) {
            float a = acc[i][m];
            a = fmaf(wf[i].x, xv.x, a);
            a = fmaf(wf[i].y, xv.y, a);
            a = fmaf(wf[i].z, xv.z, a);
            a = fmaf(wf[i].w, xv.w, a);
            acc[i][m] = a;
          }
        }
      }
    }
  };

  for (int c0 = lane; c0 < nch; c0 += 64) {
    const int c1 = c0 + 32;
    const bool has1 = c1 < nch;
    uint4 w0[kNR], w1[kNR];
#pragma unroll
    for (int i = 0; i < kNR; ++i) {
      w0[i] = make_uint4(0u, 0u, 0u, 0u);
      w1[i] = make_uint4(0u, 0u, 0u, 0u);
      if (i < nrows) {
        w0[i] = load_chunk16<kStream>(rows[i] + c0 * CE::kElems);
        if (has1) w1[i] = load_chunk16<kStream>(rows[i] + c1 * CE::kElems);
      }
    }
    fma_chunk(c0, w0);
    if (has1) fma_chunk(c1, w1);
  }

  // Scalar tail: fewer than 8 elements, one per lane.
  const int tail = len - len_vec;
  if (lane < tail) {
    const float* xt = xs + CT::kGroups * p.plane_stride + lane;
#pragma unroll
    for (int i = 0; i < kNR; ++i) {
      if (i < nrows) {
        const float wv = to_float(rows[i][len_vec + lane]);
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
          if (m < M) acc[i][m] = fmaf(wv, xt[m * p.x_stride], acc[i][m]);
        }
      }
    }
  }
}

template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads, 1) lora_decode_kernel(const Params p) {
  extern __shared__ __align__(16) float smem[];
  float* __restrict__ ts = smem;                // (M, R)
  float* __restrict__ xs = smem + p.t_floats;   // M staged rows of x

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  const TA* __restrict__ A = static_cast<const TA*>(p.a);
  const TA* __restrict__ B = static_cast<const TA*>(p.b);
  T* __restrict__ y = static_cast<T*>(p.y);

  const int M = p.M, K = p.K, N = p.N, R = p.R;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  for (int i = threadIdx.x; i < M * R; i += kThreads) ts[i] = 0.0f;

  const int ntiles = (K + p.tile_k - 1) / p.tile_k;
  const int row_begin = blockIdx.x * p.rows_per_block;
  const int row_end = min(N, row_begin + p.rows_per_block);

  bool t_ready = false;
  int r0 = row_begin;
  // At least one round, so that t is computed even by a block without rows (N == 0).
  do {
    const int wrow0 = r0 + warp * kRowsPerWarp;
    const int nrows = max(0, min(kRowsPerWarp, row_end - wrow0));

    float acc[kRowsPerWarp][kMaxM];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) acc[i][m] = 0.0f;
    }

    for (int tile = 0; tile < ntiles; ++tile) {
      const int k0 = tile * p.tile_k;
      const int len = min(p.tile_k, K - k0);
      if (ntiles > 1 || r0 == row_begin) {
        __syncthreads();  // everyone is done with the previous tile
        stage_x<T>(x, p, k0, len, xs);
        __syncthreads();
      }
      if (!t_ready) {
        // t partial sums for this tile; warp w owns A rows {w*2, w*2+1} + 16k (fixed across tiles).
        for (int j0 = warp * kARowsPerWarp; j0 < R; j0 += kWarps * kARowsPerWarp) {
          const int na = min(kARowsPerWarp, R - j0);
          const TA* arows[kARowsPerWarp];
#pragma unroll
          for (int i = 0; i < kARowsPerWarp; ++i) {
            arows[i] = A + static_cast<int64_t>(min(j0 + i, R - 1)) * K + k0;
          }
          float at[kARowsPerWarp][kMaxM];
#pragma unroll
          for (int i = 0; i < kARowsPerWarp; ++i) {
#pragma unroll
            for (int m = 0; m < kMaxM; ++m) at[i][m] = 0.0f;
          }
          dot_tile<T, TA, kARowsPerWarp, false>(arows, na, xs, p, len, lane, at);
#pragma unroll
          for (int i = 0; i < kARowsPerWarp; ++i) {
#pragma unroll
            for (int m = 0; m < kMaxM; ++m) {
              if (m < M && i < na) {
                const float v = warp_sum(at[i][m]);
                if (lane == 0) ts[m * R + j0 + i] += v;
              }
            }
          }
        }
      }
      if (nrows > 0) {
        const T* wrows[kRowsPerWarp];
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          wrows[i] = w + static_cast<int64_t>(min(wrow0 + i, N - 1)) * K + k0;
        }
        dot_tile<T, T, kRowsPerWarp, true>(wrows, nrows, xs, p, len, lane, acc);
      }
    }

    if (!t_ready) {
      __syncthreads();  // t complete in shared memory
      t_ready = true;
      if (blockIdx.x == 0) {
        for (int i = threadIdx.x; i < M * R; i += kThreads) p.t[i] = ts[i];
      }
    }

    if (nrows > 0) {
      // LoRA term: lanes split r.
      for (int j = lane; j < R; j += 32) {
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          if (i < nrows) {
            const float bv = p.scaling * to_float(B[static_cast<int64_t>(wrow0 + i) * R + j]);
#pragma unroll
            for (int m = 0; m < kMaxM; ++m) {
              if (m < M) acc[i][m] = fmaf(ts[m * R + j], bv, acc[i][m]);
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        if (i < nrows) {
          const int n = wrow0 + i;
          const float bn = bias != nullptr ? to_float(bias[n]) : 0.0f;
#pragma unroll
          for (int m = 0; m < kMaxM; ++m) {
            if (m < M) {
              const float v = warp_sum(acc[i][m]);
              if (lane == m) y[static_cast<int64_t>(m) * N + n] = from_float<T>(v + bn);
            }
          }
        }
      }
    }
    r0 += kRowsPerRound;
  } while (r0 < row_end);
}

// ---------------------------------------------------------------------------------------------
// Host side

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;
};

constexpr int kMaxDevices = 64;

cudaError_t device_info(int dev, DeviceInfo* out) {
  static std::atomic<int> sms[kMaxDevices];
  static std::atomic<int> smem[kMaxDevices];
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  int s = sms[dev].load(std::memory_order_relaxed);
  int b = smem[dev].load(std::memory_order_relaxed);
  if (s == 0) {
    cudaError_t e = cudaDeviceGetAttribute(&s, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return e;
    e = cudaDeviceGetAttribute(&b, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess) return e;
    smem[dev].store(b, std::memory_order_relaxed);
    sms[dev].store(s, std::memory_order_relaxed);
  }
  out->sms = s;
  out->smem_optin = b;
  return cudaSuccess;
}

template <typename T>
int64_t shared_bytes(int M, int tile_k, int t_floats, int* plane_stride, int* x_stride) {
  using CT = ChunkTraits<T>;
  const int nch = tile_k / CT::kElems;
  int ps = nch * 4;
  if (CT::kGroups > 1) {
    // Plane stride = 16 (mod 32) floats: float4 reads that alternate planes (fp32 adapter rows
    // against a 16-bit x) land in disjoint banks.
    ps = (ps + 31) / 32 * 32 + 16;
  }
  const int xs = CT::kGroups * ps + CT::kElems;  // planes, then room for the tail
  *plane_stride = ps;
  *x_stride = xs;
  return (static_cast<int64_t>(t_floats) + static_cast<int64_t>(M) * xs) * 4;
}

template <typename T, typename TA>
cudaError_t launch_typed(const LoraDecodeArgs& a, cudaStream_t stream) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  DeviceInfo info;
  e = device_info(dev, &info);
  if (e != cudaSuccess) return e;

  Params p{};
  p.x = a.x;
  p.w = a.weight;
  p.bias = a.bias;
  p.a = a.lora_A;
  p.b = a.lora_B;
  p.y = a.y;
  p.t = a.t;
  p.M = static_cast<int>(a.M);
  p.K = static_cast<int>(a.K);
  p.N = static_cast<int>(a.N);
  p.R = static_cast<int>(a.R);
  p.scaling = a.scaling;
  p.t_floats = (p.M * p.R + 3) / 4 * 4;

  // Tile of `in`: as large as shared memory allows, then balanced across tiles.
  const int64_t budget = info.smem_optin;
  const int k8 = std::max(8, (p.K + 7) / 8 * 8);
  int tile = k8;
  int ps = 0, xstride = 0;
  if (p.M > 0 && shared_bytes<T>(p.M, tile, p.t_floats, &ps, &xstride) > budget) {
    const int64_t per_elem = 4LL * p.M;
    const int64_t fixed = 4LL * p.t_floats + 4LL * p.M * (64 + 8);  // padding allowance
    int64_t max_tile = (budget - fixed) / per_elem / 8 * 8;
    if (max_tile < 64) return cudaErrorInvalidConfiguration;
    const int ntiles = static_cast<int>((k8 + max_tile - 1) / max_tile);
    tile = ((k8 + ntiles - 1) / ntiles + 7) / 8 * 8;
    while (tile > 8 && shared_bytes<T>(p.M, tile, p.t_floats, &ps, &xstride) > budget) tile -= 8;
  }
  const int64_t smem = shared_bytes<T>(p.M, tile, p.t_floats, &ps, &xstride);
  p.tile_k = tile;
  p.plane_stride = ps;
  p.x_stride = xstride;

  // Grid: at most one block per SM (every block recomputes t), rows split evenly.
  const int groups = std::max(1, (p.N + kRowsPerRound - 1) / kRowsPerRound);
  int blocks = std::min(groups, std::max(1, info.sms));
  int rpb = (p.N + blocks - 1) / blocks;
  rpb = std::max(kRowsPerWarp, (rpb + kRowsPerWarp - 1) / kRowsPerWarp * kRowsPerWarp);
  blocks = std::max(1, (p.N + rpb - 1) / rpb);
  p.rows_per_block = rpb;

  auto kernel = lora_decode_kernel<T, TA>;
  if (smem > 48 * 1024) {
    // Raise the kernel's dynamic shared memory limit once per device (monotonic).
    static std::atomic<int> configured[kMaxDevices];
    if (configured[dev].load(std::memory_order_relaxed) < smem) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
      int cur = configured[dev].load(std::memory_order_relaxed);
      while (cur < smem && !configured[dev].compare_exchange_weak(cur, static_cast<int>(smem))) {
      }
    }
  }
  kernel<<<blocks, kThreads, static_cast<size_t>(smem), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lora_decode_launch(const LoraDecodeArgs& a, cudaStream_t stream) {
  if (a.M <= 0) return cudaSuccess;
  if (a.M > kMaxM || a.R < 0 || a.R > kMaxR || a.K < 0 || a.N < 0 || a.K > INT32_MAX / 2 ||
      a.N > INT32_MAX / 2) {
    return cudaErrorInvalidValue;
  }
  const bool same = a.adapter_dtype == a.dtype;
  const bool f32a = a.adapter_dtype == DType::kFloat32;
  switch (a.dtype) {
    case DType::kFloat32:
      if (f32a) return launch_typed<float, float>(a, stream);
      break;
    case DType::kFloat16:
      if (same) return launch_typed<__half, __half>(a, stream);
      if (f32a) return launch_typed<__half, float>(a, stream);
      break;
    case DType::kBFloat16:
      if (same) return launch_typed<__nv_bfloat16, __nv_bfloat16>(a, stream);
      if (f32a) return launch_typed<__nv_bfloat16, float>(a, stream);
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace peftkern
