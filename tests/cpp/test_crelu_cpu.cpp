// Checks the CPU crelu_ext ops, called through the dispatcher as a libtorch
// user would, bit for bit against scalar loops written here from the spec in
// csrc/crelu.h, against at::cat({at::relu(x), at::relu(-x)}, dim) and against
// autograd through that composite. Exits nonzero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace {

using crelu_ext_test::check;
using crelu_ext_test::same_bits;

auto op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}
const auto crelu = op("crelu_ext::crelu")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, int64_t, bool)>();
using MaskedOp = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                            at::MemoryFormat);
const auto crelu_backward = op("crelu_ext::crelu_backward").typed<MaskedOp>();
const auto crelu_backward_backward =
    op("crelu_ext::crelu_backward_backward").typed<MaskedOp>();

// Dimensions in memory order, outermost first.
std::vector<int64_t> memory_order(int64_t ndim, at::MemoryFormat format) {
  if (format == at::MemoryFormat::ChannelsLast) return {0, 2, 3, 1};
  if (format == at::MemoryFormat::ChannelsLast3d) return {0, 2, 3, 4, 1};
  std::vector<int64_t> order(ndim);
  std::iota(order.begin(), order.end(), 0);
  return order;
}

// Random values in `format`, every 5th element (in memory order) special.
template <typename T>
at::Tensor make_input(at::IntArrayRef sizes, at::MemoryFormat format) {
  using lim = std::numeric_limits<T>;
  const T specials[] = {
      T(0.0f),           T(-0.0f),           lim::infinity(),
      -lim::infinity(),  lim::quiet_NaN(),   -lim::quiet_NaN(),
      lim::denorm_min(), -lim::denorm_min(), lim::max(),
      lim::lowest(),     lim::min()};
  const auto order = memory_order(sizes.size(), format);
  std::vector<int64_t> mem_sizes, inverse(order.size());
  for (size_t k = 0; k < order.size(); ++k) {
    mem_sizes.push_back(sizes[order[k]]);
    inverse[order[k]] = k;
  }
  at::Tensor x = at::randn(mem_sizes, c10::CppTypeToScalarType<T>::value);
  T* p = x.data_ptr<T>();
  for (int64_t i = 0; i < x.numel(); i += 5) {
    p[i] = specials[(i / 5) % std::size(specials)];
  }
  return x.permute(inverse);
}

// Checks all three ops on x; `format` is the memory format of the output.
template <typename T>
void check_ops(const at::Tensor& x, int64_t dim, at::MemoryFormat format) {
  using acc_t = std::conditional_t<sizeof(T) < 4, float, T>;
  const std::string name =
      c10::str(x.scalar_type(), x.sizes(), " ", format, " dim=", dim, ": ");
  const auto [out, mask] = crelu.call(x, dim, true);

  const at::Tensor cat = at::cat({at::relu(x), at::relu(-x)}, dim);
  check(same_bits(out, cat) && out.strides() == cat.strides(),
        name + "crelu == cat(relu(x), relu(-x))");
  const auto [out_only, no_mask] = crelu.call(x, dim, false);
  check(same_bits(out_only, out) && no_mask.numel() == 0,
        name + "save_mask=false");

  // Everything below is in memory order: x as [outer, inner] (the dims before
  // `dim` and the rest), the output as [outer, 2, inner].
  const auto order = memory_order(x.dim(), format);
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  const int64_t p = std::find(order.begin(), order.end(), d) - order.begin();
  int64_t outer = 1;
  for (int64_t k = 0; k < p; ++k) outer *= x.size(order[k]);
  const int64_t n = x.numel(), inner = outer == 0 ? 0 : n / outer;
  auto in_memory_order = [&](const at::Tensor& t, at::IntArrayRef shape) {
    return t.permute(order).contiguous().reshape(shape);
  };
  const at::Tensor xm = in_memory_order(x, {n});
  const T* xv = xm.const_data_ptr<T>();

  at::Tensor expected = at::empty({outer, 2, inner}, x.options());
  T* ev = expected.data_ptr<T>();
  std::vector<uint8_t> pos(n), neg(n);
  for (int64_t i = 0; i < n; ++i) {
    const T v = xv[i];
    const int64_t o = i / inner, r = i % inner;
    // relu keeps NaN and -0: relu(x) = x < 0 ? +0 : x, relu(-x) likewise.
    ev[(2 * o) * inner + r] = v < T(0) ? T(0) : v;
    ev[(2 * o + 1) * inner + r] = v > T(0) ? T(0) : static_cast<T>(-v);
    pos[i] = v > T(0) || v != v;
    neg[i] = v < T(0) || v != v;
  }
  check(same_bits(in_memory_order(out, {outer, 2, inner}), expected),
        name + "crelu == scalar loop");

  // Mask: blocks of 32 elements, each a little-endian pos word then neg word.
  bool mask_ok = mask.scalar_type() == at::kByte && mask.dim() == 1 &&
                 mask.numel() == (n + 31) / 32 * 8;
  for (int64_t i = 0; mask_ok && i < n; ++i) {
    const uint8_t* word = mask.const_data_ptr<uint8_t>() + i / 32 * 8;
    const int bit = i % 32;
    mask_ok = ((word[bit / 8] >> bit % 8) & 1) == pos[i] &&
              ((word[4 + bit / 8] >> bit % 8) & 1) == neg[i];
  }
  check(mask_ok, name + "mask bits");

  // Backward: grad_x = (pos ? g1 : 0) + -(neg ? g2 : 0), in acc_t.
  at::Tensor g = at::randn_like(out);
  g.masked_fill_(at::rand_like(g, at::kFloat) < 0.1, -0.0);
  const at::Tensor grad_x = crelu_backward.call(g, mask, dim, format);
  const at::Tensor gm = in_memory_order(g, {outer, 2, inner});
  const T* gv = gm.const_data_ptr<T>();
  at::Tensor expected_grad = at::empty({outer, inner}, x.options());
  T* egv = expected_grad.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = i / inner, r = i % inner;
    const acc_t t1 = pos[i] ? acc_t(gv[(2 * o) * inner + r]) : acc_t(0);
    const acc_t t2 = neg[i] ? acc_t(gv[(2 * o + 1) * inner + r]) : acc_t(0);
    egv[i] = static_cast<T>(t1 + (-t2));
  }
  check(grad_x.is_contiguous(format) &&
            same_bits(in_memory_order(grad_x, {outer, inner}), expected_grad),
        name + "crelu_backward == scalar loop");
  const at::Tensor xr = x.detach().requires_grad_();
  at::cat({at::relu(xr), at::relu(-xr)}, dim).backward(g);
  check(same_bits(grad_x, xr.grad()), name + "crelu_backward == autograd");

  // Double backward: out = [(pos ? gg : 0) + 0, (neg ? -gg : 0) + 0], with
  // x (and its special values) as gg; `expected` is reused.
  const at::Tensor gg = x.contiguous(format);
  const at::Tensor ggm = in_memory_order(gg, {n});
  const at::Tensor gg_out = crelu_backward_backward.call(gg, mask, dim, format);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = ggm.const_data_ptr<T>()[i];
    const int64_t o = i / inner, r = i % inner;
    ev[(2 * o) * inner + r] =
        static_cast<T>((pos[i] ? v : acc_t(0)) + acc_t(0));
    ev[(2 * o + 1) * inner + r] =
        static_cast<T>((neg[i] ? -v : acc_t(0)) + acc_t(0));
  }
  check(gg_out.is_contiguous(format) &&
            same_bits(in_memory_order(gg_out, {outer, 2, inner}), expected),
        name + "crelu_backward_backward == scalar loop");
}

