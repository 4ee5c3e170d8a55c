// The CUDA kernels' per-thread work, compiled for host and device: shared by
// the GPU launcher (crelu_cuda.cu) and the host grid emulator
// (../testing/crelu_emulator.cu), which run the same bodies on the same grid.
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
//
// Each kernel's work on one unit is a functor (ForwardBody, BackwardBody,
// BackwardBackwardBody). A Device (OnGpu, or the emulator's OnHostEmulator)
// runs it: on a GPU crelu_kernel runs it in a grid-stride loop, on the host
// the emulator runs the same loop for every (block, thread) of the launch.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../crelu.h"

namespace crelu_ext::gpu {

constexpr int kThreads = 256;
constexpr int kUnit = 8;  // elements per thread step: one byte of mask word
constexpr int kUnitsPerMaskBlock = kMaskBlock / kUnit;
// Enough blocks to fill every SM several times over; the loop strides on.
constexpr int64_t kBlocksPerSm = 32;

// IntDivider<uint32_t> divides with __umulhi and a 32-bit add on the device
// and with 64-bit arithmetic on the host; the two agree for dividends below
// 2^31, which 32-bit launches guarantee (2 * numel <= INT32_MAX).
using at::cuda::detail::IntDivider;

// How a kernel moves a unit. Tag types rather than a bool so that each
// kernel's name says it: tools/cuda_codegen.py checks that the
// VectorAccess kernels use 128-bit loads and stores.
struct VectorAccess {};
struct ScalarAccess {};

C10_HOST_DEVICE inline bool is_aligned_16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Copies `kBytes` between 16-byte aligned addresses as 128-bit words. On the
// host (the emulator) the alignment a GPU would fault on is checked, and the
// bytes move with memcpy, which is what the reinterpret means.
template <int kBytes>
C10_HOST_DEVICE inline void copy_128bit(const void* from, void* to) {
  static_assert(kBytes % 16 == 0);
#if defined(__CUDA_ARCH__)
  const uint4* src = static_cast<const uint4*>(from);
  uint4* dst = static_cast<uint4*>(to);
#pragma unroll
  for (int c = 0; c < kBytes / 16; ++c) {
    dst[c] = src[c];
  }
#else
  TORCH_INTERNAL_ASSERT(is_aligned_16(from) && is_aligned_16(to),
                        "crelu_ext: emulated 128-bit access at an address "
                        "that is not 16-byte aligned");
  std::memcpy(to, from, kBytes);
#endif
}

// A unit of 8 elements, moved as 128-bit words.
template <typename scalar_t>
struct alignas(16) Unit {
  scalar_t v[kUnit];

  C10_HOST_DEVICE void load(const scalar_t* p) { copy_128bit<sizeof(v)>(p, v); }
  C10_HOST_DEVICE void store(scalar_t* p) const {
    copy_128bit<sizeof(v)>(v, p);
  }
};

// The byte of the pos word that holds unit u's bits; the neg byte is 4 on.
template <typename index_t>
C10_HOST_DEVICE inline index_t mask_byte(index_t unit) {
  return (unit / kUnitsPerMaskBlock) * kMaskBlockBytes +
         unit % kUnitsPerMaskBlock;
}

// The elements a launch covers: numel of them, in rows of `inner`.
template <typename index_t>
struct Extent {
  index_t numel;
  IntDivider<index_t> inner;

  C10_HOST_DEVICE index_t units() const { return (numel + kUnit - 1) / kUnit; }
  // The elements of the unit that starts at `flat`: 8, or fewer in the tail.
  C10_HOST_DEVICE int count(index_t flat) const {
    return static_cast<int>(numel - flat < index_t(kUnit) ? numel - flat
                                                          : index_t(kUnit));
  }
  // Offset of element `flat`'s relu(x) half in [outer, 2, inner]; its relu(-x)
  // half is inner.divisor on.
  C10_HOST_DEVICE index_t pair_offset(index_t flat) const {
    const auto qr = inner.divmod(flat);
    return qr.div * 2 * inner.divisor + qr.mod;
  }
};

template <typename Access>
constexpr bool kVectorized = std::is_same_v<Access, VectorAccess>;

// x: [outer, inner] -> out: [outer, 2, inner] and the unit's mask bytes.
template <typename scalar_t, typename index_t, typename Access>
struct ForwardBody {
  using index_type = index_t;
  const scalar_t* x;
  scalar_t* out;
  uint8_t* mask;  // nullptr: no mask wanted
  Extent<index_t> extent;

  // The mask's last block may have units past the end; their bytes are
  // zeroed, as the CPU kernels do, so the mask's bytes are the same on every
  // device. Units past the end are visited for that only.
  C10_HOST_DEVICE index_t units() const {
    const index_t units = extent.units();
    return mask == nullptr ? units
                           : (units + kUnitsPerMaskBlock - 1) /
                                 kUnitsPerMaskBlock * kUnitsPerMaskBlock;
  }

