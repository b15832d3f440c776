// Warp-level reductions.
#pragma once

#include <cuda_runtime.h>

namespace peftkern {

constexpr unsigned kFullMask = 0xffffffffu;

// Butterfly sum: every lane of the warp ends with the total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, off);
  }
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  }
  return v;
}

}  // namespace peftkern
