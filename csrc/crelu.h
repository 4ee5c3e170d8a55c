// Shared contract of the fused CReLU kernels: the layout plan, the packed sign
// mask and the element-wise math. Every backend (CPU, CUDA, Triton) follows it;
// this is the header installed for libtorch users (the ops' internals are in
// ops.h).
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

#include <cstdint>

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

}  // namespace crelu_ext
