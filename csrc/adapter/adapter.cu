// Fused bottleneck adapter forward (fp16 / bf16, adapter tensors in x's dtype, r <= 128), one launch:
//
//   z = x W_d^T + b_d                        (M, r), written in x's dtype (saved for backward)
//   y = res + s * (act(z) W_u^T + b_u)       (M, d), res = residual or x
//
// A block owns kBM = 64 rows and 8 warps; tensor cores through WMMA (16x16x16, fp32 accumulate).
//  * Phase 1 streams x and W_d over d in kBK-wide tiles through shared memory and accumulates
//    z (64 x r) in WMMA fragments; x is read from HBM once.
//  * z goes through shared memory (fp32) once: bias, z written out, activation (fp32), h stored
//    in shared memory as T (as the Triton kernel feeds its second dot).
//  * Phase 2 walks d in kBN-wide tiles: W_u tile -> shared memory, out = h W_u^T in fragments,
//    staged in shared memory (fp32), epilogue res + s * (out + b_u) with 16-byte loads / stores.
// The backward runs on the Triton kernels (this op returns z for them).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "peftkern/dtype.cuh"
#include "peftkern/vec.cuh"

namespace peftkern {
namespace {

using namespace nvcuda;

constexpr const char* kOp = "peftkern_cuda::bottleneck_adapter";
constexpr int kBM = 64, kBK = 32, kBN = 64, kRMax = 128;
constexpr int kThreads = 256;  // 8 warps: warp w owns row tile w % 4
constexpr int kLdX = kBK + 8;  // row pitch (elements) of the x / W_d tiles; +8 breaks bank conflicts
constexpr int kLdZ = kRMax + 4;  // fp32 z staging
constexpr int kLdH = kRMax + 8;  // h and W_u tiles
constexpr int kLdO = kBN + 4;    // fp32 output staging
// Shared memory: region 0 holds the phase-1 x / W_d tiles, then z (fp32), then the output staging.
constexpr int kRegion0 = kBM * kLdZ * 4;
static_assert(kBM * kLdX * 2 + kRMax * kLdX * 2 <= kRegion0 && kBM * kLdO * 4 <= kRegion0, "region 0");
constexpr int kSmem = kRegion0 + kBM * kLdH * 2 + kBN * kLdH * 2;

struct Params {
  const void* x;
  const void* res;  // residual, or null (then x)
  const void* wd;
  const void* bd;  // may be null
  const void* wu;
  const void* bu;  // may be null
  void* y;
  void* z;
  int M, D, R;
  float scaling;
  int act;
};

__device__ __forceinline__ float activation(float z, int act) {
  switch (act) {
    case 0:
      return fmaxf(z, 0.f);
    case 1:
      return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case 2:
      return 0.5f * z * (1.f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
    default:
      return z / (1.f + expf(-z));
  }
}

// Eight 16-bit elements row[j .. j+8) as raw bits, zero-filled past `len` or when !ok.
__device__ __forceinline__ uint4 load8(const unsigned short* row, int j, int len, bool ok) {
  if (ok && j + 8 <= len) return load_chunk16<false>(row + j);
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  if (ok) {
    for (int i = 0; i < 8 && j + i < len; ++i) w[i / 2] |= static_cast<uint32_t>(__ldg(row + j + i)) << (16 * (i % 2));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename T>
__device__ __forceinline__ float scalar(const void* p, int i) {
  return to_float<T>(static_cast<const T*>(p)[i]);
}

template <typename T>
__device__ __forceinline__ unsigned short bits_of(float v) {
  const T t = from_float<T>(v);
  unsigned short s;
  memcpy(&s, &t, sizeof(s));
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) adapter_fwd_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);
  T* ws = xs + kBM * kLdX;
  float* zs = reinterpret_cast<float*>(smem);  // after phase 1
  float* os = zs;                              // phase 2 output staging
  T* hs = reinterpret_cast<T*>(smem + kRegion0);
  T* us = hs + kBM * kLdH;

  const int tid = threadIdx.x, warp = tid / 32;
  const int m0 = blockIdx.x * kBM;
  const int M = p.M, D = p.D, R = p.R;
  const int rp = (R + 15) / 16 * 16, ntc = rp / 16;
  const int rt = warp % 4, cbase = warp / 4;
  const auto* x = static_cast<const unsigned short*>(p.x);
  const auto* wd = static_cast<const unsigned short*>(p.wd);
  const auto* wu = static_cast<const unsigned short*>(p.wu);

  // ---- phase 1: z = x W_d^T; warp (rt, cbase) owns column tiles cbase, cbase + 2, ...
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kRMax / 32];
#pragma unroll
  for (int j = 0; j < kRMax / 32; ++j) wmma::fill_fragment(acc[j], 0.f);
  for (int k0 = 0; k0 < D; k0 += kBK) {
    {  // x tile: 64 rows x 32 columns = one 8-element chunk per thread
      const int r = tid / 4, c = (tid % 4) * 8, m = m0 + r;
      *reinterpret_cast<uint4*>(xs + r * kLdX + c) = load8(x + static_cast<int64_t>(m) * D, k0 + c, D, m < M);
    }
    for (int i = tid; i < rp * 4; i += kThreads) {
      const int r = i / 4, c = (i % 4) * 8;
      *reinterpret_cast<uint4*>(ws + r * kLdX + c) = load8(wd + static_cast<int64_t>(r) * D, k0 + c, D, r < R);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, xs + rt * 16 * kLdX + kk, kLdX);
#pragma unroll
      for (int j = 0; j < kRMax / 32; ++j) {
        const int ct = cbase + 2 * j;
        if (ct < ntc) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // W_d rows = columns of W_d^T
          wmma::load_matrix_sync(b, ws + ct * 16 * kLdX + kk, kLdX);
          wmma::mma_sync(acc[j], a, b, acc[j]);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < kRMax / 32; ++j) {
    const int ct = cbase + 2 * j;
    if (ct < ntc) wmma::store_matrix_sync(zs + rt * 16 * kLdZ + ct * 16, acc[j], kLdZ, wmma::mem_row_major);
  }
  __syncthreads();

  // ---- bias, z out, activation -> h (T) in shared memory. Padded columns (z = 0) give h = 0.
  T* zout = static_cast<T*>(p.z);
  for (int i = tid; i < kBM * rp; i += kThreads) {
    const int r = i / rp, j = i % rp, m = m0 + r;
    float v = 0.f;
    if (j < R) {
      v = zs[r * kLdZ + j] + (p.bd ? scalar<T>(p.bd, j) : 0.f);
      if (m < M) zout[static_cast<int64_t>(m) * R + j] = from_float<T>(v);
      v = activation(v, p.act);
    }
    hs[r * kLdH + j] = from_float<T>(v);
  }
  __syncthreads();

  // ---- phase 2: y[:, n0:n0+64] = res + s * (h W_u^T + b_u)
  const auto* res = static_cast<const unsigned short*>(p.res ? p.res : p.x);
  auto* y = static_cast<unsigned short*>(p.y);
  const int ct0 = (warp / 4) * 2;
  for (int n0 = 0; n0 < D; n0 += kBN) {
    for (int i = tid; i < kBN * (rp / 8); i += kThreads) {
      const int r = i / (rp / 8), c = (i % (rp / 8)) * 8, n = n0 + r;
      *reinterpret_cast<uint4*>(us + r * kLdH + c) = load8(wu + static_cast<int64_t>(n) * R, c, R, n < D);
    }
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[2];
    wmma::fill_fragment(o[0], 0.f);
    wmma::fill_fragment(o[1], 0.f);
    for (int kk = 0; kk < ntc; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, hs + rt * 16 * kLdH + kk * 16, kLdH);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // W_u rows = columns of W_u^T
        wmma::load_matrix_sync(b, us + (ct0 + j) * 16 * kLdH + kk * 16, kLdH);
        wmma::mma_sync(o[j], a, b, o[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(os + rt * 16 * kLdO + (ct0 + j) * 16, o[j], kLdO, wmma::mem_row_major);
    }
    __syncthreads();
    for (int i = tid; i < kBM * (kBN / 8); i += kThreads) {
      const int r = i / (kBN / 8), c = (i % (kBN / 8)) * 8, m = m0 + r, n = n0 + c;
      if (m >= M || n >= D) continue;
      const int64_t row = static_cast<int64_t>(m) * D;
      const uint4 rv = load8(res + row, n, D, true);
      const float4 r0 = chunk_group_to_float4<T>(rv, 0), r1 = chunk_group_to_float4<T>(rv, 1);
      const float rf[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < 8; e += 2) {
        float v[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int nn = n + e + h;
          const float b = (p.bu && nn < D) ? scalar<T>(p.bu, nn) : 0.f;
          v[h] = rf[e + h] + p.scaling * (os[r * kLdO + c + e + h] + b);
        }
        w[e / 2] = static_cast<uint32_t>(bits_of<T>(v[0])) | (static_cast<uint32_t>(bits_of<T>(v[1])) << 16);
      }
      unsigned short* dst = y + row + n;
      if (n + 8 <= D && is_aligned16(dst)) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
      } else {
        for (int e = 0; e < 8 && n + e < D; ++e) dst[e] = static_cast<unsigned short>(w[e / 2] >> (16 * (e % 2)));
      }
    }
    __syncthreads();
  }
}

template <typename T>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  const cudaError_t attr =
      cudaFuncSetAttribute(adapter_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (attr != cudaSuccess) return attr;
  const int blocks = (p.M + kBM - 1) / kBM;
  adapter_fwd_kernel<T><<<blocks, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

int activation_id(c10::string_view a) {
  if (a == "relu") return 0;
  if (a == "gelu") return 1;
  if (a == "gelu_tanh") return 2;
  if (a == "silu") return 3;
  TORCH_CHECK(false, kOp, ": activation must be relu, gelu, gelu_tanh or silu, got ", std::string(a));
  return -1;
}

void check_arg(const at::Tensor& t, const char* name, c10::ScalarType dt, const at::Device& dev, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, kOp, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, kOp, ": ", name, " dtype (", t.scalar_type(), ") must match x (", dt, ")");
  TORCH_CHECK(t.device() == dev, kOp, ": ", name, " is on ", t.device(), " but x is on ", dev);
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_cuda(const at::Tensor& x, const at::Tensor& down_weight,
                                                           const std::optional<at::Tensor>& down_bias,
                                                           const at::Tensor& up_weight,
                                                           const std::optional<at::Tensor>& up_bias,
                                                           const std::optional<at::Tensor>& residual,
                                                           c10::string_view activation, double scaling) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == c10::kHalf || dt == c10::kBFloat16, kOp, ": x must be float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got one on ", x.device());
  const auto dev = x.device();
  check_arg(x, "x", dt, dev, 2);
  check_arg(down_weight, "down_weight", dt, dev, 2);
  check_arg(up_weight, "up_weight", dt, dev, 2);
  const int64_t M = x.size(0), D = x.size(1), R = down_weight.size(0);
  TORCH_CHECK(R >= 1 && R <= kRMax, kOp, ": r = down_weight.size(0) must be in [1, ", kRMax, "], got ", R);
  TORCH_CHECK(down_weight.size(1) == D, kOp, ": down_weight must be (r, ", D, "), got ", down_weight.sizes());
  TORCH_CHECK(up_weight.size(0) == D && up_weight.size(1) == R, kOp, ": up_weight must be (", D, ", ", R,
              "), got ", up_weight.sizes());
  TORCH_CHECK(M < (int64_t{1} << 31) && D < (int64_t{1} << 31), kOp, ": sizes must fit in int32");
  if (down_bias) {
    check_arg(*down_bias, "down_bias", dt, dev, 1);
    TORCH_CHECK(down_bias->size(0) == R, kOp, ": down_bias must be (", R, ",), got ", down_bias->sizes());
  }
  if (up_bias) {
    check_arg(*up_bias, "up_bias", dt, dev, 1);
    TORCH_CHECK(up_bias->size(0) == D, kOp, ": up_bias must be (", D, ",), got ", up_bias->sizes());
  }
  if (residual) {
    check_arg(*residual, "residual", dt, dev, 2);
    TORCH_CHECK(residual->sizes() == x.sizes(), kOp, ": residual must have x's shape ", x.sizes());
  }
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor y = at::empty({M, D}, x.options());
  at::Tensor z = at::empty({M, R}, x.options());
  if (M == 0) return {y, z};
  Params p{x.data_ptr(),
           residual ? residual->data_ptr() : nullptr,
           down_weight.data_ptr(),
           down_bias ? down_bias->data_ptr() : nullptr,
           up_weight.data_ptr(),
           up_bias ? up_bias->data_ptr() : nullptr,
           y.data_ptr(),
           z.data_ptr(),
           static_cast<int>(M),
           static_cast<int>(D),
           static_cast<int>(R),
           static_cast<float>(scaling),
           activation_id(activation)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  C10_CUDA_CHECK(dt == c10::kHalf ? launch<__half>(p, stream) : launch<__nv_bfloat16>(p, stream));
  return {y, z};
}

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_meta(const at::Tensor& x, const at::Tensor& down_weight,
                                                           const std::optional<at::Tensor>&, const at::Tensor&,
                                                           const std::optional<at::Tensor>&,
                                                           const std::optional<at::Tensor>&, c10::string_view,
                                                           double) {
  TORCH_CHECK(x.dim() == 2 && down_weight.dim() == 2, kOp, ": x and down_weight must be 2-D");
  return {at::empty_symint(x.sym_sizes(), x.options()),
          at::empty_symint({x.sym_size(0), down_weight.sym_size(0)}, x.options())};
}

}  // namespace
}  // namespace peftkern

TORCH_LIBRARY_FRAGMENT(peftkern_cuda, m) {
  m.def(
      "bottleneck_adapter(Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, Tensor? up_bias, "
      "Tensor? residual, str activation, float scaling) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peftkern_cuda, CUDA, m) {
  m.impl("bottleneck_adapter", &peftkern::bottleneck_adapter_cuda);
}

TORCH_LIBRARY_IMPL(peftkern_cuda, Meta, m) {
  m.impl("bottleneck_adapter", &peftkern::bottleneck_adapter_meta);
}
