"""Which autograd modes a C++ ``torch::autograd::Function`` serves, in this torch.

csrc/autograd.cpp registers the ops' autograd as plain autograd nodes (torch's
generated-code style, torch/csrc/autograd internals) rather than through the public
``torch::autograd::Function``. This compiles a minimal op whose Autograd kernel is a
``torch::autograd::Function`` (``y = 2 * x``) and runs it under each mode crelu_ext
serves, printing what works and what raises.

    python tools/cpp_autograd_function_modes.py   # compiles with torch's cpp_extension (~1 min)
"""

import tempfile
import warnings

import torch
import torch.utils.cpp_extension

SOURCE = r"""
#include <torch/library.h>
#include <torch/autograd.h>

namespace {
at::Tensor twice_kernel(const at::Tensor& x) { return x * 2; }

struct Twice : public torch::autograd::Function<Twice> {
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("cpp_function_probe::twice", "")
                         .typed<at::Tensor(const at::Tensor&)>();
    return op.call(x);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    return {grads[0] * 2};
  }
};

at::Tensor twice_autograd(const at::Tensor& x) { return Twice::apply(x); }
}  // namespace

TORCH_LIBRARY(cpp_function_probe, m) { m.def("twice(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(cpp_function_probe, CPU, m) { m.impl("twice", &twice_kernel); }
TORCH_LIBRARY_IMPL(cpp_function_probe, Autograd, m) { m.impl("twice", &twice_autograd); }
"""


def main() -> None:
    # torch.jit.script, which forward mode loads its formulas with, warns of its deprecation.
    warnings.filterwarnings("ignore", category=FutureWarning)
    with tempfile.TemporaryDirectory() as build:
        torch.utils.cpp_extension.load_inline(
            "cpp_function_probe",
            cpp_sources=[SOURCE],
            is_python_module=False,
            build_directory=build,
        )
    twice = torch.ops.cpp_function_probe.twice
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, dtype=torch.float64)

    def reverse():
        (grad,) = torch.autograd.grad(twice(x).sum(), x, create_graph=True)
        return grad

    def forward_ad():
        from torch.autograd import forward_ad as fwad

        with fwad.dual_level():
            return fwad.unpack_dual(twice(fwad.make_dual(x.detach(), t))).tangent

    modes = {
        "reverse mode": reverse,
        "forward mode (torch.autograd.forward_ad)": forward_ad,
        "torch.func.grad": lambda: torch.func.grad(lambda v: twice(v).sum())(x.detach()),
        "torch.func.jvp": lambda: torch.func.jvp(twice, (x.detach(),), (t,))[1],
        "torch.func.vmap(grad)": lambda: torch.func.vmap(torch.func.grad(lambda v: twice(v).sum()))(
            x.detach().reshape(2, 2)
        ),
    }
    print(f"torch {torch.__version__}: torch::autograd::Function under each autograd mode")
    for name, run in modes.items():
        try:
            run()
        except Exception as error:  # what the mode raises is the finding
            message = str(error).strip().splitlines()[0][:150]
            print(f"  {name:42} raises {type(error).__name__}: {message}")
        else:
            print(f"  {name:42} works")


if __name__ == "__main__":
    main()
