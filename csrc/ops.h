// The ops' internals, shared by ops.cpp and each device's file: the
// device-independent halves of the ops and the device kernels' signatures.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "crelu.h"

namespace crelu_ext {

// ---- the ops, shared by every device (ops.cpp) ----
// They check the inputs, plan the layout, allocate the outputs with the
// strides torch.cat gives and call the device's kernel on dense inputs.

using ForwardKernel = void (*)(const at::Tensor& x, const LayoutPlan& plan,
                               at::Tensor& out, at::Tensor& mask);
using MaskedKernel = void (*)(const at::Tensor& input, const at::Tensor& mask,
                              const LayoutPlan& plan, at::Tensor& out);

std::tuple<at::Tensor, at::Tensor> crelu_forward_impl(ForwardKernel kernel,
                                                      const at::Tensor& x,
                                                      int64_t dim,
                                                      bool save_mask);
at::Tensor crelu_backward_impl(MaskedKernel kernel, const at::Tensor& grad_out,
                               const at::Tensor& mask, int64_t dim,
                               at::MemoryFormat memory_format);
at::Tensor crelu_backward_backward_impl(MaskedKernel kernel,
                                        const at::Tensor& grad_grad_x,
                                        const at::Tensor& mask, int64_t dim,
                                        at::MemoryFormat memory_format);

// Registers a device's kernels as its implementations of the three ops, e.g.
// register_kernels<crelu_forward_cpu, ...>(m) in TORCH_LIBRARY_IMPL(..., CPU,
// m). A prefix names another set of ops with the same schemas (the CUDA
// kernels' host emulation registers "emulated_crelu", ...).
template <ForwardKernel kForward, MaskedKernel kBackward,
          MaskedKernel kBackwardBackward>
void register_kernels(torch::Library& m, const std::string& prefix = "") {
  m.impl((prefix + "crelu").c_str(),
         [](const at::Tensor& x, int64_t dim, bool save_mask) {
           return crelu_forward_impl(kForward, x, dim, save_mask);
         });
  m.impl((prefix + "crelu_backward").c_str(),
         [](const at::Tensor& grad_out, const at::Tensor& mask, int64_t dim,
            at::MemoryFormat memory_format) {
           return crelu_backward_impl(kBackward, grad_out, mask, dim,
                                      memory_format);
         });
  m.impl((prefix + "crelu_backward_backward").c_str(),
         [](const at::Tensor& grad_grad_x, const at::Tensor& mask, int64_t dim,
            at::MemoryFormat memory_format) {
           return crelu_backward_backward_impl(kBackwardBackward, grad_grad_x,
                                               mask, dim, memory_format);
         });
}

// ---- device kernels; inputs are dense in the plan's memory order ----
// out: [outer, 2, inner]. mask: mask_bytes(outer * inner) bytes, or an
// undefined tensor when autograd does not need it.
void crelu_forward_cpu(const at::Tensor& x, const LayoutPlan& plan,
                       at::Tensor& out, at::Tensor& mask);
// grad_out: [outer, 2, inner] -> grad_x: [outer, inner]
void crelu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& mask,
                        const LayoutPlan& plan, at::Tensor& grad_x);
// The adjoint of the backward, used for double backward:
// grad_x: [outer, inner] -> out: [outer, 2, inner],
// out[o][0][r] = (pos ? g : 0) + 0, out[o][1][r] = (neg ? -g : 0) + 0.
// The "+ 0" is autograd's: it sums the two halves' zero-padded gradients,
// which turns -0 into +0.
void crelu_backward_backward_cpu(const at::Tensor& grad_grad_x,
                                 const at::Tensor& mask, const LayoutPlan& plan,
                                 at::Tensor& out);

}  // namespace crelu_ext
