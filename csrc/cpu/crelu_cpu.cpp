// The ops' CPU registrations. They run the kernels built for the best
// capability ATen uses on this CPU. ATEN_CPU_CAPABILITY=default|avx2|avx512
// lowers it, as for ATen's own kernels, which is how the benchmark measures
// what vectorization buys.
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

#include "../ops.h"

namespace crelu_ext {
namespace cpu {

#define CRELU_EXT_DECLARE_CAPABILITY(CAP)                                \
  namespace CAP {                                                        \
  void forward_kernel(const at::Tensor&, const LayoutPlan&, at::Tensor&, \
                      at::Tensor&);                                      \
  void backward_kernel(const at::Tensor&, const at::Tensor&,             \
                       const LayoutPlan&, at::Tensor&);                  \
  void backward_backward_kernel(const at::Tensor&, const at::Tensor&,    \
                                const LayoutPlan&, at::Tensor&);         \
  }

CRELU_EXT_DECLARE_CAPABILITY(DEFAULT)
#if defined(__x86_64__) || defined(_M_X64)
CRELU_EXT_DECLARE_CAPABILITY(AVX2)
CRELU_EXT_DECLARE_CAPABILITY(AVX512)
#endif
#undef CRELU_EXT_DECLARE_CAPABILITY

namespace {

struct Kernels {
  decltype(&DEFAULT::forward_kernel) forward;
  decltype(&DEFAULT::backward_kernel) backward;
  decltype(&DEFAULT::backward_backward_kernel) backward_backward;
};

Kernels select_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    return {AVX512::forward_kernel, AVX512::backward_kernel,
            AVX512::backward_backward_kernel};
  }
  if (capability == "AVX2") {
    return {AVX2::forward_kernel, AVX2::backward_kernel,
            AVX2::backward_backward_kernel};
  }
#endif
  return {DEFAULT::forward_kernel, DEFAULT::backward_kernel,
          DEFAULT::backward_backward_kernel};
}

const Kernels& kernels() {
  static const Kernels selected = select_kernels();
  return selected;
}

}  // namespace
}  // namespace cpu

void crelu_forward_cpu(const at::Tensor& x, const LayoutPlan& plan,
                       at::Tensor& out, at::Tensor& mask) {
  cpu::kernels().forward(x, plan, out, mask);
}

void crelu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& mask,
                        const LayoutPlan& plan, at::Tensor& grad_x) {
  cpu::kernels().backward(grad_out, mask, plan, grad_x);
}

void crelu_backward_backward_cpu(const at::Tensor& grad_grad_x,
                                 const at::Tensor& mask, const LayoutPlan& plan,
                                 at::Tensor& out) {
  cpu::kernels().backward_backward(grad_grad_x, mask, plan, out);
}

TORCH_LIBRARY_IMPL(crelu_ext, CPU, m) {
  register_kernels<crelu_forward_cpu, crelu_backward_cpu,
                   crelu_backward_backward_cpu>(m);
}

}  // namespace crelu_ext
