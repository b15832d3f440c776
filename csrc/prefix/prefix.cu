// Prefix-tuning attention, CUDA backend piece: the batch reduction of a shared prefix's gradient.
//
// The Triton dK/dV kernel writes one fp32 partial per (batch, kv head) for dprefix_k and dprefix_v
// (no atomics, so the result does not depend on scheduling). This kernel sums both over the batch
// in one launch, in a fixed order, and writes the prefix's dtype directly: torch needs four
// launches (two sums, two casts) and an fp32 intermediate for the same.
//
//   prefix_grad_reduce(Tensor partial (2, B, N) fp32 contiguous, ScalarType dtype)
//     -> (Tensor dprefix_k (N,), Tensor dprefix_v (N,)) in dtype

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "peftkern/dtype.cuh"

namespace peftkern {
namespace {

constexpr const char* kOp = "peftkern_cuda::prefix_grad_reduce";
constexpr int kThreads = 256;

// Each thread owns 4 consecutive columns of one of the two outputs and walks the batch rows.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) prefix_grad_reduce_kernel(const float* __restrict__ part,
                                                                      T* __restrict__ out_k, T* __restrict__ out_v,
                                                                      int64_t B, int64_t N) {
  const int64_t n4 = (N + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < 2 * n4; c += stride) {
    const int which = c >= n4 ? 1 : 0;
    const int64_t col = (c - which * n4) * 4;
    const float* src = part + which * B * N + col;
    T* dst = (which ? out_v : out_k) + col;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (kVec) {  // N % 4 == 0 and part 16-byte aligned: every row's chunk is one float4
#pragma unroll 4
      for (int64_t b = 0; b < B; ++b) {
        const float4 x = __ldg(reinterpret_cast<const float4*>(src + b * N));
        acc[0] += x.x;
        acc[1] += x.y;
        acc[2] += x.z;
        acc[3] += x.w;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) dst[j] = from_float<T>(acc[j]);
    } else {
      const int cols = static_cast<int>(N - col < 4 ? N - col : 4);
      for (int64_t b = 0; b < B; ++b) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j < cols) acc[j] += __ldg(src + b * N + j);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j < cols) dst[j] = from_float<T>(acc[j]);
      }
    }
  }
}

template <typename T>
void launch(const at::Tensor& part, at::Tensor& out_k, at::Tensor& out_v, cudaStream_t stream) {
  const int64_t B = part.size(1), N = part.size(2);
  const int64_t n4 = (N + 3) / 4;
  const int64_t blocks = std::min<int64_t>((2 * n4 + kThreads - 1) / kThreads, 1 << 16);
  const float* src = part.data_ptr<float>();
  const bool vec = N % 4 == 0 && (reinterpret_cast<uintptr_t>(src) & 15u) == 0;
  T* k = reinterpret_cast<T*>(out_k.data_ptr());
  T* v = reinterpret_cast<T*>(out_v.data_ptr());
  if (vec) {
    prefix_grad_reduce_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(src, k, v, B, N);
  } else {
    prefix_grad_reduce_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(src, k, v, B, N);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> prefix_grad_reduce_cuda(const at::Tensor& part, at::ScalarType dtype) {
  TORCH_CHECK(part.dim() == 3 && part.size(0) == 2, kOp, ": partial must be (2, B, N), got shape ", part.sizes());
  TORCH_CHECK(part.scalar_type() == at::kFloat, kOp, ": partial must be float32, got ", part.scalar_type());
  TORCH_CHECK(part.is_cuda(), kOp, ": partial must be a CUDA tensor, got device ", part.device());
  TORCH_CHECK(part.is_contiguous(), kOp, ": partial must be contiguous");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
  const c10::cuda::CUDAGuard guard(part.device());
  const int64_t N = part.size(2);
  at::Tensor out_k = at::empty({N}, part.options().dtype(dtype));
  at::Tensor out_v = at::empty({N}, part.options().dtype(dtype));
  if (N == 0) return {out_k, out_v};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(part.device().index()).stream();
  switch (dtype) {
    case at::kHalf:
      launch<__half>(part, out_k, out_v, stream);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(part, out_k, out_v, stream);
      break;
    default:
      launch<float>(part, out_k, out_v, stream);
  }
  return {out_k, out_v};
}

}  // namespace
}  // namespace peftkern

TORCH_LIBRARY_FRAGMENT(peftkern_cuda, m) {
  m.def("prefix_grad_reduce(Tensor partial, ScalarType dtype) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peftkern_cuda, CUDA, m) {
  m.impl("prefix_grad_reduce", &peftkern::prefix_grad_reduce_cuda);
}
