// Element types the kernels take (float, __half, __nv_bfloat16) and their conversions to and
// from float. torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__ and friends, so every
// conversion here goes through an explicit intrinsic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace peftkern {

template <typename T>
__device__ __forceinline__ float to_float(T v);

template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);

template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two packed 16-bit elements (one 32-bit word, low half first in memory) -> two floats.
template <typename T>
__device__ __forceinline__ float2 pair_to_float2(uint32_t w);

template <>
__device__ __forceinline__ float2 pair_to_float2<__half>(uint32_t w) {
  __half2 h;
  static_assert(sizeof(h) == sizeof(w), "half2 is 4 bytes");
  memcpy(&h, &w, sizeof(w));
  return __half22float2(h);
}
template <>
__device__ __forceinline__ float2 pair_to_float2<__nv_bfloat16>(uint32_t w) {
  // bf16 -> f32 is a shift: exact, no rounding.
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

// Group g (0-based) of four consecutive elements held in a 16-byte chunk, as a float4.
// float chunks hold one group (g == 0); 16-bit chunks hold two.
template <typename T>
__device__ __forceinline__ float4 chunk_group_to_float4(const uint4& c, int g);

template <>
__device__ __forceinline__ float4 chunk_group_to_float4<float>(const uint4& c, int) {
  return make_float4(__uint_as_float(c.x), __uint_as_float(c.y), __uint_as_float(c.z),
                     __uint_as_float(c.w));
}
template <>
__device__ __forceinline__ float4 chunk_group_to_float4<__half>(const uint4& c, int g) {
  const float2 a = pair_to_float2<__half>(g == 0 ? c.x : c.z);
  const float2 b = pair_to_float2<__half>(g == 0 ? c.y : c.w);
  return make_float4(a.x, a.y, b.x, b.y);
}
template <>
__device__ __forceinline__ float4 chunk_group_to_float4<__nv_bfloat16>(const uint4& c, int g) {
  const float2 a = pair_to_float2<__nv_bfloat16>(g == 0 ? c.x : c.z);
  const float2 b = pair_to_float2<__nv_bfloat16>(g == 0 ? c.y : c.w);
  return make_float4(a.x, a.y, b.x, b.y);
}

// Elements of T in one 16-byte chunk.
template <typename T>
struct ChunkTraits {
  static_assert(16 % sizeof(T) == 0, "element size must divide 16");
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  static constexpr int kGroups = kElems / 4;  // float4 groups per chunk: 1 (fp32) or 2 (16-bit)
};

}  // namespace peftkern
