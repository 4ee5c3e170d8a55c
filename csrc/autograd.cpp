// Autograd of the crelu_ext ops, registered at the Autograd key (as torchvision
// does for its ops), so that C++/libtorch callers get it as well as Python.
//
// Reverse mode: crelu saves only the packed 2-bit mask, and its backward is
// crelu_backward. crelu_backward and crelu_backward_backward are linear in
// their gradient input and each other's adjoints, so each one's backward is
// the other: every order of derivative works.
//
// Forward mode (torch.autograd.forward_ad, torch.func.jvp at level 0): each
// op's tangent is the tangent that autograd computes through the composition
// cat([relu(x), relu(-x)], dim), bit for bit (signed zeros included), as the
// generated VariableType code sets it: read the input's tangent, compute the
// output's, set it on the output.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "crelu.h"

namespace crelu_ext {
namespace {

using torch::autograd::variable_list;

using ForwardOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                     bool);
using MaskedOp = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                            at::MemoryFormat);

const c10::TypedOperatorHandle<ForwardOp>& crelu_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("crelu_ext::crelu", "")
                             .typed<ForwardOp>();
  return op;
}

const c10::TypedOperatorHandle<MaskedOp>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("crelu_ext::crelu_backward", "")
                             .typed<MaskedOp>();
  return op;
}

const c10::TypedOperatorHandle<MaskedOp>& backward_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("crelu_ext::crelu_backward_backward", "")
          .typed<MaskedOp>();
  return op;
}

// The forward-mode level that torch.autograd.forward_ad and functorch's jvp
// use (the only one torch supports).
constexpr uint64_t kLevel = 0;

// The grad_fn of an op's output. Every op here is linear in its tensor input
// and keeps only the mask of x, so its backward is `adjoint` applied to the
// incoming gradient with the same mask. A plain autograd Node, as generated
// VariableType code builds (functorch rejects torch::autograd::Function).
class AdjointNode : public torch::autograd::TraceableFunction {
 public:
  AdjointNode(const char* name,
              const c10::TypedOperatorHandle<MaskedOp>& adjoint, int64_t dim,
              at::MemoryFormat memory_format)
      : name_(name),
        adjoint_(adjoint),
        dim_(dim),
        memory_format_(memory_format) {}

  variable_list apply(variable_list&& grads) override {
    at::Tensor grad_input;
    if (grads[0].defined() && task_should_compute_output(0)) {
      grad_input =
          adjoint_.call(grads[0], mask_.unpack(), dim_, memory_format_);
    }
    return {grad_input};
  }

  std::string name() const override { return name_; }

  void release_variables() override { mask_.reset_data(); }

  torch::autograd::SavedVariable mask_;

 private:
  const char* name_;
  const c10::TypedOperatorHandle<MaskedOp>& adjoint_;
  int64_t dim_;
  at::MemoryFormat memory_format_;
};

// torch holds autograd nodes by std::shared_ptr up to 2.13 and by
// c10::intrusive_ptr since; Edge::function tells which this torch uses.
template <typename T>
using NodePtr =
    std::conditional_t<std::is_same_v<decltype(torch::autograd::Edge::function),
                                      std::shared_ptr<torch::autograd::Node>>,
                       std::shared_ptr<T>, c10::intrusive_ptr<T>>;

template <typename T, typename... Args>
NodePtr<T> make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr<T>, std::shared_ptr<T>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// The node for an op with tensor input `input`, when autograd records it.
// `memory_format_of` is called only then: reading x's strides would
// specialize symbolic sizes under torch.export.
template <typename MemoryFormatOf>
NodePtr<AdjointNode> record(const at::Tensor& input, const char* name,
                            const c10::TypedOperatorHandle<MaskedOp>& adjoint,
                            int64_t dim, MemoryFormatOf memory_format_of) {
  if (!torch::autograd::compute_requires_grad(input)) {
    return nullptr;
  }
  const at::MemoryFormat memory_format = memory_format_of();
  auto node = make_node<AdjointNode>(name, adjoint, dim, memory_format);
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  return node;
}

