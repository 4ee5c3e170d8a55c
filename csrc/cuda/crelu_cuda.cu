// Fused CUDA kernels and their registration.
//
// Napkin math per input element: forward reads 1 and writes 2 (+ 2 mask
// bits), backward reads 2 (+ 2 bits) and writes 1: pure bandwidth. Each
// thread owns a unit of 8 consecutive input elements, which is one byte of
// each mask word (see crelu.h), so mask bytes never race and need no atomics.
// When the plan's rows are multiples of 8 and the pointers are 16-byte
// aligned, a unit lies inside one row and moves with 128-bit loads and
// stores; otherwise (odd inner sizes, storage offsets, tails) the scalar path
// places every element on its own. Offsets are 32-bit when the output fits,
// 64-bit otherwise (the output has 2 * numel elements).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <algorithm>
#include <cstdint>
#include <limits>

#include "../crelu.h"

namespace crelu_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kUnit = 8;  // elements per thread step: one byte of mask word

using at::cuda::detail::IntDivider;

// The byte of the pos word that holds unit u's bits; the neg byte is 4 on.
template <typename index_t>
__device__ __forceinline__ index_t mask_byte(index_t unit) {
  return (unit / 4) * kMaskBlockBytes + unit % 4;
}

// A unit of 8 elements, moved as 128-bit words.
template <typename scalar_t>
struct alignas(16) Unit {
  scalar_t v[kUnit];
  static_assert(sizeof(scalar_t) * kUnit % 16 == 0);

  __device__ __forceinline__ void load(const scalar_t* p) {
    const uint4* src = reinterpret_cast<const uint4*>(p);
    uint4* dst = reinterpret_cast<uint4*>(v);
#pragma unroll
    for (int c = 0; c < static_cast<int>(sizeof(v) / 16); ++c) {
      dst[c] = src[c];
    }
  }
  __device__ __forceinline__ void store(scalar_t* p) const {
    const uint4* src = reinterpret_cast<const uint4*>(v);
    uint4* dst = reinterpret_cast<uint4*>(p);
#pragma unroll
    for (int c = 0; c < static_cast<int>(sizeof(v) / 16); ++c) {
      dst[c] = src[c];
    }
  }
};

// Grid-stride loop over units; `body(unit, flat, count)`.
template <typename index_t, typename Body>
__device__ __forceinline__ void for_each_unit(index_t numel, Body body) {
  const index_t units = (numel + kUnit - 1) / kUnit;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t unit =
           static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       unit < units; unit += stride) {
    const index_t flat = unit * kUnit;
    const int count = static_cast<int>(
        numel - flat < index_t(kUnit) ? numel - flat : index_t(kUnit));
    body(unit, flat, count);
  }
}

// Offset of element `flat`'s relu(x) half in [outer, 2, inner].
template <typename index_t>
__device__ __forceinline__ index_t
pair_offset(index_t flat, const IntDivider<index_t>& inner) {
  const auto qr = inner.divmod(flat);
  return qr.div * 2 * inner.divisor + qr.mod;
}

template <typename scalar_t, typename index_t, bool kVectorized>
__global__ void crelu_forward_kernel(const scalar_t* __restrict__ x,
                                     scalar_t* __restrict__ out,
                                     uint8_t* __restrict__ mask, index_t numel,
                                     IntDivider<index_t> inner) {
  for_each_unit(numel, [&](index_t unit, index_t flat, int count) {
    uint8_t pos_bits = 0, neg_bits = 0;
    if constexpr (kVectorized) {
      Unit<scalar_t> in, pos, neg;
      in.load(x + flat);
#pragma unroll
      for (int e = 0; e < kUnit; ++e) {
        pos.v[e] = relu_pos(in.v[e]);
        neg.v[e] = relu_neg(in.v[e]);
        pos_bits |= passes_pos(in.v[e]) << e;
        neg_bits |= passes_neg(in.v[e]) << e;
      }
      scalar_t* dst = out + pair_offset(flat, inner);
      pos.store(dst);
      neg.store(dst + inner.divisor);
    } else {
      for (int e = 0; e < count; ++e) {
        const scalar_t v = x[flat + e];
        scalar_t* dst = out + pair_offset<index_t>(flat + e, inner);
        dst[0] = relu_pos(v);
        dst[inner.divisor] = relu_neg(v);
        pos_bits |= passes_pos(v) << e;
        neg_bits |= passes_neg(v) << e;
      }
    }
    if (mask != nullptr) {
      const index_t byte = mask_byte(unit);
      mask[byte] = pos_bits;
      mask[byte + 4] = neg_bits;
    }
  });
}

