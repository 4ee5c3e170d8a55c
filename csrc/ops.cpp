// The crelu_ext ops: schemas, input checks and the layout plan. Each device's
// file registers its kernels (cpu/crelu_cpu.cpp, cuda/crelu_cuda.cu), autograd
// is in autograd.cpp; the fake kernels are registered from Python
// (crelu_ext/_native.py).
#include "ops.h"

#include <ATen/ExpandUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/MemoryFormat.h>
#include <torch/library.h>

#include <vector>

namespace crelu_ext {

LayoutPlan plan_layout(at::IntArrayRef sizes, int64_t dim,
                       at::MemoryFormat memory_format) {
  // Memory order of the dimensions, outermost first.
  std::vector<int64_t> order;
  switch (memory_format) {
    case at::MemoryFormat::ChannelsLast:
      order = {0, 2, 3, 1};
      break;
    case at::MemoryFormat::ChannelsLast3d:
      order = {0, 2, 3, 4, 1};
      break;
    default:
      for (int64_t d = 0; d < static_cast<int64_t>(sizes.size()); ++d) {
        order.push_back(d);
      }
  }
  LayoutPlan plan{1, 1};
  bool before_dim = true;
  for (int64_t d : order) {
    before_dim = before_dim && d != dim;
    (before_dim ? plan.outer : plan.inner) *= sizes[d];
  }
  return plan;
}

namespace {

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kFloat || dtype == at::kDouble,
                   "crelu_ext.", op, ": expected ", name,
                   " to be float16, bfloat16, float32 or float64, got ", dtype);
}

int64_t wrap_dim(const at::Tensor& t, int64_t dim, const char* op) {
  const int64_t ndim = t.dim();
  TORCH_CHECK(ndim > 0, "crelu_ext.", op,
              ": a zero-dimensional tensor cannot be concatenated; "
              "give it at least one dimension");
  TORCH_CHECK_INDEX(dim >= -ndim && dim < ndim, "crelu_ext.", op, ": dim ", dim,
                    " is out of range for a ", ndim,
                    "-D tensor (expected it in [", -ndim, ", ", ndim - 1, "])");
  return dim < 0 ? dim + ndim : dim;
}

// TensorBase::suggest_memory_format for a tensor of these sizes and strides.
at::MemoryFormat suggested_memory_format(at::IntArrayRef sizes,
                                         at::IntArrayRef strides) {
  if (c10::is_channels_last_strides_2d(sizes, strides)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (c10::is_channels_last_strides_3d(sizes, strides)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

// c10's compute_contiguous: dims of size 1 may have any stride.
bool has_contiguous_strides(at::IntArrayRef sizes, at::IntArrayRef strides) {
  int64_t expected = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    if (sizes[d] != 1) {
      if (strides[d] != expected) {
        return false;
      }
      expected *= sizes[d];
    }
  }
  return true;
}

}  // namespace

// The memory format of torch.cat([relu(x), relu(-x)], dim), for every dim.
// torch.cat allocates its output in the format its inputs' strides suggest,
// contiguous unless all agree; relu and neg lay out their outputs by
// TensorIterator's rules: canonical strides when the input is contiguous
// (checked first: size-1 dims make a tensor both) or channels_last
// contiguous, the input's strides when it is otherwise dense, else dense
// strides in the input's stride order. relu(-x) applies those rules twice.
// crelu_ext/_layout.py has the same function for the fake kernels.
at::MemoryFormat output_memory_format(const at::Tensor& x) {
  if ((x.dim() != 4 && x.dim() != 5) || x.is_contiguous()) {
    return at::MemoryFormat::Contiguous;
  }
  if (x.is_non_overlapping_and_dense()) {
    return x.is_contiguous(at::MemoryFormat::ChannelsLast)
               ? at::MemoryFormat::ChannelsLast
               : x.suggest_memory_format();
  }
  const std::vector<int64_t> strides =
      at::infer_dense_strides(x.sizes(), x.strides());
  if (has_contiguous_strides(x.sizes(), strides)) {
    return at::MemoryFormat::Contiguous;  // relu(-x) is laid out canonically
  }
  return suggested_memory_format(x.sizes(), strides);
}

namespace {

void check_memory_format(at::MemoryFormat memory_format, int64_t ndim,
                         const char* op) {
  TORCH_CHECK(
      memory_format == at::MemoryFormat::Contiguous ||
          (memory_format == at::MemoryFormat::ChannelsLast && ndim == 4) ||
          (memory_format == at::MemoryFormat::ChannelsLast3d && ndim == 5),
      "crelu_ext.", op, ": memory_format ", memory_format, " does not fit a ",
      ndim, "-D tensor");
}

void check_mask(const at::Tensor& mask, const at::Tensor& like, int64_t numel,
                const char* op) {
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1 &&
                  mask.is_contiguous() && mask.numel() == mask_bytes(numel),
              "crelu_ext.", op, ": expected the uint8 mask of ",
              mask_bytes(numel), " bytes saved by crelu_ext.crelu, got a ",
              mask.scalar_type(), " tensor of shape ", mask.sizes());
  TORCH_CHECK(mask.device() == like.device(), "crelu_ext.", op,
              ": the mask is on ", mask.device(), " but the gradient is on ",
              like.device());
  // The CPU kernels read it as uint32 words.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(mask.const_data_ptr()) % 4 == 0,
              "crelu_ext.", op, ": the mask must start on a 4-byte boundary");
}

