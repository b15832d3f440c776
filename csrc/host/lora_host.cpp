// peftkern's CPU host path: the eager torch backend of lora_linear for fp32 x and adapters as one C++ autograd node.
//
// The math and the mask are exactly reference/lora.py's lora_linear_fwd_fp32 / lora_linear_bwd_fp32 (same aten ops in
// the same order, so the same bits): this file only moves the host work out of Python. A Python autograd.Function
// costs ~25 us more per LoRA call on the CPU than these calls from C++ (benchmarks/NOTES.md, host overhead).
// Built by peftkern/_host_ext.py (torch's JIT builder), never by the CUDA build (which skips csrc/host).
#include <torch/extension.h>
#include <ATen/CPUGeneratorImpl.h>

#include <mutex>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor rows(const Tensor& t) { return t.dim() == 2 ? t : t.reshape({-1, t.size(-1)}); }

// The bool keep = uniform >= p, the uniform draws from a private generator seeded with `seed`: the mask
// reference.lora._keep gives for `seed` (torch.Generator.manual_seed is set_current_seed).
Tensor keep_mask(const Tensor& x2d, double p, int64_t seed) {
  thread_local at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(0);
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_current_seed(static_cast<uint64_t>(seed));
  }
  return at::rand(x2d.sizes(), gen, x2d.options()).ge(p);
}

// s' * keep in fp32 (s' = scaling / (1 - p)): the products take it with no alpha. The bool mask is what is kept
// (1 byte per element of x), made fp32 again in backward: one more call than keeping that, 3 bytes less.
Tensor scaled(const Tensor& keep, double s) { return keep * at::scalar_tensor(s, keep.options().dtype(at::kFloat)); }

struct LoraLinearFp32 : public torch::autograd::Function<LoraLinearFp32> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                        const Tensor& lora_A, const Tensor& lora_B, double scaling, double p, int64_t seed) {
    Tensor x2d = rows(x);
    Tensor keep, ts;
    if (p == 0.0) {
      ts = at::linear(x2d, lora_A).mul_(scaling);
    } else {
      keep = keep_mask(x2d, p, seed);
      ts = at::linear(x2d * scaled(keep, scaling / (1.0 - p)), lora_A);
    }
    Tensor y = at::linear(x2d, weight, bias).addmm_(ts, lora_B.t());
    if (x.dim() != 2) {  // x's leading dims, as a tensor of its own: autograd forbids in-place ops on a view made
      auto sizes = x.sizes().vec();  // inside a custom Function, and layers' outputs are often modified in place
      sizes.back() = y.size(-1);
      y = at::_unsafe_view(y, sizes);
    }
    // x and W only where a gradient needs them: a 4-bit base's W is a temporary its saved-tensor hook rebuilds
    // in backward (ops/_dequant.py), which is work where dx is not wanted.
    const bool w_grad = weight.requires_grad() || (bias.has_value() && bias->defined() && bias->requires_grad());
    ctx->save_for_backward({lora_A.requires_grad() || w_grad ? x : Tensor(), x.requires_grad() ? weight : Tensor(),
                            lora_A, lora_B, ts, keep});
    ctx->saved_data["x_dim"] = x.dim();
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["p"] = p;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3], &ts = saved[4];
    const double scaling = ctx->saved_data["scaling"].toDouble(), p = ctx->saved_data["p"].toDouble();
    const Tensor keep = saved[5].defined() ? scaled(saved[5], scaling / (1.0 - p)) : Tensor();
    Tensor dy = rows(grads[0]).contiguous();
    Tensor x2d = x.defined() ? rows(x) : Tensor();
    // needs_input_grad counts tensor inputs only: an absent bias has no slot.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    size_t e = 0;
    const bool need_dx = ctx->needs_input_grad(e++), need_w = ctx->needs_input_grad(e++);
    const bool need_b = has_bias && ctx->needs_input_grad(e++);
    const bool need_a = ctx->needs_input_grad(e++), need_bb = ctx->needs_input_grad(e++);
    Tensor dx, d_w, d_b, d_a, d_bb;
    if (need_dx || need_a) {
      Tensor dt = at::mm(dy, lora_B);  // the gradient of (x * keep) A^T; without dropout scaled here instead
      if (!keep.defined()) dt.mul_(scaling);
      if (need_a) d_a = at::mm(dt.t(), keep.defined() ? x2d * keep : x2d);
      if (need_dx) {
        dx = at::mm(dt, lora_A);
        if (keep.defined()) dx.mul_(keep);
        dx.addmm_(dy, weight);
        if (ctx->saved_data["x_dim"].toInt() != 2) dx = dx.view(ctx->saved_data["x_sizes"].toIntVector());
      }
    }
    if (need_bb) d_bb = at::mm(dy.t(), ts);
    if (need_w) d_w = at::mm(dy.t(), x2d);  // a trainable base (the slow path, as ops/lora.py's _base_grads)
    if (need_b) d_b = dy.sum(0);
    return {dx, d_w, d_b, d_a, d_bb, Tensor(), Tensor(), Tensor()};
  }
};

// ops/lora.py's draw_seed without a Python call or a tensor: torch.randint(0, 2**31 - 1, ()) on the default CPU
// generator takes random64() % (2**31 - 1) for an int64 result (checked against it in tests/test_host_ext.py).
int64_t draw_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return static_cast<int64_t>(at::check_generator<at::CPUGeneratorImpl>(gen)->random64() % 2147483647ULL);
}

// seed < 0 (with dropout): draw it here, as draw_seed() would.
Tensor lora_linear_fp32(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& lora_A,
                        const Tensor& lora_B, double scaling, double p, int64_t seed) {
  if (p != 0.0 && seed < 0) seed = draw_seed();
  return LoraLinearFp32::apply(x, weight, bias, lora_A, lora_B, scaling, p, seed);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftkern's CPU host path (csrc/host): see peftkern/_host_ext.py";
  m.def("lora_linear_fp32", &lora_linear_fp32, "reference.lora.lora_linear_fwd_fp32 as one C++ autograd node");
  m.def("draw_seed", &draw_seed, "ops.lora.draw_seed's value, drawn in C++");
}
