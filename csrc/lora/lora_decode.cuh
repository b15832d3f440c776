// Host-side entry point of the LoRA decode kernel. Plain C++ (no torch, no device code): included by
// lora.cpp, which registers the op (argument checks, allocation), and by lora_decode.cu, which
// defines it. Keeping torch headers out of the .cu file keeps nvcc compile times down.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace peftkern {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y = x W^T + b + s * (x A^T) B^T, t = x A^T (fp32). All pointers device pointers to contiguous
// row-major storage; bias may be null. x, W, b, y share `dtype`; A, B share `adapter_dtype`
// (kFloat32 or == dtype). Limits (checked by the caller): 0 <= M <= kLoraDecodeMaxM,
// 0 <= R <= kLoraDecodeMaxR, K and N fit in int32.
constexpr int kLoraDecodeMaxM = 16;
constexpr int kLoraDecodeMaxR = 128;

struct LoraDecodeArgs {
  const void* x = nullptr;       // (M, K)
  const void* weight = nullptr;  // (N, K)
  const void* bias = nullptr;    // (N,) or null
  const void* lora_A = nullptr;  // (R, K)
  const void* lora_B = nullptr;  // (N, R)
  void* y = nullptr;             // (M, N), dtype
  float* t = nullptr;            // (M, R), fp32
  int64_t M = 0, K = 0, N = 0, R = 0;
  float scaling = 1.0f;
  DType dtype = DType::kFloat32;
  DType adapter_dtype = DType::kFloat32;
};

// Launches on `stream` (the current device must be the tensors' device): a shrink kernel (t) and
// the main kernel (y), the latter with programmatic dependent launch on sm_90+. Returns the
// launch status (cudaSuccess, or the error from configuring / launching a kernel).
cudaError_t lora_decode_launch(const LoraDecodeArgs& args, cudaStream_t stream);

}  // namespace peftkern
