// The host grid emulator of the CUDA kernels, for tests: it runs, on CPU
// tensors, the launch a GPU would get (the same bodies, access path, offset
// width and grid), one (block, thread) after another, and registers the
// result as the CPU ops crelu_ext::emulated_crelu* (and emulated64_crelu*,
// 64-bit offsets forced). So CI checks the index math, the launch decisions
// and the mask bytes without a GPU (crelu_ext/testing/emulated.py). Built
// only with CRELU_EXT_TESTING=1, into a library of its own.
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../cuda/crelu_kernels.cuh"
#include "../ops.h"

namespace crelu_ext {
namespace gpu {
namespace {

// The host has no device to ask for its SM count: the emulator plans for an
// H100 SXM / H200 (132 SMs), the GPUs this project is checked on.
constexpr int kEmulatedSms = 132;

// The grid emulator: the launch OnGpu would make on a GPU of kEmulatedSms
// SMs, run on the host one (block, thread) after another. No CUDA call.
template <bool kForce64bit>
struct OnHostEmulator {
  template <template <typename, typename, typename> class BodyOf,
            typename scalar_t, typename... Pointers>
  static void run(const at::Tensor& /*any_input*/, int64_t numel, int64_t inner,
                  Pointers... pointers) {
    const GridPlan plan =
        plan_grid(numel, inner, kEmulatedSms, kForce64bit, pointers...);
    with_body<BodyOf, scalar_t>(
        plan, numel, inner,
        [&](const auto& body) {
          for (uint32_t block = 0; block < plan.blocks; ++block) {
            for (uint32_t thread = 0; thread < kThreads; ++thread) {
              run_thread(body, block, thread,
                         static_cast<uint32_t>(plan.blocks));
            }
          }
        },
        pointers...);
  }
};

// ---- the emulated ops ----
// Their outputs are filled with 0xFF bytes (NaN in every dtype) before the
// emulated launch: an element or mask byte that no thread writes shows up,
// where a GPU would leave whatever the allocator gave.

void poison(at::Tensor& t) {
  if (t.defined()) {
    std::memset(t.data_ptr(), 0xFF, t.nbytes());
  }
}

template <bool kForce64bit>
void emulated_forward(const at::Tensor& x, const LayoutPlan& plan,
                      at::Tensor& out, at::Tensor& mask) {
  poison(out);
  poison(mask);
  crelu_forward<OnHostEmulator<kForce64bit>>(x, plan, out, mask);
}

template <bool kForce64bit>
void emulated_backward(const at::Tensor& grad_out, const at::Tensor& mask,
                       const LayoutPlan& plan, at::Tensor& grad_x) {
  poison(grad_x);
  crelu_backward<OnHostEmulator<kForce64bit>>(grad_out, mask, plan, grad_x);
}

template <bool kForce64bit>
void emulated_backward_backward(const at::Tensor& grad_grad_x,
                                const at::Tensor& mask, const LayoutPlan& plan,
                                at::Tensor& out) {
  poison(out);
  crelu_backward_backward<OnHostEmulator<kForce64bit>>(grad_grad_x, mask, plan,
                                                       out);
}

// The launch the emulator plans for `numel` elements in rows of `inner` when
// its pointers are (or are not) 16-byte aligned: (vectorized, index bits,
// blocks). Lets tests check the decisions on sizes too large to run.
std::tuple<bool, int64_t, int64_t> emulated_launch_plan(int64_t numel,
                                                        int64_t inner,
                                                        bool aligned,
                                                        bool force_64bit) {
  const void* pointer = aligned ? nullptr : reinterpret_cast<const void*>(1);
  const GridPlan plan =
      plan_grid(numel, inner, kEmulatedSms, force_64bit, pointer);
  return {plan.vectorized, plan.index32 ? 32 : 64, plan.blocks};
}

// The emulated ops: the native ops' schemas (csrc/ops.cpp) under these
// prefixes; tests/ops/test_emulated.py checks that the two stay the same.
constexpr const char* kEmulatedPrefix = "emulated_";
constexpr const char* kEmulated64Prefix = "emulated64_";

}  // namespace
}  // namespace gpu

TORCH_LIBRARY_FRAGMENT(crelu_ext, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  for (const std::string prefix :
       {gpu::kEmulatedPrefix, gpu::kEmulated64Prefix}) {
    m.def((prefix + "crelu(Tensor x, int dim, bool save_mask) -> "
                    "(Tensor, Tensor)")
              .c_str(),
          tags);
    m.def((prefix + "crelu_backward(Tensor grad_out, Tensor mask, int dim, "
                    "MemoryFormat memory_format) -> Tensor")
              .c_str(),
          tags);
    m.def((prefix +
           "crelu_backward_backward(Tensor grad_grad_x, Tensor mask, int dim, "
           "MemoryFormat memory_format) -> Tensor")
              .c_str(),
          tags);
  }
  m.def(
      "emulated_launch_plan(int numel, int inner, bool aligned, "
      "bool force_64bit) -> (bool, int, int)",
      &gpu::emulated_launch_plan);
}

TORCH_LIBRARY_IMPL(crelu_ext, CPU, m) {
  register_kernels<gpu::emulated_forward<false>, gpu::emulated_backward<false>,
                   gpu::emulated_backward_backward<false>>(
      m, gpu::kEmulatedPrefix);
  register_kernels<gpu::emulated_forward<true>, gpu::emulated_backward<true>,
                   gpu::emulated_backward_backward<true>>(
      m, gpu::kEmulated64Prefix);
}

}  // namespace crelu_ext
