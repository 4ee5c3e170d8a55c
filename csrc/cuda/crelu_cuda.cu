// The CUDA registrations: the kernels of crelu_kernels.cuh launched on the
// tensors' GPU.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../ops.h"
#include "crelu_kernels.cuh"

namespace crelu_ext {
namespace gpu {
namespace {

// Runs the kernels on the tensors' GPU, on its current stream. Launches never
// synchronize the host, so they can be captured in graphs.
struct OnGpu {
  template <template <typename, typename, typename> class BodyOf,
            typename scalar_t, typename... Pointers>
  static void run(const at::Tensor& any_input, int64_t numel, int64_t inner,
                  Pointers... pointers) {
    const c10::cuda::CUDAGuard guard(any_input.device());
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const GridPlan plan =
        plan_grid(numel, inner, sms, /*force_64bit=*/false, pointers...);
    const auto stream = at::cuda::getCurrentCUDAStream();
    with_body<BodyOf, scalar_t>(
        plan, numel, inner,
        [&](const auto& body) {
          using Body = std::decay_t<decltype(body)>;
          crelu_kernel<Body>
              <<<plan.blocks, kThreads, 0, stream>>>(body.extent, pointers...);
        },
        pointers...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace gpu

TORCH_LIBRARY_IMPL(crelu_ext, CUDA, m) {
  register_kernels<gpu::crelu_forward<gpu::OnGpu>,
                   gpu::crelu_backward<gpu::OnGpu>,
                   gpu::crelu_backward_backward<gpu::OnGpu>>(m);
}

}  // namespace crelu_ext