template <typename scalar_t, typename index_t, bool kVectorized>
__global__ void crelu_backward_kernel(const scalar_t* __restrict__ grad_out,
                                      const uint8_t* __restrict__ mask,
                                      scalar_t* __restrict__ grad_x,
                                      index_t numel,
                                      IntDivider<index_t> inner) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_unit(numel, [&](index_t unit, index_t flat, int count) {
    const index_t byte = mask_byte(unit);
    const uint8_t pos_bits = mask[byte];
    const uint8_t neg_bits = mask[byte + 4];
    if constexpr (kVectorized) {
      Unit<scalar_t> g1, g2, result;
      const scalar_t* src = grad_out + pair_offset(flat, inner);
      g1.load(src);
      g2.load(src + inner.divisor);
#pragma unroll
      for (int e = 0; e < kUnit; ++e) {
        result.v[e] = static_cast<scalar_t>(crelu_grad<acc_t>(
            g1.v[e], g2.v[e], (pos_bits >> e) & 1, (neg_bits >> e) & 1));
      }
      result.store(grad_x + flat);
    } else {
      for (int e = 0; e < count; ++e) {
        const scalar_t* src = grad_out + pair_offset<index_t>(flat + e, inner);
        grad_x[flat + e] = static_cast<scalar_t>(
            crelu_grad<acc_t>(src[0], src[inner.divisor], (pos_bits >> e) & 1,
                              (neg_bits >> e) & 1));
      }
    }
  });
}

template <typename scalar_t, typename index_t, bool kVectorized>
__global__ void crelu_backward_backward_kernel(
    const scalar_t* __restrict__ grad_grad_x, const uint8_t* __restrict__ mask,
    scalar_t* __restrict__ out, index_t numel, IntDivider<index_t> inner) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_unit(numel, [&](index_t unit, index_t flat, int count) {
    const index_t byte = mask_byte(unit);
    const uint8_t pos_bits = mask[byte];
    const uint8_t neg_bits = mask[byte + 4];
    if constexpr (kVectorized) {
      Unit<scalar_t> g, pos, neg;
      g.load(grad_grad_x + flat);
#pragma unroll
      for (int e = 0; e < kUnit; ++e) {
        pos.v[e] = static_cast<scalar_t>(
            crelu_grad_grad_pos<acc_t>(g.v[e], (pos_bits >> e) & 1));
        neg.v[e] = static_cast<scalar_t>(
            crelu_grad_grad_neg<acc_t>(g.v[e], (neg_bits >> e) & 1));
      }
      scalar_t* dst = out + pair_offset(flat, inner);
      pos.store(dst);
      neg.store(dst + inner.divisor);
    } else {
      for (int e = 0; e < count; ++e) {
        const acc_t g = grad_grad_x[flat + e];
        scalar_t* dst = out + pair_offset<index_t>(flat + e, inner);
        dst[0] = static_cast<scalar_t>(
            crelu_grad_grad_pos<acc_t>(g, (pos_bits >> e) & 1));
        dst[inner.divisor] = static_cast<scalar_t>(
            crelu_grad_grad_neg<acc_t>(g, (neg_bits >> e) & 1));
      }
    }
  });
}

bool is_aligned_16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Picks 32- or 64-bit offsets and the vectorized or scalar path, then
// launches `Kernel<scalar_t, index_t, vectorized>` on the current stream.
// Launches never synchronize the host, so they can be captured in graphs.
template <template <typename, typename, bool> class KernelOf, typename scalar_t,
          typename... Pointers>
