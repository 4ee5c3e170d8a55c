// The Python module crelu_ext._C: loading it loads the op library, and its
// crelu() is the eager fast path of crelu_ext.crelu. torch.ops' generic call
// parses the schema's arguments at every call and costs about two torch ops on
// a small tensor; this binding calls the same registered op through a typed
// handle, so autograd, autocast, the device kernels and the profiler still see
// crelu_ext::crelu. Errors reach Python as torch's own (c10::TypeError ->
// TypeError, c10::IndexError -> IndexError, ...).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <tuple>

namespace {

using CreluSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&,
                                                          int64_t, bool);

at::Tensor crelu(const at::Tensor& x, int64_t dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("crelu_ext::crelu", "")
                             .typed<CreluSignature>();
  // save_mask=false: the autograd kernel still writes the mask when it
  // records the call for backward.
  return std::get<0>(op.call(x, dim, /*save_mask=*/false));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def("crelu", torch::wrap_pybind_function(crelu), pybind11::arg("x"),
        pybind11::arg("dim"),
        "crelu_ext::crelu(x, dim, save_mask=False)[0], called directly");
}