  C10_HOST_DEVICE void operator()(index_t unit) const {
    const index_t flat = unit * kUnit;
    if (flat >= extent.numel) {
      mask[mask_byte(unit)] = 0;
      mask[mask_byte(unit) + 4] = 0;
      return;
    }
    uint8_t pos_bits = 0, neg_bits = 0;
    if constexpr (kVectorized<Access>) {
      Unit<scalar_t> in, pos, neg;
      in.load(x + flat);
#pragma unroll
      for (int e = 0; e < kUnit; ++e) {
        pos.v[e] = relu_pos(in.v[e]);
        neg.v[e] = relu_neg(in.v[e]);
        pos_bits |= passes_pos(in.v[e]) << e;
        neg_bits |= passes_neg(in.v[e]) << e;
      }
      scalar_t* dst = out + extent.pair_offset(flat);
      pos.store(dst);
      neg.store(dst + extent.inner.divisor);
    } else {
      const int count = extent.count(flat);
      for (int e = 0; e < count; ++e) {
        const scalar_t v = x[flat + e];
        scalar_t* dst = out + extent.pair_offset(flat + e);
        dst[0] = relu_pos(v);
        dst[extent.inner.divisor] = relu_neg(v);
        pos_bits |= passes_pos(v) << e;
        neg_bits |= passes_neg(v) << e;
      }
    }
    if (mask != nullptr) {
      mask[mask_byte(unit)] = pos_bits;
      mask[mask_byte(unit) + 4] = neg_bits;
    }
  }
};

// grad_out: [outer, 2, inner] -> grad_x: [outer, inner]
template <typename scalar_t, typename index_t, typename Access>
struct BackwardBody {
  using index_type = index_t;
  const scalar_t* grad_out;
  const uint8_t* mask;
  scalar_t* grad_x;
  Extent<index_t> extent;

  C10_HOST_DEVICE index_t units() const { return extent.units(); }

  C10_HOST_DEVICE void operator()(index_t unit) const {
    using acc_t = at::opmath_type<scalar_t>;
    const index_t flat = unit * kUnit;
    const uint8_t pos_bits = mask[mask_byte(unit)];
    const uint8_t neg_bits = mask[mask_byte(unit) + 4];
    if constexpr (kVectorized<Access>) {
      Unit<scalar_t> g1, g2, result;
      const scalar_t* src = grad_out + extent.pair_offset(flat);
      g1.load(src);
      g2.load(src + extent.inner.divisor);
#pragma unroll
      for (int e = 0; e < kUnit; ++e) {
        result.v[e] = static_cast<scalar_t>(crelu_grad<acc_t>(
            g1.v[e], g2.v[e], (pos_bits >> e) & 1, (neg_bits >> e) & 1));
      }
      result.store(grad_x + flat);
    } else {
      const int count = extent.count(flat);
      for (int e = 0; e < count; ++e) {
        const scalar_t* src = grad_out + extent.pair_offset(flat + e);
        grad_x[flat + e] = static_cast<scalar_t>(
            crelu_grad<acc_t>(src[0], src[extent.inner.divisor],
                              (pos_bits >> e) & 1, (neg_bits >> e) & 1));
      }
    }
  }
};

// grad_grad_x: [outer, inner] -> out: [outer, 2, inner]
template <typename scalar_t, typename index_t, typename Access>
struct BackwardBackwardBody {
  using index_type = index_t;
  const scalar_t* grad_grad_x;
  const uint8_t* mask;
  scalar_t* out;
  Extent<index_t> extent;

  C10_HOST_DEVICE index_t units() const { return extent.units(); }

