// IA3's elementwise and reduction pieces: the cuda backend of peftkern::ia3_linear pairs them with
// cuBLAS GEMMs (see peftkern/ops/ia3.py).
//
//   ia3_scale(t, l, dim)  -> t ⊙ l along dim (0: l[row], 1: l[col]), in t's dtype
//       folds the IA3 vector into the weight so one cuBLAS GEMM does the scaled product (columns:
//       the feed-forward forward; rows: the output case's dx = dy (l ⊙ W)).
//   ia3_bias_scale(z, bias, l, dtype)  -> ((z + bias) ⊙ l[col]) in dtype, z fp32 (M, N)
//       the output-case forward after a cuBLAS GEMM with fp32 output: y is rounded once, from fp32,
//       as backward's rebuild Z = y / l needs (a folded weight would add a second rounding).
//   ia3_colsum_mul(a, b, l, divide, write_scaled) -> (dl, scaled)
//       dl[n] = Σ_m a[m,n]·b[m,n] (÷ l[n] when divide), fp32, deterministic (per-split partials
//       summed in a fixed order by a second kernel); scaled = a ⊙ l[n] in a's dtype, written in the
//       same pass when write_scaled (else an empty tensor).
//       output case: a = dy, b = y, divide  (Z = y / l, so dl = Σ dy·Z)
//       feed-forward: a = dy W, b = x, write_scaled gives dx = (dy W) ⊙ l
// Both are bandwidth-bound: 16-byte loads where the rows allow it, fp32 math, exact conversions.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "peftkern/dtype.cuh"
#include "peftkern/vec.cuh"

namespace peftkern {
namespace {

constexpr int kThreadsX = 32;
constexpr int kThreadsY = 8;

template <typename T>
__device__ __forceinline__ void unpack(const uint4& v, float (&f)[16 / sizeof(T)]) {
  T e[16 / sizeof(T)];
  memcpy(e, &v, 16);
#pragma unroll
  for (int i = 0; i < 16 / static_cast<int>(sizeof(T)); ++i) f[i] = to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&f)[16 / sizeof(T)]) {
  T e[16 / sizeof(T)];
#pragma unroll
  for (int i = 0; i < 16 / static_cast<int>(sizeof(T)); ++i) e[i] = from_float<T>(f[i]);
  uint4 v;
  memcpy(&v, e, 16);
  return v;
}

// out = in ⊙ l along `dim` of a contiguous (R, C) tensor; one 16-byte chunk per thread step.
template <typename T>
__global__ void scale_kernel(const T* __restrict__ in, const float* __restrict__ l, T* __restrict__ out,
                             int64_t numel, int64_t cols, int dim, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t nchunks = (numel + kVec - 1) / kVec;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < nchunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = c * kVec;
    if (vec && i0 + kVec <= numel) {
      float f[kVec];
      unpack<T>(ld_stream_v4(in + i0), f);
#pragma unroll
      for (int i = 0; i < kVec; ++i) f[i] *= l[dim == 0 ? (i0 + i) / cols : (i0 + i) % cols];
      *reinterpret_cast<uint4*>(out + i0) = pack<T>(f);
    } else {
      for (int64_t i = i0; i < min(i0 + kVec, numel); ++i) {
        out[i] = from_float<T>(to_float(in[i]) * l[dim == 0 ? i / cols : i % cols]);
      }
    }
  }
}

// y = ((z + bias[col]) ⊙ l[col]) in T, z fp32 and contiguous; four floats per thread step.
template <typename T>
__global__ void bias_scale_kernel(const float* __restrict__ z, const T* __restrict__ bias, const float* __restrict__ l,
                                  T* __restrict__ y, int64_t numel, int64_t cols, bool vec) {
  for (int64_t i0 = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * 4; i0 < numel;
       i0 += static_cast<int64_t>(gridDim.x) * blockDim.x * 4) {
    float v[4];
    if (vec && i0 + 4 <= numel) {
      const float4 f = *reinterpret_cast<const float4*>(z + i0);
      v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = i0 + j < numel ? z[i0 + j] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (i0 + j < numel) {
        const int64_t c = (i0 + j) % cols;
        const float zb = bias != nullptr ? v[j] + to_float(bias[c]) : v[j];
        y[i0 + j] = from_float<T>(zb * l[c]);
      }
    }
  }
}