std::vector<int64_t> with_dim_scaled(at::IntArrayRef sizes, int64_t dim,
                                     int64_t numerator, int64_t denominator) {
  std::vector<int64_t> scaled = sizes.vec();
  scaled[dim] = scaled[dim] * numerator / denominator;
  return scaled;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> crelu_forward_impl(ForwardKernel kernel,
                                                      const at::Tensor& x,
                                                      int64_t dim,
                                                      bool save_mask) {
  check_floating(x, "crelu", "x");
  dim = wrap_dim(x, dim, "crelu");
  const auto memory_format = output_memory_format(x);
  const at::Tensor input = x.contiguous(memory_format);
  at::Tensor out = at::empty(with_dim_scaled(x.sizes(), dim, 2, 1),
                             x.options().memory_format(memory_format));
  at::Tensor mask = save_mask ? at::empty({mask_bytes(x.numel())},
                                          x.options().dtype(at::kByte))
                              : at::empty({0}, x.options().dtype(at::kByte));
  if (x.numel() > 0) {
    at::Tensor mask_arg = save_mask ? mask : at::Tensor();
    kernel(input, plan_layout(x.sizes(), dim, memory_format), out, mask_arg);
  }
  return {out, mask};
}

at::Tensor crelu_backward_impl(MaskedKernel kernel, const at::Tensor& grad_out,
                               const at::Tensor& mask, int64_t dim,
                               at::MemoryFormat memory_format) {
  check_floating(grad_out, "crelu_backward", "grad_out");
  dim = wrap_dim(grad_out, dim, "crelu_backward");
  check_memory_format(memory_format, grad_out.dim(), "crelu_backward");
  TORCH_CHECK(grad_out.size(dim) % 2 == 0, "crelu_ext.crelu_backward: ",
              "grad_out must have an even size at dim ", dim, ", got ",
              grad_out.sizes());
  const auto x_sizes = with_dim_scaled(grad_out.sizes(), dim, 1, 2);
  at::Tensor grad_x =
      at::empty(x_sizes, grad_out.options().memory_format(memory_format));
  check_mask(mask, grad_out, grad_x.numel(), "crelu_backward");
  if (grad_x.numel() > 0) {
    kernel(grad_out.contiguous(memory_format), mask,
           plan_layout(x_sizes, dim, memory_format), grad_x);
  }
  return grad_x;
}

at::Tensor crelu_backward_backward_impl(MaskedKernel kernel,
                                        const at::Tensor& grad_grad_x,
                                        const at::Tensor& mask, int64_t dim,
                                        at::MemoryFormat memory_format) {
  const char* op = "crelu_backward_backward";
  check_floating(grad_grad_x, op, "grad_grad_x");
  dim = wrap_dim(grad_grad_x, dim, op);
  check_memory_format(memory_format, grad_grad_x.dim(), op);
  check_mask(mask, grad_grad_x, grad_grad_x.numel(), op);
  at::Tensor out =
      at::empty(with_dim_scaled(grad_grad_x.sizes(), dim, 2, 1),
                grad_grad_x.options().memory_format(memory_format));
  if (grad_grad_x.numel() > 0) {
    kernel(grad_grad_x.contiguous(memory_format), mask,
           plan_layout(grad_grad_x.sizes(), dim, memory_format), out);
  }
  return out;
}

TORCH_LIBRARY(crelu_ext, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  // save_mask: also return the packed sign mask that crelu_backward needs
  // (see crelu.h); otherwise the mask is empty and never written, unless
  // autograd records the call (autograd.cpp writes it then).
  m.def("crelu(Tensor x, int dim, bool save_mask) -> (Tensor, Tensor)", tags);
  m.def(
      "crelu_backward(Tensor grad_out, Tensor mask, int dim, "
      "MemoryFormat memory_format) -> Tensor",
      tags);
  m.def(
      "crelu_backward_backward(Tensor grad_grad_x, Tensor mask, int dim, "
      "MemoryFormat memory_format) -> Tensor",
      tags);
}

}  // namespace crelu_ext