// The composition's tangent: cat's of relu's, threshold_backward(t, relu(x),
// 0), and of relu(-x)'s, threshold_backward(-t, relu(-x), 0). That is
// (pos ? t : +0, neg ? -t : +0), with -0 kept where t is -0.
at::Tensor crelu_tangent(const at::Tensor& x_t, const at::Tensor& out,
                         int64_t dim) {
  const int64_t size = x_t.size(dim);
  return at::cat(
      {at::threshold_backward(x_t, out.narrow(dim, 0, size), 0),
       at::threshold_backward(at::neg(x_t), out.narrow(dim, size, size), 0)},
      dim);
}

std::tuple<at::Tensor, at::Tensor> crelu_autograd(const at::Tensor& x,
                                                  int64_t dim, bool save_mask) {
  const auto grad_fn = record(x, "CreluBackward0", backward_op(), dim,
                              [&] { return output_memory_format(x); });
  auto [out, mask] = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    // The mask is written whenever the backward will need it.
    return crelu_op().call(x, dim, save_mask || grad_fn);
  }();
  if (grad_fn) {
    torch::autograd::set_history(out, grad_fn);
    grad_fn->mask_ = torch::autograd::SavedVariable(mask, /*is_output=*/false);
  }
  const at::Tensor& x_t = x._fw_grad(kLevel);
  if (x_t.defined()) {
    out._set_fw_grad(crelu_tangent(x_t, out, dim), kLevel,
                     /*is_inplace_op=*/false);
  }
  return {out, mask};
}

// crelu_backward and crelu_backward_backward: `op` is linear in `grad`, so its
// tangent is `op` itself, applied to the tangent after `tangent_input`.
at::Tensor masked_autograd(const c10::TypedOperatorHandle<MaskedOp>& op,
                           const char* name,
                           const c10::TypedOperatorHandle<MaskedOp>& adjoint,
                           at::Tensor (*tangent_input)(const at::Tensor&),
                           const at::Tensor& grad, const at::Tensor& mask,
                           int64_t dim, at::MemoryFormat memory_format) {
  const auto grad_fn =
      record(grad, name, adjoint, dim, [=] { return memory_format; });
  at::Tensor out = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(grad, mask, dim, memory_format);
  }();
  if (grad_fn) {
    torch::autograd::set_history(out, grad_fn);
    grad_fn->mask_ = torch::autograd::SavedVariable(mask, /*is_output=*/false);
  }
  const at::Tensor& grad_t = grad._fw_grad(kLevel);
  if (grad_t.defined()) {
    out._set_fw_grad(op.call(tangent_input(grad_t), mask, dim, memory_format),
                     kLevel,
                     /*is_inplace_op=*/false);
  }
  return out;
}

// The composition's backward computes threshold_backward(g, relu(x), 0), whose
// tangent autograd forms as zeros_like(relu(x)'s tangent) +
// threshold_backward(g_t, ...): the "+ 0" turns -0 into +0.
at::Tensor plus_zero(const at::Tensor& t) { return at::add(t, 0); }

at::Tensor as_is(const at::Tensor& t) { return t; }

}  // namespace

TORCH_LIBRARY_IMPL(crelu_ext, Autograd, m) {
  m.impl("crelu", &crelu_autograd);
  m.impl("crelu_backward",
         [](const at::Tensor& grad_out, const at::Tensor& mask, int64_t dim,
            at::MemoryFormat memory_format) {
           return masked_autograd(backward_op(), "CreluBackwardBackward0",
                                  backward_backward_op(), plus_zero, grad_out,
                                  mask, dim, memory_format);
         });
  m.impl("crelu_backward_backward", [](const at::Tensor& grad_grad_x,
                                       const at::Tensor& mask, int64_t dim,
                                       at::MemoryFormat memory_format) {
    return masked_autograd(backward_backward_op(),
                           "CreluBackwardBackwardBackward0", backward_op(),
                           as_is, grad_grad_x, mask, dim, memory_format);
  });
}

}  // namespace crelu_ext