// part[split, n] = Σ_{m in split} a[m,n]·b[m,n]; scaled[m,n] = a[m,n]·l[n] when `scaled` is set.
// Block: 32 x 8 threads; x owns kVec consecutive columns, y strides the split's rows.
template <typename T>
__global__ void __launch_bounds__(kThreadsX* kThreadsY)
    colsum_mul_kernel(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ l,
                      T* __restrict__ scaled, float* __restrict__ part, int64_t M, int64_t N, int64_t rows_per_split,
                      bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  __shared__ float red[kThreadsY][kThreadsX * kVec];
  const int64_t n0 = (blockIdx.x * static_cast<int64_t>(kThreadsX) + threadIdx.x) * kVec;
  const int64_t m_lo = blockIdx.y * rows_per_split;
  const int64_t m_hi = min(M, m_lo + rows_per_split);
  float acc[kVec] = {};
  float lv[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) lv[i] = n0 + i < N ? l[n0 + i] : 0.0f;

  if (vec && n0 + kVec <= N) {
    for (int64_t m = m_lo + threadIdx.y; m < m_hi; m += kThreadsY) {
      const int64_t off = m * N + n0;
      float fa[kVec], fb[kVec];
      unpack<T>(ld_stream_v4(a + off), fa);
      unpack<T>(ld_stream_v4(b + off), fb);
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = fmaf(fa[i], fb[i], acc[i]);
      if (scaled != nullptr) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) fa[i] *= lv[i];
        *reinterpret_cast<uint4*>(scaled + off) = pack<T>(fa);
      }
    }
  } else if (n0 < N) {
    for (int64_t m = m_lo + threadIdx.y; m < m_hi; m += kThreadsY) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (n0 + i < N) {
          const float va = to_float(a[m * N + n0 + i]);
          acc[i] = fmaf(va, to_float(b[m * N + n0 + i]), acc[i]);
          if (scaled != nullptr) scaled[m * N + n0 + i] = from_float<T>(va * lv[i]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) red[threadIdx.y][threadIdx.x * kVec + i] = acc[i];
  __syncthreads();
  // Threads of row 0 sum the 8 rows, in order, for kVec columns each.
  if (threadIdx.y == 0) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      float s = 0.0f;
#pragma unroll
      for (int y = 0; y < kThreadsY; ++y) s += red[y][threadIdx.x * kVec + i];
      if (n0 + i < N) part[blockIdx.y * N + n0 + i] = s;
    }
  }
}

// dl[n] = Σ_s part[s, n] (÷ l[n]): a fixed summation order, so results are bitwise reproducible.
__global__ void finalize_kernel(const float* __restrict__ part, const float* __restrict__ l, float* __restrict__ dl,
                                int64_t N, int splits, bool divide) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  float s = 0.0f;
  for (int i = 0; i < splits; ++i) s += part[i * N + n];
  dl[n] = divide ? s / l[n] : s;
}

int sm_count(int dev) {
  static int cache[64] = {};
  if (dev < 0 || dev >= 64) return 108;
  if (cache[dev] == 0) {
    int s = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&s, cudaDevAttrMultiProcessorCount, dev));
    cache[dev] = s;
  }
  return cache[dev];
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == c10::kFloat || s == c10::kHalf || s == c10::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", s);
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_l(const at::Tensor& l, int64_t n, const at::Tensor& like, const char* op) {
  TORCH_CHECK(l.scalar_type() == c10::kFloat, op, ": l must be float32, got ", l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == n, op, ": l must have shape (", n, ",), got ", l.sizes());
  TORCH_CHECK(l.device() == like.device() && l.is_contiguous(), op, ": l must be contiguous on ", like.device());
}

#define PEFTKERN_IA3_DISPATCH(st, ...)                           \
  switch (st) {                                                  \
    case c10::kHalf: {                                           \
      using T = __half;                                          \
      __VA_ARGS__();                                             \
      break;                                                     \
    }                                                            \
    case c10::kBFloat16: {                                       \
      using T = __nv_bfloat16;                                   \
      __VA_ARGS__();                                             \
      break;                                                     \
    }                                                            \
    default: {                                                   \
      using T = float;                                           \
      __VA_ARGS__();                                             \
    }                                                            \
  }

