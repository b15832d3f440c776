// 16-byte chunk loads that take the widest access the pointer's alignment allows.
//
// A chunk is 16 contiguous bytes starting at p. When p is 16-byte aligned the load is one
// 128-bit access; otherwise it is split into 8-, 4- or 2-byte accesses, so a caller can walk any
// row (rows of a matrix whose width is not a multiple of 8, or a base pointer from an odd view)
// with the same loop. For a row walked in 16-byte steps the alignment is the same for every chunk,
// so the branch is uniform across a warp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace peftkern {

// Read-only, streamed once: bypass L1 allocation (the weight matrix in a GEMV).
__device__ __forceinline__ uint4 ld_stream_v4(const void* p) {
  uint4 v;
#if defined(__CUDA_ARCH__)
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
#else
  v = *reinterpret_cast<const uint4*>(p);  // host pass / host-side emulation of the kernels
#endif
  return v;
}

// Read-only, reused (activations, small adapter matrices read by every block).
__device__ __forceinline__ uint4 ld_ro_v4(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <bool kStream>
__device__ __forceinline__ uint4 load_chunk16(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if ((a & 15u) == 0) {
    return kStream ? ld_stream_v4(p) : ld_ro_v4(p);
  }
  uint4 v;
  if ((a & 7u) == 0) {
    const uint2* q = reinterpret_cast<const uint2*>(p);
    const uint2 lo = __ldg(q), hi = __ldg(q + 1);
    v = make_uint4(lo.x, lo.y, hi.x, hi.y);
  } else if ((a & 3u) == 0) {
    const unsigned int* q = reinterpret_cast<const unsigned int*>(p);
    v = make_uint4(__ldg(q), __ldg(q + 1), __ldg(q + 2), __ldg(q + 3));
  } else {
    // 2-byte aligned (16-bit element types only).
    const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = static_cast<uint32_t>(__ldg(q + 2 * i)) | (static_cast<uint32_t>(__ldg(q + 2 * i + 1)) << 16);
    }
    v = make_uint4(w[0], w[1], w[2], w[3]);
  }
  return v;
}

__device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace peftkern
