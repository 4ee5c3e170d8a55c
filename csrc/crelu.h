// Shared contract of the fused CReLU kernels: the layout plan, the packed sign
// mask and the element-wise math. Every backend (CPU, CUDA, Triton) follows it.
//
//   crelu(x, dim) = cat([relu(x), relu(-x)], dim)
//
// Layout plan: a dense input is read in memory order as a matrix
// [outer, inner], where `dim` splits the memory order into the dimensions
// before it (outer) and the rest (inner). The output, in the same memory
// format, is then [outer, 2, inner]: out[o][0][r] = relu(x[o][r]),
// out[o][1][r] = relu(-x[o][r]). NCHW with dim=1: outer=N, inner=C*H*W;
// channels_last with dim=1: outer=N*H*W, inner=C.
//
// Packed sign mask (what autograd saves, 2 bits per element): the flat input
// index i = o * inner + r is grouped in blocks of 32 elements. Block b is
// 8 bytes: two little-endian uint32 words, `pos` then `neg`, where bit i % 32
// of pos is "x > 0 or NaN" and of neg is "x < 0 or NaN". These are exactly
// the elements through which torch.relu's backward passes the gradient.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

namespace crelu_ext {

constexpr int64_t kMaskBlock = 32;      // elements per mask block
constexpr int64_t kMaskBlockBytes = 8;  // a pos word and a neg word

inline int64_t mask_bytes(int64_t numel) {
  return (numel + kMaskBlock - 1) / kMaskBlock * kMaskBlockBytes;
}

struct LayoutPlan {
  int64_t outer;
  int64_t inner;  // contiguous elements of x per outer index
};

// The plan of a tensor of `sizes` laid out densely in `memory_format`.
LayoutPlan plan_layout(at::IntArrayRef sizes, int64_t dim,
                       at::MemoryFormat memory_format);

// The dtypes every kernel supports.
#define CRELU_EXT_DISPATCH_FLOATS(TYPE, NAME, ...)                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, \
                                  __VA_ARGS__)

// ---- element-wise math, shared by the CPU scalar path and CUDA ----
// relu keeps NaN and the sign of zero (relu(-0.0) == -0.0), so it is
// "x < 0 ? +0 : x", and relu(-x) is "x > 0 ? +0 : -x".

template <typename T>
C10_HOST_DEVICE inline T relu_pos(T x) {
  return x < T(0) ? T(0) : x;
}

template <typename T>
C10_HOST_DEVICE inline T relu_neg(T x) {
  return x > T(0) ? T(0) : -x;
}

template <typename T>
C10_HOST_DEVICE inline bool passes_pos(T x) {
  return !(x <= T(0));  // x > 0 or NaN
}

template <typename T>
C10_HOST_DEVICE inline bool passes_neg(T x) {
  return !(x >= T(0));  // x < 0 or NaN
}

// grad_x = t1 + (-t2), t1 = pos ? g1 : 0, t2 = neg ? g2 : 0, evaluated in
// `acc_t` like autograd's sum of the two paths (float for 16-bit types).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t crelu_grad(acc_t g1, acc_t g2, bool pos,
                                        bool neg) {
  const acc_t t1 = pos ? g1 : acc_t(0);
  const acc_t t2 = neg ? g2 : acc_t(0);
  return t1 + (-t2);
}

// (pos ? g : 0) + 0, and (neg ? -g : 0) + 0: the "+ 0" only turns -0 into
// +0, so it is written as a comparison that no compiler can fold away.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t crelu_grad_grad_pos(acc_t g, bool pos) {
  return pos && g != acc_t(0) ? g : acc_t(0);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t crelu_grad_grad_neg(acc_t g, bool neg) {
  return neg && g != acc_t(0) ? -g : acc_t(0);
}

// The memory format of cat([relu(x), relu(-x)]): the output's, and the one
// crelu_backward and crelu_backward_backward are given for x's gradient.
at::MemoryFormat output_memory_format(const at::Tensor& x);

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