at::Tensor ia3_scale_cuda(const at::Tensor& t, const at::Tensor& l, int64_t dim) {
  constexpr const char* kOp = "peftkern_cuda::ia3_scale";
  check_float(t, kOp, "t");
  TORCH_CHECK(t.dim() == 2, kOp, ": t must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(dim == 0 || dim == 1, kOp, ": dim must be 0 or 1, got ", dim);
  check_l(l, t.size(dim), t, kOp);
  const c10::cuda::CUDAGuard guard(t.device());
  at::Tensor out = at::empty(t.sizes(), t.options());
  const int64_t numel = t.numel();
  if (numel == 0) return out;
  const int threads = 256;
  const int64_t chunks = (numel + 7) / 8;
  const int blocks = static_cast<int>(std::min<int64_t>((chunks + threads - 1) / threads, 16LL * sm_count(t.get_device())));
  auto stream = c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
  const bool vec = aligned16(t.data_ptr()) && aligned16(out.data_ptr());
  PEFTKERN_IA3_DISPATCH(t.scalar_type(), [&] {
    scale_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<const T*>(t.data_ptr()), l.data_ptr<float>(),
                                                    static_cast<T*>(out.data_ptr()), numel, t.size(1),
                                                    static_cast<int>(dim), vec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor ia3_bias_scale_cuda(const at::Tensor& z, const std::optional<at::Tensor>& bias, const at::Tensor& l,
                               c10::ScalarType dtype) {
  constexpr const char* kOp = "peftkern_cuda::ia3_bias_scale";
  TORCH_CHECK(z.scalar_type() == c10::kFloat, kOp, ": z must be float32, got ", z.scalar_type());
  TORCH_CHECK(z.is_cuda() && z.is_contiguous() && z.dim() == 2, kOp, ": z must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(dtype == c10::kFloat || dtype == c10::kHalf || dtype == c10::kBFloat16, kOp,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
  const int64_t N = z.size(1);
  check_l(l, N, z, kOp);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->device() == z.device(),
                kOp, ": bias must be a contiguous (", N, ",) ", dtype, " tensor on ", z.device());
  }
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor y = at::empty(z.sizes(), z.options().dtype(dtype));
  const int64_t numel = z.numel();
  if (numel == 0) return y;
  const int threads = 256;
  const int blocks = static_cast<int>(
      std::min<int64_t>((numel / 4 + threads) / threads, 16LL * sm_count(z.get_device())));
  auto stream = c10::cuda::getCurrentCUDAStream(z.get_device()).stream();
  PEFTKERN_IA3_DISPATCH(dtype, [&] {
    bias_scale_kernel<T><<<blocks, threads, 0, stream>>>(
        z.data_ptr<float>(), bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr,
        l.data_ptr<float>(), static_cast<T*>(y.data_ptr()), numel, N, aligned16(z.data_ptr()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor> ia3_colsum_mul_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& l,
                                                       bool divide, bool write_scaled) {
  constexpr const char* kOp = "peftkern_cuda::ia3_colsum_mul";
  check_float(a, kOp, "a");
  check_float(b, kOp, "b");
  TORCH_CHECK(a.dim() == 2, kOp, ": a must be 2-D (M, N), got shape ", a.sizes());
  TORCH_CHECK(b.sizes() == a.sizes(), kOp, ": b must have a's shape ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), kOp, ": b is ", b.scalar_type(), " but a is ", a.scalar_type());
  TORCH_CHECK(b.device() == a.device(), kOp, ": b is on ", b.device(), " but a is on ", a.device());
  const int64_t M = a.size(0), N = a.size(1);
  check_l(l, N, a, kOp);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor dl = at::empty({N}, a.options().dtype(at::kFloat));
  at::Tensor scaled = write_scaled ? at::empty({M, N}, a.options()) : at::empty({0}, a.options());
  if (N == 0) return {dl, scaled};
  auto stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
  const int vec_elems = 16 / static_cast<int>(a.element_size());
  const int64_t col_blocks = (N + kThreadsX * vec_elems - 1) / (kThreadsX * vec_elems);
  // Enough splits of M to fill the GPU twice over, each at least 64 rows.
  const int64_t want = std::max<int64_t>(1, (2LL * sm_count(a.get_device()) + col_blocks - 1) / col_blocks);
  const int splits = static_cast<int>(std::clamp<int64_t>(std::min(want, (M + 63) / 64), 1, 65535));
  const int64_t rows = (M + splits - 1) / splits;
  at::Tensor part = at::empty({splits, N}, a.options().dtype(at::kFloat));
  const bool vec = N % vec_elems == 0 && aligned16(a.data_ptr()) && aligned16(b.data_ptr()) &&
                   (!write_scaled || aligned16(scaled.data_ptr()));
  PEFTKERN_IA3_DISPATCH(a.scalar_type(), [&] {
    colsum_mul_kernel<T><<<dim3(static_cast<unsigned>(col_blocks), splits), dim3(kThreadsX, kThreadsY), 0, stream>>>(
        static_cast<const T*>(a.data_ptr()), static_cast<const T*>(b.data_ptr()), l.data_ptr<float>(),
        write_scaled ? static_cast<T*>(scaled.data_ptr()) : nullptr, part.data_ptr<float>(), M, N, rows, vec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<<<static_cast<unsigned>((N + 255) / 256), 256, 0, stream>>>(part.data_ptr<float>(), l.data_ptr<float>(),
                                                                              dl.data_ptr<float>(), N, splits, divide);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dl, scaled};
}

}  // namespace
}  // namespace peftkern

TORCH_LIBRARY_FRAGMENT(peftkern_cuda, m) {
  m.def("ia3_scale(Tensor t, Tensor l, int dim) -> Tensor");
  m.def("ia3_bias_scale(Tensor z, Tensor? bias, Tensor l, ScalarType dtype) -> Tensor");
  m.def("ia3_colsum_mul(Tensor a, Tensor b, Tensor l, bool divide, bool write_scaled) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peftkern_cuda, CUDA, m) {
  m.impl("ia3_scale", &peftkern::ia3_scale_cuda);
  m.impl("ia3_bias_scale", &peftkern::ia3_bias_scale_cuda);
  m.impl("ia3_colsum_mul", &peftkern::ia3_colsum_mul_cuda);
}