template <typename T>
void check_dtype() {
  using MF = at::MemoryFormat;
  struct Case {
    std::vector<int64_t> sizes;
    int64_t dim;
    MF format;
  };
  const Case cases[] = {
      {{2, 3, 5, 7}, 0, MF::Contiguous},
      {{2, 3, 5, 7}, 1, MF::Contiguous},
      {{2, 3, 5, 7}, -1, MF::Contiguous},
      {{2, 3, 5, 7}, -4, MF::Contiguous},
      {{2, 3, 5, 7}, 1, MF::ChannelsLast},
      {{2, 3, 5, 7}, -1, MF::ChannelsLast},
      {{2, 3, 5, 7}, 2, MF::ChannelsLast},
      {{3, 37, 4, 5}, 1, MF::ChannelsLast},
      {{2, 64, 3, 3}, 1, MF::ChannelsLast},
      {{2, 3, 4, 5, 6}, 1, MF::ChannelsLast3d},
      {{4, 64}, 1, MF::Contiguous},
      {{4, 64}, 0, MF::Contiguous},
      {{1000}, 0, MF::Contiguous},
      {{5, 96, 3}, -2, MF::Contiguous},
      {{3, 50001}, 1, MF::Contiguous},
      {{0, 5}, 1, MF::Contiguous},
      // Outputs over 8 MiB, which the kernel may write with streaming stores.
      {{2, 2200001}, 1, MF::Contiguous},
  };
  for (const Case& c : cases) {
    check_ops<T>(make_input<T>(c.sizes, c.format), c.dim, c.format);
  }
  // A transposed (dense, not contiguous) input gives a contiguous output.
  check_ops<T>(make_input<T>({9, 7}, MF::Contiguous).t(), 0, MF::Contiguous);
}

template <typename E, typename F>
void check_throws(F f, const std::string& what) {
  try {
    f();
    check(false, what + " (nothing thrown)");
  } catch (const E&) {
    check(true, what);
  } catch (const std::exception& e) {
    check(false, what + " (wrong exception: " + e.what() + ")");
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_dtype<float>();
  check_dtype<double>();
  check_dtype<at::Half>();
  check_dtype<at::BFloat16>();

  check_throws<c10::TypeError>(
      [] { crelu.call(at::ones({4}, at::kInt), 0, false); }, "int input");
  check_throws<c10::IndexError>([] { crelu.call(at::ones({2, 3}), 2, false); },
                                "dim 2 of a 2-D tensor");
  check_throws<c10::IndexError>([] { crelu.call(at::ones({2, 3}), -3, false); },
                                "dim -3 of a 2-D tensor");

  return crelu_ext_test::report();
}