  C10_HOST_DEVICE void operator()(index_t unit) const {
    using acc_t = at::opmath_type<scalar_t>;
    const index_t flat = unit * kUnit;
    const uint8_t pos_bits = mask[mask_byte(unit)];
    const uint8_t neg_bits = mask[mask_byte(unit) + 4];
    if constexpr (kVectorized<Access>) {
      Unit<scalar_t> g, pos, neg;
      g.load(grad_grad_x + flat);
#pragma unroll
      for (int e = 0; e < kUnit; ++e) {
        pos.v[e] = static_cast<scalar_t>(
            crelu_grad_grad_pos<acc_t>(g.v[e], (pos_bits >> e) & 1));
        neg.v[e] = static_cast<scalar_t>(
            crelu_grad_grad_neg<acc_t>(g.v[e], (neg_bits >> e) & 1));
      }
      scalar_t* dst = out + extent.pair_offset(flat);
      pos.store(dst);
      neg.store(dst + extent.inner.divisor);
    } else {
      const int count = extent.count(flat);
      for (int e = 0; e < count; ++e) {
        const acc_t g = grad_grad_x[flat + e];
        scalar_t* dst = out + extent.pair_offset(flat + e);
        dst[0] = static_cast<scalar_t>(
            crelu_grad_grad_pos<acc_t>(g, (pos_bits >> e) & 1));
        dst[extent.inner.divisor] = static_cast<scalar_t>(
            crelu_grad_grad_neg<acc_t>(g, (neg_bits >> e) & 1));
      }
    }
  }
};

// One thread's share of a launch of `blocks` blocks: the grid-stride loop.
template <typename Body>
C10_HOST_DEVICE inline void run_thread(const Body& body, uint32_t block,
                                       uint32_t thread, uint32_t blocks) {
  using index_t = typename Body::index_type;
  const index_t units = body.units();
  const index_t stride = static_cast<index_t>(blocks) * kThreads;
  for (index_t unit = static_cast<index_t>(block) * kThreads + thread;
       unit < units; unit += stride) {
    body(unit);
  }
}

// The pointers are the kernel's own __restrict__ parameters, not members of a
// body passed in, so that the inputs are read through the read-only data cache
// (LDG.E.*.CONSTANT) as they are when each kernel is written out by hand.
template <typename Body, typename... Pointers>
__global__ void crelu_kernel(Extent<typename Body::index_type> extent,
                             Pointers __restrict__... pointers) {
  run_thread(Body{pointers..., extent}, blockIdx.x, threadIdx.x, gridDim.x);
}

// The launch of one kernel: its access path, offset width and grid size.
struct GridPlan {
  bool vectorized;
  bool index32;
  int64_t blocks;
};

template <typename... Pointers>
GridPlan plan_grid(int64_t numel, int64_t inner, int sms, bool force_64bit,
                   Pointers... pointers) {
  const int64_t units = (numel + kUnit - 1) / kUnit;
  return {
      inner % kUnit == 0 && (is_aligned_16(pointers) && ...),
      !force_64bit && 2 * numel <= static_cast<int64_t>(
                                       std::numeric_limits<int32_t>::max()),
      std::min<int64_t>((units + kThreads - 1) / kThreads, sms * kBlocksPerSm),
  };
}

// Calls run(body) with the body `plan` picks: BodyOf<scalar_t, uint32_t or
// uint64_t, VectorAccess or ScalarAccess>{pointers..., extent}.
template <template <typename, typename, typename> class BodyOf,
          typename scalar_t, typename Run, typename... Pointers>
void with_body(const GridPlan& plan, int64_t numel, int64_t inner, Run run,
               Pointers... pointers) {
  auto go = [&](auto index_zero, auto access) {
    using index_t = decltype(index_zero);
    run(BodyOf<scalar_t, index_t, decltype(access)>{
        pointers...,
        Extent<index_t>{static_cast<index_t>(numel),
                        IntDivider<index_t>(static_cast<index_t>(inner))}});
  };
  if (plan.index32) {
    plan.vectorized ? go(uint32_t{}, VectorAccess{})
                    : go(uint32_t{}, ScalarAccess{});
  } else {
    plan.vectorized ? go(uint64_t{}, VectorAccess{})
                    : go(uint64_t{}, ScalarAccess{});
  }
}

// x: [outer, inner] -> out: [outer, 2, inner] (+ mask)
template <typename Device>
void crelu_forward(const at::Tensor& x, const LayoutPlan& plan, at::Tensor& out,
                   at::Tensor& mask) {
  CRELU_EXT_DISPATCH_FLOATS(x.scalar_type(), "crelu_forward_cuda", [&] {
    Device::template run<ForwardBody, scalar_t>(
        x, x.numel(), plan.inner, x.const_data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(),
        mask.defined() ? mask.data_ptr<uint8_t>() : nullptr);
  });
}

// grad_out: [outer, 2, inner] -> grad_x: [outer, inner]
template <typename Device>
void crelu_backward(const at::Tensor& grad_out, const at::Tensor& mask,
                    const LayoutPlan& plan, at::Tensor& grad_x) {
  CRELU_EXT_DISPATCH_FLOATS(grad_x.scalar_type(), "crelu_backward_cuda", [&] {
    Device::template run<BackwardBody, scalar_t>(
        grad_out, grad_x.numel(), plan.inner,
        grad_out.const_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(),
        grad_x.data_ptr<scalar_t>());
  });
}

// grad_grad_x: [outer, inner] -> out: [outer, 2, inner]
template <typename Device>
void crelu_backward_backward(const at::Tensor& grad_grad_x,
                             const at::Tensor& mask, const LayoutPlan& plan,
                             at::Tensor& out) {
  CRELU_EXT_DISPATCH_FLOATS(
      grad_grad_x.scalar_type(), "crelu_backward_backward_cuda", [&] {
        Device::template run<BackwardBackwardBody, scalar_t>(
            grad_grad_x, grad_grad_x.numel(), plan.inner,
            grad_grad_x.const_data_ptr<scalar_t>(),
            mask.const_data_ptr<uint8_t>(), out.data_ptr<scalar_t>());
      });
}

}  // namespace crelu_ext::gpu
