// LoRA's CUDA op, peftkern_cuda::lora_decode: its registration in the extension (library
// `peftkern_cuda`, loaded with torch.ops.load_library by peftkern/_ext.py; no Python module). The
// kernel is in lora_decode.cu, reached through the plain C++ entry point in lora_decode.cuh, so this
// file is the only one of the op compiled against torch's headers (by the host compiler, not nvcc).
// Like every op folder under csrc/, it adds to the namespace with TORCH_LIBRARY_FRAGMENT:
//   * a schema,
//   * a CUDA kernel: argument checks naming the argument, a device guard, the current stream,
//   * a Meta kernel (shapes/dtypes only, symbolic sizes) so fake tensors can trace it,
//   * a CPU kernel that only raises a clear error (there is no CPU implementation here).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "lora_decode.cuh"

namespace peftkern {
namespace {

constexpr const char* kOp = "peftkern_cuda::lora_decode";

bool is_float_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kHalf || t == c10::kBFloat16;
}

DType to_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kHalf:
      return DType::kFloat16;
    case c10::kBFloat16:
      return DType::kBFloat16;
    default:
      return DType::kFloat32;
  }
}

// Checks that do not depend on concrete sizes or devices (shared by the CUDA and Meta kernels).
void check_ranks_and_dtypes(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B) {
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D (M, in), got ", x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, kOp, ": weight must be 2-D (out, in), got shape ", weight.sizes());
  TORCH_CHECK(lora_A.dim() == 2, kOp, ": lora_A must be 2-D (r, in), got shape ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2, kOp, ": lora_B must be 2-D (out, r), got shape ", lora_B.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1, kOp, ": bias must be 1-D (out,), got shape ", bias->sizes());
  }
  const auto dt = x.scalar_type();
  TORCH_CHECK(is_float_dtype(dt), kOp, ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, kOp, ": weight dtype (", weight.scalar_type(),
              ") must match x dtype (", dt, ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == dt, kOp, ": bias dtype (", bias->scalar_type(), ") must match x dtype (",
                dt, ")");
  }
  const auto at_ = lora_A.scalar_type();
  TORCH_CHECK(at_ == c10::kFloat || at_ == dt, kOp, ": lora_A must be float32 or x's dtype (", dt, "), got ",
              at_);
  TORCH_CHECK(lora_B.scalar_type() == at_, kOp, ": lora_B dtype (", lora_B.scalar_type(),
              ") must match lora_A dtype (", at_, ")");
}

std::tuple<at::Tensor, at::Tensor> lora_decode_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double scaling) {
  check_ranks_and_dtypes(x, weight, bias, lora_A, lora_B);

  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  TORCH_CHECK(M <= kLoraDecodeMaxM, kOp, ": x has M=", M, " rows; the decode kernel takes M <= ",
              kLoraDecodeMaxM);
  TORCH_CHECK(weight.size(1) == K, kOp, ": weight must have shape (out, in) with in=", K, " (x.shape[1]), got ",
              weight.sizes());
  TORCH_CHECK(lora_A.size(1) == K, kOp, ": lora_A must have shape (r, in) with in=", K, " (x.shape[1]), got ",
              lora_A.sizes());
  TORCH_CHECK(R <= kLoraDecodeMaxR, kOp, ": rank r=", R, " is larger than the supported maximum ",
              kLoraDecodeMaxR);
  TORCH_CHECK(lora_B.size(0) == N && lora_B.size(1) == R, kOp, ": lora_B must have shape (out, r) = (", N, ", ",
              R, "), got ", lora_B.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->size(0) == N, kOp, ": bias must have shape (out,) = (", N, ",), got ", bias->sizes());
  }
  TORCH_CHECK(K <= (1LL << 30) && N <= (1LL << 30), kOp, ": in=", K, " / out=", N, " too large");

  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got device ", x.device());
  const auto dev = x.device();
  auto check_dev = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == dev, kOp, ": ", name, " is on ", t.device(), " but x is on ", dev);
  };
  check_dev(weight, "weight");
  check_dev(lora_A, "lora_A");
  check_dev(lora_B, "lora_B");
  if (bias.has_value()) check_dev(*bias, "bias");

  TORCH_CHECK(x.is_contiguous(), kOp, ": x must be contiguous");
  TORCH_CHECK(weight.is_contiguous(), kOp, ": weight must be contiguous");
  TORCH_CHECK(lora_A.is_contiguous(), kOp, ": lora_A must be contiguous");
  TORCH_CHECK(lora_B.is_contiguous(), kOp, ": lora_B must be contiguous");
  if (bias.has_value()) TORCH_CHECK(bias->is_contiguous(), kOp, ": bias must be contiguous");

  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor t = at::empty({M, R}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, t};

  LoraDecodeArgs a;
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.lora_A = lora_A.data_ptr();
  a.lora_B = lora_B.data_ptr();
  a.y = y.data_ptr();
  a.t = t.data_ptr<float>();
  a.M = M;
  a.K = K;
  a.N = N;
  a.R = R;
  a.scaling = static_cast<float>(scaling);
  a.dtype = to_dtype(x.scalar_type());
  a.adapter_dtype = to_dtype(lora_A.scalar_type());
  C10_CUDA_CHECK(lora_decode_launch(a, c10::cuda::getCurrentCUDAStream(dev.index()).stream()));
  return {y, t};
}

std::tuple<at::Tensor, at::Tensor> lora_decode_meta(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double /*scaling*/) {
  check_ranks_and_dtypes(x, weight, bias, lora_A, lora_B);
  at::Tensor y = at::empty_symint({x.sym_size(0), weight.sym_size(0)}, x.options());
  at::Tensor t = at::empty_symint({x.sym_size(0), lora_A.sym_size(0)}, x.options().dtype(at::kFloat));
  return {y, t};
}

std::tuple<at::Tensor, at::Tensor> lora_decode_cpu(const at::Tensor& x, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, const at::Tensor&,
                                                   const at::Tensor&, double) {
  TORCH_CHECK(false, kOp, " runs on CUDA tensors only (x is on ", x.device(),
              "); there is no CPU kernel in the CUDA extension: use peftkern's torch or triton backend");
}

}  // namespace
}  // namespace peftkern

TORCH_LIBRARY_FRAGMENT(peftkern_cuda, m) {
  m.def(
      "lora_decode(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peftkern_cuda, CUDA, m) {
  m.impl("lora_decode", &peftkern::lora_decode_cuda);
}

TORCH_LIBRARY_IMPL(peftkern_cuda, Meta, m) {
  m.impl("lora_decode", &peftkern::lora_decode_meta);
}

TORCH_LIBRARY_IMPL(peftkern_cuda, CPU, m) {
  m.impl("lora_decode", &peftkern::lora_decode_cpu);
}
