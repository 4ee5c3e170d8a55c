// Autograd of the crelu_ext ops from a C++ program with no Python: forward,
// backward, double and triple backward and forward mode through
// crelu_ext::crelu, called through the dispatcher as a libtorch user would,
// bit for bit against autograd through at::cat({at::relu(x), at::relu(-x)}).
// Exits nonzero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/forward_grad.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"

namespace {

using crelu_ext_test::check;
using crelu_ext_test::same_bits;

const auto crelu_op = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("crelu_ext::crelu", "")
                          .typed<std::tuple<at::Tensor, at::Tensor>(
                              const at::Tensor&, int64_t, bool)>();

// As a user would write it: save_mask=false, and autograd writes the mask
// when it records the call.
at::Tensor crelu(const at::Tensor& x, int64_t dim) {
  return std::get<0>(crelu_op.call(x, dim, false));
}

at::Tensor composition(const at::Tensor& x, int64_t dim) {
  return at::cat({at::relu(x), at::relu(-x)}, dim);
}

// Random values, every 3rd element special: +-0, +-inf, NaN, subnormals.
at::Tensor make_input(at::IntArrayRef sizes, at::ScalarType dtype) {
  using lim = std::numeric_limits<double>;
  const double specials[] = {0.0,
                             -0.0,
                             lim::infinity(),
                             -lim::infinity(),
                             lim::quiet_NaN(),
                             lim::denorm_min(),
                             -lim::denorm_min(),
                             1.0,
                             -1.0};
  at::Tensor x = at::randn(sizes, at::kDouble);
  double* p = x.data_ptr<double>();
  for (int64_t i = 0; i < x.numel(); i += 3) {
    p[i] = specials[(i / 3) % std::size(specials)];
  }
  return x.to(dtype);
}

// Derivatives of the first, second and third order of f at x (reverse mode,
// create_graph all the way), and the tangent of f's output (forward mode).
template <typename F>
std::vector<at::Tensor> derivatives(F f, const at::Tensor& x0,
                                    const at::Tensor& g0, const at::Tensor& gg0,
                                    const at::Tensor& ggg0, int64_t dim) {
  const at::Tensor x = x0.clone().requires_grad_(true);
  const at::Tensor g = g0.clone().requires_grad_(true);
  const at::Tensor gg = gg0.clone().requires_grad_(true);
  const at::Tensor out = f(x, dim);
  const at::Tensor grad_x =
      torch::autograd::grad({out}, {x}, {g}, std::nullopt, true)[0];
  const at::Tensor grad_g =
      torch::autograd::grad({grad_x}, {g}, {gg}, std::nullopt, true)[0];
  const at::Tensor grad_gg = torch::autograd::grad({grad_g}, {gg}, {ggg0})[0];
  return {out, grad_x, grad_g, grad_gg};
}

template <typename F>
at::Tensor tangent(F f, const at::Tensor& x0, const at::Tensor& t0,
                   int64_t dim) {
  const uint64_t level = torch::autograd::ForwardADLevel::get_next_idx();
  const at::Tensor x = x0.clone();
  x._set_fw_grad(t0, level, /*is_inplace_op=*/false);
  const at::Tensor t = f(x, dim)._fw_grad(level).clone();
  torch::autograd::ForwardADLevel::release_idx(level);
  return t;
}

void check_case(at::IntArrayRef sizes, int64_t dim, at::ScalarType dtype) {
  const std::string name = c10::str(dtype, sizes, " dim=", dim, ": ");
  const at::Tensor x = make_input(sizes, dtype);
  std::vector<int64_t> out_sizes = sizes.vec();
  out_sizes[dim < 0 ? dim + sizes.size() : dim] *= 2;
  const at::Tensor g = make_input(out_sizes, dtype);
  const at::Tensor gg = make_input(sizes, dtype);
  const at::Tensor ggg = make_input(out_sizes, dtype);
  const auto actual = derivatives(crelu, x, g, gg, ggg, dim);
  const auto expected = derivatives(composition, x, g, gg, ggg, dim);
  const char* what[] = {"forward", "backward", "double backward",
                        "triple backward"};
  for (size_t i = 0; i < actual.size(); ++i) {
    check(same_bits(actual[i], expected[i]), name + what[i]);
  }
  const at::Tensor t = make_input(sizes, dtype);
  check(same_bits(tangent(crelu, x, t, dim), tangent(composition, x, t, dim)),
        name + "forward-mode tangent");

  // Only the mask is saved, and only when autograd records the call.
  const at::Tensor xr = x.clone().requires_grad_(true);
  const auto [out, mask] = crelu_op.call(xr, dim, false);
  check(mask.numel() == (x.numel() + 31) / 32 * 8 && out.requires_grad(),
        name + "mask written under autograd");
  {
    at::NoGradGuard no_grad;
    const auto [out_no_grad, no_mask] = crelu_op.call(xr, dim, false);
    check(no_mask.numel() == 0 && !out_no_grad.requires_grad(),
          name + "no mask without grad");
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    check_case({4, 6, 5}, 1, dtype);
    check_case({4, 6, 5}, -1, dtype);
    check_case({3, 70}, 0, dtype);
  }
  return crelu_ext_test::report();
}