void launch(const at::Tensor& any_input, int64_t numel, int64_t inner,
            Pointers... pointers) {
  const c10::cuda::CUDAGuard guard(any_input.device());
  const bool vectorized =
      inner % kUnit == 0 && (is_aligned_16(pointers) && ...);
  const int64_t units = (numel + kUnit - 1) / kUnit;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Enough blocks to fill every SM several times over; the loop strides on.
  const int64_t blocks =
      std::min<int64_t>((units + kThreads - 1) / kThreads, int64_t{sms} * 32);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool index32 =
      2 * numel <= static_cast<int64_t>(std::numeric_limits<int32_t>::max());
  auto go = [&](auto index_zero, auto vectorized_tag) {
    using index_t = decltype(index_zero);
    KernelOf<scalar_t, index_t, decltype(vectorized_tag)::value>::launch(
        blocks, stream, pointers..., static_cast<index_t>(numel),
        IntDivider<index_t>(static_cast<index_t>(inner)));
  };
  if (index32) {
    vectorized ? go(uint32_t{}, std::true_type{})
               : go(uint32_t{}, std::false_type{});
  } else {
    vectorized ? go(uint64_t{}, std::true_type{})
               : go(uint64_t{}, std::false_type{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define CRELU_EXT_KERNEL_LAUNCHER(NAME, KERNEL)                             \
  template <typename scalar_t, typename index_t, bool kVectorized>          \
  struct NAME {                                                             \
    template <typename... Args>                                             \
    static void launch(int64_t blocks, cudaStream_t stream, Args... args) { \
      KERNEL<scalar_t, index_t, kVectorized>                                \
          <<<blocks, kThreads, 0, stream>>>(args...);                       \
    }                                                                       \
  };

CRELU_EXT_KERNEL_LAUNCHER(ForwardLauncher, crelu_forward_kernel)
CRELU_EXT_KERNEL_LAUNCHER(BackwardLauncher, crelu_backward_kernel)
CRELU_EXT_KERNEL_LAUNCHER(BackwardBackwardLauncher,
                          crelu_backward_backward_kernel)
#undef CRELU_EXT_KERNEL_LAUNCHER

}  // namespace

// x: [outer, inner] -> out: [outer, 2, inner] (+ mask)
void crelu_forward_cuda(const at::Tensor& x, const LayoutPlan& plan,
                        at::Tensor& out, at::Tensor& mask) {
  CRELU_EXT_DISPATCH_FLOATS(x.scalar_type(), "crelu_forward_cuda", [&] {
    launch<ForwardLauncher, scalar_t>(
        x, x.numel(), plan.inner, x.const_data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(),
        mask.defined() ? mask.data_ptr<uint8_t>() : nullptr);
  });
}

// grad_out: [outer, 2, inner] -> grad_x: [outer, inner]
void crelu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& mask,
                         const LayoutPlan& plan, at::Tensor& grad_x) {
  CRELU_EXT_DISPATCH_FLOATS(grad_x.scalar_type(), "crelu_backward_cuda", [&] {
    launch<BackwardLauncher, scalar_t>(grad_out, grad_x.numel(), plan.inner,
                                       grad_out.const_data_ptr<scalar_t>(),
                                       mask.const_data_ptr<uint8_t>(),
                                       grad_x.data_ptr<scalar_t>());
  });
}

// grad_grad_x: [outer, inner] -> out: [outer, 2, inner]
void crelu_backward_backward_cuda(const at::Tensor& grad_grad_x,
                                  const at::Tensor& mask,
                                  const LayoutPlan& plan, at::Tensor& out) {
  CRELU_EXT_DISPATCH_FLOATS(
      grad_grad_x.scalar_type(), "crelu_backward_backward_cuda", [&] {
        launch<BackwardBackwardLauncher, scalar_t>(
            grad_grad_x, grad_grad_x.numel(), plan.inner,
            grad_grad_x.const_data_ptr<scalar_t>(),
            mask.const_data_ptr<uint8_t>(), out.data_ptr<scalar_t>());
      });
}

TORCH_LIBRARY_IMPL(crelu_ext, CUDA, m) {
  register_kernels<crelu_forward_cuda, crelu_backward_cuda,
                   crelu_backward_backward_cuda>(m);
}

}  // namespace crelu_ext
